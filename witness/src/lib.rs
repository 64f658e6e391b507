//! `metro-witness`: a raft voter in the third site that stores no volume data.
//!
//! It runs the same daemon core as a storage node (quorum member, control
//! API, etcd registration, metrics) with role `witness`, so no volume,
//! replication or NBD code path is ever started. It is meant to sit on a
//! small VM beside the third etcd member, possibly 100-200 ms away: nothing
//! on the write path waits for it (leases and heartbeats go to the leader,
//! which the preferred-site policy keeps in a data site).

use metro_api::config::{ConfigError, DaemonConfig, Role};
use std::path::Path;

/// Load a config and check it is a witness config.
pub fn load_config(path: &Path) -> Result<DaemonConfig, ConfigError> {
    let cfg = DaemonConfig::load(path)?;
    if cfg.role != Role::Witness {
        return Err(ConfigError {
            file: path.display().to_string(),
            key: "role".into(),
            reason: format!("metro-witness needs role = \"witness\", found {:?}", cfg.role),
        });
    }
    Ok(cfg)
}

pub async fn run(cfg: DaemonConfig, config_path: &str) -> anyhow::Result<()> {
    metro_node::daemon::run(cfg, config_path).await
}
