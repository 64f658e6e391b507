//! The etcd registry passes the same conformance suite as the in-memory one,
//! against a real etcd (Debian's etcd-server), and reports etcd being down
//! as a clear, bounded error instead of hanging.

use metro_node::registry::{etcd::EtcdRegistry, Registry, RegistryError};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start_etcd() -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let mut child = Command::new("etcd")
        .args(["--name", "t", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("t=http://127.0.0.1:{peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd is installed (scripts/install-deps)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
            return Etcd { child, url, _dir: dir };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("etcd did not start within 20 s");
}

#[tokio::test]
async fn the_etcd_registry_passes_the_conformance_suite() {
    let etcd = start_etcd();
    let reg = EtcdRegistry::new("conf", vec![etcd.url.clone()], Duration::from_secs(2));
    metro_node::registry::conformance(&reg).await;
}

#[tokio::test]
async fn etcd_down_is_a_clear_error_within_the_deadline() {
    let etcd = start_etcd();
    let url = etcd.url.clone();
    drop(etcd);
    let reg = EtcdRegistry::new("down", vec![url], Duration::from_millis(500));
    let t = Instant::now();
    let err = reg.specs().await.unwrap_err();
    assert!(matches!(err, RegistryError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("attached volumes keep working"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(3), "took {:?}", t.elapsed());
}

#[tokio::test]
async fn a_hand_edited_cluster_config_with_a_typo_or_a_bad_value_is_corrupt_naming_the_key() {
    let etcd = start_etcd();
    let reg = EtcdRegistry::new("edit", vec![etcd.url.clone()], Duration::from_secs(2));
    let good = metro_quorum::ClusterConfig::seed(&metro_api::config::QuorumConfig::default());
    let mut c = etcd_client::Client::connect([etcd.url.as_str()], None).await.expect("connect");
    for (edit, key) in [("leese_ms", "leese_ms"), ("voters_per_site", "voters_per_site")] {
        let mut v = serde_json::to_value(&good).unwrap();
        v[edit] = 9.into();
        c.put("/metro/edit/config", v.to_string(), None).await.expect("put");
        let err = reg.config().await.unwrap_err();
        let RegistryError::Corrupt { key: k, reason } = &err else { panic!("{err:?}") };
        assert_eq!(k, "/metro/edit/config");
        assert!(reason.contains(&format!("cluster config key `{key}`")), "{err}");
    }
}
