//! Drive a running lab through the `metroctl` binary, exactly as an operator
//! would (`metroctl --lab DIR … -o json`). The integration tests and the
//! benchmarks share this one runner.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("running {bin}: {source}")]
    Spawn { bin: PathBuf, source: std::io::Error },
    #[error("metroctl {args}: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("metroctl {args}: not JSON: {source}")]
    Json { args: String, source: serde_json::Error },
}

/// A lab directory plus the metroctl binary that drives it.
#[derive(Debug, Clone)]
pub struct LabCli {
    pub bin: PathBuf,
    pub lab: PathBuf,
}

impl LabCli {
    pub fn new(bin_dir: &Path, lab: &Path) -> Self {
        LabCli { bin: bin_dir.join("metroctl"), lab: lab.to_path_buf() }
    }

    /// Run `metroctl --lab DIR ARGS`; stdout on success, stderr in the error.
    pub fn run(&self, args: &[&str]) -> Result<String, CliError> {
        let out = Command::new(&self.bin)
            .arg("--lab")
            .arg(&self.lab)
            .args(args)
            .output()
            .map_err(|source| CliError::Spawn { bin: self.bin.clone(), source })?;
        if !out.status.success() {
            return Err(CliError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `metroctl -o json ARGS`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<Value, CliError> {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        serde_json::from_str(&self.run(&a)?).map_err(|source| CliError::Json { args: args.join(" "), source })
    }

    /// `metroctl volume show NAME` as JSON.
    pub fn volume(&self, name: &str) -> Result<Value, CliError> {
        self.json(&["volume", "show", name])
    }
}
