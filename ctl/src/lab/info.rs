//! [`LabInfo`]: the lab's `lab.json` (DESIGN.md section 8).
//!
//! The stable keys of the contract are the field names below; extra keys
//! (`mode`, `ready`, `repl`, `config`, `log`, `command`, …) are additions that
//! readers may ignore. Invariants:
//! - `lab.json` is replaced atomically (write to a temp file, rename), so a
//!   reader never sees half a file;
//! - it is rewritten whenever the lab starts, stops or restarts a process, so
//!   every `pid` is current (`null` when the process is not running).

use super::{LabError, NetMode};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const LAB_JSON: &str = "lab.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteInfo {
    pub name: String,
    pub kind: String,
}

/// How to (re)start one process and where it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    /// Current pid, `null` when not running.
    pub pid: Option<u32>,
    /// Full argv; `start-site` re-runs exactly this.
    pub command: Vec<String>,
    /// stdout and stderr are appended here.
    pub log: PathBuf,
    /// Working directory of the process.
    pub cwd: PathBuf,
}

/// A metro daemon: a storage node (in `nodes`) or the witness (in `witness`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub id: String,
    pub site: String,
    pub role: String,
    /// Network namespace (`null` in loopback mode).
    pub netns: Option<String>,
    pub address: String,
    pub api: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repl: Option<String>,
    pub metrics: String,
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(flatten)]
    pub proc: ProcInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdInfo {
    pub name: String,
    pub site: String,
    pub netns: Option<String>,
    pub address: String,
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    #[serde(flatten)]
    pub proc: ProcInfo,
}

/// The whole lab, as written to `DIR/lab.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabInfo {
    pub cluster: String,
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    pub viewer_cert: PathBuf,
    pub viewer_key: PathBuf,
    /// The application host's identity (`client:lab`), for `metro-attach`.
    #[serde(default)]
    pub client_cert: PathBuf,
    #[serde(default)]
    pub client_key: PathBuf,
    pub etcd_endpoints: Vec<String>,
    pub sites: Vec<SiteInfo>,
    pub nodes: Vec<DaemonInfo>,
    pub witness: DaemonInfo,
    pub etcd: Vec<EtcdInfo>,
    /// `netns` or `loopback`.
    pub mode: NetMode,
    /// True once `lab up` saw every process healthy; false while starting and after `down`.
    pub ready: bool,
    /// Namespace of the bridge (netns mode).
    pub switch_netns: Option<String>,
    /// True while this lab owns network state (namespaces, host link, nft
    /// table) that `down` must remove.
    #[serde(default)]
    pub network: bool,
    /// nft table holding the partitions.
    #[serde(default = "default_table")]
    pub nft_table: String,
    /// Active partitions, as pairs of site names.
    pub partitions: Vec<[String; 2]>,
    /// Every quorum timing (heartbeat, elections, lease, drift, node loss) is
    /// multiplied by this (see `LabOptions::timing_scale`); absent means 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub timing_scale: u32,
    /// Power-cut mode: storage nodes keep unflushed writes in their own
    /// memory (`storage.volatile_write_cache`), so `lab power-cut` loses
    /// them. Absent means false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub power_cut_mode: bool,
}

fn default_table() -> String {
    super::topology::NFT_TABLE.to_string()
}

/// A view of one process of the lab, whatever its kind.
pub struct ProcRef<'a> {
    pub id: &'a str,
    pub site: &'a str,
    pub netns: Option<&'a str>,
    pub proc: &'a mut ProcInfo,
}

impl LabInfo {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(LAB_JSON)
    }

    /// Read `DIR/lab.json`; `Ok(None)` if there is none.
    pub fn load(dir: &Path) -> Result<Option<Self>, LabError> {
        let path = Self::path(dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LabError::Io { path, source: e }),
        };
        serde_json::from_str(&text).map(Some).map_err(|source| LabError::BadLabJson { path, source })
    }

    /// Read `DIR/lab.json`, failing with [`LabError::NoLab`] if there is none.
    pub fn require(dir: &Path) -> Result<Self, LabError> {
        Self::load(dir)?.ok_or_else(|| LabError::NoLab { dir: dir.to_path_buf() })
    }

    /// Atomically replace `DIR/lab.json`.
    pub fn save(&self) -> Result<(), LabError> {
        let path = Self::path(&self.dir);
        let tmp = self.dir.join(".lab.json.tmp");
        let text = serde_json::to_string_pretty(self).expect("LabInfo always serializes");
        std::fs::write(&tmp, text + "\n").map_err(LabError::io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(LabError::io(&path))
    }

    /// Every process: etcd members first, then nodes, then the witness.
    pub fn procs_mut(&mut self) -> Vec<ProcRef<'_>> {
        let mut out = Vec::new();
        for e in &mut self.etcd {
            out.push(ProcRef { id: &e.name, site: &e.site, netns: e.netns.as_deref(), proc: &mut e.proc });
        }
        for d in self.nodes.iter_mut().chain(std::iter::once(&mut self.witness)) {
            out.push(ProcRef { id: &d.id, site: &d.site, netns: d.netns.as_deref(), proc: &mut d.proc });
        }
        out
    }

    /// Pids recorded in lab.json (running or not).
    pub fn pids(&self) -> Vec<u32> {
        let etcd = self.etcd.iter().map(|e| &e.proc);
        let daemons = self.nodes.iter().chain(std::iter::once(&self.witness)).map(|d| &d.proc);
        etcd.chain(daemons).filter_map(|p| p.pid).collect()
    }

    /// A storage node or the witness by id.
    pub fn daemon(&self, id: &str) -> Option<&DaemonInfo> {
        self.nodes.iter().chain(std::iter::once(&self.witness)).find(|d| d.id == id)
    }
}

fn one() -> u32 {
    1
}

fn is_false(v: &bool) -> bool {
    !*v
}

fn is_one(v: &u32) -> bool {
    *v == 1
}
