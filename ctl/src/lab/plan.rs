//! Turning [`LabOptions`] into a concrete plan: the [`LabInfo`] (paths,
//! addresses, commands; no pids yet), the daemon configs and the certificates.
//!
//! Directory layout:
//!
//! ```text
//! DIR/lab.json
//! DIR/certs/{ca,node-a1,…,witness,admin-lab,viewer-lab}.{pem,key}
//! DIR/config/<id>.toml   DIR/logs/<id>.log
//! DIR/nodes/<id>/        DIR/etcd/<name>/   (created by etcd itself, mode 0700)
//! ```

use super::info::{DaemonInfo, EtcdInfo, LabInfo, ProcInfo, SiteInfo};
use super::topology::{self as topo, DaemonDef, Kind};
use super::{LabError, LabOptions, NetMode};
use crate::certs;
use metro_api::config::{
    DaemonConfig, EtcdConfig, ListenConfig, QuorumConfig, Role, SiteConfig, SiteKind, StorageConfig,
    TlsConfig,
};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Name of the lab's admin and viewer identities (`admin:lab`, `viewer:lab`).
const CLIENT_NAME: &str = "lab";
/// Site that wins a dc-a/dc-b tie in the lab.
const PREFERRED_SITE: &str = "dc-a";

/// `--dir`, else `METRO_LAB_DIR`, else `./lab`.
pub fn default_dir() -> PathBuf {
    std::env::var_os("METRO_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("lab"))
}

/// `METRO_BIN_DIR`, else the directory of the running executable (for a test
/// binary in `target/debug/deps`, its parent `target/debug`).
pub fn default_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("METRO_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        return dir.parent().map(Path::to_path_buf).unwrap_or(dir);
    }
    dir
}

fn role_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Storage => "storage",
        Kind::Witness => "witness",
        Kind::Etcd => "etcd",
    }
}

fn cn_of(d: &DaemonDef) -> String {
    match d.kind {
        Kind::Witness => "witness".into(),
        _ => format!("node:{}", d.id),
    }
}

fn daemon_command(opts: &LabOptions, d: &DaemonDef, info: &DaemonInfo) -> Vec<String> {
    let Some(tpl) = &opts.daemon_override else {
        let bin = if d.kind == Kind::Witness { "metro-witness" } else { "metro-node" };
        return vec![
            opts.bin_dir.join(bin).display().to_string(),
            "--config".into(),
            info.config.display().to_string(),
        ];
    };
    tpl.iter()
        .map(|a| {
            a.replace("{id}", d.id)
                .replace("{site}", d.site)
                .replace("{role}", role_name(d.kind))
                .replace("{address}", &info.address)
                .replace("{config}", &info.config.display().to_string())
                .replace("{data_dir}", &info.data_dir.display().to_string())
                .replace("{api_port}", &topo::PORT_API.to_string())
                .replace("{metrics_port}", &topo::PORT_METRICS.to_string())
        })
        .collect()
}

fn etcd_command(etcd: &EtcdInfo, initial_cluster: &str) -> Vec<String> {
    let data_dir = etcd.data_dir.display().to_string();
    let flags: [(&str, &str); 11] = [
        ("data-dir", &data_dir),
        ("listen-client-urls", &etcd.client_url),
        ("advertise-client-urls", &etcd.client_url),
        ("listen-peer-urls", &etcd.peer_url),
        ("initial-advertise-peer-urls", &etcd.peer_url),
        ("initial-cluster", initial_cluster),
        ("initial-cluster-state", "new"),
        ("initial-cluster-token", "metro-lab"),
        ("logger", "zap"),
        ("log-outputs", "stderr"),
        // Last on purpose: process liveness matches on the last argument.
        ("name", &etcd.name),
    ];
    let mut v: Vec<String> = vec!["etcd".into(), "--pre-vote".into()];
    for (k, val) in flags {
        v.push(format!("--{k}"));
        v.push(val.to_string());
    }
    v
}

/// The full plan for `mode` in the (absolute) directory `dir`.
pub fn build(opts: &LabOptions, dir: &Path, mode: NetMode) -> LabInfo {
    let certs = dir.join("certs");
    let base = topo::base(mode, opts.loopback_octet);
    let ns_of = |id: &str| (mode == NetMode::Netns).then(|| topo::netns(id));
    let proc_of = |id: &str, cwd: PathBuf| ProcInfo {
        pid: None,
        command: vec![],
        log: dir.join("logs").join(format!("{id}.log")),
        cwd,
    };
    let mut etcd: Vec<EtcdInfo> = topo::DAEMONS
        .iter()
        .filter(|d| d.kind == Kind::Etcd)
        .map(|d| {
            let addr = topo::address(base, d);
            EtcdInfo {
                name: d.id.into(),
                site: d.site.into(),
                netns: ns_of(d.id),
                address: addr.to_string(),
                client_url: format!("http://{addr}:{}", topo::PORT_ETCD_CLIENT),
                peer_url: format!("http://{addr}:{}", topo::PORT_ETCD_PEER),
                data_dir: dir.join("etcd").join(d.id),
                proc: proc_of(d.id, dir.join("etcd")),
            }
        })
        .collect();
    let initial: Vec<String> = etcd.iter().map(|e| format!("{}={}", e.name, e.peer_url)).collect();
    let initial = initial.join(",");
    for e in &mut etcd {
        e.proc.command = etcd_command(e, &initial);
    }
    let mut daemons: Vec<DaemonInfo> = topo::DAEMONS
        .iter()
        .filter(|d| d.kind != Kind::Etcd)
        .map(|d| {
            let addr = topo::address(base, d);
            let storage = d.kind == Kind::Storage;
            let stem = certs::file_stem(&cn_of(d));
            let data_dir = dir.join("nodes").join(d.id);
            let mut info = DaemonInfo {
                id: d.id.into(),
                site: d.site.into(),
                role: role_name(d.kind).into(),
                netns: ns_of(d.id),
                address: addr.to_string(),
                api: format!("https://{addr}:{}", topo::PORT_API),
                nbd: storage.then(|| format!("{addr}:{}", topo::PORT_NBD)),
                repl: storage.then(|| format!("{addr}:{}", topo::PORT_REPL)),
                metrics: format!("http://{addr}:{}/metrics", topo::PORT_METRICS),
                config: dir.join("config").join(format!("{}.toml", d.id)),
                cert: certs.join(format!("{stem}.pem")),
                key: certs.join(format!("{stem}.key")),
                proc: proc_of(d.id, data_dir.clone()),
                data_dir,
            };
            info.proc.command = daemon_command(opts, d, &info);
            info
        })
        .collect();
    let witness = daemons.pop().expect("the witness is the last daemon");
    debug_assert_eq!(witness.role, "witness");
    let client = |role: &str, ext: &str| certs.join(format!("{role}-{CLIENT_NAME}.{ext}"));
    LabInfo {
        cluster: topo::CLUSTER.into(),
        dir: dir.to_path_buf(),
        ca_cert: certs.join("ca.pem"),
        admin_cert: client("admin", "pem"),
        admin_key: client("admin", "key"),
        viewer_cert: client("viewer", "pem"),
        viewer_key: client("viewer", "key"),
        client_cert: client("client", "pem"),
        client_key: client("client", "key"),
        etcd_endpoints: etcd.iter().map(|e| e.client_url.clone()).collect(),
        sites: topo::SITES
            .iter()
            .map(|s| SiteInfo { name: s.name.into(), kind: if s.data { "data" } else { "witness" }.into() })
            .collect(),
        nodes: daemons,
        witness,
        etcd,
        mode,
        ready: false,
        network: false,
        nft_table: topo::nft_table(mode, opts.loopback_octet),
        switch_netns: (mode == NetMode::Netns).then(|| topo::SWITCH_NS.to_string()),
        partitions: vec![],
        timing_scale: opts.timing_scale.max(1),
        power_cut_mode: opts.power_cut_mode,
    }
}

/// Create the CA (kept if present) and every missing certificate.
pub fn issue_certs(info: &LabInfo) -> Result<(), LabError> {
    let dir = info.dir.join("certs");
    let (ca, _) = certs::init(&dir)?;
    let mut wanted: Vec<(String, Vec<IpAddr>)> = vec![
        (format!("admin:{CLIENT_NAME}"), vec![]),
        (format!("viewer:{CLIENT_NAME}"), vec![]),
        (format!("client:{CLIENT_NAME}"), vec![]),
    ];
    for d in info.nodes.iter().chain(std::iter::once(&info.witness)) {
        let def = topo::daemon(&d.id).expect("planned daemons are in the topology");
        let ip: IpAddr = d.address.parse().expect("planned addresses are IPs");
        wanted.push((cn_of(def), vec![ip, IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)]));
    }
    for (cn, ips) in wanted {
        let stem = certs::file_stem(&cn);
        if dir.join(format!("{stem}.pem")).exists() && dir.join(format!("{stem}.key")).exists() {
            continue;
        }
        let pair = certs::issue(&ca, &cn, &ips, &[], certs::DEFAULT_VALIDITY_DAYS)?;
        certs::write_pair(&dir, &stem, &pair)?;
    }
    Ok(())
}

fn sock(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().expect("planned addresses are IPs"), port)
}

/// The `metro_api` config of one daemon, validated by a parse round trip.
pub fn daemon_config(info: &LabInfo, d: &DaemonInfo) -> Result<DaemonConfig, LabError> {
    let storage = d.role == "storage";
    let cfg = DaemonConfig {
        cluster: info.cluster.clone(),
        node_id: d.id.clone(),
        site: d.site.clone(),
        role: if storage { Role::Storage } else { Role::Witness },
        data_dir: d.data_dir.clone(),
        advertise: Some(d.address.clone()),
        sites: info
            .sites
            .iter()
            .map(|s| SiteConfig {
                name: s.name.clone(),
                kind: if s.kind == "data" { SiteKind::Data } else { SiteKind::Witness },
            })
            .collect(),
        listen: ListenConfig {
            api: sock(&d.address, topo::PORT_API),
            nbd: storage.then(|| sock(&d.address, topo::PORT_NBD)),
            replication: storage.then(|| sock(&d.address, topo::PORT_REPL)),
            metrics: sock(&d.address, topo::PORT_METRICS),
        },
        etcd: EtcdConfig {
            endpoints: info.etcd_endpoints.clone(),
            timeout_ms: 2000,
            ca_cert: None,
            cert: None,
            key: None,
        },
        tls: TlsConfig { ca_cert: info.ca_cert.clone(), cert: d.cert.clone(), key: d.key.clone() },
        quorum: scaled_quorum(info.timing_scale),
        storage: StorageConfig {
            volatile_write_cache: storage && info.power_cut_mode,
            ..StorageConfig::default()
        },
    };
    let text = toml::to_string(&cfg).map_err(|e| LabError::Config(e.to_string()))?;
    let back = DaemonConfig::parse(&d.config.display().to_string(), &text)
        .map_err(|e| LabError::Config(e.to_string()))?;
    debug_assert_eq!(back, cfg);
    Ok(cfg)
}

/// The lab's quorum settings: the defaults with every timing times `k`
/// (which keeps every relation the config check enforces).
fn scaled_quorum(k: u32) -> QuorumConfig {
    let d = QuorumConfig::default();
    let k = u64::from(k.max(1));
    QuorumConfig {
        preferred_site: Some(PREFERRED_SITE.into()),
        heartbeat_ms: d.heartbeat_ms * k,
        election_timeout_min_ms: d.election_timeout_min_ms * k,
        election_timeout_max_ms: d.election_timeout_max_ms * k,
        lease_ms: d.lease_ms * k,
        drift_margin_ms: d.drift_margin_ms * k,
        node_loss_ms: d.node_loss_ms * k,
        ..d
    }
}

/// Write every daemon's config file and create the data and log directories.
pub fn write_configs(info: &LabInfo) -> Result<(), LabError> {
    for sub in ["config", "logs", "etcd", "nodes"] {
        let p = info.dir.join(sub);
        std::fs::create_dir_all(&p).map_err(LabError::io(&p))?;
    }
    for d in info.nodes.iter().chain(std::iter::once(&info.witness)) {
        std::fs::create_dir_all(&d.data_dir).map_err(LabError::io(&d.data_dir))?;
        let cfg = daemon_config(info, d)?;
        let text = toml::to_string(&cfg).map_err(|e| LabError::Config(e.to_string()))?;
        let header = format!(
            "# Written by `metroctl lab up` for {} (site {}); rewritten on every up.\n",
            d.id, d.site
        );
        std::fs::write(&d.config, header + &text).map_err(LabError::io(&d.config))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timing_scale_stretches_every_quorum_timing_and_still_validates() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = LabOptions::new(dir.path());
        opts.timing_scale = 4;
        let info = build(&opts, dir.path(), NetMode::Netns);
        let cfg = daemon_config(&info, &info.witness).expect("a valid config");
        let d = QuorumConfig::default();
        assert_eq!(cfg.quorum.heartbeat_ms, 4 * d.heartbeat_ms);
        assert_eq!(cfg.quorum.lease_ms, 4 * d.lease_ms);
        assert_eq!(cfg.quorum.node_loss_ms, 4 * d.node_loss_ms);
        let json = serde_json::to_value(&info).unwrap();
        assert_eq!(json["timing_scale"], 4);
        let plain = build(&LabOptions::new(dir.path()), dir.path(), NetMode::Netns);
        assert!(
            serde_json::to_value(&plain).unwrap().get("timing_scale").is_none(),
            "default lab.json unchanged"
        );
    }

    #[test]
    fn the_plan_has_every_contract_key_and_configs_validate() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LabOptions::new(dir.path());
        let info = build(&opts, dir.path(), NetMode::Netns);
        assert_eq!(info.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["a1", "a2", "b1", "b2"]);
        assert_eq!(info.witness.id, "w1");
        assert_eq!(info.etcd_endpoints[0], "http://10.77.1.10:2379");
        assert_eq!(info.nodes[2].nbd.as_deref(), Some("10.77.2.11:10809"));
        assert_eq!(info.nodes[0].netns.as_deref(), Some("metro-a1"));
        assert_eq!(info.etcd[2].netns.as_deref(), Some("metro-etcd-w"));
        let json: serde_json::Value = serde_json::to_value(&info).unwrap();
        for k in [
            "cluster",
            "dir",
            "ca_cert",
            "admin_cert",
            "admin_key",
            "etcd_endpoints",
            "sites",
            "nodes",
            "witness",
            "etcd",
        ] {
            assert!(json.get(k).is_some(), "missing {k}");
        }
        for k in ["id", "site", "role", "netns", "address", "api", "nbd", "metrics", "pid", "data_dir"] {
            assert!(json["nodes"][0].get(k).is_some(), "node missing {k}");
        }
        for k in ["id", "site", "netns", "address", "api", "metrics", "pid"] {
            assert!(json["witness"].get(k).is_some(), "witness missing {k}");
        }
        for k in ["name", "site", "netns", "client_url", "pid"] {
            assert!(json["etcd"][0].get(k).is_some(), "etcd missing {k}");
        }
        for d in info.nodes.iter().chain(std::iter::once(&info.witness)) {
            let cfg = daemon_config(&info, d).unwrap();
            assert_eq!(cfg.listen.metrics.to_string(), format!("{}:9100", d.address));
        }
        assert_eq!(info.nodes[0].proc.command[0], opts.bin_dir.join("metro-node").display().to_string());
        assert_eq!(info.witness.proc.command[0], opts.bin_dir.join("metro-witness").display().to_string());
    }

    #[test]
    fn power_cut_mode_turns_on_the_volatile_cache_of_storage_nodes_only_and_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let plain = build(&LabOptions::new(dir.path()), dir.path(), NetMode::Netns);
        assert!(!plain.power_cut_mode);
        assert!(serde_json::to_value(&plain).unwrap().get("power_cut_mode").is_none(), "absent when off");
        for d in plain.nodes.iter() {
            assert!(!daemon_config(&plain, d).unwrap().storage.volatile_write_cache, "{}", d.id);
        }
        // Refused without the mode, naming how to start the lab in it.
        plain.save().unwrap();
        let e = super::super::power_cut(dir.path(), "b1").unwrap_err();
        assert!(matches!(e, LabError::NotPowerCutMode { .. }), "{e}");
        assert!(e.to_string().contains("lab up --dir") && e.to_string().contains("--power-cut-mode"), "{e}");

        let mut opts = LabOptions::new(dir.path());
        opts.power_cut_mode = true;
        let info = build(&opts, dir.path(), NetMode::Netns);
        assert_eq!(serde_json::to_value(&info).unwrap()["power_cut_mode"], true, "recorded in lab.json");
        for d in info.nodes.iter() {
            assert!(daemon_config(&info, d).unwrap().storage.volatile_write_cache, "{}", d.id);
        }
        assert!(
            !daemon_config(&info, &info.witness).unwrap().storage.volatile_write_cache,
            "not the witness"
        );
        info.save().unwrap();
        let e = super::super::power_cut(dir.path(), "dc-z").unwrap_err();
        assert!(matches!(e, LabError::UnknownTarget(_)), "{e}");
        // Nothing runs: a power cut of a stopped node kills nothing.
        assert_eq!(super::super::power_cut(dir.path(), "b1").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn an_override_command_gets_its_placeholders_filled() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = LabOptions::new(dir.path());
        opts.daemon_override =
            Some(vec!["serve".into(), "--bind".into(), "{address}".into(), "{metrics_port}".into()]);
        let info = build(&opts, dir.path(), NetMode::Loopback);
        assert_eq!(info.nodes[1].proc.command, ["serve", "--bind", "127.77.1.12", "9100"]);
        assert!(info.nodes[1].netns.is_none());
        assert_eq!(info.etcd[0].proc.command.last().unwrap(), "etcd-a");
    }
}
