//! [`LabError`]: every way the lab can fail, each message naming the next step.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("a lab already runs in {dir} (pids {pids:?}); run `metroctl lab down --dir {dir}` first")]
    AlreadyRunning { dir: PathBuf, pids: Vec<u32> },
    #[error("no lab in {dir} (no lab.json); run `metroctl lab up --dir {dir}` first")]
    NoLab { dir: PathBuf },
    #[error("{what} needs root (network namespaces and nftables); run metroctl as root, or use `lab up --loopback`")]
    NotRoot { what: String },
    #[error("`{tool}` not found in PATH; install it: `apt-get install {package}`")]
    MissingTool { tool: String, package: String },
    #[error("{path} not found; build the daemons (`cargo build -p metro-node -p metro-witness`) or point METRO_BIN_DIR at them")]
    MissingBinary { path: PathBuf },
    #[error("{addr} is already in use (by another lab or service); stop it, or run `metroctl lab down` for a stale lab")]
    PortInUse { addr: String },
    #[error("leftover lab network: {what}; another lab runs on this machine: run `metroctl lab down --dir` with that lab's directory (or remove the leftover by hand: `ip netns del NAME`, `ip link del metro-host`)")]
    Leftover { what: String },
    #[error("unknown site `{0}`; sites are dc-a, dc-b, witness")]
    UnknownSite(String),
    #[error("unknown daemon `{0}`; daemons are a1, a2, b1, b2, w1, etcd-a, etcd-b, etcd-w")]
    UnknownDaemon(String),
    #[error("unknown site or daemon `{0}`; sites are dc-a, dc-b, witness; daemons are a1, a2, b1, b2, w1, etcd-a, etcd-b, etcd-w")]
    UnknownTarget(String),
    #[error("a site cannot be partitioned from itself (`{0}`)")]
    SameSite(String),
    #[error("`{cmd}` failed: {detail}")]
    Command { cmd: String, detail: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid lab.json: {source}; run `metroctl lab down --purge` to start over")]
    BadLabJson { path: PathBuf, source: serde_json::Error },
    #[error("certificates: {0}")]
    Certs(#[from] crate::certs::CertError),
    #[error("daemon config: {0}")]
    Config(String),
    /// `last` is the log's last line (usually the error), up front so that
    /// a truncated report still shows it.
    #[error("{id} exited during start-up; its log ends with: {last}\nlast lines of {log}:\n{tail}")]
    Exited { id: String, log: PathBuf, last: String, tail: String },
    #[error("not healthy after {waited_s} s: {pending}; see the logs in {logs}")]
    Unhealthy { waited_s: u64, pending: String, logs: PathBuf },
    #[error("the lab in {dir} is not in power-cut mode: its daemons keep no unflushed writes in memory, so a kill would lose nothing (the page cache is shared); start the lab with `metroctl lab down --dir {dir} --purge` then `metroctl lab up --dir {dir} --power-cut-mode`, or use `lab kill-site`/`kill-node` for a process crash")]
    NotPowerCutMode { dir: PathBuf },
    #[error("cleanup incomplete: {0}")]
    Cleanup(String),
}

impl LabError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LabError {
        let path = path.into();
        move |source| LabError::Io { path, source }
    }
}
