//! The REAL quorum engine (`metro_quorum::Quorum`: openraft over tonic, its
//! control loop, heartbeats and leases) on turmoil hosts: tonic channels go
//! through [`TurmoilConnector`] (the engine's injectable `Connector`), the
//! `Internal` service is served from a turmoil TCP listener, and the raft
//! files live in a per-host directory that survives crashes.
//!
//! An [`EngineOracle`] samples every host each 10 ms of simulated time and
//! the harness checks it after every step: at most one leader per term, epochs
//! never decrease on any member, a new primary always comes from the previous
//! `in_sync`, and at most one node may serve a volume at any instant (a node
//! may serve when its state names it primary and it holds a lease for the
//! current epoch, which is what the data path asks `lease_valid_until`).
//!
//! Each host's clock drifts (a rate within ±2 % drawn from the seed, see
//! [`drifted_timings`]).
//!
//! Bit-reproducible from the seed: the fault schedule and turmoil's network
//! are seeded, and openraft draws its election timeouts from
//! [`metro_quorum::runtime`]'s per-thread generator, seeded here (turmoil
//! runs every host on the test's thread). `a_real_engine_run_is_reproducible_from_its_seed`
//! checks it by comparing [`EngineOracle::trace`] digests of two runs.

use super::engine_oracle::EngineOracle;
use hyper_util::rt::TokioIo;
use metro_api::config::{QuorumConfig, Role, SiteKind};
use metro_quorum::state::{raft_id_of, Command, LeasePolicy, NodeRecord};
use metro_quorum::{Connector, EngineConfig, Quorum};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::{Channel, Endpoint, Uri};

pub const ENGINE_PORT: u16 = 7443;
/// How often each host reports to the oracle (simulated time).
const SAMPLE_MS: u64 = 10;
/// Bounds on connection set-up inside the simulation.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Reaches a peer through turmoil's simulated TCP.
pub struct TurmoilConnector;

impl Connector for TurmoilConnector {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address `{addr}`: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        Ok(ep.connect_with_connector_lazy(tower::service_fn(|uri: Uri| async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(ENGINE_PORT);
            let s = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok::<_, std::io::Error>(TokioIo::new(s))
        })))
    }
}

/// A server-side turmoil connection tonic can serve.
pub struct Conn(pub turmoil::net::TcpStream);

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

pub fn site_of(id: &str) -> (&'static str, Role) {
    match &id[..1] {
        "a" => ("dc-a", Role::Storage),
        "b" => ("dc-b", Role::Storage),
        _ => ("witness", Role::Witness),
    }
}

fn record(id: &str) -> NodeRecord {
    let (site, role) = site_of(id);
    NodeRecord {
        id: id.into(),
        raft_id: raft_id_of(id),
        site: site.into(),
        role,
        api: format!("{id}:{ENGINE_PORT}"),
        nbd: None,
        replication: None,
        capacity_bytes: 1 << 40,
        timings: None,
    }
}

/// Engine timings for the simulation: the defaults (DESIGN.md 7).
pub fn timings() -> QuorumConfig {
    QuorumConfig { preferred_site: Some("dc-a".into()), ..QuorumConfig::default() }
}

/// The timings of a host whose clock runs `rate_ppm` fast (negative: slow).
/// turmoil gives every host the same clock, so a drifting clock is modelled
/// by its effect: a duration the host sets (a lease, a timeout, a loss
/// threshold) elapses after `d / (1 + ρ)` of real time, and an interval it
/// measures is compared against that scaled threshold.
pub fn drifted_timings(rate_ppm: i64) -> QuorumConfig {
    let t = timings();
    let scale = |ms: u64| ((ms as f64) / (1.0 + rate_ppm as f64 / 1e6)).round() as u64;
    QuorumConfig {
        heartbeat_ms: scale(t.heartbeat_ms),
        election_timeout_min_ms: scale(t.election_timeout_min_ms),
        election_timeout_max_ms: scale(t.election_timeout_max_ms),
        lease_ms: scale(t.lease_ms),
        node_loss_ms: scale(t.node_loss_ms),
        site_stable_ms: scale(t.site_stable_ms),
        // The margin is a configured duration too: it drifts with the clock.
        drift_margin_ms: scale(t.drift_margin_ms),
        ..t
    }
}

/// A host's clock rate for a run: drawn from the seed, within the bound
/// the model simulator uses ([`super::clock::MAX_DRIFT_PPM`]).
pub fn drift_ppm_of(seed: u64, id: &str) -> i64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (seed, id).hash(&mut h);
    let span = 2 * super::clock::MAX_DRIFT_PPM + 1;
    (h.finish() % span as u64) as i64 - super::clock::MAX_DRIFT_PPM
}

fn sim_now_ms() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64
}

/// Start host `id`'s quorum member on `data_dir` with drifted timings and
/// serve its internal API on turmoil TCP. True: its very first start.
pub(crate) async fn start_member(
    id: &str,
    data_dir: PathBuf,
    drift_ppm: i64,
) -> turmoil::Result<(Quorum, bool)> {
    let (site, role) = site_of(id);
    let cfg = EngineConfig {
        node_id: id.to_string(),
        site: site.into(),
        role,
        api_addr: format!("{id}:{ENGINE_PORT}"),
        data_dir,
        timings: drifted_timings(drift_ppm),
        tls: None,
        // The operator configured the nominal timings; the drift is the clock's.
        declared_timings: Some(metro_quorum::state::LeaseTimings::of(&timings())),
    };
    // A restarted host rejoins; only the very first start of a1 bootstraps.
    let first_start = !cfg.data_dir.join("raft").exists();
    let q = Quorum::start_with_connector(cfg, Arc::new(TurmoilConnector)).await?;
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", ENGINE_PORT)).await?;
    let incoming = futures::stream::unfold(listener, |l| async move {
        let next = l.accept().await.map(|(s, _)| Conn(s));
        Some((next, l))
    });
    let router = tonic::transport::Server::builder().add_service(q.internal_service());
    tokio::spawn(async move {
        let _ = router.serve_with_incoming(incoming).await;
    });
    Ok((q, first_start))
}

/// a1's first start bootstraps the cluster; every other start joins through
/// the other `hosts`, retrying until it is in.
pub(crate) async fn enter_cluster(
    q: &Quorum,
    id: &str,
    first_start: bool,
    me: NodeRecord,
    hosts: &[&str],
) -> turmoil::Result {
    if id == "a1" && first_start {
        let sites = vec![
            ("dc-a".to_string(), SiteKind::Data),
            ("dc-b".to_string(), SiteKind::Data),
            ("witness".to_string(), SiteKind::Witness),
        ];
        q.initialize(sites, Some("dc-a".into()), me).await?;
    } else {
        let peers: Vec<String> =
            hosts.iter().filter(|p| **p != id).map(|p| format!("{p}:{ENGINE_PORT}")).collect();
        while let Err(e) = q.join(me.clone(), peers.clone()).await {
            tracing::debug!(%id, error = %e, "join failed; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Ok(())
}

/// The software of one host: start the member, serve, join, heartbeat, report.
pub async fn engine_host(
    id: String,
    dir: PathBuf,
    oracle: Arc<Mutex<EngineOracle>>,
    drift_ppm: i64,
) -> turmoil::Result {
    let (q, first_start) = start_member(&id, dir, drift_ppm).await?;
    enter_cluster(&q, &id, first_start, record(&id), &["a1", "a2", "b1", "b2", "w1"]).await?;
    let rx = q.state();
    let me = id.clone();
    q.spawn_heartbeat(move || {
        let s = rx.borrow().clone();
        s.volumes
            .values()
            .filter(|v| v.primary.as_deref() == Some(me.as_str()))
            .map(|v| (v.name.clone(), v.epoch))
            .collect()
    });
    loop {
        let state = q.state().borrow().clone();
        if id == "a1" && state.nodes.len() == 5 && state.volumes.len() < super::harness::VOLUMES.len() {
            for (name, replicas, primary) in super::harness::VOLUMES {
                if !state.volumes.contains_key(name) {
                    let _ = q
                        .propose(Command::CreateVolume {
                            name: name.into(),
                            size_bytes: 1 << 30,
                            iops_limit: 0,
                            bandwidth_limit: 0,
                            lease_policy: LeasePolicy::Suspend,
                            replicas: replicas.iter().map(|r| r.to_string()).collect(),
                            primary: primary.into(),
                            nonce: 1,
                        })
                        .await;
                }
            }
        }
        let status = q.status();
        let now = sim_now_ms();
        let mut serving = BTreeMap::new();
        for v in state.volumes.values().filter(|v| v.primary.as_deref() == Some(id.as_str())) {
            if let Some(until) = q.lease_valid_until(&v.name, v.epoch) {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                serving.insert(v.name.clone(), now + left.as_millis() as u64);
            }
        }
        oracle.lock().unwrap_or_else(|p| p.into_inner()).report(&id, &status, state, serving);
        tokio::time::sleep(Duration::from_millis(SAMPLE_MS)).await;
    }
}

/// Outcome of [`run_engine_site_loss`].
#[derive(Debug)]
pub struct EngineReport {
    pub violations: Vec<String>,
    /// Simulated ms from the loss of dc-a until every volume was served again.
    pub rto_ms: Option<u64>,
    /// Final primaries as seen by a survivor.
    pub primaries: BTreeMap<String, Option<String>>,
    pub ready_at_ms: Option<u64>,
    /// The oracle's digest of the whole run (see [`EngineOracle::trace`]).
    pub trace: u64,
}

/// Boot five real members, create the volumes, wait until every volume is
/// served and the voters are site-balanced, crash every host of `site`, and
/// run until every volume is served again by a survivor.
pub fn run_engine_site_loss(seed: u64, site: &str) -> EngineReport {
    let lost: Vec<&'static str> = super::faults::hosts_of(site).to_vec();
    let survivor = if site == "dc-a" { "b1" } else { "a1" };
    const READY_DEADLINE_MS: u64 = 60_000;
    const FAILOVER_DEADLINE_MS: u64 = 20_000;
    let (_root, oracle, mut sim) = boot(seed, READY_DEADLINE_MS + FAILOVER_DEADLINE_MS + 10_000);
    let vols: Vec<&str> = super::harness::VOLUMES.iter().map(|(v, _, _)| *v).collect();
    let all_served = |o: &EngineOracle| vols.iter().all(|v| o.serving(v).len() == 1);
    // Site-balanced voters: one per data site plus the witness.
    let balanced = |o: &EngineOracle| {
        o.voters.len() == 3 && ["a", "b", "w"].iter().all(|p| o.voters.iter().any(|v| v.starts_with(p)))
    };
    let mut ready_at = None;
    let mut lost_at = None;
    let mut rto = None;
    loop {
        if let Err(e) = sim.step() {
            oracle.lock().unwrap().violations.push(format!("host error: {e}"));
            break;
        }
        let now = sim.elapsed().as_millis() as u64;
        let mut o = oracle.lock().unwrap();
        o.check_instant(now);
        if !o.violations.is_empty() {
            break;
        }
        match (ready_at, lost_at) {
            (None, _) if all_served(&o) && balanced(&o) => {
                ready_at = Some(now);
                drop(o);
                let mut o = oracle.lock().unwrap();
                for h in &lost {
                    sim.crash(*h);
                    o.crashed(h);
                }
                lost_at = Some(now);
            }
            (None, _) if now > READY_DEADLINE_MS => {
                let msg = format!(
                    "the cluster never became ready: statuses {:?}, served {:?}",
                    o.statuses,
                    vols.iter().map(|v| o.serving(v)).collect::<Vec<_>>()
                );
                o.violations.push(msg);
                break;
            }
            (Some(_), Some(l))
                if all_served(&o)
                    && vols.iter().all(|v| o.serving(v).iter().all(|n| !lost.contains(&n.as_str()))) =>
            {
                rto = Some(now - l);
                break;
            }
            (Some(_), Some(l)) if now > l + FAILOVER_DEADLINE_MS => {
                o.violations.push(format!("no failover within {FAILOVER_DEADLINE_MS} ms"));
                break;
            }
            _ => {}
        }
    }
    let o = oracle.lock().unwrap();
    let primaries = o
        .state_of(survivor)
        .map(|s| s.volumes.values().map(|v| (v.name.clone(), v.primary.clone())).collect())
        .unwrap_or_default();
    EngineReport {
        violations: o.violations.clone(),
        rto_ms: rto,
        primaries,
        ready_at_ms: ready_at,
        trace: o.trace,
    }
}

fn shm_or_tmp() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// Outcome of [`run_engine_random`].
#[derive(Debug)]
pub struct EngineRandomReport {
    pub seed: u64,
    pub faults: Vec<(u64, super::faults::Fault)>,
    pub violations: Vec<String>,
    /// Volumes not served by exactly one member at the end of the liveness phase.
    pub unserved: Vec<String>,
    pub promotions: usize,
    /// The oracle's digest of the whole run (see [`EngineOracle::trace`]).
    pub trace: u64,
}

/// Random faults (the model simulator's schedule: full, one-way and
/// witness-sees-one-side partitions, crashes, restarts, slow links) against
/// five real members; invariants after every step, then a heal and a check
/// that every volume is served again.
pub fn run_engine_random(seed: u64, safety_ms: u64, liveness_ms: u64) -> EngineRandomReport {
    use super::faults::{schedule, Scenario};
    // Faults start after the boot, which takes well under 4 s simulated.
    let faults = schedule(Scenario::Random, seed, safety_ms);
    let end_ms = safety_ms + liveness_ms;
    let (_root, oracle, mut sim) = boot(seed, end_ms + 10_000);
    super::harness::base_latency(&sim);
    let mut pending = faults.iter().cloned().peekable();
    let mut crashed = std::collections::BTreeSet::new();
    loop {
        let now = sim.elapsed().as_millis() as u64;
        while let Some((_, f)) = pending.next_if(|(at, _)| *at <= now) {
            let leader = {
                let o = oracle.lock().unwrap();
                o.statuses
                    .values()
                    .filter(|s| s.is_leader)
                    .max_by_key(|s| s.term)
                    .and_then(|s| s.leader.clone())
            };
            let o = oracle.clone();
            super::harness::apply_fault(
                &mut sim,
                leader,
                &mut |h| o.lock().unwrap().crashed(h),
                &mut crashed,
                &f,
            );
        }
        if let Err(e) = sim.step() {
            oracle.lock().unwrap().violations.push(format!("host error: {e}"));
            break;
        }
        let now = sim.elapsed().as_millis() as u64;
        let mut o = oracle.lock().unwrap();
        o.check_instant(now);
        if !o.violations.is_empty() || now >= end_ms {
            break;
        }
    }
    let o = oracle.lock().unwrap();
    let unserved = super::harness::VOLUMES
        .iter()
        .filter(|(v, _, _)| o.serving(v).len() != 1)
        .map(|(v, _, _)| v.to_string())
        .collect();
    EngineRandomReport {
        seed,
        faults,
        violations: o.violations.clone(),
        unserved,
        promotions: o.promotions.len(),
        trace: o.trace,
    }
}

/// Five real members on a fresh turmoil world (boot only; the caller steps).
fn boot(seed: u64, total_ms: u64) -> (tempfile::TempDir, Arc<Mutex<EngineOracle>>, turmoil::Sim<'static>) {
    let root = tempfile::Builder::new().prefix("metro-engine-sim").tempdir_in(shm_or_tmp()).expect("tempdir");
    let oracle = Arc::new(Mutex::new(EngineOracle::default()));
    // turmoil runs every host on this thread: seeding its generator makes
    // openraft's election timeouts a function of the seed.
    metro_quorum::runtime::seed_thread_rng(seed);
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .tick_duration(Duration::from_millis(1))
        .simulation_duration(Duration::from_millis(total_ms))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(3))
        .build();
    for id in ["a1", "a2", "b1", "b2", "w1"] {
        let dir = root.path().join(id);
        let o = oracle.clone();
        let drift = drift_ppm_of(seed, id);
        sim.host(id, move || engine_host(id.to_string(), dir.clone(), o.clone(), drift));
    }
    (root, oracle, sim)
}

/// Outcome of [`run_engine_witness_then_dc_a`].
#[derive(Debug, Default)]
pub struct NoQuorumReport {
    pub violations: Vec<String>,
    /// Every volume was served throughout the witness-only outage.
    pub served_without_witness: bool,
    /// `(ms after dc-a was lost, volume, member)` of any serving seen once
    /// every lease must have ended.
    pub served_without_quorum: Vec<(u64, String, String)>,
}

/// DESIGN.md 5, "witness lost, then dc-a lost": the witness dies (nothing
/// changes), 5 s later dc-a dies; dc-b alone has no quorum, so once the last
/// lease has run out nobody may serve.
pub fn run_engine_witness_then_dc_a(seed: u64) -> NoQuorumReport {
    const READY_DEADLINE_MS: u64 = 60_000;
    const WITNESS_ONLY_MS: u64 = 5_000;
    const OBSERVE_MS: u64 = 10_000;
    let t = timings();
    // Past this, every lease granted before the loss has ended on every clock.
    let leases_over_ms = t.lease_ms + t.drift_margin_ms + t.heartbeat_ms;
    let (_root, oracle, mut sim) = boot(seed, READY_DEADLINE_MS + WITNESS_ONLY_MS + OBSERVE_MS + 5_000);
    let vols: Vec<&str> = super::harness::VOLUMES.iter().map(|(v, _, _)| *v).collect();
    let mut report = NoQuorumReport { served_without_witness: true, ..Default::default() };
    let (mut witness_lost, mut dc_a_lost) = (None::<u64>, None::<u64>);
    loop {
        if let Err(e) = sim.step() {
            report.violations.push(format!("host error: {e}"));
            break;
        }
        let now = sim.elapsed().as_millis() as u64;
        let mut o = oracle.lock().unwrap();
        o.check_instant(now);
        if !o.violations.is_empty() {
            break;
        }
        let all_served = vols.iter().all(|v| o.serving(v).len() == 1);
        match (witness_lost, dc_a_lost) {
            (None, _) => {
                let balanced = o.voters.len() == 3 && o.voters.iter().any(|v| v == "w1");
                if all_served && balanced {
                    sim.crash("w1");
                    o.crashed("w1");
                    witness_lost = Some(now);
                } else if now > READY_DEADLINE_MS {
                    report.violations.push("the cluster never became ready".into());
                    break;
                }
            }
            (Some(w), None) => {
                // Let leases settle a heartbeat after the loss, then require service throughout.
                if now > w + t.heartbeat_ms * 2 && !all_served {
                    report.served_without_witness = false;
                }
                if now >= w + WITNESS_ONLY_MS {
                    for h in ["a1", "a2"] {
                        sim.crash(h);
                        o.crashed(h);
                    }
                    dc_a_lost = Some(now);
                }
            }
            (Some(_), Some(a)) => {
                if now > a + leases_over_ms {
                    for v in &vols {
                        for n in o.serving(v) {
                            report.served_without_quorum.push((now - a, v.to_string(), n));
                        }
                    }
                }
                if now >= a + OBSERVE_MS {
                    break;
                }
            }
        }
    }
    report.violations.extend(oracle.lock().unwrap().violations.clone());
    report
}
