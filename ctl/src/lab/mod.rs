//! The one-machine lab of DESIGN.md section 8: three sites, four storage
//! nodes, a witness and three etcd members, each in its own network namespace
//! (or on its own 127.77.x.y address in loopback mode).
//!
//! ```text
//! up:   preflight -> certs -> configs -> network -> etcd x3 -> daemons x5
//!       -> wait_healthy -> lab.json{ready:true}
//! down: SIGTERM (grace) -> SIGKILL -> delete namespaces + nft table [-> rm -r DIR]
//! ```
//!
//! The CLI (`metroctl lab …`) and the integration tests call these functions
//! in-process. Invariants: `DIR/lab.json` always lists every process the lab
//! started, with current pids (so `down` can always clean up, even after a
//! failed `up`); every wait has a deadline; a failed `up` tears down what it built.

mod attach;
pub mod cli;
mod error;
mod health;
mod info;
mod net;
mod ops;
mod plan;
mod process;
pub mod topology;

pub use attach::{attach_command, attachment_listed};
pub use cli::{CliError, LabCli};
pub use error::LabError;
pub use health::{etcd_healthy, http_get, metrics_up, wait_healthy, wait_healthy_subset};
pub use info::{DaemonInfo, EtcdInfo, LabInfo, ProcInfo, SiteInfo, LAB_JSON};
pub use net::{netns_exists, nft_table_exists};
pub use ops::{
    down, heal, kill_node, kill_site, partition, power_cut, start_node, start_nodes, start_site, up,
};
pub use plan::{default_bin_dir, default_dir};
pub use process::alive;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Default bound on `lab up` waiting for health (etcd forms in ~3 s here;
/// daemons need a few seconds more to register and elect).
pub const DEFAULT_HEALTH_DEADLINE: Duration = Duration::from_secs(60);

/// How the lab's daemons are networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// One network namespace per daemon, bridged in `metro-sw` (needs root).
    Netns,
    /// 127.77.x.y addresses in the root namespace.
    Loopback,
    /// Netns if possible, else loopback (with a log line). Never persisted.
    Auto,
}

/// What `lab up` builds.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Lab directory (created if missing).
    pub dir: PathBuf,
    /// Where `metro-node` and `metro-witness` are.
    pub bin_dir: PathBuf,
    pub mode: NetMode,
    /// Replace the metro daemon command (tests, stand-ins). Placeholders:
    /// `{id}`, `{site}`, `{role}`, `{address}`, `{config}`, `{data_dir}`,
    /// `{api_port}`, `{metrics_port}`. etcd is never replaced.
    pub daemon_override: Option<Vec<String>>,
    /// Bound on waiting until the lab is healthy.
    pub health_deadline: Duration,
    /// Loopback mode uses 127.`loopback_octet`.S.H (default 77); another
    /// value lets a second loopback lab (e.g. a test) run beside the default one.
    pub loopback_octet: u8,
    /// Do not start the witness site's processes (w1 and etcd-w): something
    /// else serves them on the same addresses (the witness VM image on a tap
    /// in the witness namespace, `images/test-witness-image --lab`). `up` then
    /// waits for the data sites only.
    pub external_witness: bool,
    /// Multiply every quorum timing by this (1 = DESIGN.md defaults). The
    /// witness VM under TCG on a busy machine answers raft RPCs in seconds,
    /// not within a 250 ms heartbeat; its lab test stretches the timings.
    pub timing_scale: u32,
    /// Power-cut mode (test only): every storage node runs with
    /// `storage.volatile_write_cache = true`, so its unflushed volume writes
    /// live in its own memory and `lab power-cut` (kill -9) loses them, as a
    /// power cut loses a machine's page cache. Recorded in lab.json.
    pub power_cut_mode: bool,
}

impl LabOptions {
    /// Options with defaults: `bin_dir` from [`default_bin_dir`], mode `Auto`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            bin_dir: default_bin_dir(),
            mode: NetMode::Auto,
            daemon_override: None,
            health_deadline: DEFAULT_HEALTH_DEADLINE,
            loopback_octet: topology::DEFAULT_LOOPBACK_OCTET,
            external_witness: false,
            timing_scale: 1,
            power_cut_mode: false,
        }
    }
}
