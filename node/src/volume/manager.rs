//! The volume manager follows committed cluster state and makes this node do
//! its part for every volume:
//!
//! - replica of a volume → keep a local thin replica and its epoch floor;
//! - primary → serve it through a [`PrimaryVolume`] (NBD exports come from here);
//! - no longer primary → depose the export (clients get ESHUTDOWN and an
//!   error naming the new primary on reconnect);
//! - primary with out-of-sync replicas → resync them when reachable, then
//!   commit their rejoin.
//!
//! It implements [`ExportRegistry`] for the NBD server, [`ReplicaSink`] for
//! the replication server and [`VolumeControl`] for its primaries.

use super::control::VolumeControl;
use super::primary::{PendingCopy, PrimaryVolume, ReplState};
use super::resolve::{change_volume, RESOLVE_WAIT};
use super::storage::VolumeStorage;
use crate::block::{BlockDevice, ExportError, ExportRegistry};
use crate::repl::link::{Dialer, Link};
use crate::repl::replica::{Floor, ReplicaVolume};
use crate::repl::server::ReplicaSink;
use crate::store::{deleted_since, judge_id, IdVerdict};
use async_trait::async_trait;
use metro_quorum::{ClusterState, Command, CommandResult, VolumeId};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// Largest chunk a resync reads and queues under the order lock at once.
const RESYNC_CHUNK: u64 = 1024 * 1024;
/// Resync chunks in flight to the peer at once (bounded; ≤ 8 MiB of data).
const RESYNC_WINDOW: usize = 8;
/// Copied bytes between two writes of the dirty bitmap during a resync. The
/// bitmap is the resume cursor: clearing it lazily only means a crash copies
/// up to this much again, while one atomic write (two fsyncs) per chunk was
/// what limited the copy rate.
const RESYNC_PERSIST_EVERY: u64 = 64 * 1024 * 1024;
/// Most a new primary copies to its in-sync replicas before serving; past
/// it they leave `in_sync` and resync in the background instead.
const RECONCILE_COPY_MAX: u64 = 256 * 1024 * 1024;
/// How long a new primary waits for a link to a replica to come up before
/// it counts the replica as unreachable.
const RECONCILE_CONNECT_WAIT: Duration = Duration::from_secs(3);
/// How often the manager looks for replicas to resync.
const RESYNC_SCAN: Duration = Duration::from_millis(500);

/// What the manager needs from the quorum engine (a trait so tests and the
/// simulator can run a manager without raft).
#[async_trait]
pub trait ClusterView: Send + Sync + 'static {
    fn state(&self) -> watch::Receiver<Arc<ClusterState>>;
    /// A valid lease on `volume` granted at `min_epoch` or later?
    fn lease_valid(&self, volume: &str, min_epoch: u64) -> bool;
    async fn propose(&self, cmd: Command) -> Result<CommandResult, String>;
    /// This node stopped serving `volume` (deposed, every client op returned)
    /// and gives up its lease at `epoch`, so the next primary need not wait
    /// for it to run out. Default: nothing (the lease just expires).
    fn release_lease(&self, _volume: &str, _epoch: u64) {}
    /// A volume just became primary here: ask for its lease now rather than
    /// at the next heartbeat. Default: nothing.
    fn lease_wanted(&self) {}
}

/// How long a deposed primary waits for its client ops to return before it
/// gives its lease up early (past it, the lease simply runs out).
const RELEASE_DRAIN: Duration = Duration::from_secs(1);

/// Resync progress of one (volume, peer).
#[derive(Debug, Clone, Default)]
pub struct ResyncProgress {
    pub bytes_left: u64,
    pub bytes_done: u64,
    pub rate_bps: u64,
    pub running: bool,
}

#[derive(Default)]
struct Inner {
    replicas: HashMap<String, Arc<ReplicaVolume>>,
    primaries: HashMap<String, Arc<PrimaryVolume>>,
    links: HashMap<String, Arc<Link>>,
    resyncing: HashSet<(String, String)>,
    /// Volumes this replica is proposing to leave `in_sync` of (its copy lost
    /// its page cache), so that one proposal runs at a time.
    leaving: HashSet<String>,
    progress: HashMap<(String, String), ResyncProgress>,
    /// The volume id each open replica was opened for.
    ids: HashMap<String, VolumeId>,
    /// `volume_serial` of the state last swept for leftovers of deleted volumes.
    swept_serial: Option<u64>,
}

pub struct VolumeManager {
    me: String,
    /// This process's replica session (boot id + incarnation), see
    /// [`local_session`].
    session: Mutex<String>,
    cluster: Arc<dyn ClusterView>,
    storage: Arc<dyn VolumeStorage>,
    dialer: Dialer,
    ack_timeout: Duration,
    inner: Mutex<Inner>,
    weak: Weak<VolumeManager>,
}

struct CtlRef(Weak<VolumeManager>);

impl VolumeManager {
    pub fn new(
        me: String,
        cluster: Arc<dyn ClusterView>,
        storage: Arc<dyn VolumeStorage>,
        dialer: Dialer,
        ack_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak: &Weak<VolumeManager>| {
            let w = weak.clone();
            let mut dialer = dialer;
            dialer.on_hot = Some(Arc::new(move |peer: &str, ranges: Vec<(String, u64, u64)>| {
                if let Some(m) = w.upgrade() {
                    m.peer_reported_hot(peer, ranges);
                }
            }));
            let w = weak.clone();
            dialer.on_session = Some(Arc::new(move |peer: String| {
                let w = w.clone();
                Box::pin(async move {
                    match w.upgrade() {
                        Some(m) => m.peer_session_changed(&peer).await,
                        None => true,
                    }
                })
            }));
            VolumeManager {
                me,
                session: Mutex::new(local_session()),
                cluster,
                storage,
                dialer,
                ack_timeout,
                inner: Mutex::default(),
                weak: weak.clone(),
            }
        })
    }

    /// `peer` answers from a new session (restart, reboot, power cut): for
    /// every volume served here that it is a replica of, mark what it may
    /// have lost and take it out of `in_sync` before the link carries ops
    /// again. False if that could not be done yet (the link stays down and
    /// the next connect tries again).
    async fn peer_session_changed(&self, peer: &str) -> bool {
        if crate::rt::bug(crate::rt::Bug::IgnorePeerSession) {
            return true;
        }
        let primaries: Vec<Arc<PrimaryVolume>> =
            self.inner.lock().expect("poisoned").primaries.values().cloned().collect();
        let mut ok = true;
        for p in primaries.into_iter().filter(|p| !p.is_deposed()) {
            if !p.is_ready()
                && self.storage.cache_lost(&p.name)
                && !self.storage.hot_extents(&p.name).is_empty()
            {
                // Our own copy is the suspect one: we lost our page cache as
                // primary and have not reconciled. Taking the peer out of
                // `in_sync` would leave this copy as the only in-sync one and
                // lose acknowledged writes the peer may still hold (found by
                // the data-path simulation, seed 5). Let the link come up;
                // `reconcile_new_primary` hands the volume to the peer.
                tracing::warn!(volume = %p.name, %peer, "replica restarted while this primary, after losing its page cache, waits to hand over: it stays in in_sync");
                continue;
            }
            if let Err(e) = p.peer_lost_cache(peer).await {
                if !p.is_deposed() {
                    tracing::warn!(volume = %p.name, %peer, error = %e, "cannot take a restarted replica out of in_sync yet");
                    ok = false;
                }
            }
        }
        ok
    }

    /// Before a new primary serves (a change of primary, or this node
    /// restarting as primary), make every in-sync copy equal to this one in
    /// the ranges where the previous primary's writes may not have reached
    /// every copy: this node's activity-log extents (it may have crashed as
    /// primary) and those each replica reports (a previous primary's). They
    /// are copied from here and flushed there; a replica that cannot take
    /// them leaves `in_sync` with them marked dirty. Stale replicas get them
    /// marked dirty. Then client I/O starts.
    async fn reconcile_new_primary(&self, p: Arc<PrimaryVolume>) {
        let name = p.name.clone();
        let started = Instant::now();
        // Only under a lease: a deposed primary's copies are fenced anyway,
        // but a lease means no one else is serving while we copy.
        while !self.cluster.lease_valid(&name, p.first_epoch()) {
            if p.is_deposed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ReplState { in_sync_peers, stale_peers, .. } = p.repl_state().await;
        // Did this node, in this primaryship, already make its copy durable
        // before serving (then a power cut since cost only writes it
        // acknowledged itself)? Read before this start records anything.
        let (primary_since, previous_primary) = self
            .state_now()
            .volumes
            .get(&name)
            .map(|v| (v.primary_since, v.previous_primary.clone()))
            .unwrap_or((0, None));
        let flushed_in_this_primaryship =
            self.storage.primary_flushed(&name).is_some_and(|e| e >= primary_since);
        // Everything this copy holds must be durable before copies of it
        // count (it may hold writes it received as a replica, unflushed).
        if let Err(e) = p.local.flush().await {
            tracing::error!(volume = %name, error = %e, "local flush before serving failed");
            p.depose(&format!("local flush failed: {e}"));
            return;
        }
        let mut own = self.storage.hot_extents(&name);
        if own.is_empty() && self.storage.cache_lost(&name) {
            // This copy lost its page cache as a replica (its own activity
            // log knows nothing of the writes it acknowledged): any write no
            // flush here covered may be gone, anywhere in the volume. Found
            // by the data-path simulation: a replica promoted after its
            // power cut while the old primary, isolated, still held the
            // write.
            own = vec![(0, crate::block::BlockDevice::size(&*p))];
        }
        if crate::rt::bug(crate::rt::Bug::SkipPrimaryReconcile) {
            own.clear();
        }
        if !own.is_empty()
            && self.storage.cache_lost(&name)
            && !in_sync_peers.is_empty()
            && !crate::rt::bug(crate::rt::Bug::ServeAfterCacheLoss)
        {
            // This node lost its page cache (power cut, reboot) while it was
            // primary: its copy of the hot extents may lack writes an in-sync
            // replica acknowledged and still holds. Hand the volume to that
            // replica instead of pushing our copy over it; it resyncs those
            // extents back to us (it asks for them as it takes over).
            // While no in-sync replica is reachable, hold I/O and try again:
            // serving this copy (or copying it over a replica) could lose
            // acknowledged writes that the replica still holds (found by the
            // data-path simulation, seed 5: the replica was down for a second).
            let mut warned = false;
            let mut peers = in_sync_peers.clone();
            loop {
                if self.step_down_after_cache_loss(&p, &peers).await {
                    return;
                }
                if p.is_deposed() {
                    return;
                }
                // The in-sync set may have shrunk meanwhile (a replica that
                // lost power leaves it itself): with none left, this copy is
                // the only in-sync one and serves (found by the data-path
                // simulation: the hand-over was retried forever).
                peers = p.repl_state().await.in_sync_peers;
                if peers.is_empty() {
                    tracing::warn!(volume = %name, "no in-sync replica is left to hand over to: this copy serves");
                    break;
                }
                if !warned {
                    tracing::warn!(volume = %name, peers = ?in_sync_peers, "lost the page cache as primary and no in-sync replica can take over yet: holding I/O until one can (serving this copy could lose acknowledged writes)");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        // The only in-sync copy lost its page cache before this primaryship
        // ever flushed it: it may lack writes the previous primary
        // acknowledged (they were only in this node's cache), and that
        // primary, now a stale replica, still holds them. Pull its
        // activity-log extents from it before serving, or resyncing it from
        // this copy would erase them (found by the data-path simulation,
        // seed 639325170: a failover to a replica that was then cut off and
        // lost power before its first flush).
        let prev = previous_primary.filter(|prev| *prev != self.me && !in_sync_peers.contains(prev));
        let sole_copy = p.repl_state().await.in_sync_peers.is_empty();
        if let Some(prev) = prev.filter(|_| {
            self.storage.cache_lost(&name)
                && !flushed_in_this_primaryship
                && sole_copy
                && !crate::rt::bug(crate::rt::Bug::SkipPullFromPreviousPrimary)
        }) {
            if !self.pull_from_previous_primary(&p, &prev).await {
                return;
            }
            if let Err(e) = p.local.flush().await {
                tracing::error!(volume = %name, error = %e, "local flush after pulling from the previous primary failed");
                p.depose(&format!("local flush failed: {e}"));
                return;
            }
        }
        // From here on this primaryship's copy is durable: a later power cut
        // costs only writes this node acknowledges itself.
        if let Err(e) = self.storage.set_primary_flushed(&name, p.first_epoch()) {
            tracing::error!(volume = %name, error = %e, "cannot record the primary's flush");
            p.depose(&format!("cannot record the primary's flush: {e}"));
            return;
        }
        let mut ranges: Vec<(u64, u64)> = own.clone();
        let mut failed: Vec<String> = Vec::new();
        let mut reported: Vec<String> = Vec::new();
        let state = self.state_now();
        for peer in &in_sync_peers {
            if let Some(link) = self.link_for(peer, &state) {
                let deadline = Instant::now() + RECONCILE_CONNECT_WAIT;
                while !link.is_connected() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let hot = match crate::rt::bug(crate::rt::Bug::SkipPeerHotQuery) {
                true => Some(Vec::new()),
                false => p.query_hot(peer).await,
            };
            match hot {
                Some(r) => {
                    if !r.is_empty() {
                        reported.push(peer.clone());
                    }
                    ranges.extend(r);
                }
                None => failed.push(peer.clone()),
            }
        }
        let ranges = crate::store::ranges::normalize(&ranges);
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        for peer in &stale_peers {
            let mut mine = ranges.clone();
            match self.query_stale_peer_hot(&p, peer, &state).await {
                StaleHot::Known(r) => mine.extend(r),
                // Down: it reports its extents in the link handshake when it
                // returns (`peer_reported_hot`), before any resync to it.
                StaleHot::Unreachable => {}
                StaleHot::Unknown => {
                    // Connected but no answer (for example a just-deposed
                    // primary that has not opened its replica yet): it may
                    // hold writes of its own anywhere. A resync of only our
                    // ranges would rejoin it with them (found by the
                    // data-path simulation, a drain under load).
                    tracing::warn!(volume = %name, %peer, "a stale replica did not report its hot extents: marking the whole volume dirty for it");
                    if let Err(e) = self.storage.mark_all_dirty(&name, peer) {
                        tracing::error!(volume = %name, %peer, error = %e, "cannot mark the volume dirty");
                    }
                }
            }
            for (off, len) in mine {
                if let Err(e) = self.storage.mark_dirty(&name, peer, off, len) {
                    tracing::error!(volume = %name, %peer, error = %e, "cannot mark reconciled ranges dirty");
                }
            }
        }
        let copy_to: Vec<String> = in_sync_peers.iter().filter(|x| !failed.contains(x)).cloned().collect();
        if total > RECONCILE_COPY_MAX {
            tracing::warn!(volume = %name, bytes = total, "too much to reconcile before serving; the replicas leave in_sync and resync it");
            failed.extend(copy_to.iter().cloned());
        } else if total > 0 {
            for peer in &copy_to {
                let mut ok = true;
                for (pos, chunk) in crate::store::ranges::chunks(&ranges, RESYNC_CHUNK) {
                    let storage = self.storage.clone();
                    let n = name.clone();
                    let data = move |o: u64, l: u64| storage.data_ranges(&n, o, l);
                    ok = matches!(p.copy_to_peer(peer, pos, chunk, data).await, Ok(Some(_)));
                    if !ok {
                        break;
                    }
                }
                if !(ok && p.flush_peer(peer).await) {
                    failed.push(peer.clone());
                }
            }
        }
        if !failed.is_empty() {
            tracing::warn!(volume = %name, peers = ?failed, "replicas could not be reconciled before serving: taking them out of in_sync");
            if let Err(e) = p.degrade_with(&failed, &ranges).await {
                tracing::warn!(volume = %name, error = %e, "reconciliation ended: no longer primary");
                return;
            }
        }
        // Our copies are durable on every replica still in sync: forget the
        // ranges here and there.
        if let Err(e) = self.storage.clear_hot(&name) {
            tracing::warn!(volume = %name, error = %e, "cannot clear the activity log after reconciling");
        }
        for peer in reported.iter().filter(|x| !failed.contains(x)) {
            p.clear_peer_hot(peer).await;
        }
        p.set_ready();
        tracing::info!(volume = %name, bytes = total, copied_to = ?copy_to.iter().filter(|x| !failed.contains(x)).collect::<Vec<_>>(), degraded = ?failed, ms = started.elapsed().as_millis() as u64, "primary reconciled its activity log with its replicas; serving");
    }

    /// This replica's copy of `v` lost its page cache (a power cut since
    /// its primary last reconciled it) and still counts as in sync: propose
    /// leaving `in_sync`, so that no failover promotes a copy that may lack
    /// acknowledged writes while the primary that holds them is cut off
    /// (found by the data-path simulation). The primary resyncs it back.
    fn leave_in_sync(&self, v: &metro_quorum::VolumeRecord) {
        if !self.inner.lock().expect("poisoned").leaving.insert(v.name.clone()) {
            return;
        }
        let Some(me) = self.weak.upgrade() else { return };
        let (name, epoch, primary) = (v.name.clone(), v.epoch, v.primary.clone());
        let in_sync: Vec<String> = v.in_sync.iter().filter(|n| **n != self.me).cloned().collect();
        tokio::spawn(async move {
            let r = change_volume(&*me.cluster, &name, epoch, primary, in_sync, None, RESOLVE_WAIT).await;
            match &r {
                Ok(e) => {
                    tracing::warn!(volume = %name, epoch = e, "this copy lost its page cache: left in_sync until its primary resyncs it")
                }
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "this copy lost its page cache but cannot leave in_sync yet; trying again")
                }
            }
            me.inner.lock().expect("poisoned").leaving.remove(&name);
        });
    }

    /// A stale replica's activity-log extents (a previous primary's writes
    /// that may be on it only). Asks again for a while when the link is up
    /// but the peer cannot answer yet.
    async fn query_stale_peer_hot(
        &self,
        p: &Arc<PrimaryVolume>,
        peer: &str,
        state: &ClusterState,
    ) -> StaleHot {
        let Some(link) = self.link_for(peer, state) else { return StaleHot::Unreachable };
        let deadline = Instant::now() + RECONCILE_CONNECT_WAIT;
        loop {
            if !link.is_connected() {
                return StaleHot::Unreachable;
            }
            if let Some(r) = p.query_hot(peer).await {
                return StaleHot::Known(r);
            }
            if Instant::now() >= deadline || p.is_deposed() {
                return StaleHot::Unknown;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Copy `prev`'s activity-log extents of `p` from `prev`'s copy into
    /// ours. Holds (retrying) until `prev` answers; false if `p` was deposed
    /// meanwhile.
    async fn pull_from_previous_primary(&self, p: &Arc<PrimaryVolume>, prev: &str) -> bool {
        let name = p.name.clone();
        let started = Instant::now();
        let mut warned = false;
        loop {
            if p.is_deposed() {
                return false;
            }
            let state = self.state_now();
            let connected = self.link_for(prev, &state).is_some_and(|l| l.is_connected());
            if connected {
                if let Some(ranges) = p.query_hot(prev).await {
                    let ranges = crate::store::ranges::normalize(&ranges);
                    match self.pull_ranges(p, prev, &ranges).await {
                        Ok(bytes) => {
                            tracing::warn!(volume = %name, from = %prev, bytes, ranges = ranges.len(), ms = started.elapsed().as_millis() as u64, "lost the page cache before this primaryship's first flush: pulled the previous primary's hot extents");
                            return true;
                        }
                        Err(e) => {
                            tracing::warn!(volume = %name, from = %prev, error = %e, "pulling from the previous primary failed; trying again")
                        }
                    }
                }
            }
            if !warned {
                tracing::warn!(volume = %name, previous_primary = %prev, "lost the page cache before this primaryship's first flush: holding I/O until the previous primary can give back the writes it acknowledged (if it is gone for good, `metroctl site activate --force` accepts this copy)");
                warned = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Read `ranges` from `peer`'s copy and write them into ours; the bytes copied.
    async fn pull_ranges(
        &self,
        p: &Arc<PrimaryVolume>,
        peer: &str,
        ranges: &[(u64, u64)],
    ) -> Result<u64, String> {
        for (pos, chunk) in crate::store::ranges::chunks(ranges, RESYNC_CHUNK) {
            let data = p
                .read_from_peer(peer, pos, chunk as u32)
                .await
                .ok_or_else(|| format!("{peer} did not answer a read at {pos}+{chunk}"))?;
            p.local.write(pos, data, false).await.map_err(|e| format!("local write at {pos}: {e}"))?;
        }
        Ok(crate::store::ranges::total(ranges))
    }

    /// Move the primary role of `p` to a reachable in-sync replica and leave
    /// `in_sync` (committed). True when done (the caller stops); false when
    /// no replica could take it (this copy is then the best there is).
    async fn step_down_after_cache_loss(&self, p: &Arc<PrimaryVolume>, in_sync_peers: &[String]) -> bool {
        let state = self.state_now();
        for peer in in_sync_peers {
            let Some(link) = self.link_for(peer, &state) else { continue };
            let deadline = Instant::now() + RECONCILE_CONNECT_WAIT;
            while !link.is_connected() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !link.is_connected() {
                continue;
            }
            let epoch = p.repl_state().await.epoch;
            let keep: Vec<String> = in_sync_peers.to_vec();
            match change_volume(&*self.cluster, &p.name, epoch, Some(peer.clone()), keep, None, RESOLVE_WAIT)
                .await
            {
                Ok(e) => {
                    tracing::warn!(volume = %p.name, to = %peer, epoch = e, "restarted after losing the page cache as primary: handed the volume to an in-sync replica, which resyncs our hot extents");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(volume = %p.name, to = %peer, error = %e, "cannot hand the volume over after losing the page cache");
                }
            }
        }
        false
    }

    /// A returning replica reported ranges it may hold unacknowledged writes
    /// in (it was a primary): resync them from here, like dirty regions.
    fn peer_reported_hot(&self, peer: &str, ranges: Vec<(String, u64, u64)>) {
        let state = self.state_now();
        for (vol, off, len) in ranges {
            let Some(v) = state.volumes.get(&vol) else { continue };
            if v.primary.as_deref() != Some(self.me.as_str()) || v.in_sync.iter().any(|n| n == peer) {
                continue;
            }
            if let Err(e) = self.storage.mark_dirty(&vol, peer, off, len) {
                tracing::error!(volume = %vol, %peer, error = %e, "cannot record a reported divergent range");
            }
        }
    }

    pub fn node_id(&self) -> &str {
        &self.me
    }

    /// Use `session` as this replica's session (the simulator gives each
    /// simulated boot its own, deterministically).
    pub fn set_session(&self, session: String) {
        *self.session.lock().expect("poisoned") = session;
    }

    pub fn storage(&self) -> &Arc<dyn VolumeStorage> {
        &self.storage
    }

    /// Follow committed state until `shutdown`, and resync in the background.
    pub fn spawn(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let me = self.clone();
        let mut rx = self.cluster.state();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESYNC_SCAN);
            loop {
                let state = rx.borrow_and_update().clone();
                me.reconcile(&state).await;
                tokio::select! {
                    biased;
                    _ = shutdown.changed() => {
                        me.depose_all("daemon shutting down");
                        return;
                    }
                    r = rx.changed() => if r.is_err() { return },
                    _ = tick.tick() => {
                        me.start_resyncs();
                    }
                }
            }
        });
    }

    /// (volume, epoch) of every volume this node serves, for lease renewal.
    pub fn primaries(&self) -> Vec<(String, u64)> {
        let state = self.cluster.state().borrow().clone();
        let inner = self.inner.lock().expect("poisoned");
        inner.primaries.keys().filter_map(|n| state.volumes.get(n).map(|v| (n.clone(), v.epoch))).collect()
    }

    pub fn progress(&self, volume: &str, peer: &str) -> ResyncProgress {
        let inner = self.inner.lock().expect("poisoned");
        let mut p = inner.progress.get(&(volume.to_string(), peer.to_string())).cloned().unwrap_or_default();
        if !p.running {
            p.bytes_left = self.storage.dirty_bytes(volume, peer);
        }
        p
    }

    /// Some(false) while this node is the volume's primary but still holds
    /// client I/O (waiting for its first lease, or reconciling its activity
    /// log with the replicas: `reconcile_new_primary`); the copies may
    /// differ until it is done. None when not primary here.
    pub fn primary_ready(&self, volume: &str) -> Option<bool> {
        self.inner.lock().expect("poisoned").primaries.get(volume).map(|p| p.is_ready())
    }

    pub fn is_primary_here(&self, volume: &str) -> bool {
        self.inner.lock().expect("poisoned").primaries.contains_key(volume)
    }

    fn depose_all(&self, why: &str) {
        let inner = self.inner.lock().expect("poisoned");
        for p in inner.primaries.values() {
            p.depose(why);
        }
    }

    fn link_for(&self, peer: &str, state: &ClusterState) -> Option<Arc<Link>> {
        let mut inner = self.inner.lock().expect("poisoned");
        if let Some(l) = inner.links.get(peer) {
            return Some(l.clone());
        }
        let addr = state.nodes.get(peer)?.replication.clone()?;
        let link = Link::spawn(peer.to_string(), addr, self.dialer.clone());
        inner.links.insert(peer.to_string(), link.clone());
        Some(link)
    }

    /// Bring local objects in line with committed state.
    pub async fn reconcile(&self, state: &ClusterState) {
        let mut wanted_replicas = HashSet::new();
        for v in state.volumes.values() {
            if !v.replicas.contains(&self.me) {
                continue;
            }
            wanted_replicas.insert(v.name.clone());
            let primary = v.primary.clone().unwrap_or_default();
            let replica = self.ensure_replica(&v.name, v.id, v.size_bytes, &primary, v.epoch);
            if let Some(r) = &replica {
                r.observe(&primary, v.epoch);
            }
            let am_primary = v.primary.as_deref() == Some(self.me.as_str());
            if !am_primary
                && v.in_sync.contains(&self.me)
                && self.storage.cache_lost(&v.name)
                && !crate::rt::bug(crate::rt::Bug::IgnorePeerSession)
            {
                self.leave_in_sync(v);
            }
            // A replica's activity log is cleared only by its primary (a
            // `ClearHot` op), once that primary's copies over those extents
            // are durable here: clearing it on seeing another primary would
            // race with that primary's query for them.
            let mut existing = self.inner.lock().expect("poisoned").primaries.get(&v.name).cloned();
            // Primary again, but in a newer primaryship: this node missed
            // (in one jump of its state) a stretch where others were primary.
            // The old primaryship's held writes and view must not carry over
            // into the new one: depose it and start afresh (seed 134: the
            // old primary adopted the new epoch and acknowledged, at its
            // stale epoch, writes the copies in between never held).
            if let Some(p) = existing
                .as_ref()
                .filter(|p| am_primary && !p.is_deposed() && v.primary_since > p.first_epoch())
            {
                p.depose(&format!("a newer primaryship of this node began at epoch {}", v.primary_since));
                self.inner.lock().expect("poisoned").primaries.remove(&v.name);
                existing = None;
            }
            let in_sync_peers: Vec<String> = v.in_sync.iter().filter(|n| **n != self.me).cloned().collect();
            let stale_peers: Vec<String> =
                v.replicas.iter().filter(|n| **n != self.me && !v.in_sync.contains(n)).cloned().collect();
            for p in in_sync_peers.iter().chain(stale_peers.iter()) {
                if am_primary {
                    self.link_for(p, state);
                }
            }
            match (am_primary, existing) {
                (true, Some(p)) if !p.is_deposed() => p.adopt(v.epoch, in_sync_peers, stale_peers).await,
                (true, _) => {
                    let Some(r) = replica else { continue };
                    let ctl: Arc<dyn VolumeControl> = Arc::new(CtlRef(self.weak.clone()));
                    let pv = Arc::new(
                        PrimaryVolume::new(
                            v.name.clone(),
                            v.size_bytes,
                            r.device.clone(),
                            self.me.clone(),
                            ReplState { epoch: v.epoch, in_sync_peers, stale_peers, catching_up: Vec::new() },
                            ctl,
                            self.ack_timeout,
                            v.lease_policy,
                        )
                        .with_limits(v.iops_limit, v.bandwidth_limit)
                        .hold_until_reconciled(),
                    );
                    // A restarted node replays its own (maybe stale) state first, so
                    // this is not yet "serving": I/O waits for a lease from the
                    // current leader, which grants one only to its own primary.
                    tracing::info!(volume = %v.name, epoch = v.epoch, "primary by the committed state; I/O starts once the leader grants a lease");
                    self.inner.lock().expect("poisoned").primaries.insert(v.name.clone(), pv.clone());
                    self.cluster.lease_wanted();
                    if let Some(me) = self.weak.upgrade() {
                        tokio::spawn(async move { me.reconcile_new_primary(pv).await });
                    }
                }
                (false, Some(p)) => {
                    p.depose(&format!("primary moved to {primary}"));
                    self.inner.lock().expect("poisoned").primaries.remove(&v.name);
                    let cluster = self.cluster.clone();
                    let name = v.name.clone();
                    tokio::spawn(async move {
                        let epoch = p.repl_state().await.epoch;
                        if p.drained(RELEASE_DRAIN).await {
                            cluster.release_lease(&name, epoch);
                        } else {
                            tracing::warn!(volume = %name, "client ops still running after the move; the lease runs out instead");
                        }
                    });
                }
                (false, None) => {}
            }
        }
        // Volumes deleted from state, or this node no longer a replica.
        let gone: Vec<String> = {
            let inner = self.inner.lock().expect("poisoned");
            inner.replicas.keys().filter(|n| !wanted_replicas.contains(*n)).cloned().collect()
        };
        for name in gone {
            let (p, _) = {
                let mut inner = self.inner.lock().expect("poisoned");
                (inner.primaries.remove(&name), inner.replicas.remove(&name))
            };
            if let Some(p) = p {
                p.depose("volume deleted");
            }
            if !state.volumes.contains_key(&name) {
                if let Err(e) = self.storage.delete(&name) {
                    tracing::warn!(volume = %name, error = %e, "cannot delete local replica");
                }
            }
        }
        self.sweep_deleted(state);
    }

    /// Remove local replicas of volumes the committed state certainly no
    /// longer holds (deleted while this node was down), once per allocated
    /// serial. Only with positive evidence ([`deleted_since`]): a state that
    /// is behind (replayed after a power cut) keeps what it cannot judge.
    fn sweep_deleted(&self, state: &ClusterState) {
        {
            let mut inner = self.inner.lock().expect("poisoned");
            if inner.swept_serial == Some(state.volume_serial) {
                return;
            }
            inner.swept_serial = Some(state.volume_serial);
        }
        for (name, id) in self.storage.identities() {
            let open = self.inner.lock().expect("poisoned").replicas.contains_key(&name);
            if open || state.volumes.contains_key(&name) || !deleted_since(id, state.volume_serial) {
                continue;
            }
            tracing::warn!(volume = %name, %id, "REMOVING the local replica of a volume deleted while this node was away");
            if let Err(e) = self.storage.delete(&name) {
                tracing::warn!(volume = %name, error = %e, "cannot delete local replica");
            }
        }
    }

    fn ensure_replica(
        &self,
        name: &str,
        id: VolumeId,
        size: u64,
        primary: &str,
        epoch: u64,
    ) -> Option<Arc<ReplicaVolume>> {
        {
            let mut inner = self.inner.lock().expect("poisoned");
            if let Some(r) = inner.replicas.get(name) {
                if inner.ids.get(name).is_none_or(|open| judge_id(*open, id) == IdVerdict::Same) {
                    return Some(r.clone());
                }
                // Opened for an earlier volume of that name (the delete and
                // the create reached us in one state update): close it.
                tracing::warn!(volume = %name, %id, "the open replica belongs to an earlier volume of this name; reopening");
                inner.replicas.remove(name);
                if let Some(p) = inner.primaries.remove(name) {
                    p.depose("volume deleted");
                }
            }
        }
        match self.storage.open_or_create(name, size, id) {
            Ok((dev, persisted)) => {
                let storage = self.storage.clone();
                let vname = name.to_string();
                let floor = Floor { primary: primary.to_string(), epoch: persisted.min(epoch) };
                let r = Arc::new(ReplicaVolume::new(
                    name.to_string(),
                    dev,
                    floor,
                    Box::new(move |e| {
                        if let Err(err) = storage.persist_epoch(&vname, e) {
                            tracing::error!(volume = %vname, error = %err, "cannot persist epoch");
                        }
                    }),
                ));
                let mut inner = self.inner.lock().expect("poisoned");
                inner.replicas.insert(name.to_string(), r.clone());
                inner.ids.insert(name.to_string(), id);
                Some(r)
            }
            Err(e) => {
                tracing::error!(volume = %name, error = %e, "cannot open local replica");
                None
            }
        }
    }

    fn start_resyncs(&self) {
        let state = self.cluster.state().borrow().clone();
        for v in state.volumes.values() {
            let replica_here = v.primary.as_deref() != Some(self.me.as_str()) && v.in_sync.contains(&self.me);
            if replica_here
                && self.storage.cache_lost(&v.name)
                && !crate::rt::bug(crate::rt::Bug::IgnorePeerSession)
            {
                self.leave_in_sync(v);
            }
        }
        let primaries: Vec<Arc<PrimaryVolume>> =
            self.inner.lock().expect("poisoned").primaries.values().cloned().collect();
        for p in primaries {
            let Some(v) = state.volumes.get(&p.name) else { continue };
            for peer in v.replicas.iter().filter(|n| **n != self.me && !v.in_sync.contains(n)) {
                let key = (p.name.clone(), peer.clone());
                let Some(link) = self.link_for(peer, &state) else { continue };
                if !link.is_connected() || !self.cluster.lease_valid(&p.name, p.first_epoch()) {
                    continue;
                }
                // Not before the new primary reconciled: it marks what stale
                // replicas may hold of an old primary's writes; a resync that
                // ran first found nothing dirty and rejoined the old primary
                // with them (found by the data-path simulation, a drain).
                if !p.is_ready() {
                    continue;
                }
                if !self.inner.lock().expect("poisoned").resyncing.insert(key.clone()) {
                    continue;
                }
                let Some(me) = self.weak.upgrade() else { return };
                let p = p.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    let r = me.resync(&p, &peer).await;
                    let mut inner = me.inner.lock().expect("poisoned");
                    inner.resyncing.remove(&key);
                    if let Some(pr) = inner.progress.get_mut(&key) {
                        pr.running = false;
                    }
                    drop(inner);
                    match r {
                        Ok(epoch) => {
                            tracing::info!(volume = %p.name, %peer, epoch, "replica resynced and back in sync")
                        }
                        Err(e) => {
                            tracing::warn!(volume = %p.name, %peer, error = %e, "resync interrupted; it resumes later")
                        }
                    }
                });
            }
        }
    }

    /// Copy only the dirty regions to `peer` while live writes are mirrored
    /// to it, then commit its rejoin. Interruptible: the dirty bitmap is the
    /// cursor, so a later attempt continues where this one stopped.
    async fn resync(&self, p: &Arc<PrimaryVolume>, peer: &str) -> Result<u64, String> {
        let key = (p.name.clone(), peer.to_string());
        p.begin_catch_up(peer).await;
        let started = Instant::now();
        let mut done: u64 = 0;
        let mut sent: u64 = 0;
        // Chunks queued to the peer, oldest first: (offset, len, copy). Each
        // is "being copied" in the bitmap (clean in memory, dirty on disk)
        // until its acknowledgement ends the copy.
        let mut window: VecDeque<(u64, u64, PendingCopy)> = VecDeque::new();
        // Copies the peer acknowledged (from its cache) since the last flush
        // there: their bits are written clean only after that flush, on the
        // same connection (a reconnect may mean a new session that lost
        // them), else they are marked dirty again.
        let mut unflushed: Vec<(u64, u64)> = Vec::new();
        let link = self.link_for(peer, &self.state_now()).ok_or_else(|| format!("no link to {peer}"))?;
        let mut generation = link.generation();
        let copied = async {
            loop {
                let regions = self.storage.dirty_regions(&p.name, peer);
                if regions.is_empty() {
                    break;
                }
                let total_left: u64 = regions.iter().map(|r| r.1).sum();
                let mut unpersisted: u64 = 0;
                for (pos, chunk) in crate::store::ranges::chunks(&regions, RESYNC_CHUNK) {
                    self.storage.begin_copy(&p.name, peer, pos, chunk).map_err(|e| e.to_string())?;
                    let storage = self.storage.clone();
                    let name = p.name.clone();
                    let ranges = move |o: u64, l: u64| storage.data_ranges(&name, o, l);
                    let copy = match p.send_copy(peer, pos, chunk, ranges).await {
                        Ok(Some(c)) => c,
                        other => {
                            let _ = self.storage.end_copy(&p.name, peer, pos, chunk, false);
                            return Err(match other {
                                Err(e) => e.to_string(),
                                _ => format!("no link to {peer}"),
                            });
                        }
                    };
                    window.push_back((pos, chunk, copy));
                    // Keep at most RESYNC_WINDOW chunks in flight; at a persist
                    // point, wait for all of them so the bitmap written only
                    // clears what the peer acknowledged.
                    let persist_now = unpersisted + chunk >= RESYNC_PERSIST_EVERY;
                    while window.len() > RESYNC_WINDOW || (persist_now && !window.is_empty()) {
                        let c_len = self.await_copy(p, peer, &mut window, &mut unflushed).await?;
                        done += c_len.0;
                        sent += c_len.1;
                        unpersisted += c_len.0;
                        self.note_progress(&key, total_left, done, started);
                    }
                    if persist_now {
                        self.checkpoint(p, peer, &link, &mut generation, &mut unflushed).await?;
                        unpersisted = 0;
                    }
                }
                while !window.is_empty() {
                    let c_len = self.await_copy(p, peer, &mut window, &mut unflushed).await?;
                    done += c_len.0;
                    sent += c_len.1;
                    self.note_progress(&key, total_left, done, started);
                }
                self.checkpoint(p, peer, &link, &mut generation, &mut unflushed).await?;
            }
            Ok(())
        }
        .await;
        // Acknowledged copies no flush covers are dirty again.
        for (pos, len) in unflushed.drain(..) {
            let _ = self.storage.mark_dirty(&p.name, peer, pos, len);
        }
        // Whatever is still in flight after a failure is dirty again.
        for (pos, len, _) in window.drain(..) {
            let _ = self.storage.end_copy(&p.name, peer, pos, len, false);
        }
        let result = match copied {
            Ok(()) => p.rejoin(peer).await,
            Err(e) => Err(e),
        };
        // On success the rejoin already told it to forget its activity-log
        // extents (reported when it came back; resynced from here, durable
        // there), before committing.
        if result.is_err() {
            p.abort_catch_up(peer).await;
        }
        tracing::info!(volume = %p.name, %peer, dirty_bytes = done, data_bytes_sent = sent, ms = started.elapsed().as_millis() as u64, ok = result.is_ok(), "resync pass");
        result
    }

    /// Wait for the oldest copy in `window` and end it: `(dirty bytes, data
    /// bytes sent)` when the peer acknowledged it, else an error (the copy
    /// is dirty again; the rest of the window is the caller's to end).
    async fn await_copy(
        &self,
        p: &PrimaryVolume,
        peer: &str,
        window: &mut VecDeque<(u64, u64, PendingCopy)>,
        unflushed: &mut Vec<(u64, u64)>,
    ) -> Result<(u64, u64), String> {
        let (pos, len, c) = window.pop_front().expect("non-empty window");
        let bytes = c.bytes;
        let acked = c.acked().await;
        self.storage.end_copy(&p.name, peer, pos, len, acked).map_err(|e| e.to_string())?;
        if acked {
            unflushed.push((pos, len));
        }
        if acked {
            Ok((len, bytes))
        } else {
            Err(format!("{peer} did not acknowledge a resync write"))
        }
    }

    /// Flush `peer` and, if every copy since the last checkpoint was
    /// acknowledged on the connection that flushed, write the bitmap with
    /// their bits clear. Otherwise they are dirty again and the pass ends.
    async fn checkpoint(
        &self,
        p: &PrimaryVolume,
        peer: &str,
        link: &crate::repl::link::Link,
        generation: &mut u64,
        unflushed: &mut Vec<(u64, u64)>,
    ) -> Result<(), String> {
        let flushed = p.flush_peer(peer).await;
        if !flushed || link.generation() != *generation {
            for (pos, len) in unflushed.drain(..) {
                self.storage.mark_dirty(&p.name, peer, pos, len).map_err(|e| e.to_string())?;
            }
            *generation = link.generation();
            return Err(format!(
                "{peer} did not make the resync copies durable (flush failed or the link reconnected)"
            ));
        }
        unflushed.clear();
        self.storage.persist_dirty(&p.name, peer).map_err(|e| e.to_string())
    }

    fn note_progress(&self, key: &(String, String), total_left: u64, done: u64, started: Instant) {
        let secs = started.elapsed().as_secs_f64().max(0.001);
        self.inner.lock().expect("poisoned").progress.insert(
            key.clone(),
            ResyncProgress {
                bytes_left: total_left.saturating_sub(done),
                bytes_done: done,
                rate_bps: (done as f64 / secs) as u64,
                running: true,
            },
        );
    }

    fn state_now(&self) -> Arc<ClusterState> {
        self.cluster.state().borrow().clone()
    }
}

impl ExportRegistry for VolumeManager {
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, ExportError> {
        if let Some(p) = self.inner.lock().expect("poisoned").primaries.get(name) {
            if !p.is_deposed() {
                return Ok(p.clone());
            }
        }
        let state = self.state_now();
        let Some(v) = state.volumes.get(name) else { return Err(ExportError::NotFound(name.to_string())) };
        match &v.primary {
            Some(p) if p != &self.me => Err(ExportError::NotPrimary {
                volume: name.to_string(),
                primary: p.clone(),
                nbd: state.nodes.get(p).and_then(|n| n.nbd.clone()).unwrap_or_default(),
            }),
            _ => Err(ExportError::Unavailable {
                volume: name.to_string(),
                reason: "no primary is serving it right now (failover or quorum loss in progress); retry"
                    .into(),
            }),
        }
    }

    fn list(&self) -> Vec<String> {
        self.inner.lock().expect("poisoned").primaries.keys().cloned().collect()
    }
}

/// This process's replica session: the kernel's boot id plus a random
/// incarnation drawn at start. A power cut or reboot changes the boot id; a
/// restart of the daemon (or a re-exec) changes the incarnation. Either may
/// have lost writes acknowledged from the page cache (the test-only volatile
/// cache loses them on any restart), so peers compare it on every connect.
/// What a stale replica reported of its activity log.
enum StaleHot {
    Known(Vec<(u64, u64)>),
    /// No link to it now: it reports its extents when it connects again.
    Unreachable,
    /// Connected, but it did not answer in time.
    Unknown,
}

pub fn local_session() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-boot".into());
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{boot}/{}/{}.{n}", std::process::id(), started.as_nanos())
}

impl ReplicaSink for VolumeManager {
    fn session(&self) -> String {
        self.session.lock().expect("poisoned").clone()
    }

    fn query_hot(&self, volume: &str) -> Vec<(u64, u64)> {
        self.storage.hot_extents(volume)
    }

    fn clear_hot(&self, volume: &str) -> std::io::Result<()> {
        self.storage.clear_hot(volume)
    }

    fn replica(&self, volume: &str, _size: u64) -> Option<Arc<ReplicaVolume>> {
        if let Some(r) = self.inner.lock().expect("poisoned").replicas.get(volume) {
            return Some(r.clone());
        }
        // The primary may know about the volume before our state does.
        let state = self.state_now();
        let v = state.volumes.get(volume)?;
        if !v.replicas.contains(&self.me) {
            return None;
        }
        self.ensure_replica(volume, v.id, v.size_bytes, v.primary.as_deref().unwrap_or(""), v.epoch)
    }

    fn node_id(&self) -> &str {
        &self.me
    }

    fn hot_ranges(&self, primary: &str) -> Vec<(String, u64, u64)> {
        let state = self.state_now();
        let mut out = Vec::new();
        for v in state.volumes.values() {
            // Our state may be older than the caller's (we may still think we
            // are primary): report for every volume we share; the primary
            // filters with its newer state.
            if primary == self.me
                || !v.replicas.iter().any(|r| r == primary)
                || !v.replicas.contains(&self.me)
            {
                continue;
            }
            // The link may come up before reconcile opened the replica after a
            // restart: open it here, or its activity log would read as empty.
            if self
                .ensure_replica(&v.name, v.id, v.size_bytes, v.primary.as_deref().unwrap_or(""), v.epoch)
                .is_none()
            {
                tracing::error!(volume = %v.name, "cannot open the replica to report its hot extents");
                continue;
            }
            for (off, len) in self.storage.hot_extents(&v.name) {
                out.push((v.name.clone(), off, len));
            }
            // Regions this copy wrote as primary while another replica was
            // out of sync: after a forced `site activate` elsewhere, the new
            // primary lacks them, and must overwrite them here.
            for other in v.replicas.iter().filter(|r| **r != self.me) {
                for (off, len) in self.storage.dirty_regions(&v.name, other) {
                    out.push((v.name.clone(), off, len));
                }
            }
        }
        out
    }
}

#[async_trait]
impl VolumeControl for CtlRef {
    fn lease_valid(&self, volume: &str, min_epoch: u64) -> bool {
        self.0.upgrade().is_some_and(|m| m.cluster.lease_valid(volume, min_epoch))
    }

    fn still_primary(&self, volume: &str, first_epoch: u64) -> bool {
        self.0.upgrade().is_some_and(|m| {
            m.state_now().volumes.get(volume).is_some_and(|v| {
                v.primary.as_deref() == Some(m.me.as_str()) && v.primary_since <= first_epoch
            })
        })
    }

    fn link(&self, peer: &str) -> Option<Arc<Link>> {
        let m = self.0.upgrade()?;
        let state = m.state_now();
        m.link_for(peer, &state)
    }

    fn touch_extent(&self, volume: &str, offset: u64, len: u64) -> std::io::Result<()> {
        match self.0.upgrade() {
            Some(m) => m.storage.touch_extent(volume, offset, len),
            None => Ok(()),
        }
    }

    fn touch_would_flush(&self, volume: &str, offset: u64, len: u64) -> bool {
        self.0.upgrade().is_some_and(|m| m.storage.touch_would_flush(volume, offset, len))
    }

    fn flush_begin(&self, volume: &str) -> u64 {
        self.0.upgrade().map(|m| m.storage.flush_begin(volume)).unwrap_or(0)
    }

    fn flush_done(&self, volume: &str, seq: u64) {
        if let Some(m) = self.0.upgrade() {
            m.storage.flush_done(volume, seq);
        }
    }

    fn mark_dirty(&self, volume: &str, peer: &str, offset: u64, len: u64) -> std::io::Result<()> {
        match self.0.upgrade() {
            Some(m) => m.storage.mark_dirty(volume, peer, offset, len),
            None => Err(std::io::Error::other("node shutting down")),
        }
    }

    fn mark_all_outstanding(&self, volume: &str, peer: &str) -> std::io::Result<()> {
        let Some(m) = self.0.upgrade() else { return Err(std::io::Error::other("node shutting down")) };
        for (off, len) in m.storage.hot_extents(volume) {
            m.storage.mark_dirty(volume, peer, off, len)?;
        }
        Ok(())
    }

    async fn shrink_in_sync(
        &self,
        volume: &str,
        expected_epoch: u64,
        in_sync: Vec<String>,
    ) -> Result<u64, String> {
        let m = self.0.upgrade().ok_or("node shutting down")?;
        let me = Some(m.me.clone());
        change_volume(&*m.cluster, volume, expected_epoch, me, in_sync, None, RESOLVE_WAIT)
            .await
            .map_err(|e| e.to_string())
    }

    async fn rejoin(
        &self,
        volume: &str,
        expected_epoch: u64,
        in_sync: Vec<String>,
        peer: &str,
    ) -> Result<u64, String> {
        let m = self.0.upgrade().ok_or("node shutting down")?;
        let (me, peer) = (Some(m.me.clone()), Some(peer.to_string()));
        change_volume(&*m.cluster, volume, expected_epoch, me, in_sync, peer, RESOLVE_WAIT)
            .await
            .map_err(|e| e.to_string())
    }
}
