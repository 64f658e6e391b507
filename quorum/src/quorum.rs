//! [`Quorum`]: one member of metro's configuration-manager raft group.
//!
//! ```text
//!  daemon ──start()──► Quorum ─┬─ openraft Raft (LogStore, StateMachine, NetworkFactory)
//!                              ├─ InternalService  (mounted by the daemon's tonic server)
//!                              ├─ role watcher     (leader? since when? → LeaderState)
//!                              ├─ control loop     (leader only: membership, failover, site modes)
//!                              └─ heartbeat loop   (every member: liveness + primary leases)
//! ```
//!
//! Invariants:
//! - openraft types never appear in this crate's public API.
//! - Every network wait has a deadline (see `network.rs` constants and the
//!   `*_DEADLINE` constants here).
//! - Leases are memory-only on both sides; a new leader starts with an empty
//!   table and treats every volume as possibly leased until
//!   `leader_since + lease_ms + drift_margin_ms` (see `decide::lease`).

use crate::error::QuorumError;
use crate::incarnation::Incarnation;
use crate::log_store::LogStore;
use crate::network::{
    Connector, Method, NetworkFactory, Peers, TcpConnector, PROPOSE_TIMEOUT, SNAPSHOT_CHUNK_BYTES,
    SNAPSHOT_TIMEOUT,
};
use crate::state::{ClusterState, Command, CommandResult, NodeRecord};
use crate::state_machine::StateMachine;
use crate::types::{Raft, RaftId};
use crate::wire::ProposeReply;
use metro_api::config::{QuorumConfig, Role, SiteKind};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, LogId, Membership, ServerState, Vote};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Deadline for one `propose` (all retries and leader hops included).
pub const PROPOSE_DEADLINE: Duration = Duration::from_secs(10);
/// Deadline for `initialize` to elect itself and commit the bootstrap commands.
pub const INIT_DEADLINE: Duration = Duration::from_secs(15);
/// Deadline for `join`: reach a leader, be registered, and catch up.
pub const JOIN_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for building a snapshot in `compact_log` (a JSON dump of the state).
pub const COMPACT_DEADLINE: Duration = Duration::from_secs(10);
/// File (under `data_dir/raft`) with the peers a superseded member rejoins through.
const REJOIN_PEERS: &str = "rejoin-peers";
const REJOIN_MAGIC: &[u8; 8] = b"METRPEER";
/// Deadline for probing another voter before the quorum-loss override.
const OVERRIDE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on leader-hint hops per attempt (a stale hint cannot loop forever).
const MAX_HOPS: usize = 4;
/// Backoff between attempts while no leader is known.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_millis(500);

/// Everything a member needs to start.
#[derive(Clone)]
pub struct EngineConfig {
    pub node_id: String,
    pub site: String,
    pub role: Role,
    /// `host:port` other members dial (the daemon's gRPC listener).
    pub api_addr: String,
    pub data_dir: PathBuf,
    pub timings: QuorumConfig,
    /// None = plaintext (tests, simulator). Some = mTLS, callers must be `node:*` or `witness`.
    pub tls: Option<metro_api::tls::TlsFiles>,
    /// The lease timings this member declares at registration, when they are
    /// not `timings`' own. None in every daemon. The simulator emulates a
    /// drifting clock by scaling a host's configured durations (a fast clock
    /// makes every configured duration elapse early), while the operator's
    /// configuration, which registration compares across members, is the
    /// nominal one: it declares that here.
    pub declared_timings: Option<crate::state::LeaseTimings>,
}

/// A snapshot of the member's raft view, in node names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QuorumStatus {
    pub leader: Option<String>,
    pub term: u64,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    pub last_applied: u64,
    pub is_leader: bool,
    /// A joint membership change is in progress (`voters` is then the union
    /// of the old and new voter sets).
    pub membership_changing: bool,
}

/// A lease this node holds as primary of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldLease {
    pub epoch: u64,
    /// Monotonic instant the lease ends: when the renewing request was *sent* + `lease_ms`.
    pub valid_until: Instant,
}

/// Lease releases waiting for a heartbeat; beyond this the oldest is dropped.
pub(crate) const MAX_PENDING_RELEASES: usize = 4096;

/// The leader-only, in-memory part (never logged).
pub(crate) struct LeaderState {
    pub term: u64,
    /// Heartbeats and first sightings, ms on the member's monotonic clock.
    pub liveness: crate::decide::Liveness,
    pub leases: crate::decide::LeaseTable,
    pub sites: crate::decide::SiteTracker,
}

/// A leadership hand-over to the preferred site in progress (or the last one).
#[derive(Debug, Clone)]
pub(crate) struct Handover {
    pub target: String,
    pub started_ms: u64,
}

/// Why the daemon must restart this member's raft core (see [`Quorum::restart_requested`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// This member rebuilt the group (`force_new_group`): start again from the rewritten log.
    Rebuilt { incarnation: u64 },
    /// A newer incarnation superseded this voter: discard the raft state
    /// ([`discard_raft_state`]), then start again and rejoin as a learner.
    Rejoin { incarnation: u64 },
}

/// What [`Quorum::force_new_group`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideReport {
    pub incarnation: u64,
    /// The only voter of the rebuilt group (this node).
    pub voter: String,
    /// Nodes of the site kept as learners of the rebuilt group.
    pub learners: Vec<String>,
    pub fenced: Vec<String>,
    /// Volumes reset to the site's replicas (`--force`): writes acknowledged elsewhere are lost.
    pub forced: Vec<String>,
}

pub(crate) struct Shared {
    pub cfg: EngineConfig,
    pub raft_id: RaftId,
    pub raft: Raft,
    pub sm: StateMachine,
    /// A handle on the log (the raft core owns another): read and rewritten
    /// only by the quorum-loss override, with the core stopped.
    pub log: LogStore,
    pub restart: watch::Sender<Option<Restart>>,
    pub peers: Arc<Peers>,
    pub tls_enabled: bool,
    /// Origin of the `*_ms` clock used by the decision functions.
    pub t0: Instant,
    pub leader: Mutex<Option<LeaderState>>,
    pub leases: watch::Sender<Arc<BTreeMap<String, HeldLease>>>,
    /// `(volume, epoch)` leases this node gave up (planned move), sent with
    /// the next heartbeat. Bounded by [`MAX_PENDING_RELEASES`].
    pub released: Mutex<Vec<(String, u64)>>,
    /// Highest epoch released per volume: a grant for a released epoch that
    /// arrives late (its heartbeat left before the release) is ignored.
    pub released_floor: Mutex<BTreeMap<String, u64>>,
    /// Wakes the heartbeat loop before its next tick (a release to send, or
    /// a new primary that wants its lease now).
    pub heartbeat_now: tokio::sync::Notify,
    /// Last hand-over this member started as leader (kept across terms: cooldown).
    pub handover: Mutex<Option<Handover>>,
    /// Elections are held (disabled) on this member until this instant.
    pub hold_elections_until: Mutex<Option<Instant>>,
    pub stop: watch::Sender<bool>,
    pub tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    pub fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    /// Node-loss threshold: the committed cluster config's, else this daemon's.
    pub fn node_loss_ms(&self) -> u64 {
        self.sm.current().config.as_ref().map_or(self.cfg.timings.node_loss_ms, |c| c.node_loss_ms)
    }

    pub fn leader_state(&self) -> std::sync::MutexGuard<'_, Option<LeaderState>> {
        self.leader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The leader's `(raft id, addr)` as this member sees it.
    pub fn leader_addr(&self) -> Option<(RaftId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.raft_id)
    }

    /// Commit `cmd` locally (we must be the leader). `Err(Some(addr))`/`Err(None)`: not leader.
    pub async fn write_local(
        &self,
        cmd: Command,
    ) -> Result<CommandResult, Result<Option<String>, QuorumError>> {
        let fut = self.raft.client_write(cmd);
        match tokio::time::timeout(PROPOSE_TIMEOUT, fut).await {
            Err(_) => Err(Err(QuorumError::Timeout {
                what: "committing a command".into(),
                ms: PROPOSE_TIMEOUT.as_millis() as u64,
            })),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(Ok(f.leader_node.map(|n| n.addr)))
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Err(QuorumError::Invalid(e.to_string())))
            }
            Ok(Err(RaftError::Fatal(f))) => Err(Err(QuorumError::Stopped(f.to_string()))),
        }
    }

    /// Add `rec` as a learner if the membership does not know it yet (leader only).
    pub async fn ensure_learner(&self, rec: &NodeRecord) {
        let known = {
            let m = self.raft.metrics();
            let m = m.borrow();
            m.membership_config.membership().get_node(&rec.raft_id).is_some()
        };
        if known {
            return;
        }
        let node = BasicNode { addr: rec.api.clone() };
        match tokio::time::timeout(PROPOSE_TIMEOUT, self.raft.add_learner(rec.raft_id, node, false)).await {
            Ok(Ok(_)) => tracing::info!(node = %rec.id, addr = %rec.api, "added a learner"),
            Ok(Err(e)) => tracing::warn!(node = %rec.id, error = %e, "could not add the learner yet"),
            Err(_) => tracing::warn!(node = %rec.id, "adding the learner timed out"),
        }
    }
}

/// One member of the quorum group. Cheap to clone.
#[derive(Clone)]
pub struct Quorum {
    pub(crate) inner: Arc<Shared>,
}

fn backoff(attempt: u32) -> Duration {
    let exp = RETRY_MIN.saturating_mul(1 << attempt.min(4));
    exp.min(RETRY_MAX)
}

impl Quorum {
    /// Open the member's storage under `data_dir/raft/` and start its raft core.
    pub async fn start(cfg: EngineConfig) -> Result<Quorum, QuorumError> {
        let tls = cfg.tls.as_ref().map(|t| t.tonic_client());
        let local = cfg.api_addr.rsplit_once(':').and_then(|(h, _)| h.parse().ok());
        Self::start_with_connector(cfg, Arc::new(TcpConnector::new(tls).with_local_address(local))).await
    }

    /// As [`Quorum::start`], with a custom way to reach peers (simulation).
    pub async fn start_with_connector(
        cfg: EngineConfig,
        connector: Arc<dyn Connector>,
    ) -> Result<Quorum, QuorumError> {
        let t = &cfg.timings;
        let raft_config = openraft::Config {
            cluster_name: "metro".into(),
            heartbeat_interval: t.heartbeat_ms,
            election_timeout_min: t.election_timeout_min_ms,
            election_timeout_max: t.election_timeout_max_ms,
            install_snapshot_timeout: SNAPSHOT_TIMEOUT.as_millis() as u64,
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            ..Default::default()
        }
        .validate()
        .map_err(|e| QuorumError::Invalid(format!("quorum timings: {e}")))?;
        if t.lease_ms == 0 || t.node_loss_ms == 0 {
            return Err(QuorumError::Invalid("lease_ms and node_loss_ms must be > 0".into()));
        }
        let dir = cfg.data_dir.join("raft");
        let log = LogStore::open(&dir).map_err(|e| QuorumError::Storage(e.to_string()))?;
        let sm = StateMachine::open(&dir).map_err(|e| QuorumError::Storage(e.to_string()))?;
        let incarnation = Arc::new(Incarnation::open(&dir).map_err(|e| QuorumError::Storage(e.to_string()))?);
        let raft_id = crate::state::raft_id_of(&cfg.node_id);
        let peers = Arc::new(Peers::new(connector, cfg.node_id.clone(), incarnation));
        let net = NetworkFactory { peers: peers.clone() };
        let raft = Raft::new(raft_id, Arc::new(raft_config), net, log.clone(), sm.clone())
            .await
            .map_err(|e| QuorumError::Storage(e.to_string()))?;
        let (leases, _) = watch::channel(Arc::new(BTreeMap::new()));
        let (stop, _) = watch::channel(false);
        let (restart, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            tls_enabled: cfg.tls.is_some(),
            cfg,
            raft_id,
            raft,
            sm,
            log,
            restart,
            peers,
            t0: Instant::now(),
            leader: Mutex::new(None),
            leases,
            released: Mutex::new(Vec::new()),
            released_floor: Mutex::new(BTreeMap::new()),
            heartbeat_now: tokio::sync::Notify::new(),
            handover: Mutex::new(None),
            hold_elections_until: Mutex::new(None),
            stop,
            tasks: Mutex::new(Vec::new()),
        });
        let q = Quorum { inner: shared };
        q.spawn(crate::control::role_watcher(q.inner.clone()));
        q.spawn(crate::control::control_loop(q.inner.clone()));
        q.spawn(incarnation_watcher(q.inner.clone()));
        tracing::info!(
            node = %q.inner.cfg.node_id,
            raft_id,
            addr = %q.inner.cfg.api_addr,
            incarnation = q.inner.peers.incarnation.get(),
            "quorum member started"
        );
        Ok(q)
    }

    pub(crate) fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut stop = self.inner.stop.subscribe();
        let h = tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => {}
                _ = fut => {}
            }
        });
        self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()).push(h);
    }

    /// The node id this member was started with.
    pub fn node_id(&self) -> &str {
        &self.inner.cfg.node_id
    }

    /// The `Internal` gRPC service; the daemon mounts it on its tonic server.
    pub fn internal_service(
        &self,
    ) -> metro_api::pb::internal::internal_server::InternalServer<
        impl metro_api::pb::internal::internal_server::Internal,
    > {
        crate::service::InternalService::server(self.inner.clone())
    }

    /// Bootstrap a brand-new cluster with this node as the only voter, then
    /// commit `InitSites` and `RegisterNode(me)`. Idempotent.
    pub async fn initialize(
        &self,
        sites: Vec<(String, SiteKind)>,
        preferred_site: Option<String>,
        me: NodeRecord,
    ) -> Result<(), QuorumError> {
        let me = self.with_timings(me);
        self.check_me(&me)?;
        let s = &self.inner;
        let initialized = s.raft.is_initialized().await.map_err(|e| QuorumError::Stopped(e.to_string()))?;
        if !initialized {
            let members = BTreeMap::from([(s.raft_id, BasicNode { addr: s.cfg.api_addr.clone() })]);
            match s.raft.initialize(members).await {
                Ok(()) => tracing::info!(node = %s.cfg.node_id, "initialized a new quorum group"),
                Err(RaftError::APIError(e)) => tracing::info!(error = %e, "already initialized"),
                Err(RaftError::Fatal(f)) => return Err(QuorumError::Stopped(f.to_string())),
            }
        }
        let deadline = Instant::now() + INIT_DEADLINE;
        let r = self.propose_until(Command::InitSites { sites, preferred_site }, deadline).await?;
        if !r.is_ok() {
            return Err(QuorumError::Invalid(format!("InitSites: {r:?}")));
        }
        let r = self.propose_until(Command::RegisterNode(me), deadline).await?;
        if !r.is_ok() {
            return Err(QuorumError::Invalid(format!("RegisterNode: {r:?}")));
        }
        Ok(())
    }

    /// `me` carrying this member's lease timings: registration is refused
    /// when they differ from the committed ones (`state::LeaseTimings`).
    fn with_timings(&self, mut me: NodeRecord) -> NodeRecord {
        let cfg = &self.inner.cfg;
        me.timings =
            Some(cfg.declared_timings.unwrap_or_else(|| crate::state::LeaseTimings::of(&cfg.timings)));
        me
    }

    fn check_me(&self, me: &NodeRecord) -> Result<(), QuorumError> {
        let c = &self.inner.cfg;
        if me.id != c.node_id || me.raft_id != self.inner.raft_id || me.api != c.api_addr || me.site != c.site
        {
            return Err(QuorumError::Invalid(format!(
                "node record {} (raft id {}, api {}, site {}) does not match this member ({}, {}, {}, {})",
                me.id, me.raft_id, me.api, me.site, c.node_id, self.inner.raft_id, c.api_addr, c.site
            )));
        }
        Ok(())
    }

    /// Join an existing cluster through any member's `host:port` in `peers`:
    /// the leader registers this node and adds it as a learner; returns once
    /// this member's replicated state contains its own registration.
    pub async fn join(&self, me: NodeRecord, peers: Vec<String>) -> Result<(), QuorumError> {
        let me = self.with_timings(me);
        self.check_me(&me)?;
        if peers.is_empty() {
            return Err(QuorumError::Invalid("join needs at least one peer address".into()));
        }
        let deadline = Instant::now() + JOIN_DEADLINE;
        let mut attempt = 0u32;
        let mut last_err = QuorumError::NoLeader("no peer answered".into());
        'outer: loop {
            for p in &peers {
                if Instant::now() >= deadline {
                    break 'outer;
                }
                match self.propose_via(p, &Command::RegisterNode(me.clone())).await {
                    Ok(r) if r.is_ok() => {
                        tracing::info!(node = %me.id, via = %p, "registered; waiting to catch up");
                        let mut rx = self.state();
                        let wait = rx.wait_for(|s| s.nodes.get(&me.id) == Some(&me));
                        return match tokio::time::timeout_at(deadline, wait).await {
                            Ok(Ok(_)) => Ok(()),
                            Ok(Err(_)) => Err(QuorumError::Stopped("state channel closed".into())),
                            Err(_) => Err(QuorumError::Timeout {
                                what: "catching up after joining".into(),
                                ms: JOIN_DEADLINE.as_millis() as u64,
                            }),
                        };
                    }
                    Ok(r) => {
                        return Err(QuorumError::Invalid(format!("the cluster refused this node: {r:?}")))
                    }
                    Err(e) if e.is_retryable() => {
                        tracing::debug!(via = %p, error = %e, "join attempt failed; retrying");
                        last_err = e;
                    }
                    Err(e) => return Err(e),
                }
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt)).await;
        }
        Err(QuorumError::Timeout {
            what: format!("joining via {peers:?} (last error: {last_err})"),
            ms: JOIN_DEADLINE.as_millis() as u64,
        })
    }

    /// Send `cmd` to the member at `addr`, following leader hints.
    async fn propose_via(&self, addr: &str, cmd: &Command) -> Result<CommandResult, QuorumError> {
        let mut addr = addr.to_string();
        for _ in 0..MAX_HOPS {
            let reply: ProposeReply = self
                .inner
                .peers
                .call(&addr, Method::Propose, cmd, PROPOSE_TIMEOUT)
                .await
                .map_err(|e| e.into_quorum())?;
            match reply {
                ProposeReply::Applied(r) => return Ok(r),
                ProposeReply::NotLeader { leader: Some(l) } if l != addr => addr = l,
                ProposeReply::NotLeader { .. } => {
                    return Err(QuorumError::NoLeader(format!("{addr} knows no leader")))
                }
                ProposeReply::Failed(m) => return Err(QuorumError::NoLeader(m)),
            }
        }
        Err(QuorumError::NoLeader(format!("more than {MAX_HOPS} leader hints")))
    }

    /// Commit `cmd` through the leader (forwarding if needed) and return its result.
    /// Retryable errors: [`QuorumError::is_retryable`].
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, QuorumError> {
        self.propose_until(cmd, Instant::now() + PROPOSE_DEADLINE).await
    }

    /// As [`Quorum::propose`], giving up after `within`.
    pub async fn propose_within(&self, cmd: Command, within: Duration) -> Result<CommandResult, QuorumError> {
        self.propose_until(cmd, Instant::now() + within).await
    }

    pub(crate) async fn propose_until(
        &self,
        cmd: Command,
        deadline: Instant,
    ) -> Result<CommandResult, QuorumError> {
        let s = &self.inner;
        let mut attempt = 0u32;
        let mut last = QuorumError::NoLeader("no leader elected yet".into());
        while Instant::now() < deadline {
            let res = if s.is_leader() {
                match s.write_local(cmd.clone()).await {
                    Ok(r) => Ok(r),
                    Err(Ok(hint)) => Err(QuorumError::NoLeader(format!("lost leadership (hint {hint:?})"))),
                    Err(Err(e)) => Err(e),
                }
            } else if let Some((_, addr)) = s.leader_addr() {
                self.propose_via(&addr, &cmd).await
            } else {
                Err(QuorumError::NoLeader("no leader elected yet".into()))
            };
            match res {
                Ok(r) => return Ok(r),
                Err(e) if e.is_retryable() => last = e,
                Err(e) => return Err(e),
            }
            attempt += 1;
            tokio::time::sleep(backoff(attempt).min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
        Err(last)
    }

    /// The replicated state, updated on every apply (learners included).
    pub fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.inner.sm.subscribe()
    }

    /// Whether this member is the leader *and* a quorum still follows it (a
    /// read-index round trip, bounded by `deadline`). A restarted member may
    /// believe for a moment that it still leads its old term (openraft
    /// restores a committed vote of its own as leadership); its state is then
    /// stale, and only this confirmation tells the two apart.
    pub async fn confirm_leader(&self, deadline: std::time::Duration) -> bool {
        if !self.inner.is_leader() {
            return false;
        }
        matches!(tokio::time::timeout(deadline, self.inner.raft.ensure_linearizable()).await, Ok(Ok(_)))
    }

    /// Raft view in node names.
    pub fn status(&self) -> QuorumStatus {
        let s = &self.inner;
        let m = s.raft.metrics().borrow().clone();
        let state = s.sm.current();
        let name = |id: &RaftId| {
            state.node_by_raft_id(*id).map(|n| n.id.clone()).unwrap_or_else(|| format!("raft-{id}"))
        };
        let mem = m.membership_config.membership();
        let voters: BTreeSet<String> = mem.voter_ids().map(|i| name(&i)).collect();
        let learners: BTreeSet<String> = mem.learner_ids().map(|i| name(&i)).collect();
        QuorumStatus {
            leader: m.current_leader.as_ref().map(name),
            term: m.current_term,
            voters: voters.into_iter().collect(),
            learners: learners.into_iter().collect(),
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            is_leader: m.state == ServerState::Leader && m.current_leader == Some(s.raft_id),
            membership_changing: mem.get_joint_config().len() > 1,
        }
    }

    /// Start sending heartbeats (liveness + lease renewal for `primaries()`)
    /// to the leader every `heartbeat_ms`.
    pub fn spawn_heartbeat(&self, primaries: impl Fn() -> Vec<(String, u64)> + Send + Sync + 'static) {
        self.spawn(crate::heartbeat::heartbeat_loop(self.inner.clone(), Box::new(primaries)));
    }

    /// Until when this node may serve `volume` at `epoch` as primary; None when
    /// it holds no lease for that epoch or the lease has ended.
    pub fn lease_valid_until(&self, volume: &str, epoch: u64) -> Option<Instant> {
        let l = self.inner.leases.borrow().get(volume).copied()?;
        (l.epoch == epoch && l.valid_until > Instant::now()).then_some(l.valid_until)
    }

    /// This node stopped serving `volume` (deposed after a planned move, with
    /// every accepted op finished) and gives up its lease at `epoch`: the
    /// leader may grant the next primary at once instead of waiting out the
    /// lease. The caller must never serve the volume again under this lease.
    pub fn release_lease(&self, volume: &str, epoch: u64) {
        let s = &self.inner;
        {
            let mut f = s.released_floor.lock().expect("poisoned");
            let e = f.entry(volume.to_string()).or_insert(0);
            *e = (*e).max(epoch);
        }
        s.leases.send_if_modified(|m| {
            if m.get(volume).is_some_and(|l| l.epoch <= epoch) {
                Arc::make_mut(m).remove(volume);
                true
            } else {
                false
            }
        });
        {
            let mut r = s.released.lock().expect("poisoned");
            if r.len() >= MAX_PENDING_RELEASES {
                // Unsent releases only cost time: those leases just run out.
                r.remove(0);
            }
            r.push((volume.to_string(), epoch));
        }
        s.heartbeat_now.notify_one();
    }

    /// Send a heartbeat now rather than at the next tick (a node that just
    /// became primary asks for its lease at once).
    pub fn heartbeat_soon(&self) {
        self.inner.heartbeat_now.notify_one();
    }

    /// Watch the leases this node holds (updated on every heartbeat reply).
    pub fn lease_watch(&self) -> watch::Receiver<Arc<BTreeMap<String, HeldLease>>> {
        self.inner.leases.subscribe()
    }

    /// Build a snapshot now and drop the log up to it (members that lag
    /// behind then catch up through a snapshot transfer).
    pub async fn compact_log(&self) -> Result<(), QuorumError> {
        let s = &self.inner;
        let applied = s.raft.metrics().borrow().last_applied.map(|l| l.index).unwrap_or(0);
        s.raft.trigger().snapshot().await.map_err(|e| QuorumError::Stopped(e.to_string()))?;
        let mut rx = s.raft.metrics();
        let built = rx.wait_for(|m| m.snapshot.is_some_and(|l| l.index >= applied));
        match tokio::time::timeout(COMPACT_DEADLINE, built).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(QuorumError::Stopped("raft metrics closed".into())),
            Err(_) => {
                return Err(QuorumError::Timeout {
                    what: "building a snapshot".into(),
                    ms: COMPACT_DEADLINE.as_millis() as u64,
                })
            }
        }
        s.raft.trigger().purge_log(applied).await.map_err(|e| QuorumError::Stopped(e.to_string()))
    }

    /// Peers to rejoin through after [`discard_raft_state`] (empty otherwise).
    pub fn rejoin_peers(&self) -> Vec<String> {
        let path = self.inner.cfg.data_dir.join("raft").join(REJOIN_PEERS);
        match crate::durable::read(&path, REJOIN_MAGIC, 1) {
            Ok(Some(body)) => serde_json::from_slice(&body).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// This member's quorum group incarnation (0 until a quorum-loss override).
    pub fn incarnation(&self) -> u64 {
        self.inner.peers.incarnation.get()
    }

    /// Set (once) when the daemon must restart this member: after
    /// [`Quorum::force_new_group`], or when a newer incarnation superseded it.
    /// The raft core is already stopped then.
    pub fn restart_requested(&self) -> watch::Receiver<Option<Restart>> {
        self.inner.restart.subscribe()
    }

    /// The quorum-loss override (DESIGN.md §4.5, `metroctl site activate`
    /// without a leader): rebuild the group around this member, a voter of
    /// `site`, from its own log.
    ///
    /// 1. The state it would commit (applied state + its log's uncommitted
    ///    tail) and the latest membership must pass `decide::plan_override`.
    /// 2. The incarnation is bumped and persisted: from now on, members of
    ///    the old group are refused (and rejoin as learners on their own).
    /// 3. The raft core stops; the log gets, as if this member had been
    ///    elected at a new term, a membership entry (this node the only voter,
    ///    the other nodes of the site learners) and one batch entry (site
    ///    modes, `ForceInSync` for `--force`d volumes).
    /// 4. [`Restart::Rebuilt`] asks the daemon to restart the member: it elects
    ///    itself and commits everything. Its control loop then waits one lease
    ///    period plus the drift margin (it is a new leader) before it promotes
    ///    the site's in-sync replicas; the epoch bumps fence the other site.
    pub async fn force_new_group(&self, site: &str, force: bool) -> Result<OverrideReport, QuorumError> {
        let s = &self.inner;
        let m = s.raft.metrics().borrow().clone();
        let (mut state, applied) = s.sm.applied();
        for e in s.log.entries_after(applied.map(|l| l.index)) {
            if let EntryPayload::Normal(cmd) = &e.payload {
                state.apply(cmd);
            }
        }
        let mem = m.membership_config.membership().clone();
        let name = |id: RaftId| {
            state.node_by_raft_id(id).map(|n| n.id.clone()).unwrap_or_else(|| format!("raft-{id}"))
        };
        let voters: BTreeSet<String> = mem.voter_ids().map(name).collect();
        // Probe every other member: a voter that answers may still form a
        // quorum; any member's last log id tells whether ours is behind.
        let mut probes = tokio::task::JoinSet::new();
        for n in state.nodes.values().filter(|n| n.id != s.cfg.node_id) {
            let addr = mem.get_node(&n.raft_id).map(|b| b.addr.clone()).unwrap_or_else(|| n.api.clone());
            let (peers, who) = (s.peers.clone(), n.id.clone());
            let req = crate::wire::HeartbeatRequest {
                node_id: s.cfg.node_id.clone(),
                primaries: Vec::new(),
                released: Vec::new(),
            };
            probes.spawn(async move {
                let r: Result<crate::wire::HeartbeatReply, _> =
                    peers.call(&addr, Method::Heartbeat, &req, OVERRIDE_PROBE_TIMEOUT).await;
                let answer = match r {
                    Ok(crate::wire::HeartbeatReply::NotLeader { last_log, .. }) => Some(last_log),
                    // A leader answered: its log is as recent as any (treat it as ahead).
                    Ok(crate::wire::HeartbeatReply::Granted { .. }) => Some(Some((u64::MAX, u64::MAX))),
                    Err(
                        crate::network::RpcError::Unreachable { .. }
                        | crate::network::RpcError::Timeout { .. },
                    ) => None,
                    // Any other answer (a refusal) still means it is alive.
                    Err(_) => Some(None),
                };
                (who, answer)
            });
        }
        let mut reachable = BTreeMap::new();
        while let Some(r) = probes.join_next().await {
            if let Ok((who, Some(last))) = r {
                reachable.insert(who, last);
            }
        }
        let my_last = s.log.last_and_vote().0.map(|l| (l.leader_id.term, l.index));
        let plan =
            crate::decide::plan_override(&state, site, &s.cfg.node_id, &voters, &reachable, my_last, force)?;
        // A leader that lost its quorum keeps its role in openraft (and could
        // not commit: the caller's proposal failed); another leader must not exist.
        if let Some(l) = m.current_leader.filter(|l| *l != s.raft_id) {
            return Err(QuorumError::Invalid(format!(
                "this node still follows a leader ({}); the override is only for a lost quorum",
                name(l)
            )));
        }

        let g = s.peers.incarnation.get() + 1;
        s.peers.incarnation.set(g).map_err(|e| QuorumError::Storage(e.to_string()))?;
        tracing::warn!(node = %s.cfg.node_id, %site, incarnation = g, "quorum-loss override: rebuilding the quorum group around this node");
        if let Err(e) = s.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown before the override");
        }
        let (last, vote) = s.log.last_and_vote();
        let term =
            last.map(|l| l.leader_id.term).unwrap_or(0).max(vote.map(|v| v.leader_id.term).unwrap_or(0)) + 1;
        let leader = CommittedLeaderId::new(term, s.raft_id);
        let mut nodes = BTreeMap::from([(s.raft_id, BasicNode { addr: s.cfg.api_addr.clone() })]);
        let mut learners = Vec::new();
        for n in state.nodes.values().filter(|n| n.site == site && n.id != s.cfg.node_id) {
            nodes.insert(n.raft_id, BasicNode { addr: n.api.clone() });
            learners.push(n.id.clone());
        }
        let membership = Membership::new(vec![BTreeSet::from([s.raft_id])], nodes);
        let next = last.map(|l| l.index + 1).unwrap_or(0);
        let entries = vec![
            crate::types::Entry {
                log_id: LogId::new(leader, next),
                payload: EntryPayload::Membership(membership),
            },
            crate::types::Entry {
                log_id: LogId::new(leader, next + 1),
                payload: EntryPayload::Normal(Command::Batch(plan.commands.clone())),
            },
        ];
        let res = s.log.force_append(Vote::new(term, s.raft_id), entries);
        // Restart in every case: the raft core is stopped.
        s.restart.send_replace(Some(Restart::Rebuilt { incarnation: g }));
        res.map_err(|e| QuorumError::Storage(e.to_string()))?;
        tracing::warn!(
            node = %s.cfg.node_id,
            incarnation = g,
            term,
            fenced = ?plan.fenced,
            forced = ?plan.forced,
            ?learners,
            "quorum-loss override written; restarting the quorum member"
        );
        Ok(OverrideReport {
            incarnation: g,
            voter: s.cfg.node_id.clone(),
            learners,
            fenced: plan.fenced,
            forced: plan.forced,
        })
    }

    /// Stop the raft core and every background task of this member.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            t.abort();
        }
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        *self.inner.leader_state() = None;
    }
}

/// React to a higher incarnation seen on the wire: a learner adopts it (its
/// log never decided a commit, the new leader overwrites what differs); a
/// voter stops its raft core and asks for [`Restart::Rejoin`].
async fn incarnation_watcher(s: Arc<Shared>) {
    let mut rx = s.peers.incarnation.higher();
    let mut first = true;
    loop {
        // The first round handles a value reported before this task subscribed.
        if !std::mem::take(&mut first) && rx.changed().await.is_err() {
            return;
        }
        let Some((g, who)) = rx.borrow_and_update().clone() else { continue };
        let mine = s.peers.incarnation.get();
        if g <= mine {
            continue;
        }
        let voter = {
            let m = s.raft.metrics();
            let m = m.borrow();
            let is_voter = m.membership_config.membership().voter_ids().any(|i| i == s.raft_id);
            is_voter
        };
        if !voter {
            match s.peers.incarnation.set(g) {
                Ok(()) => tracing::warn!(
                    node = %s.cfg.node_id, from = %who, incarnation = g, previous = mine,
                    "the quorum group was rebuilt (site activate without a quorum); this learner follows the new group"
                ),
                Err(e) => tracing::error!(error = %e, "cannot store the new quorum incarnation"),
            }
            continue;
        }
        tracing::error!(
            node = %s.cfg.node_id, from = %who, incarnation = g, previous = mine,
            "the quorum group was rebuilt without this voter (site activate without a quorum); discarding this node's raft state and rejoining as a learner"
        );
        if let Err(e) = s.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        s.restart.send_replace(Some(Restart::Rejoin { incarnation: g }));
        return;
    }
}

/// Discard the raft state under `data_dir/raft` (log, vote, snapshot) and
/// store `incarnation`: the member then starts empty and joins as a learner.
/// Call only with the member stopped ([`Restart::Rejoin`]).
/// `peers`: `host:port` of members to rejoin through (kept in
/// `raft/rejoin-peers`, see [`Quorum::rejoin_peers`]) when etcd is down.
pub fn discard_raft_state(
    data_dir: &std::path::Path,
    incarnation: u64,
    peers: &[String],
) -> Result<(), QuorumError> {
    let dir = data_dir.join("raft");
    crate::incarnation::write(&dir, incarnation).map_err(|e| QuorumError::Storage(e.to_string()))?;
    let body = serde_json::to_vec(peers).expect("strings serialize");
    crate::durable::write_atomic(&dir.join(REJOIN_PEERS), REJOIN_MAGIC, 1, &body)
        .map_err(|e| QuorumError::Storage(e.to_string()))?;
    for f in ["log.seg", "log.seg.tmp", "vote", "vote.tmp", "snapshot", "snapshot.tmp"] {
        match std::fs::remove_file(dir.join(f)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(QuorumError::Storage(format!("removing {}: {e}", dir.join(f).display()))),
        }
    }
    crate::durable::fsync_dir(&dir).map_err(|e| QuorumError::Storage(e.to_string()))
}
