//! The lab in loopback mode (127.78.x.y in the root namespace, partitions in
//! an `inet` nft table) and `lab up`'s fail-fast checks. Real etcd; the metro
//! daemons are stand-ins serving HTTP on their metrics address.
//!
//! Tests in this file share 127.78.x.y ports, so they hold [`SERIAL`]. They
//! use octet 78 so that a default loopback lab (127.77) may run beside them.

use metroctl::lab::{self, LabError, LabInfo, LabOptions, NetMode};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Second octet of the loopback labs of this file.
const OCTET: u8 = 78;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// See lab_netns.rs: a dropped SYN shows up as a timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

struct Guard(PathBuf);
impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.0, true) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn standin() -> Vec<String> {
    ["/usr/bin/python3", "-m", "http.server", "--bind", "{address}", "{metrics_port}"]
        .into_iter()
        .map(String::from)
        .collect()
}

/// TCP connect from source address `from` (port chosen by the kernel) to `to`.
async fn connects(from: &str, to: &str) -> bool {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    matches!(tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(to.parse().unwrap())).await, Ok(Ok(_)))
}

fn nft_has_lab_table() -> bool {
    lab::nft_table_exists(NetMode::Loopback, "metro_lab_78")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_lab_comes_up_partitions_heals_and_goes_away() {
    let _serial = SERIAL.lock().await;
    metro_api::telemetry::init_tracing();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _guard = Guard(dir.clone());

    tracing::info!("--- up in loopback mode");
    let mut opts = LabOptions::new(&dir);
    opts.mode = NetMode::Loopback;
    opts.loopback_octet = OCTET;
    opts.daemon_override = Some(standin());
    let t = Instant::now();
    let info = lab::up(opts).await.expect("loopback lab up");
    eprintln!("MEASURED loopback lab up {} ms", t.elapsed().as_millis());
    assert_eq!(info.mode, NetMode::Loopback);
    assert!(info.nodes.iter().all(|n| n.netns.is_none() && n.address.starts_with("127.78.")));
    for e in &info.etcd {
        assert!(lab::etcd_healthy(&e.client_url).await, "{}", e.client_url);
    }
    for d in info.nodes.iter().chain(std::iter::once(&info.witness)) {
        assert!(lab::metrics_up(&d.metrics).await, "{}", d.metrics);
    }

    tracing::info!("--- cut dc-a from dc-b");
    let (a1, b1, w1) = ("127.78.1.11", "127.78.2.11", "127.78.3.11");
    assert!(connects(a1, &format!("{b1}:9100")).await);
    lab::partition(&dir, "dc-a", "dc-b").unwrap();
    assert!(nft_has_lab_table());
    assert!(!connects(a1, &format!("{b1}:9100")).await, "a1 -> b1 dropped");
    assert!(!connects(b1, &format!("{a1}:9100")).await, "b1 -> a1 dropped");
    assert!(connects(w1, &format!("{a1}:9100")).await, "witness -> a1");
    assert!(connects(w1, &format!("{b1}:9100")).await, "witness -> b1");
    assert!(lab::etcd_healthy(&info.etcd[2].client_url).await, "etcd keeps quorum through the witness");

    tracing::info!("--- heal");
    lab::heal(&dir).unwrap();
    assert!(!nft_has_lab_table());
    assert!(connects(a1, &format!("{b1}:9100")).await);

    tracing::info!("--- kill-site dc-b and start it again");
    let old = LabInfo::require(&dir).unwrap();
    assert_eq!(lab::kill_site(&dir, "dc-b").unwrap(), ["etcd-b", "b1", "b2"]);
    assert!(!lab::metrics_up(&old.nodes[2].metrics).await);
    lab::start_site(&dir, "dc-b").await.unwrap();
    let new = LabInfo::require(&dir).unwrap();
    assert_ne!(new.etcd[1].proc.pid, old.etcd[1].proc.pid);
    assert!(lab::etcd_healthy(&new.etcd[1].client_url).await);

    tracing::info!("--- down");
    lab::partition(&dir, "dc-a", "witness").unwrap();
    let t = Instant::now();
    lab::down(&dir, false).unwrap();
    eprintln!("MEASURED loopback lab down {} ms", t.elapsed().as_millis());
    assert!(!nft_has_lab_table());
    for e in &new.etcd {
        assert!(!lab::alive(e.proc.pid.unwrap(), &e.proc.command));
    }
    for d in new.nodes.iter().chain(std::iter::once(&new.witness)) {
        assert!(!lab::alive(d.proc.pid.unwrap(), &d.proc.command));
    }
}

#[tokio::test]
async fn up_without_the_daemon_binaries_fails_fast_saying_how_to_build_them() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = LabOptions::new(tmp.path().join("lab"));
    opts.mode = NetMode::Loopback;
    opts.loopback_octet = OCTET;
    opts.bin_dir = tmp.path().join("empty");
    let t = Instant::now();
    let err = lab::up(opts).await.expect_err("no binaries");
    assert!(t.elapsed() < Duration::from_secs(2), "fails fast");
    assert!(matches!(err, LabError::MissingBinary { .. }), "{err}");
    assert!(err.to_string().contains("cargo build -p metro-node -p metro-witness"), "{err}");
    assert!(!tmp.path().join("lab/lab.json").exists(), "nothing was started");
}

#[tokio::test]
async fn up_in_loopback_mode_refuses_a_port_in_use_and_names_it() {
    let _serial = SERIAL.lock().await;
    let busy = std::net::TcpListener::bind("127.78.2.12:7443").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _guard = Guard(dir.clone());
    let mut opts = LabOptions::new(&dir);
    opts.mode = NetMode::Loopback;
    opts.loopback_octet = OCTET;
    opts.daemon_override = Some(standin());
    let err = lab::up(opts).await.expect_err("port in use");
    assert!(matches!(&err, LabError::PortInUse { addr } if addr == "127.78.2.12:7443"), "{err}");
    assert!(err.to_string().contains("already in use"), "{err}");
    drop(busy);
}

#[tokio::test]
async fn fault_commands_without_a_lab_say_to_run_lab_up() {
    let tmp = tempfile::tempdir().unwrap();
    let err = lab::kill_site(tmp.path(), "dc-a").expect_err("no lab");
    assert!(err.to_string().contains("metroctl lab up"), "{err}");
    let err = lab::kill_site(tmp.path(), "dc-z").expect_err("bad site");
    assert!(matches!(err, LabError::UnknownSite(_)), "{err}");
    let err = lab::partition(tmp.path(), "dc-a", "dc-a").expect_err("same site");
    assert!(matches!(err, LabError::SameSite(_)), "{err}");
    lab::down(&tmp.path().join("never-up"), false).expect("down with nothing running is a no-op");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_dies_at_start_fails_up_with_its_log_and_the_lab_is_torn_down() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _guard = Guard(dir.clone());
    let mut opts = LabOptions::new(&dir);
    opts.mode = NetMode::Loopback;
    opts.loopback_octet = OCTET;
    opts.daemon_override = Some(
        ["sh", "-c", "echo config {config} is broken for {id}; exit 3"]
            .into_iter()
            .map(String::from)
            .collect(),
    );
    let t = Instant::now();
    let err = lab::up(opts).await.expect_err("daemons exit");
    assert!(t.elapsed() < Duration::from_secs(20), "fails well before the health deadline");
    let LabError::Exited { id, tail, .. } = &err else { panic!("{err}") };
    assert!(tail.contains(&format!("is broken for {id}")), "{err}");
    let info = LabInfo::require(&dir).unwrap();
    assert!(!info.ready);
    assert!(info.pids().is_empty(), "every pid cleared after the teardown");
    for e in &info.etcd {
        assert!(!lab::etcd_healthy(&e.client_url).await, "{} still answers", e.name);
    }
}
