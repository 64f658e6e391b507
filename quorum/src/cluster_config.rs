//! Cluster-wide configuration: desired state in etcd under
//! `/metro/<cluster>/config`, reconciled by the leader into the replicated
//! [`crate::ClusterState::config`] through [`crate::Command::SetClusterConfig`].
//!
//! ```text
//!  metroctl cluster config set k=v ─► Control (admin) ─► ClusterConfig::set + validate
//!      ─► etcd CAS (generation + 1) ─► leader_loop sees a newer generation
//!      ─► SetClusterConfig committed ─► every member reads it from its state
//! ```
//!
//! Which settings live here (runtime-changeable) and which stay in each
//! daemon's TOML (`[quorum]`, restart to change) is a safety decision:
//!
//! | key | here? | why |
//! |---|---|---|
//! | `preferred_site` | yes | only steers the leader hand-over (`control::should_hand_over`) |
//! | `default_lease_policy` | yes | read when a volume is created without `--policy` |
//! | `site_stable_ms` | yes | hysteresis before a fenced site is active again: liveness only |
//! | `node_loss_ms` | yes | detection speed only: promotion still waits for the old lease to be certainly over |
//! | `voters_per_site` | yes | voters converge one joint-consensus step at a time either way |
//! | `lease_ms`, `drift_margin_ms` | no | see below |
//! | `heartbeat_ms`, `election_timeout_*` | no | openraft fixes them when the raft core starts |
//!
//! Lease timings stay per daemon: the leader's lease table and a new leader's
//! wait (`leader_since + lease_ms + drift_margin_ms`) use one timing per term.
//! A runtime *decrease* could let a newly elected leader end its wait before a
//! lease its predecessor granted under the longer period has run out (two
//! primaries); even an increase is unsafe unless every grant records its own
//! period. Doing it safely needs per-grant periods in `LeaseTable` and a
//! committed high-water mark that a new leader waits out, lowered only once
//! no longer grant can be live; until that exists they are not here.

use crate::state::LeasePolicy;
use serde::{Deserialize, Serialize};

/// The schema this release reads and writes.
pub const SCHEMA: u32 = 1;
/// Keys `set` accepts, in display order.
pub const KEYS: [&str; 5] =
    ["preferred_site", "default_lease_policy", "site_stable_ms", "node_loss_ms", "voters_per_site"];
const SITE_STABLE_MS: std::ops::RangeInclusive<u64> = 1_000..=3_600_000;
const NODE_LOSS_MS_MAX: u64 = 60_000;

/// A refused cluster config: which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cluster config key `{key}`: {reason}")]
pub struct ClusterConfigError {
    pub key: String,
    pub reason: String,
}

fn err(key: &str, reason: impl Into<String>) -> ClusterConfigError {
    ClusterConfigError { key: key.into(), reason: reason.into() }
}

/// The cluster config, as stored in etcd (JSON) and in the replicated state.
/// Unknown keys are refused (a typo written with etcdctl must not be ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Format version ([`SCHEMA`]).
    pub schema: u32,
    /// Bumped by every change; the leader applies only newer generations.
    pub generation: u64,
    /// Data site that keeps the leadership and wins a cut between the data sites.
    pub preferred_site: Option<String>,
    /// Lease policy of volumes created without an explicit one.
    pub default_lease_policy: LeasePolicy,
    /// A fenced site must stay reachable this long before it is active again.
    pub site_stable_ms: u64,
    /// A node not heard from this long is considered lost.
    pub node_loss_ms: u64,
    /// Voters per active data site (1 or 2), plus the witness.
    pub voters_per_site: u8,
}

impl ClusterConfig {
    /// The first config of a cluster, seeded from the bootstrap daemon's `[quorum]`.
    pub fn seed(q: &metro_api::config::QuorumConfig) -> Self {
        ClusterConfig {
            schema: SCHEMA,
            generation: 1,
            preferred_site: q.preferred_site.clone(),
            default_lease_policy: LeasePolicy::Suspend,
            site_stable_ms: q.site_stable_ms,
            node_loss_ms: q.node_loss_ms,
            voters_per_site: q.voters_per_site,
        }
    }

    /// The config to store when etcd has none: the applied one (etcd was
    /// wiped or restored from an old backup) one generation on, else the
    /// seed from this daemon's `[quorum]`.
    pub fn initial(applied: Option<&ClusterConfig>, q: &metro_api::config::QuorumConfig) -> Self {
        match applied {
            Some(a) => ClusterConfig { generation: a.generation + 1, ..a.clone() },
            None => Self::seed(q),
        }
    }

    /// Parse the stored JSON and validate what needs no cluster knowledge.
    pub fn from_json(json: &[u8]) -> Result<Self, ClusterConfigError> {
        let c: ClusterConfig = serde_json::from_slice(json).map_err(|e| {
            let msg = e.to_string();
            let key = msg.split('`').nth(1).unwrap_or("-").to_string();
            err(&key, msg)
        })?;
        c.validate(None)?;
        Ok(c)
    }

    /// Check every value; with `data_sites`, also that `preferred_site` is one of them.
    pub fn validate(&self, data_sites: Option<&[&str]>) -> Result<(), ClusterConfigError> {
        if self.schema != SCHEMA {
            return Err(err(
                "schema",
                format!("schema {} is not supported (this release reads {SCHEMA})", self.schema),
            ));
        }
        if self.generation == 0 {
            return Err(err("generation", "must be at least 1"));
        }
        if let Some(p) = &self.preferred_site {
            if !metro_api::config::valid_name(p) {
                return Err(err("preferred_site", format!("`{p}` is not a site name")));
            }
            if let Some(sites) = data_sites {
                if !sites.contains(&p.as_str()) {
                    return Err(err(
                        "preferred_site",
                        format!(
                            "`{p}` is not a data site of this cluster (data sites: {})",
                            sites.join(", ")
                        ),
                    ));
                }
            }
        }
        if !SITE_STABLE_MS.contains(&self.site_stable_ms) {
            return Err(err(
                "site_stable_ms",
                format!(
                    "{} is out of range {}..={} ms",
                    self.site_stable_ms,
                    SITE_STABLE_MS.start(),
                    SITE_STABLE_MS.end()
                ),
            ));
        }
        if self.node_loss_ms == 0 || self.node_loss_ms > NODE_LOSS_MS_MAX {
            return Err(err(
                "node_loss_ms",
                format!("{} is out of range 1..={NODE_LOSS_MS_MAX} ms", self.node_loss_ms),
            ));
        }
        if !(1..=2).contains(&self.voters_per_site) {
            return Err(err("voters_per_site", format!("{} is not 1 or 2", self.voters_per_site)));
        }
        Ok(())
    }

    /// Checks against one daemon's own timings: a node is lost only after at
    /// least two of its heartbeats could have arrived.
    pub fn validate_timings(&self, heartbeat_ms: u64) -> Result<(), ClusterConfigError> {
        if self.node_loss_ms < 2 * heartbeat_ms {
            return Err(err(
                "node_loss_ms",
                format!(
                    "{} ms is less than two heartbeats ({heartbeat_ms} ms each): nodes would be declared lost while healthy",
                    self.node_loss_ms
                ),
            ));
        }
        Ok(())
    }

    /// Change one key from its text form (`metroctl cluster config set KEY=VALUE`).
    /// Does not bump the generation (the writer does, once per change).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ClusterConfigError> {
        let v = value.trim();
        let ms = |key: &str| {
            v.parse::<u64>().map_err(|_| err(key, format!("`{v}` is not a whole number of milliseconds")))
        };
        match key {
            "preferred_site" => {
                self.preferred_site = match v {
                    "" | "none" | "-" => None,
                    s => Some(s.to_string()),
                }
            }
            "default_lease_policy" => {
                self.default_lease_policy = match v {
                    "suspend" => LeasePolicy::Suspend,
                    "error" => LeasePolicy::Error,
                    _ => return Err(err(key, format!("`{v}` is not `suspend` or `error`"))),
                }
            }
            "site_stable_ms" => self.site_stable_ms = ms(key)?,
            "node_loss_ms" => self.node_loss_ms = ms(key)?,
            "voters_per_site" => {
                self.voters_per_site = v.parse().map_err(|_| err(key, format!("`{v}` is not 1 or 2")))?
            }
            "schema" | "generation" => return Err(err(key, "is maintained by metro and cannot be set")),
            "lease_ms" | "drift_margin_ms" | "heartbeat_ms" | "election_timeout_min_ms"
            | "election_timeout_max_ms" => {
                return Err(err(
                    key,
                    "is not changeable at runtime (lease safety / raft timers); set it in every daemon's [quorum] and restart them",
                ))
            }
            _ => return Err(err(key, format!("unknown key; known keys: {}", KEYS.join(", ")))),
        }
        Ok(())
    }

    /// `(key, value)` pairs in [`KEYS`] order, values in their `set` form.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("preferred_site", self.preferred_site.clone().unwrap_or_else(|| "none".into())),
            (
                "default_lease_policy",
                match self.default_lease_policy {
                    LeasePolicy::Suspend => "suspend".into(),
                    LeasePolicy::Error => "error".into(),
                },
            ),
            ("site_stable_ms", self.site_stable_ms.to_string()),
            ("node_loss_ms", self.node_loss_ms.to_string()),
            ("voters_per_site", self.voters_per_site.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> ClusterConfig {
        ClusterConfig::seed(&metro_api::config::QuorumConfig {
            preferred_site: Some("dc-a".into()),
            ..Default::default()
        })
    }

    #[test]
    fn the_seed_follows_the_daemon_config_and_round_trips_as_json() {
        let c = seed();
        c.validate(Some(&["dc-a", "dc-b"])).unwrap();
        assert_eq!((c.schema, c.generation, c.site_stable_ms, c.node_loss_ms), (SCHEMA, 1, 10_000, 2_000));
        let json = serde_json::to_vec(&c).unwrap();
        assert_eq!(ClusterConfig::from_json(&json).unwrap(), c);
    }

    #[test]
    fn an_empty_store_is_reseeded_from_the_applied_config_one_generation_on() {
        let q = metro_api::config::QuorumConfig::default();
        assert_eq!(ClusterConfig::initial(None, &q), ClusterConfig::seed(&q));
        let applied = ClusterConfig { generation: 5, voters_per_site: 2, ..seed() };
        let again = ClusterConfig::initial(Some(&applied), &q);
        assert_eq!(again, ClusterConfig { generation: 6, ..applied });
    }

    #[test]
    fn every_key_is_settable_from_text_and_shown_the_same_way() {
        let mut c = seed();
        for (k, v) in [
            ("preferred_site", "dc-b"),
            ("default_lease_policy", "error"),
            ("site_stable_ms", "20000"),
            ("node_loss_ms", "3000"),
            ("voters_per_site", "2"),
        ] {
            c.set(k, v).unwrap();
        }
        c.validate(Some(&["dc-a", "dc-b"])).unwrap();
        let shown: Vec<(&str, String)> = c.pairs();
        let keys: Vec<&str> = shown.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, KEYS);
        assert_eq!(shown[0].1, "dc-b");
        assert_eq!(shown[1].1, "error");
        c.set("preferred_site", "none").unwrap();
        assert_eq!(c.preferred_site, None);
    }

    #[test]
    fn invalid_values_are_refused_naming_the_key() {
        let bad: [(&str, &str, &str); 8] = [
            ("voters_per_site", "3", "not 1 or 2"),
            ("site_stable_ms", "5", "out of range"),
            ("node_loss_ms", "0", "out of range"),
            ("node_loss_ms", "soon", "whole number"),
            ("default_lease_policy", "panic", "`suspend` or `error`"),
            ("preferred_site", "dc-z", "not a data site"),
            ("lease_ms", "100", "not changeable at runtime"),
            ("colour", "red", "unknown key"),
        ];
        for (k, v, why) in bad {
            let mut c = seed();
            let e = c.set(k, v).and_then(|_| c.validate(Some(&["dc-a", "dc-b"]))).unwrap_err();
            assert_eq!(e.key, k, "{e}");
            assert!(e.reason.contains(why), "{k}={v}: {e}");
            assert!(e.to_string().starts_with(&format!("cluster config key `{k}`")), "{e}");
        }
        let e = seed().validate_timings(2_000).unwrap_err();
        assert_eq!(e.key, "node_loss_ms");
        seed().validate_timings(250).unwrap();
    }

    #[test]
    fn stored_json_with_an_unknown_key_or_schema_is_refused() {
        let mut v = serde_json::to_value(seed()).unwrap();
        v["leese_ms"] = 5.into();
        let e = ClusterConfig::from_json(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.key, "leese_ms", "{e}");
        let mut v = serde_json::to_value(seed()).unwrap();
        v["schema"] = 2.into();
        let e = ClusterConfig::from_json(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.key, "schema", "{e}");
        let mut v = serde_json::to_value(seed()).unwrap();
        v.as_object_mut().unwrap().remove("node_loss_ms");
        let e = ClusterConfig::from_json(v.to_string().as_bytes()).unwrap_err();
        assert_eq!(e.key, "node_loss_ms", "{e}");
    }
}
