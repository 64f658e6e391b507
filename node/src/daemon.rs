//! The daemon: composes the quorum member, the control API, etcd registration
//! and (on storage nodes) volumes, NBD and replication. `metro-node` and
//! `metro-witness` are thin wrappers around [`run`]; tests start daemons as
//! real processes through those binaries.
//!
//! ```text
//!  start ─► quorum member ─► gRPC (Control + Internal, mTLS) ─► metrics
//!        ─► storage: volume manager, replication server, NBD server
//!        ─► join: register in etcd; first claimant initializes raft, others join as learners
//!        ─► heartbeat (liveness + leases) ─► leader-only: reconcile specs, publish status
//!        ─► READY=1 ... SIGTERM ─► hand primaries to in-sync replicas (handoff.rs, ≤ 8 s)
//!                                ─► depose the rest, let NBD clients finish in-flight requests, stop
//! ```

use crate::control::ControlService;
use crate::registry::{
    etcd::{EtcdRegistry, EtcdTls},
    Registry, VolumeSpec,
};
use crate::repl::link::Dialer;
use crate::volume::manager::{ClusterView, VolumeManager};
use crate::volume::storage::VolumeStorage;
use anyhow::Context;
use async_trait::async_trait;
use metro_api::config::{DaemonConfig, Role, SiteKind};
use metro_api::pb::control::control_server::ControlServer;
use metro_api::telemetry;
use metro_api::tls::TlsFiles;
use metro_quorum::decide::placement::place_volume;
use metro_quorum::{ClusterState, Command, CommandResult, EngineConfig, NodeRecord, Quorum, Restart};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the leader reconciles volume specs from etcd in any case.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How often the leader checks whether any spec changed (a keys-only,
/// one-key etcd read), so a new volume is placed within this, not within
/// RECONCILE_EVERY (which made every create take up to a second).
const SPECS_POLL: Duration = Duration::from_millis(50);
/// How often the leader publishes the status summary to etcd.
const PUBLISH_EVERY: Duration = Duration::from_secs(5);
/// Retry period for joining the cluster.
const JOIN_RETRY: Duration = Duration::from_secs(1);
/// A refusal by the cluster is fatal only once it has persisted this long:
/// while the bootstrap node is still committing the site list, joiners are
/// briefly told "unknown site" (seen in lab start-ups), which must not kill them.
const REFUSAL_GRACE: Duration = Duration::from_secs(10);
/// Bound on one join attempt through the peers.
const JOIN_ATTEMPT: Duration = Duration::from_secs(5);
/// On SIGTERM: time allowed to move this node's primaries to in-sync replicas.
const HANDOFF_BUDGET: Duration = Duration::from_secs(8);
/// On SIGTERM: time NBD clients get to finish in-flight requests afterwards
/// (hand-off plus drain stay within systemd's stop timeout).
const NBD_DRAIN: Duration = Duration::from_secs(2);

/// Process exit code when the cluster refuses this node (unknown site, a
/// second witness, an id collision): retrying cannot help, the operator must
/// fix the config. Distinct from 1 so systemd units can use
/// `RestartPreventExitStatus=3` instead of restarting forever.
pub const EXIT_REFUSED: u8 = 3;

/// The cluster refused to admit this node; fatal (see [`EXIT_REFUSED`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "the cluster refused node `{node}` (site `{site}`): {reason} (next step: fix node_id/site/role in {config} to match the cluster (`metroctl status` lists its sites and nodes), then start again)"
)]
pub struct JoinRefused {
    pub node: String,
    pub site: String,
    pub reason: String,
    pub config: String,
}

/// [`ClusterView`] over the real quorum engine.
pub struct QuorumView(pub Quorum);

#[async_trait]
impl ClusterView for QuorumView {
    fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.0.state()
    }

    fn lease_valid(&self, volume: &str, min_epoch: u64) -> bool {
        let now = tokio::time::Instant::now();
        self.0.lease_watch().borrow().get(volume).is_some_and(|l| l.epoch >= min_epoch && l.valid_until > now)
    }

    async fn propose(&self, cmd: Command) -> Result<CommandResult, String> {
        self.0.propose(cmd).await.map_err(|e| e.to_string())
    }

    fn release_lease(&self, volume: &str, epoch: u64) {
        self.0.release_lease(volume, epoch);
    }

    fn lease_wanted(&self) {
        self.0.heartbeat_soon();
    }
}

/// The API addresses of every other member this node's replicated state knows.
fn peer_apis(quorum: &Quorum, me: &str) -> Vec<String> {
    quorum.state().borrow().nodes.values().filter(|n| n.id != me).map(|n| n.api.clone()).collect()
}

fn host_port(host: &str, addr: &std::net::SocketAddr) -> String {
    format!("{host}:{}", addr.port())
}

/// This daemon's registration record.
pub fn node_record(cfg: &DaemonConfig, capacity_bytes: u64) -> NodeRecord {
    let host = cfg.advertise_host();
    NodeRecord {
        id: cfg.node_id.clone(),
        raft_id: metro_quorum::state::raft_id_of(&cfg.node_id),
        site: cfg.site.clone(),
        role: cfg.role,
        api: host_port(&host, &cfg.listen.api),
        nbd: cfg.listen.nbd.map(|a| host_port(&host, &a)),
        replication: cfg.listen.replication.map(|a| host_port(&host, &a)),
        capacity_bytes,
        timings: Some(metro_quorum::state::LeaseTimings::of(&cfg.quorum)),
    }
}

/// Run a daemon until SIGTERM/SIGINT.
pub async fn run(cfg: DaemonConfig, config_path: &str) -> anyhow::Result<()> {
    metro_api::tls::install_crypto_provider();
    cfg.check_secrets(config_path)?;
    let cfg = Arc::new(cfg);
    let tls = TlsFiles::from_config(&cfg.tls).context("loading TLS files")?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data_dir {}", cfg.data_dir.display()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    telemetry::notify_status("starting");

    let quorum = Quorum::start(EngineConfig {
        node_id: cfg.node_id.clone(),
        site: cfg.site.clone(),
        role: cfg.role,
        api_addr: host_port(&cfg.advertise_host(), &cfg.listen.api),
        data_dir: cfg.data_dir.join("quorum"),
        timings: cfg.quorum.clone(),
        tls: Some(tls.clone()),
        declared_timings: None,
    })
    .await
    .context("starting the quorum member")?;
    let etcd_tls = EtcdTls::from_config(&cfg.etcd).context("loading the [etcd] TLS files")?;
    let registry: Arc<dyn Registry> = Arc::new(
        EtcdRegistry::new(
            &cfg.cluster,
            cfg.etcd.endpoints.clone(),
            Duration::from_millis(cfg.etcd.timeout_ms),
        )
        .with_tls(etcd_tls),
    );

    // Storage: volumes, replication and NBD.
    let mut manager = None;
    let mut nbd_task = None;
    let mut capacity = 0;
    let mut file_storage = None;
    if cfg.role == Role::Storage {
        let storage = crate::volume::file_storage::FileStorage::open(&cfg)
            .with_context(|| format!("opening volumes under {}", cfg.data_dir.display()))?;
        capacity = storage.capacity().0;
        let storage = Arc::new(storage);
        file_storage = Some(storage.clone());
        let storage: Arc<dyn VolumeStorage> = storage;
        let dialer = Dialer::tls(cfg.node_id.clone(), tls.rustls_client()?, Some(cfg.listen.api.ip()));
        let m = VolumeManager::new(
            cfg.node_id.clone(),
            Arc::new(QuorumView(quorum.clone())),
            storage,
            dialer,
            Duration::from_millis(cfg.storage.replica_ack_timeout_ms),
        );
        m.spawn(stop_rx.clone());
        let repl_addr = cfg.listen.replication.expect("validated: storage nodes have a replication address");
        let repl_listener = tokio::net::TcpListener::bind(repl_addr)
            .await
            .with_context(|| format!("binding replication {repl_addr} (is another daemon running?)"))?;
        tokio::spawn(crate::repl::server::serve(
            repl_listener,
            tls.rustls_server()?,
            m.clone(),
            stop_rx.clone(),
        ));
        let nbd_addr = cfg.listen.nbd.expect("validated: storage nodes have an NBD address");
        let nbd_listener = tokio::net::TcpListener::bind(nbd_addr)
            .await
            .with_context(|| format!("binding NBD {nbd_addr} (is another daemon running?)"))?;
        let nbd = Arc::new(crate::nbd::NbdServer::new(
            m.clone(),
            crate::nbd::NbdLimits { max_request_bytes: cfg.storage.max_request_bytes, ..Default::default() },
        ));
        nbd_task = Some(tokio::spawn(nbd.serve(nbd_listener, stop_rx.clone())));
        let m2 = m.clone();
        quorum.spawn_heartbeat(move || m2.primaries());
        manager = Some(m);
    } else {
        quorum.spawn_heartbeat(Vec::new);
    }

    // gRPC: operators' Control API and the internal raft services.
    let control = ControlService {
        cfg: cfg.clone(),
        quorum: quorum.clone(),
        registry: registry.clone(),
        manager: manager.clone(),
        tls: tls.clone(),
    };
    let api_listener = tokio::net::TcpListener::bind(cfg.listen.api)
        .await
        .with_context(|| format!("binding API {} (is another daemon running?)", cfg.listen.api))?;
    let incoming = tonic::transport::server::TcpIncoming::from(api_listener).with_nodelay(Some(true));
    let mut grpc_stop = stop_rx.clone();
    let server = tonic::transport::Server::builder()
        .tls_config(tls.tonic_server())?
        .timeout(Duration::from_secs(30))
        .add_service(ControlServer::new(control))
        .add_service(quorum.internal_service())
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = grpc_stop.changed().await;
        });
    let grpc = tokio::spawn(server);

    let registry_metrics = telemetry::new_registry();
    crate::metrics::register(&registry_metrics, quorum.clone(), manager.clone());
    telemetry::serve_metrics(cfg.listen.metrics, registry_metrics)
        .await
        .with_context(|| format!("binding metrics {}", cfg.listen.metrics))?;

    let me = node_record(&cfg, capacity);
    let mut join = tokio::spawn(join_loop(cfg.clone(), quorum.clone(), registry.clone(), me));
    tokio::spawn(leader_loop(cfg.clone(), quorum.clone(), registry.clone(), stop_rx.clone()));

    telemetry::notify_ready(&format!("{} {} serving", cfg.role_name(), cfg.node_id));
    let q = quorum.clone();
    telemetry::spawn_watchdog(move || q.status().last_applied > 0 || q.status().leader.is_some());
    tracing::info!(node = %cfg.node_id, site = %cfg.site, "daemon ready");

    let mut restart_rx = quorum.restart_requested();
    let restart = async move { restart_rx.wait_for(|r| r.is_some()).await.ok().and_then(|r| r.clone()) };
    tokio::pin!(restart);
    let outcome = tokio::select! {
        _ = wait_for_signal() => Outcome::Stop,
        r = &mut restart => r.map_or(Outcome::Stop, Outcome::Restart),
        r = &mut join => match r {
            Ok(Err(reason)) => Outcome::Refused(reason),
            // Joined (or the task ended): keep serving until a signal or a restart.
            _ => tokio::select! {
                _ = wait_for_signal() => Outcome::Stop,
                r = &mut restart => r.map_or(Outcome::Stop, Outcome::Restart),
            },
        },
    };
    if let Outcome::Refused(reason) = &outcome {
        tracing::error!(node = %cfg.node_id, site = %cfg.site, %reason, "the cluster refused this node; stopping");
    }
    tracing::info!("shutting down");
    telemetry::notify_stopping();
    // Only a requested stop hands primaries off; a refused node has none, and
    // a restart in place (quorum-loss override) keeps serving its volumes.
    if matches!(outcome, Outcome::Stop) {
        if let Some(m) = &manager {
            hand_off(&quorum, m).await;
        }
    }
    let _ = stop_tx.send(true);
    if let Some(t) = nbd_task {
        telemetry::notify_status("stopping: NBD clients finish in-flight requests");
        let _ = tokio::time::timeout(NBD_DRAIN, t).await;
    }
    quorum.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(3), grpc).await;
    // An orderly stop syncs, as a machine's shutdown syncs its page cache
    // (only the test-only volatile write cache holds anything here).
    if let Some(fs) = &file_storage {
        fs.flush_volatile().await;
    }
    match outcome {
        Outcome::Refused(reason) => Err(JoinRefused {
            node: cfg.node_id.clone(),
            site: cfg.site.clone(),
            reason,
            config: config_path.to_string(),
        }
        .into()),
        Outcome::Restart(r) => {
            let reason = match r {
                Restart::Rebuilt { incarnation } => {
                    format!("this node rebuilt the quorum group (incarnation {incarnation})")
                }
                Restart::Rejoin { incarnation } => {
                    let peers = peer_apis(&quorum, &cfg.node_id);
                    metro_quorum::discard_raft_state(&cfg.data_dir.join("quorum"), incarnation, &peers)
                        .context("discarding the superseded raft state")?;
                    tracing::warn!(
                        incarnation,
                        "discarded this node's raft state (superseded quorum group); it rejoins as a learner"
                    );
                    format!("rejoining the rebuilt quorum group (incarnation {incarnation}) as a learner")
                }
            };
            Err(RestartInPlace { reason }.into())
        }
        Outcome::Stop => Ok(()),
    }
}

/// SIGTERM on a storage node: move its primaries to in-sync replicas (the
/// `node drain` path) so clients see a pause, not a failover; log what stays.
async fn hand_off(quorum: &Quorum, manager: &Arc<VolumeManager>) {
    let me = quorum.node_id().to_string();
    let status = quorum.status();
    let view = QuorumView(quorum.clone());
    let count = metro_quorum::decide::primaries_of(&quorum.state().borrow(), &me).count();
    if count == 0 {
        return;
    }
    telemetry::notify_status(&format!("stopping: handing off {count} primaries"));
    tracing::info!(primaries = count, leader = ?status.leader, "handing off primaries before stopping");
    let started = std::time::Instant::now();
    let r = crate::handoff::hand_off_primaries(
        &view,
        &me,
        status.leader.is_some(),
        |v| manager.is_primary_here(v),
        HANDOFF_BUDGET,
    )
    .await;
    for (volume, to) in &r.moved {
        tracing::info!(%volume, %to, "primary handed off");
    }
    for (volume, why) in &r.kept {
        tracing::warn!(%volume, %why, "primary not handed off; it fails over once this node's lease lapses");
    }
    tracing::info!(
        moved = r.moved.len(),
        kept = r.kept.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "hand-off done"
    );
}

enum Outcome {
    Stop,
    Refused(String),
    Restart(Restart),
}

/// The daemon must start again in place (same pid, same arguments: see
/// [`reexec`]): its quorum member was rebuilt by the quorum-loss override, or
/// superseded by a rebuilt group and its raft state discarded. Volume data is
/// untouched; the restarted daemon resumes from it.
#[derive(Debug, thiserror::Error)]
#[error("restarting in place: {reason}")]
pub struct RestartInPlace {
    pub reason: String,
}

/// Replace this process by a fresh copy of the same binary with the same
/// arguments (same pid, so supervisors and lab.json stay valid). Returns only
/// on failure.
pub fn reexec() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    std::process::Command::new("/proc/self/exe").arg0(argv0).args(args).exec()
}

trait RoleName {
    fn role_name(&self) -> &'static str;
}

impl RoleName for DaemonConfig {
    fn role_name(&self) -> &'static str {
        match self.role {
            Role::Storage => "storage node",
            Role::Storageless => "storageless node",
            Role::Witness => "witness",
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Register in etcd and get into the raft group: the first claimant of the
/// bootstrap key initializes it, everyone else joins as a learner (the leader
/// then balances voters). Retries transient errors (etcd or peers down, no
/// leader) until it succeeds; also re-registers the node record on every
/// restart so addresses stay current. Returns `Err(reason)` when the cluster
/// refused this node (retrying cannot help).
async fn join_loop(
    cfg: Arc<DaemonConfig>,
    quorum: Quorum,
    registry: Arc<dyn Registry>,
    me: NodeRecord,
) -> Result<(), String> {
    let sites: Vec<(String, SiteKind)> = cfg.sites.iter().map(|s| (s.name.clone(), s.kind)).collect();
    // Registration is independent of joining: keep trying until etcd takes it
    // (then the registry keeps the lease alive on its own).
    let (reg, rec) = (registry.clone(), me.clone());
    tokio::spawn(async move {
        let mut attempt = 0u32;
        while let Err(e) = reg.register(&rec).await {
            attempt += 1;
            if attempt == 1 || attempt.is_multiple_of(30) {
                tracing::warn!(error = %e, "cannot register in etcd yet; retrying");
            }
            tokio::time::sleep(JOIN_RETRY).await;
        }
    });
    let mut attempt = 0u32;
    let mut refused_since: Option<tokio::time::Instant> = None;
    loop {
        attempt += 1;
        let known = quorum.state().borrow().nodes.get(&me.id) == Some(&me);
        if known {
            tracing::info!(node = %me.id, "member of the cluster");
            return Ok(());
        }
        // A member that rejoins a rebuilt group (incarnation > 0, raft state
        // discarded) never bootstraps a group of its own.
        let may_bootstrap = quorum.incarnation() == 0;
        let result = match registry.claim_bootstrap(&me.id).await {
            Ok(winner) if winner == me.id && may_bootstrap => quorum
                .initialize(sites.clone(), cfg.quorum.preferred_site.clone(), me.clone())
                .await
                .map_err(JoinError::from),
            Ok(_) => {
                let mut peers: Vec<String> = match registry.nodes().await {
                    Ok(nodes) => nodes.into_iter().filter(|n| n.id != me.id).map(|n| n.api).collect(),
                    Err(_) => Vec::new(),
                };
                for p in quorum.rejoin_peers() {
                    if !peers.contains(&p) {
                        peers.push(p);
                    }
                }
                join_bounded(&quorum, &me, peers).await
            }
            // etcd is down: only a node that already knows its cluster can rejoin it.
            Err(e) => {
                let peers = peer_apis(&quorum, &me.id);
                let peers = if peers.is_empty() { quorum.rejoin_peers() } else { peers };
                if peers.is_empty() {
                    Err(JoinError::Retry(format!("cannot reach etcd to find the cluster: {e}")))
                } else {
                    join_bounded(&quorum, &me, peers).await
                }
            }
        };
        match result {
            Ok(()) => {
                tracing::info!(node = %me.id, "joined the cluster");
                return Ok(());
            }
            Err(JoinError::Refused(reason)) => {
                let since = *refused_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= REFUSAL_GRACE {
                    return Err(reason);
                }
                tracing::warn!(%reason, "the cluster refused this node; retrying in case it is still bootstrapping");
                tokio::time::sleep(JOIN_RETRY).await;
            }
            Err(JoinError::Retry(e)) => {
                refused_since = None;
                if attempt == 1 || attempt.is_multiple_of(10) {
                    tracing::warn!(error = %e, attempt, "not in the cluster yet; retrying");
                }
                tokio::time::sleep(JOIN_RETRY).await;
            }
        }
    }
}

/// One bounded join attempt, so the loop re-reads etcd (the bootstrap winner
/// may change from unknown to known) instead of waiting out a long deadline.
async fn join_bounded(quorum: &Quorum, me: &NodeRecord, peers: Vec<String>) -> Result<(), JoinError> {
    if peers.is_empty() {
        return Err(JoinError::Retry("no peers registered yet".into()));
    }
    match tokio::time::timeout(JOIN_ATTEMPT, quorum.join(me.clone(), peers)).await {
        Ok(r) => r.map_err(JoinError::from),
        Err(_) => Err(JoinError::Retry(format!("no leader answered within {JOIN_ATTEMPT:?}"))),
    }
}

/// One join attempt's failure: worth retrying, or a refusal by the cluster.
enum JoinError {
    Retry(String),
    Refused(String),
}

impl From<metro_quorum::QuorumError> for JoinError {
    fn from(e: metro_quorum::QuorumError) -> Self {
        use metro_quorum::QuorumError as Q;
        match e {
            // `join` reports a rejected RegisterNode (unknown site, second
            // witness, id collision) as Invalid; a peer refusing our
            // certificate is Refused; another protocol version is fatal too.
            Q::Invalid(r) => JoinError::Refused(r),
            e @ (Q::Refused { .. } | Q::VersionMismatch(_)) => JoinError::Refused(e.to_string()),
            e => JoinError::Retry(e.to_string()),
        }
    }
}

/// Leader-only duties: seed and reconcile the cluster config and the volume
/// specs from etcd into committed state, and publish a status summary for
/// outside observers. Specs are reconciled as soon as their version key in
/// etcd changes (polled every `SPECS_POLL`), and at least every
/// `RECONCILE_EVERY`; the cluster config every `RECONCILE_EVERY`.
async fn leader_loop(
    cfg: Arc<DaemonConfig>,
    quorum: Quorum,
    registry: Arc<dyn Registry>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SPECS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_publish = tokio::time::Instant::now() - PUBLISH_EVERY;
    let mut last_reconcile = tokio::time::Instant::now() - RECONCILE_EVERY;
    let mut seen_version = None;
    let mut warned_generation = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if !quorum.status().is_leader {
            seen_version = None;
            continue;
        }
        let due = last_reconcile.elapsed() >= RECONCILE_EVERY;
        if due {
            if let Err(e) = reconcile_config(&cfg, &quorum, registry.as_ref(), &mut warned_generation).await {
                tracing::warn!(error = %e, "reconciling the cluster config");
            }
        }
        // Read the version before the specs: a change after it is seen next poll.
        let version = registry.specs_version().await.ok();
        if version.is_some() && version == seen_version && !due {
            continue;
        }
        last_reconcile = tokio::time::Instant::now();
        let Ok(specs) = registry.specs().await else { continue };
        let state = quorum.state().borrow().clone();
        match reconcile_specs(&quorum, registry.as_ref(), &state, specs).await {
            Ok(()) => seen_version = version,
            Err(e) => tracing::warn!(error = %e, "reconciling volume specs"),
        }
        if last_publish.elapsed() >= PUBLISH_EVERY {
            last_publish = tokio::time::Instant::now();
            let state = quorum.state().borrow().clone();
            let st = quorum.status();
            let published_at_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let summary = crate::summary::summary(&crate::summary::SummaryInput {
                cluster: &cfg.cluster,
                published_by: &cfg.node_id,
                published_at_unix_ms,
                status: &st,
                state: &state,
                ages_ms: &quorum.heartbeat_ages_ms().unwrap_or_default(),
                node_loss_ms: quorum.node_loss_ms(),
                witness_rtt: crate::summary::witness_rtt(&quorum, &state),
            });
            if let Err(e) = registry.put_status(&summary.to_string()).await {
                tracing::debug!(error = %e, "publishing the status summary");
            }
        }
    }
}

/// Leader: seed `/metro/<cluster>/config` from this daemon's `[quorum]` when
/// it is absent, and commit a stored config newer than the applied one. A
/// stored config the cluster cannot take is logged once per generation and
/// left alone (the last applied config stays in force).
async fn reconcile_config(
    cfg: &DaemonConfig,
    quorum: &Quorum,
    registry: &dyn Registry,
    warned_generation: &mut u64,
) -> Result<(), String> {
    let stored = match registry.config().await {
        Ok(Some((c, _))) => c,
        Ok(None) => {
            let applied = quorum.state().borrow().config.clone();
            let seed = metro_quorum::ClusterConfig::initial(applied.as_ref(), &cfg.quorum);
            match registry.put_config(&seed, None).await {
                Ok(()) => tracing::info!(config = ?seed, "stored the initial cluster config in etcd"),
                Err(crate::registry::RegistryError::Conflict(_)) => {}
                Err(e) => return Err(e.to_string()),
            }
            return Ok(());
        }
        Err(crate::registry::RegistryError::Corrupt { key, reason }) => {
            return Err(format!("{key} is invalid, keeping the applied config: {reason}"));
        }
        Err(e) => return Err(e.to_string()),
    };
    let state = quorum.state().borrow().clone();
    if let Some(applied) = state.config.as_ref().filter(|c| c.generation >= stored.generation) {
        if applied.generation > stored.generation && *warned_generation != stored.generation {
            // etcd went back in time (restored from an old backup): keep what
            // runs; the next `cluster config set` writes past it.
            *warned_generation = stored.generation;
            tracing::warn!(
                stored = stored.generation,
                applied = applied.generation,
                "the stored cluster config is older than the applied one; keeping the applied one"
            );
        }
        return Ok(());
    }
    let data: Vec<&str> =
        state.sites.values().filter(|s| s.kind == SiteKind::Data).map(|s| s.name.as_str()).collect();
    let valid = stored.validate(Some(&data)).and_then(|_| stored.validate_timings(cfg.quorum.heartbeat_ms));
    if let Err(e) = valid {
        if *warned_generation != stored.generation {
            *warned_generation = stored.generation;
            tracing::warn!(generation = stored.generation, error = %e, "the stored cluster config is refused; keeping the applied one");
        }
        return Ok(());
    }
    let generation = stored.generation;
    let r = quorum.propose(Command::SetClusterConfig(stored)).await.map_err(|e| e.to_string())?;
    tracing::info!(generation, result = ?r, "applied the cluster config");
    Ok(())
}

async fn reconcile_specs(
    quorum: &Quorum,
    registry: &dyn Registry,
    state: &ClusterState,
    specs: Vec<VolumeSpec>,
) -> Result<(), String> {
    let ages = quorum.heartbeat_ages_ms().unwrap_or_default();
    let alive: BTreeSet<String> =
        ages.iter().filter(|(_, age)| **age < quorum.node_loss_ms()).map(|(n, _)| n.clone()).collect();
    let mut used: BTreeMap<String, u64> = BTreeMap::new();
    for v in state.volumes.values() {
        for r in &v.replicas {
            *used.entry(r.clone()).or_default() += v.size_bytes;
        }
    }
    for spec in specs {
        let exists = state.volumes.contains_key(&spec.name);
        if spec.deleted {
            if exists {
                quorum
                    .propose(Command::DeleteVolume { name: spec.name.clone() })
                    .await
                    .map_err(|e| e.to_string())?;
            }
            registry.remove_spec(&spec.name).await.map_err(|e| e.to_string())?;
            continue;
        }
        if exists {
            continue;
        }
        match place_volume(state, &alive, &used, spec.size_bytes, spec.primary_site.as_deref()) {
            Ok((replicas, primary)) => {
                for r in &replicas {
                    *used.entry(r.clone()).or_default() += spec.size_bytes;
                }
                let r = quorum
                    .propose(Command::CreateVolume {
                        name: spec.name.clone(),
                        size_bytes: spec.size_bytes,
                        iops_limit: spec.iops_limit,
                        bandwidth_limit: spec.bandwidth_limit,
                        lease_policy: spec.lease_policy,
                        replicas: replicas.clone(),
                        primary: primary.clone(),
                        nonce: metro_quorum::state::new_volume_nonce(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(volume = %spec.name, ?replicas, %primary, result = ?r, "placed volume");
            }
            Err(e) => tracing::warn!(volume = %spec.name, error = %e, "cannot place volume yet"),
        }
    }
    Ok(())
}
