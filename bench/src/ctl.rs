//! Thin access to a running lab through the `metroctl` binary (JSON output),
//! exactly as an operator would drive it.

use anyhow::{bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A lab directory plus the metroctl binary that drives it.
#[derive(Debug, Clone)]
pub struct Ctl {
    pub bin: PathBuf,
    pub lab: PathBuf,
}

impl Ctl {
    pub fn new(bin_dir: &Path, lab: &Path) -> Self {
        Ctl { bin: bin_dir.join("metroctl"), lab: lab.to_path_buf() }
    }

    /// Run `metroctl --lab DIR ARGS`; stdout on success, stderr in the error.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .arg("--lab")
            .arg(&self.lab)
            .args(args)
            .output()
            .context("running metroctl")?;
        if !out.status.success() {
            bail!("metroctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        Ok(serde_json::from_str(&self.run(&a)?)?)
    }

    pub fn volume(&self, name: &str) -> anyhow::Result<Value> {
        self.json(&["volume", "show", name])
    }

    /// True when every replica of `name` is in sync with nothing left to copy.
    pub fn in_sync(&self, name: &str) -> anyhow::Result<bool> {
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
