//! Test fixtures: in-process quorum members on 127.0.0.1 with real tonic servers.

use metro_api::config::{QuorumConfig, Role, SiteKind};
use metro_quorum::{ClusterState, EngineConfig, NodeRecord, Quorum};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Fast timings so a whole test runs in seconds (DESIGN.md 7 defaults / ~4).
pub fn timings() -> QuorumConfig {
    QuorumConfig {
        voters_per_site: 1,
        preferred_site: None,
        heartbeat_ms: 100,
        election_timeout_min_ms: 500,
        election_timeout_max_ms: 1000,
        lease_ms: 1000,
        drift_margin_ms: 200,
        node_loss_ms: 1000,
        site_stable_ms: 3000,
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "it=info,metro_quorum=info,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn lab_sites() -> Vec<(String, SiteKind)> {
    vec![
        ("dc-a".into(), SiteKind::Data),
        ("dc-b".into(), SiteKind::Data),
        ("witness".into(), SiteKind::Witness),
    ]
}

pub fn site_of(id: &str) -> (&'static str, Role) {
    match id.chars().next() {
        Some('a') => ("dc-a", Role::Storage),
        Some('b') => ("dc-b", Role::Storage),
        _ => ("witness", Role::Witness),
    }
}

pub struct Member {
    pub id: String,
    pub addr: String,
    pub dir: PathBuf,
    pub q: Quorum,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Member {
    pub fn record(&self) -> NodeRecord {
        let (site, role) = site_of(&self.id);
        NodeRecord {
            id: self.id.clone(),
            raft_id: metro_quorum::state::raft_id_of(&self.id),
            site: site.into(),
            role,
            api: self.addr.clone(),
            nbd: None,
            replication: None,
            capacity_bytes: 1 << 30,
            timings: None,
        }
    }

    pub fn state(&self) -> Arc<ClusterState> {
        self.q.state().borrow().clone()
    }

    /// Heartbeat with the volumes this member is primary of (per its own state).
    pub fn heartbeat_as_primary(&self) {
        let rx = self.q.state();
        let me = self.id.clone();
        self.q.spawn_heartbeat(move || {
            let s = rx.borrow().clone();
            s.volumes
                .values()
                .filter(|v| v.primary.as_deref() == Some(me.as_str()))
                .map(|v| (v.name.clone(), v.epoch))
                .collect()
        });
    }

    /// Stop serving and stop the raft core (a crash, as far as peers can tell).
    pub async fn kill(&mut self) {
        if let Some((tx, h)) = self.server.take() {
            let _ = tx.send(());
            if tokio::time::timeout(Duration::from_secs(1), async { h.await.ok() }).await.is_err() {
                tracing::warn!(id = %self.id, "server did not stop gracefully");
            }
        }
        self.q.shutdown().await;
    }
}

/// Start a member on `port` (0 = any) with its data under `dir`.
pub async fn start_member(id: &str, dir: &Path, port: u16, tls: Option<metro_api::tls::TlsFiles>) -> Member {
    start_member_with(id, dir, port, tls, timings()).await
}

/// [`start_member`] with other timings.
pub async fn start_member_with(
    id: &str,
    dir: &Path,
    port: u16,
    tls: Option<metro_api::tls::TlsFiles>,
    timings: QuorumConfig,
) -> Member {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
    let addr = listener.local_addr().unwrap().to_string();
    let (site, role) = site_of(id);
    let cfg = EngineConfig {
        node_id: id.into(),
        site: site.into(),
        role,
        api_addr: addr.clone(),
        data_dir: dir.to_path_buf(),
        timings,
        tls: tls.clone(),
        declared_timings: None,
    };
    let q = Quorum::start(cfg).await.expect("start quorum member");
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        builder = builder.tls_config(t.tonic_server()).expect("server tls");
    }
    let router = builder.add_service(q.internal_service());
    let (tx, rx) = oneshot::channel::<()>();
    let h = tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let _ = router
            .serve_with_incoming_shutdown(incoming, async {
                rx.await.ok();
            })
            .await;
    });
    Member { id: id.into(), addr, dir: dir.to_path_buf(), q, server: Some((tx, h)) }
}

pub fn port_of(m: &Member) -> u16 {
    m.addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// Restart `id` on its address from its data dir (after `kill`).
pub async fn restart(c: &mut Cluster, id: &str) {
    let (dir, port) = (c.get(id).dir.clone(), port_of(c.get(id)));
    let m = start_member(id, &dir, port, None).await;
    m.heartbeat_as_primary();
    *c.get_mut(id) = m;
}

/// Poll `f` until it returns true or `timeout` passes (then panic with `what`).
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A cluster of members named `ids` ("a*" dc-a, "b*" dc-b, "w*" witness):
/// the first initializes, the others join through it. Every member heartbeats
/// as the primary of whatever its state says it is primary of.
pub struct Cluster {
    pub members: Vec<Member>,
    /// Keeps the members' data dirs alive for the test's duration.
    pub _root: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(ids: &[&str]) -> Cluster {
        Self::start_with(ids, |_| None).await
    }

    /// As `start`, with each member's TLS material from `tls(id)`.
    pub async fn start_with(ids: &[&str], tls: impl Fn(&str) -> Option<metro_api::tls::TlsFiles>) -> Cluster {
        Self::start_opts(ids, Some("dc-a"), tls).await
    }

    /// As `start_with`, with the group's preferred site (None: no preference).
    pub async fn start_opts(
        ids: &[&str],
        preferred: Option<&str>,
        tls: impl Fn(&str) -> Option<metro_api::tls::TlsFiles>,
    ) -> Cluster {
        init_tracing();
        let root = tempfile::tempdir().unwrap();
        let mut members = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let m = start_member(id, &root.path().join(id), 0, tls(id)).await;
            if i == 0 {
                m.q.initialize(lab_sites(), preferred.map(str::to_string), m.record())
                    .await
                    .expect("initialize");
            } else {
                let first: &Member = &members[0];
                m.q.join(m.record(), vec![first.addr.clone()]).await.expect("join");
            }
            m.heartbeat_as_primary();
            members.push(m);
        }
        Cluster { members, _root: root }
    }

    pub fn get(&self, id: &str) -> &Member {
        self.members.iter().find(|m| m.id == id).expect("member")
    }

    pub fn get_mut(&mut self, id: &str) -> &mut Member {
        self.members.iter_mut().find(|m| m.id == id).expect("member")
    }

    /// The id of the member that currently leads, per a majority of members' views.
    pub fn leader(&self) -> Option<String> {
        self.members.iter().find(|m| m.q.status().is_leader).map(|m| m.id.clone())
    }

    pub async fn wait_voters(&self, voters: &[&str]) {
        let want: Vec<String> = voters.iter().map(|s| s.to_string()).collect();
        let m = &self.members[0];
        wait_until(Duration::from_secs(15), &format!("voters are {want:?}"), || {
            let st = m.q.status();
            let ok = st.voters == want && !st.membership_changing;
            async move { ok }
        })
        .await;
    }

    pub async fn shutdown(mut self) {
        for m in &mut self.members {
            m.kill().await;
        }
    }
}

/// A throw-away cluster CA issuing metro certificates (server name `metro`).
pub struct TestCa {
    ca: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    pub fn new() -> TestCa {
        metro_api::tls::install_crypto_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, "metro test CA");
        let ca = p.self_signed(&key).unwrap();
        TestCa { ca, key }
    }

    /// Certificate + key for common name `cn` (e.g. `node:a1`, `witness`, `viewer:x`).
    pub fn issue(&self, cn: &str) -> metro_api::tls::TlsFiles {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![metro_api::tls::SERVER_NAME.to_string()]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.ca, &self.key).unwrap();
        metro_api::tls::TlsFiles {
            ca_pem: self.ca.pem().into_bytes(),
            cert_pem: cert.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
        }
    }
}
