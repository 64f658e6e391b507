//! The lab's application host: `metro-attach` started on the host against
//! a lab, with the lab's `client:lab` identity (or another one). Shared by
//! the test harness and the bench.

use super::LabInfo;
use std::path::Path;
use std::process::Command;

/// The command that attaches `volume` from this host, serving it in
/// `socket_dir/<volume>.sock`, with `cert`/`key` as its identity.
pub fn attach_command(
    info: &LabInfo,
    bin_dir: &Path,
    volume: &str,
    socket_dir: &Path,
    cert: &Path,
    key: &Path,
) -> Command {
    let mut endpoints: Vec<&str> = info.nodes.iter().map(|n| n.api.as_str()).collect();
    endpoints.push(&info.witness.api);
    let mut c = Command::new(bin_dir.join("metro-attach"));
    c.arg("run")
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .arg("--ca")
        .arg(&info.ca_cert)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["--volume", volume, "--socket-dir"])
        .arg(socket_dir);
    c
}

/// True once a running agent lists `volume` in `socket_dir/attachments.json`
/// (it serves from then on; the socket file exists a little earlier).
pub fn attachment_listed(socket_dir: &Path, volume: &str) -> bool {
    std::fs::read(socket_dir.join("attachments.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|l| l.as_array().into_iter().flatten().any(|x| x["volume"] == volume))
}
