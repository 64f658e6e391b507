//! The `metroctl` binary itself: certificates and the lab commands' errors
//! and no-ops (the lab's behaviour is covered in-process by lab_netns.rs and
//! lab_loopback.rs).

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn metroctl(args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_metroctl")).args(args).env("RUST_LOG", "warn").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn certs_init_then_issue_writes_a_ca_signed_pair_with_a_private_key() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let (ok, _, err) = metroctl(&["certs", "init", "--dir", d]);
    assert!(ok, "{err}");
    let (ok, out, err) = metroctl(&[
        "-o", "json", "certs", "issue", "--dir", d, "--cn", "node:x1", "--ip", "10.0.0.5", "--days", "2",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cn"], "node:x1");
    let cert = std::fs::read_to_string(tmp.path().join("node-x1.pem")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    let mode = std::fs::metadata(tmp.path().join("node-x1.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The pair loads as TLS material for the daemons and clients.
    metro_api::tls::TlsFiles::load(
        &tmp.path().join("ca.pem"),
        &tmp.path().join("node-x1.pem"),
        &tmp.path().join("node-x1.key"),
    )
    .unwrap();
}

#[test]
fn certs_issue_without_a_ca_and_with_a_bad_cn_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let (ok, _, err) = metroctl(&["certs", "issue", "--dir", d, "--cn", "admin:me"]);
    assert!(!ok);
    assert!(err.contains("metroctl certs init"), "{err}");
    metroctl(&["certs", "init", "--dir", d]);
    let (ok, _, err) = metroctl(&["certs", "issue", "--dir", d, "--cn", "root"]);
    assert!(!ok);
    assert!(err.contains("node:<id>"), "{err}");
}

#[test]
fn lab_down_with_nothing_running_succeeds_and_fault_commands_need_a_lab() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("lab");
    let d = d.to_str().unwrap();
    let (ok, out, err) = metroctl(&["lab", "down", "--dir", d]);
    assert!(ok, "{err}");
    assert!(out.contains("lab down"), "{out}");
    let (ok, _, err) = metroctl(&["--lab", d, "lab", "kill-site", "dc-a"]);
    assert!(!ok);
    assert!(err.contains("no lab in") && err.contains("metroctl lab up"), "{err}");
    let (ok, _, err) = metroctl(&["lab", "partition", "--dir", d, "dc-a", "moon"]);
    assert!(!ok);
    assert!(err.contains("unknown site `moon`"), "{err}");
}

#[test]
fn lab_up_without_root_or_without_etcd_fails_fast_naming_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let d = tmp.path().join("lab");
    let d = d.to_str().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_metroctl")])
        .args(["lab", "up", "--netns", "--dir", d])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root") && err.contains("--loopback"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_metroctl"))
        .args(["lab", "up", "--loopback", "--dir", d])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install etcd-server"), "{err}");
}

#[test]
fn a_reader_closing_stdout_early_ends_metroctl_quietly() {
    // `metroctl completions bash | head -1`: the reader goes away after one line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_metroctl"))
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
}
