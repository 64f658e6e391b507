//! The lab in network-namespace mode, end to end, as root: real namespaces,
//! real nftables, real etcd 3.4; the metro daemons are stand-ins
//! (`python3 -m http.server` on the metrics address) so this suite does not
//! depend on the daemons being finished.
//!
//! One test function runs every phase in order, because namespace names are
//! global to the machine; a guard tears the lab down even when a phase fails.

use metroctl::lab::{self, LabError, LabInfo, LabOptions, NetMode};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A connect that must succeed gets this long; one that must be dropped is
/// declared blocked after this long (silent drop = timeout, not refusal).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// etcd re-elects within a few seconds after losing a member.
const ETCD_SETTLE: Duration = Duration::from_secs(20);

/// Tears the lab down (purging its directory) when the test ends, pass or fail.
struct Guard(PathBuf);
impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.0, true) {
            eprintln!("cleanup: {e}");
        }
    }
}

fn standin() -> Vec<String> {
    // Any HTTP answer counts as "up"; http.server answers GET /metrics with 404.
    ["/usr/bin/python3", "-m", "http.server", "--bind", "{address}", "{metrics_port}"]
        .into_iter()
        .map(String::from)
        .collect()
}

/// TCP connect to `addr` from inside network namespace `ns` (on a thread that
/// joins the namespace, so the test process itself stays in the root ns).
fn connects_from(ns: &str, addr: &str) -> bool {
    let path = format!("/run/netns/{ns}");
    let addr: SocketAddr = addr.parse().unwrap();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on this thread only; the fd is valid for the call.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).is_ok()
    })
    .join()
    .unwrap()
}

fn connects_from_host(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), CONNECT_TIMEOUT).is_ok()
}

fn hostport(url: &str) -> String {
    url.trim_start_matches("http://").trim_start_matches("https://").split('/').next().unwrap().to_string()
}

fn lab_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap()).unwrap()
}

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false)
}

fn namespace_pids(ns: &str) -> Vec<String> {
    let out = std::process::Command::new("ip").args(["netns", "pids", ns]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect()
}

fn netns_exists(ns: &str) -> bool {
    lab::netns_exists(ns)
}

fn metro_namespaces() -> Vec<String> {
    let out = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("metro-") && !n.starts_with("metro-probe"))
        .map(String::from)
        .collect()
}

async fn eventually_healthy(url: &str) -> bool {
    let start = Instant::now();
    while start.elapsed() < ETCD_SETTLE {
        if lab::etcd_healthy(url).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

fn addr_of(info: &LabInfo, id: &str, port: u16) -> String {
    let a = info
        .daemon(id)
        .map(|d| d.address.clone())
        .unwrap_or_else(|| info.etcd.iter().find(|e| e.name == id).expect("known id").address.clone());
    format!("{a}:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_netns_lab_comes_up_breaks_heals_restarts_and_goes_away_cleanly() {
    metro_api::telemetry::init_tracing();
    for ns in metro_namespaces() {
        assert!(namespace_pids(&ns).is_empty(), "another lab runs on this machine (namespace {ns})");
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _guard = Guard(dir.clone());
    let mut opts = LabOptions::new(&dir);
    opts.mode = NetMode::Netns;
    opts.daemon_override = Some(standin());

    tracing::info!("--- a leftover namespace with a live process (another lab) is refused, naming it");
    let _ = ip(&["netns", "add", "metro-a1"]);
    let mut squatter = std::process::Command::new("ip")
        .args(["netns", "exec", "metro-a1", "sleep", "120"])
        .spawn()
        .expect("sleep inside metro-a1");
    let t = Instant::now();
    while namespace_pids("metro-a1").is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = lab::up(opts.clone()).await.expect_err("up over a live namespace");
    let msg = err.to_string();
    assert!(matches!(err, LabError::Leftover { .. }), "{err}");
    assert!(msg.contains("metro-a1") && msg.contains("live processes"), "{msg}");
    assert!(netns_exists("metro-a1"), "a refused up must not touch the other lab's namespace");
    squatter.kill().unwrap();
    squatter.wait().unwrap();

    tracing::info!("--- a dead lab's network (namespaces with no process, the host link) is reclaimed");
    let _ = ip(&["netns", "add", "metro-sw"]);
    let _ = ip(&["link", "add", "metro-host", "type", "dummy"]);
    assert!(namespace_pids("metro-a1").is_empty());

    tracing::info!("--- up with stand-in daemons");
    let t = Instant::now();
    let info = lab::up(opts.clone()).await.expect("lab up");
    let up_ms = t.elapsed().as_millis();
    assert!(info.ready);
    assert_eq!(info.mode, NetMode::Netns);

    tracing::info!("--- lab.json has every contract key, and every address answers from the host");
    let j = lab_json(&dir);
    for k in [
        "cluster",
        "dir",
        "ca_cert",
        "admin_cert",
        "admin_key",
        "etcd_endpoints",
        "sites",
        "nodes",
        "witness",
        "etcd",
    ] {
        assert!(j.get(k).is_some(), "lab.json lacks {k}");
    }
    assert_eq!(j["cluster"], "lab");
    assert_eq!(
        j["sites"],
        serde_json::json!([{"name":"dc-a","kind":"data"},{"name":"dc-b","kind":"data"},{"name":"witness","kind":"witness"}])
    );
    assert_eq!(j["nodes"].as_array().unwrap().len(), 4);
    for n in j["nodes"].as_array().unwrap() {
        for k in ["id", "site", "role", "netns", "address", "api", "nbd", "metrics", "pid", "data_dir"] {
            assert!(n.get(k).is_some(), "node lacks {k}: {n}");
        }
        assert!(n["pid"].as_u64().is_some(), "{n}");
        assert_eq!(n["netns"], format!("metro-{}", n["id"].as_str().unwrap()));
        assert!(connects_from_host(&hostport(n["metrics"].as_str().unwrap())), "{}", n["metrics"]);
        assert!(lab::metrics_up(n["metrics"].as_str().unwrap()).await);
    }
    for k in ["id", "site", "netns", "address", "api", "metrics", "pid"] {
        assert!(j["witness"].get(k).is_some(), "witness lacks {k}");
    }
    assert!(lab::metrics_up(j["witness"]["metrics"].as_str().unwrap()).await);
    assert_eq!(j["etcd"].as_array().unwrap().len(), 3);
    for e in j["etcd"].as_array().unwrap() {
        for k in ["name", "site", "netns", "client_url", "pid"] {
            assert!(e.get(k).is_some(), "etcd lacks {k}: {e}");
        }
        assert!(lab::etcd_healthy(e["client_url"].as_str().unwrap()).await, "{e}");
    }
    for ep in j["etcd_endpoints"].as_array().unwrap() {
        assert!(lab::etcd_healthy(ep.as_str().unwrap()).await, "{ep}");
    }
    for k in ["ca_cert", "admin_cert", "admin_key"] {
        assert!(Path::new(j[k].as_str().unwrap()).is_file(), "{k}");
    }
    let cfg = metro_api::config::DaemonConfig::load(&info.nodes[0].config).expect("a1's config parses");
    cfg.check_secrets("a1").expect("a1's certificate files exist and the key is private");
    assert_eq!(cfg.etcd.endpoints, info.etcd_endpoints);

    tracing::info!("--- a second up is refused, naming the pids and the fix");
    let err = lab::up(opts.clone()).await.expect_err("second up");
    assert!(matches!(err, LabError::AlreadyRunning { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("a lab already runs") && msg.contains("metroctl lab down"), "{msg}");
    assert!(lab::metrics_up(&info.nodes[0].metrics).await, "the refused up left the lab alone");

    tracing::info!("--- cut dc-a from dc-b; the witness still sees both");
    let (a1, b1) = (addr_of(&info, "a1", 9100), addr_of(&info, "b1", 9100));
    assert!(connects_from("metro-a1", &b1), "before the cut");
    lab::partition(&dir, "dc-a", "dc-b").unwrap();
    assert!(lab::nft_table_exists(NetMode::Netns, "metro_lab"));
    assert!(!connects_from("metro-a1", &b1), "a1 -> b1 must be dropped");
    assert!(!connects_from("metro-b2", &a1), "b2 -> a1 must be dropped");
    assert!(!connects_from("metro-etcd-a", &addr_of(&info, "etcd-b", 2380)), "etcd-a -> etcd-b peer");
    assert!(connects_from("metro-w1", &a1), "witness -> a1");
    assert!(connects_from("metro-w1", &b1), "witness -> b1");
    assert!(connects_from("metro-a2", &addr_of(&info, "w1", 9100)), "a2 -> witness");
    assert!(connects_from_host(&a1) && connects_from_host(&b1), "the host reaches both sides");
    assert_eq!(lab_json(&dir)["partitions"], serde_json::json!([["dc-a", "dc-b"]]));

    tracing::info!("--- heal");
    lab::heal(&dir).unwrap();
    assert!(!lab::nft_table_exists(NetMode::Netns, "metro_lab"));
    assert!(connects_from("metro-a1", &b1), "a1 -> b1 after heal");
    assert!(connects_from("metro-b2", &a1), "b2 -> a1 after heal");

    tracing::info!("--- kill-site dc-a: its etcd member and nodes die, the other two members stay healthy");
    let old = LabInfo::require(&dir).unwrap();
    let old_etcd_a = old.etcd[0].proc.clone();
    let killed = lab::kill_site(&dir, "dc-a").unwrap();
    assert_eq!(killed, ["etcd-a", "a1", "a2"]);
    assert!(!lab::alive(old_etcd_a.pid.unwrap(), &old_etcd_a.command));
    for id in ["a1", "a2"] {
        let d = old.daemon(id).unwrap();
        assert!(!lab::alive(d.proc.pid.unwrap(), &d.proc.command), "{id} still runs");
    }
    let after_kill = lab_json(&dir);
    assert!(after_kill["etcd"][0]["pid"].is_null());
    assert!(after_kill["etcd"][1]["pid"].as_u64().is_some());
    assert!(!connects_from_host(&addr_of(&info, "etcd-a", 2379)), "etcd-a no longer listens");
    assert!(eventually_healthy(&info.etcd[1].client_url).await, "etcd-b healthy without dc-a");
    assert!(eventually_healthy(&info.etcd[2].client_url).await, "etcd-w healthy without dc-a");
    assert!(lab::metrics_up(&info.nodes[2].metrics).await, "b1 untouched");

    tracing::info!("--- start-site dc-a: new pids in lab.json, etcd-a healthy again");
    let started = lab::start_site(&dir, "dc-a").await.unwrap();
    assert_eq!(started, ["etcd-a", "a1", "a2"]);
    let new = LabInfo::require(&dir).unwrap();
    let new_pid = new.etcd[0].proc.pid.expect("etcd-a has a pid again");
    assert_ne!(Some(new_pid), old_etcd_a.pid);
    assert!(lab::alive(new_pid, &new.etcd[0].proc.command));
    assert!(eventually_healthy(&new.etcd[0].client_url).await);
    assert!(lab::metrics_up(&new.nodes[0].metrics).await);
    assert!(new.etcd[0].data_dir.join("member").is_dir(), "etcd-a kept its data");

    tracing::info!("--- kill-node and start-node one daemon");
    assert_eq!(lab::kill_node(&dir, "b2").unwrap(), ["b2"]);
    assert!(!lab::metrics_up(&new.nodes[3].metrics).await);
    assert_eq!(lab::start_node(&dir, "b2").await.unwrap(), ["b2"]);
    assert!(lab::metrics_up(&new.nodes[3].metrics).await);

    tracing::info!("--- partition again, then down: no namespace, no process, no nft table");
    lab::partition(&dir, "dc-b", "witness").unwrap();
    let last = LabInfo::require(&dir).unwrap();
    let procs: Vec<lab::ProcInfo> = last
        .etcd
        .iter()
        .map(|e| e.proc.clone())
        .chain(last.nodes.iter().chain(std::iter::once(&last.witness)).map(|d| d.proc.clone()))
        .collect();
    let t = Instant::now();
    lab::down(&dir, false).unwrap();
    let down_ms = t.elapsed().as_millis();
    assert_eq!(metro_namespaces(), Vec::<String>::new());
    assert!(!Path::new("/sys/class/net/metro-host").exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("/run/netns/metro-"), "a namespace mount survived down");
    for p in &procs {
        assert!(!lab::alive(p.pid.unwrap(), &p.command), "{:?} survived down", p.command);
    }
    let tables = std::process::Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("metro_lab"));
    let j = lab_json(&dir);
    assert!(j["nodes"][0]["pid"].is_null() && j["ready"] == false, "lab.json records the stop");
    assert!(dir.join("etcd/etcd-a/member").is_dir(), "down without --purge keeps data");
    lab::down(&dir, false).expect("down twice is a no-op");

    tracing::info!("--- up again on the kept data, then down --purge");
    let t = Instant::now();
    lab::up(opts.clone()).await.expect("second lab up on kept data");
    let reup_ms = t.elapsed().as_millis();
    let t = Instant::now();
    lab::down(&dir, true).unwrap();
    let purge_ms = t.elapsed().as_millis();
    assert!(!dir.exists());
    assert_eq!(metro_namespaces(), Vec::<String>::new());
    eprintln!("MEASURED lab up {up_ms} ms; lab down {down_ms} ms; up on kept data {reup_ms} ms; down --purge {purge_ms} ms");
}
