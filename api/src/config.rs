//! The daemon configuration file (TOML), shared by `metro-node` and
//! `metro-witness`, rendered by Ansible and by `metroctl lab up`.
//!
//! Outer config (serde, as written by operators) is converted into a validated
//! [`DaemonConfig`] by [`DaemonConfig::load`]. Every error names the file, the
//! key and the reason. Unknown keys are refused (a typo must never be ignored).
//! The commented template lives in `api/metro.toml.example`; a test parses it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("config {file}: key `{key}`: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Storage,
    Storageless,
    Witness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    Data,
    Witness,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    pub kind: SiteKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// gRPC: control API and internal services, mutual TLS.
    pub api: SocketAddr,
    /// NBD exports (storage nodes only).
    #[serde(default)]
    pub nbd: Option<SocketAddr>,
    /// Replication links (storage nodes only), TLS.
    #[serde(default)]
    pub replication: Option<SocketAddr>,
    /// Prometheus `/metrics` over plain HTTP.
    pub metrics: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Deadline for every etcd call, in milliseconds.
    #[serde(default = "default_etcd_timeout_ms")]
    pub timeout_ms: u64,
    /// CA that signed etcd's server certificate. Setting it turns on TLS to
    /// etcd; every endpoint must then be `https://`.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate for etcd's `--client-cert-auth` (needs `key`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Private key of `cert`: must not be readable by group or world.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl EtcdConfig {
    /// True when the daemon talks TLS to etcd.
    pub fn tls(&self) -> bool {
        self.ca_cert.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    /// Private key: must not be readable by group or world.
    pub key: PathBuf,
}

/// Quorum timings. Defaults follow DESIGN.md section 7.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuorumConfig {
    /// Voters per data site (1 or 2); the witness is always the extra voter.
    pub voters_per_site: u8,
    /// Site that wins a tie when the two data sites cannot see each other.
    pub preferred_site: Option<String>,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub lease_ms: u64,
    /// Bound on clock-rate drift between nodes over one lease period.
    pub drift_margin_ms: u64,
    /// A node unheard-of for this long is considered lost.
    pub node_loss_ms: u64,
    /// A site must stay reachable this long before it counts as active again.
    pub site_stable_ms: u64,
}

impl Default for QuorumConfig {
    fn default() -> Self {
        Self {
            voters_per_site: 1,
            preferred_site: None,
            // openraft 0.9 uses heartbeat_ms as the deadline of every
            // AppendEntries, so it must exceed the worst round trip to the
            // witness (200 ms supported, tests/tests/witness_latency.rs);
            // with less, a far witness never acknowledges an entry and a
            // site loss cannot commit a failover. Elections are tuned for
            // RTO (docs/benchmarks.md, rto): an openraft follower campaigns
            // only after election_timeout_max (its leader lease) plus a
            // random election timeout, ~1.9 s here (3-4 s with 1000/2000),
            // before the new leader waits lease_ms + drift_margin_ms.
            heartbeat_ms: 250,
            election_timeout_min_ms: 750,
            election_timeout_max_ms: 1000,
            lease_ms: 2000,
            drift_margin_ms: 500,
            node_loss_ms: 2000,
            site_stable_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Capacity offered for thin volumes; 0 = the free space of `data_dir`.
    pub capacity_bytes: u64,
    pub replica_ack_timeout_ms: u64,
    pub dirty_region_bytes: u64,
    pub activity_extent_bytes: u64,
    /// Largest NBD request accepted, in bytes.
    pub max_request_bytes: u32,
    /// TEST ONLY (the lab's power-cut mode, `metroctl lab up --power-cut-mode`):
    /// keep every unflushed write to volume data in the daemon's own memory,
    /// so `kill -9` loses it as a power cut loses the page cache. Never set
    /// this in production: a daemon crash then loses acknowledged writes
    /// that were not flushed. Accepted on storage nodes only; the daemon
    /// logs a warning at startup and for every volume it opens.
    pub volatile_write_cache: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 0,
            replica_ack_timeout_ms: 1000,
            dirty_region_bytes: 64 * 1024,
            activity_extent_bytes: 4 * 1024 * 1024,
            max_request_bytes: 32 * 1024 * 1024,
            volatile_write_cache: false,
        }
    }
}

/// One daemon's configuration (`metro-node` or `metro-witness`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    pub cluster: String,
    pub node_id: String,
    pub site: String,
    pub role: Role,
    pub data_dir: PathBuf,
    /// Address other daemons and clients use to reach this one (defaults to the listen address).
    #[serde(default)]
    pub advertise: Option<String>,
    pub sites: Vec<SiteConfig>,
    pub listen: ListenConfig,
    pub etcd: EtcdConfig,
    pub tls: TlsConfig,
    #[serde(default)]
    pub quorum: QuorumConfig,
    #[serde(default)]
    pub storage: StorageConfig,
}

fn default_etcd_timeout_ms() -> u64 {
    2000
}

impl DaemonConfig {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "-".into(),
            reason: format!("cannot read the file: {e}"),
        })?;
        Self::parse(&file, &text)
    }

    /// Parse and validate config text; `file` is only used in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let cfg: DaemonConfig = toml::from_str(text).map_err(|e| {
            let key = e
                .message()
                .split('`')
                .nth(1)
                .map(str::to_string)
                .or_else(|| e.span().and_then(|s| key_at(text, s.start)))
                .unwrap_or_else(|| "-".into());
            let line = e.span().map(|s| text[..s.start].lines().count().max(1)).unwrap_or(0);
            ConfigError { file: file.into(), key, reason: format!("line {line}: {}", e.message()) }
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: &str, reason: String| ConfigError { file: file.into(), key: key.into(), reason };
        if self.cluster.is_empty() || !valid_name(&self.cluster) {
            return Err(err("cluster", "must be a non-empty name of [a-z0-9-]".into()));
        }
        if !valid_name(&self.node_id) {
            return Err(err("node_id", format!("`{}` is not a name of [a-z0-9-]", self.node_id)));
        }
        let mut names = BTreeSet::new();
        for s in &self.sites {
            if !valid_name(&s.name) || !names.insert(s.name.clone()) {
                return Err(err("sites", format!("site `{}` is invalid or listed twice", s.name)));
            }
        }
        let data = self.sites.iter().filter(|s| s.kind == SiteKind::Data).count();
        let witness = self.sites.iter().filter(|s| s.kind == SiteKind::Witness).count();
        if data != 2 || witness != 1 {
            return Err(err(
                "sites",
                format!("a stretch cluster has exactly 2 data sites and 1 witness site; found {data} data and {witness} witness"),
            ));
        }
        let Some(mine) = self.sites.iter().find(|s| s.name == self.site) else {
            return Err(err(
                "site",
                format!(
                    "`{}` is not one of the cluster's sites ({})",
                    self.site,
                    names.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        };
        match (self.role, mine.kind) {
            (Role::Witness, SiteKind::Witness) | (Role::Storage | Role::Storageless, SiteKind::Data) => {}
            (role, kind) => {
                return Err(err(
                    "role",
                    format!("role {role:?} cannot run in a {kind:?} site `{}`", self.site),
                ))
            }
        }
        if let Some(p) = &self.quorum.preferred_site {
            if !self.sites.iter().any(|s| &s.name == p && s.kind == SiteKind::Data) {
                return Err(err("quorum.preferred_site", format!("`{p}` is not a data site")));
            }
        }
        if !(1..=2).contains(&self.quorum.voters_per_site) {
            return Err(err("quorum.voters_per_site", "must be 1 or 2".into()));
        }
        let q = &self.quorum;
        if q.heartbeat_ms == 0 || q.heartbeat_ms * 3 > q.election_timeout_min_ms {
            return Err(err(
                "quorum.heartbeat_ms",
                "must be > 0 and at most a third of election_timeout_min_ms".into(),
            ));
        }
        if q.election_timeout_min_ms >= q.election_timeout_max_ms {
            return Err(err(
                "quorum.election_timeout_max_ms",
                "must be greater than election_timeout_min_ms".into(),
            ));
        }
        if q.lease_ms < 2 * q.heartbeat_ms || q.drift_margin_ms == 0 {
            return Err(err(
                "quorum.lease_ms",
                "must be at least two heartbeats, with a non-zero drift_margin_ms".into(),
            ));
        }
        if self.etcd.endpoints.is_empty() {
            return Err(err("etcd.endpoints", "needs at least one endpoint".into()));
        }
        let e = &self.etcd;
        if e.cert.is_some() != e.key.is_some() {
            return Err(err("etcd.cert", "`cert` and `key` go together: set both or neither".into()));
        }
        if e.cert.is_some() && e.ca_cert.is_none() {
            return Err(err("etcd.ca_cert", "a client certificate needs TLS: set `ca_cert` too".into()));
        }
        let scheme = if e.tls() { "https://" } else { "http://" };
        if let Some(bad) = e.endpoints.iter().find(|u| !u.starts_with(scheme)) {
            return Err(err(
                "etcd.endpoints",
                format!(
                    "`{bad}` must start with {scheme} ({})",
                    if e.tls() {
                        "ca_cert is set, so etcd is reached over TLS"
                    } else {
                        "set ca_cert to use https"
                    }
                ),
            ));
        }
        if self.role == Role::Storage && (self.listen.nbd.is_none() || self.listen.replication.is_none()) {
            return Err(err("listen", "a storage node needs `nbd` and `replication` addresses".into()));
        }
        let st = &self.storage;
        if !st.dirty_region_bytes.is_power_of_two() || st.dirty_region_bytes < 4096 {
            return Err(err("storage.dirty_region_bytes", "must be a power of two of at least 4096".into()));
        }
        if !st.activity_extent_bytes.is_power_of_two() || st.activity_extent_bytes < st.dirty_region_bytes {
            return Err(err(
                "storage.activity_extent_bytes",
                "must be a power of two, at least dirty_region_bytes".into(),
            ));
        }
        if st.max_request_bytes < 4096 || st.max_request_bytes > 128 * 1024 * 1024 {
            return Err(err("storage.max_request_bytes", "must be between 4 KiB and 128 MiB".into()));
        }
        if st.volatile_write_cache && self.role != Role::Storage {
            return Err(err(
                "storage.volatile_write_cache",
                "is a test-only mode for storage nodes (it keeps volume writes in memory); remove it".into(),
            ));
        }
        Ok(())
    }

    /// Check that the TLS files exist and the key is private. Separate from
    /// parsing so that config templates can be checked without certificates.
    pub fn check_secrets(&self, file: &str) -> Result<(), ConfigError> {
        let mut files = vec![
            ("tls.ca_cert", &self.tls.ca_cert),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ];
        for (key, path) in [
            ("etcd.ca_cert", &self.etcd.ca_cert),
            ("etcd.cert", &self.etcd.cert),
            ("etcd.key", &self.etcd.key),
        ] {
            if let Some(p) = path {
                files.push((key, p));
            }
        }
        for (key, path) in files {
            let meta = std::fs::metadata(path).map_err(|e| ConfigError {
                file: file.into(),
                key: key.into(),
                reason: format!("{}: {e}", path.display()),
            })?;
            if key.ends_with(".key") {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode();
                if mode & 0o044 != 0 {
                    return Err(ConfigError {
                        file: file.into(),
                        key: key.into(),
                        reason: format!(
                            "{} is readable by group or world (mode {:o}); run `chmod 600 {}`",
                            path.display(),
                            mode & 0o777,
                            path.display()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Host part other daemons use to reach this one.
    pub fn advertise_host(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.api.ip().to_string())
    }
}

/// The dotted key (`table.key`) of the `key = value` line holding byte
/// `pos` of `text`, for errors whose message does not name it (a value of
/// the wrong type).
fn key_at(text: &str, pos: usize) -> Option<String> {
    let start = text.get(..pos)?.rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_string(),
    })
}

/// Names are lowercase ASCII letters, digits and dashes, 1..=63 chars.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = include_str!("../metro.toml.example");

    #[test]
    fn the_shipped_template_parses_and_validates() {
        let cfg = DaemonConfig::parse("metro.toml.example", TEMPLATE).expect("template must parse");
        assert_eq!(cfg.role, Role::Storage);
        assert_eq!(cfg.quorum.lease_ms, 2000);
        assert_eq!(cfg.sites.len(), 3);
    }

    #[test]
    fn an_unknown_key_is_refused_with_file_and_key() {
        let text = TEMPLATE.replace("[quorum]", "[quorum]\nleese_ms = 5");
        let e = DaemonConfig::parse("x.toml", &text).unwrap_err();
        assert_eq!(e.key, "leese_ms", "{e}");
        assert!(e.to_string().starts_with("config x.toml: key `leese_ms`"), "{e}");
    }

    #[test]
    fn an_unknown_site_is_refused() {
        let text = TEMPLATE.replace("site = \"dc-a\"", "site = \"dc-z\"");
        let e = DaemonConfig::parse("x.toml", &text).unwrap_err();
        assert_eq!(e.key, "site");
        assert!(e.reason.contains("dc-z"));
    }

    #[test]
    fn two_witness_sites_are_refused() {
        let text = TEMPLATE.replace(
            "kind = \"data\"\n\n[[sites]]\nname = \"dc-b\"",
            "kind = \"witness\"\n\n[[sites]]\nname = \"dc-b\"",
        );
        let e = DaemonConfig::parse("x.toml", &text).unwrap_err();
        assert_eq!(e.key, "sites", "{e}");
    }

    #[test]
    fn etcd_tls_keys_parse_and_need_https_endpoints() {
        let tls = "[etcd]\nca_cert = \"/etc/metro/etcd-ca.pem\"\ncert = \"/etc/metro/etcd.pem\"\nkey = \"/etc/metro/etcd.key\"";
        let https = TEMPLATE.replace("[etcd]", tls).replace("http://", "https://");
        let cfg = DaemonConfig::parse("x.toml", &https).expect("https endpoints with TLS parse");
        assert!(cfg.etcd.tls());
        assert_eq!(cfg.etcd.key.as_deref(), Some(Path::new("/etc/metro/etcd.key")));
        let plain = TEMPLATE.replace("[etcd]", tls);
        let e = DaemonConfig::parse("x.toml", &plain).unwrap_err();
        assert_eq!(e.key, "etcd.endpoints", "{e}");
        assert!(e.reason.contains("must start with https://"), "{e}");
        let no_key = https.replace("key = \"/etc/metro/etcd.key\"\n", "");
        let e = DaemonConfig::parse("x.toml", &no_key).unwrap_err();
        assert_eq!(e.key, "etcd.cert", "{e}");
    }

    #[test]
    fn the_test_only_volatile_write_cache_parses_and_a_bad_value_names_the_key() {
        let cfg = DaemonConfig::parse("x.toml", TEMPLATE).unwrap();
        assert!(!cfg.storage.volatile_write_cache, "off by default");
        let with = |v: &str| TEMPLATE.replace("[storage]", &format!("[storage]\nvolatile_write_cache = {v}"));
        let cfg = DaemonConfig::parse("x.toml", &with("true")).expect("true parses");
        assert!(cfg.storage.volatile_write_cache);
        let e = DaemonConfig::parse("x.toml", &with("\"yes\"")).unwrap_err();
        assert_eq!(e.key, "storage.volatile_write_cache", "the key is named: {e}");
        let storageless = with("true").replace("role = \"storage\"", "role = \"storageless\"");
        let e = DaemonConfig::parse("x.toml", &storageless).unwrap_err();
        assert_eq!(e.key, "storage.volatile_write_cache", "{e}");
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let e = DaemonConfig::parse("x.toml", "cluster = \n").unwrap_err();
        assert!(e.reason.contains("line 1"), "{e}");
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = DaemonConfig::parse("t", TEMPLATE).unwrap();
        for (p, name) in
            [(&mut cfg.tls.ca_cert, "ca.pem"), (&mut cfg.tls.cert, "c.pem"), (&mut cfg.tls.key, "k.pem")]
        {
            *p = dir.path().join(name);
            std::fs::write(&*p, "x").unwrap();
        }
        std::fs::set_permissions(&cfg.tls.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = cfg.check_secrets("t").unwrap_err();
        assert_eq!(e.key, "tls.key");
        assert!(e.reason.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&cfg.tls.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        cfg.check_secrets("t").unwrap();

        // The etcd client key is held to the same rule.
        let (ca, cert, key) =
            (dir.path().join("e-ca.pem"), dir.path().join("e.pem"), dir.path().join("e.key"));
        for p in [&ca, &cert, &key] {
            std::fs::write(p, "x").unwrap();
        }
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        (cfg.etcd.ca_cert, cfg.etcd.cert, cfg.etcd.key) = (Some(ca), Some(cert), Some(key.clone()));
        let e = cfg.check_secrets("t").unwrap_err();
        assert_eq!(e.key, "etcd.key", "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        cfg.check_secrets("t").unwrap();
    }
}
