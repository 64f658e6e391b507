//! Thin access to a running lab through the `metroctl` binary (JSON output),
//! exactly as an operator would drive it.

/// The shared runner (`metroctl::lab::LabCli`), plus what benchmarks ask of it.
pub type Ctl = metroctl::lab::LabCli;

/// Bench-only questions about a volume.
pub trait CtlExt {
    /// True when every replica of `name` is in sync with nothing left to copy.
    fn in_sync(&self, name: &str) -> anyhow::Result<bool>;
}

impl CtlExt for Ctl {
    fn in_sync(&self, name: &str) -> anyhow::Result<bool> {
        let v = self.volume(name)?;
        let replicas = v["replicas"].as_array().map(|a| a.len()).unwrap_or(0);
        let in_sync = v["in_sync"].as_array().map(|a| a.len()).unwrap_or(0);
        let clean = v["replica_status"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|r| r["dirty_bytes"].as_u64() == Some(0) && r["resync_bytes_left"].as_u64() == Some(0));
        Ok(replicas >= 2 && in_sync == replicas && clean && v["state"] == "serving")
    }
}
