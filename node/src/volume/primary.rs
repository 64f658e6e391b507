//! The primary's block device: local write plus synchronous mirroring to
//! every in-sync replica, with the acknowledgement rules of DESIGN.md §3.
//!
//! ```text
//!  write ─► lease gate ─► order lock { activity log; mark dirty for out-of-sync replicas;
//!                                      enqueue to in-sync links; register in flight }
//!        ─► local write (after earlier overlapping ops; a FLUSH after every earlier op)
//!           ∥ replicas apply in link order
//!        ─► await every in-sync ack (≤ ack timeout)
//!        ─► any replica failed? ─► commit "remove from in_sync" (epoch+1), mark dirty
//!        ─► acknowledge
//! ```
//! The order lock only sequences: the local write (and a FLUSH's local
//! fdatasync) runs outside it, concurrently with the replicas, so
//! non-overlapping requests no longer queue behind each other's disk I/O.
//! Invariants kept here:
//! - RPO 0: a write is acknowledged only when every replica in `in_sync` at
//!   that moment holds it (FUA/FLUSH: fdatasync'ed), or after a committed
//!   change removed the replica and its region was durably marked dirty.
//! - The order lock fixes one order for a volume's ops, on every copy: the
//!   links carry ops in lock order, and locally an op waits for every earlier
//!   op it overlaps ([`InFlight`]), so overlapping writes land in the same
//!   order everywhere. A FLUSH waits for every earlier op before its local
//!   fdatasync, so it covers everything ordered before it (and the activity
//!   log may cool what it covers).
//! - A stale-epoch answer means this node was deposed: it stops serving.

use super::control::VolumeControl;
use crate::block::{BlockDevice, BlockError, BlockResult};
use crate::repl::link::{Ack, LinkError, OutOp};
use crate::repl::wire::{AckStatus, OpKind};
use async_trait::async_trait;
use bytes::Bytes;
use metro_quorum::LeasePolicy;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch, Mutex};

/// How often a suspended request re-checks its lease.
const SUSPEND_POLL: Duration = Duration::from_millis(50);

/// Receiver of one replica's answer to one op.
type AckRx = oneshot::Receiver<Result<Ack, LinkError>>;

/// Mutable replication view of the volume, guarded by the order lock.
#[derive(Debug, Clone)]
pub struct ReplState {
    pub epoch: u64,
    /// Replicas other than this node that are in `in_sync`.
    pub in_sync_peers: Vec<String>,
    /// Replicas other than this node that are out of sync (dirty-tracked).
    pub stale_peers: Vec<String>,
    /// Out-of-sync replicas currently catching up: they get live writes too.
    pub catching_up: Vec<String>,
}

/// One registered local op: id, byte range (None: a FLUSH), done signal.
type InFlightOp = (u64, Option<(u64, u64)>, watch::Receiver<bool>);

/// Local operations ordered under the order lock but not finished yet.
/// Registering happens under the order lock, so "earlier" is lock order.
#[derive(Default)]
struct InFlight {
    next_id: u64,
    /// `(id, byte range or None for a FLUSH, done signal)`.
    ops: Vec<InFlightOp>,
}

/// Ends one client op's [`PrimaryVolume::enter`] (also on cancellation).
struct ActiveGuard<'a>(&'a PrimaryVolume);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Marks a registered local op finished when dropped (also on cancellation).
struct InFlightGuard<'a> {
    table: &'a std::sync::Mutex<InFlight>,
    id: u64,
    done: watch::Sender<bool>,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.table.lock().expect("poisoned").ops.retain(|(id, _, _)| *id != self.id);
        let _ = self.done.send(true);
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// Wait until every op in `deps` has finished locally.
async fn wait_all(deps: Vec<watch::Receiver<bool>>) {
    for mut rx in deps {
        // Err: the guard is gone, which also means the op is over.
        let _ = rx.wait_for(|done| *done).await;
    }
}

pub struct PrimaryVolume {
    pub name: String,
    size: u64,
    pub local: Arc<dyn BlockDevice>,
    me: String,
    state: Mutex<ReplState>,
    /// Local ops sequenced but not yet finished (see [`InFlight`]).
    inflight: std::sync::Mutex<InFlight>,
    ctl: Arc<dyn VolumeControl>,
    ack_timeout: Duration,
    policy: LeasePolicy,
    deposed: AtomicBool,
    /// The epoch this node became primary at: only a lease granted at this
    /// epoch or later lets it serve.
    first_epoch: u64,
    /// Client ops (reads and mutations) that entered and have not returned.
    active: std::sync::atomic::AtomicUsize,
    /// Signalled whenever `active` drops to zero.
    idle: tokio::sync::Notify,
    /// Per-volume IOPS and bandwidth limits from the volume spec (0 = none).
    limiter: crate::store::rate_limiter::RateLimiter,
    /// False until the start-of-primaryship reconciliation is done
    /// ([`set_ready`](Self::set_ready)): client I/O waits for it.
    ready: AtomicBool,
}

/// A resync copy queued to a peer and not yet acknowledged.
pub struct PendingCopy {
    waits: Vec<AckRx>,
    /// Bytes of data (not holes) it carries.
    pub bytes: u64,
    timeout: Duration,
}

impl PendingCopy {
    /// Did the peer acknowledge every op of the copy (each within the deadline)?
    pub async fn acked(self) -> bool {
        for rx in self.waits {
            if !matches!(
                tokio::time::timeout(self.timeout, rx).await,
                Ok(Ok(Ok(Ack { status: AckStatus::Ok, .. })))
            ) {
                return false;
            }
        }
        true
    }
}

enum Outcome {
    Ok,
    Failed(String),
    Stale(u64),
}

impl PrimaryVolume {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        size: u64,
        local: Arc<dyn BlockDevice>,
        me: String,
        repl: ReplState,
        ctl: Arc<dyn VolumeControl>,
        ack_timeout: Duration,
        policy: LeasePolicy,
    ) -> Self {
        let first_epoch = repl.epoch;
        Self {
            name,
            size,
            local,
            me,
            first_epoch,
            state: Mutex::new(repl),
            inflight: std::sync::Mutex::default(),
            ctl,
            ack_timeout,
            policy,
            deposed: AtomicBool::new(false),
            active: std::sync::atomic::AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            limiter: crate::store::rate_limiter::RateLimiter::unlimited(),
            ready: AtomicBool::new(true),
        }
    }

    /// Hold client I/O until [`set_ready`](Self::set_ready): the volume
    /// manager reconciles the activity logs of this node and its peers first
    /// (every change of primary, every restart).
    pub fn hold_until_reconciled(self) -> Self {
        self.ready.store(false, Ordering::SeqCst);
        self
    }

    /// Reconciliation done: serve.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Apply the volume spec's limits (0 = unlimited).
    pub fn with_limits(mut self, iops: u64, bytes_per_sec: u64) -> Self {
        self.limiter = crate::store::rate_limiter::RateLimiter::new(iops, bytes_per_sec);
        self
    }

    pub async fn repl_state(&self) -> ReplState {
        self.state.lock().await.clone()
    }

    /// Adopt a newer committed configuration (e.g. after a rejoin, or a change
    /// made by the leader). Never goes back in epoch.
    pub async fn adopt(&self, epoch: u64, in_sync_peers: Vec<String>, stale_peers: Vec<String>) {
        let mut s = self.state.lock().await;
        if epoch > s.epoch {
            s.catching_up.retain(|p| stale_peers.contains(p));
            s.epoch = epoch;
            s.in_sync_peers = in_sync_peers;
            s.stale_peers = stale_peers;
        }
    }

    /// Stop serving: every later request gets ESHUTDOWN.
    pub fn depose(&self, why: &str) {
        if !self.deposed.swap(true, Ordering::SeqCst) {
            tracing::warn!(volume = %self.name, %why, "primary stops serving");
        }
    }

    pub fn is_deposed(&self) -> bool {
        self.deposed.load(Ordering::SeqCst)
    }

    /// The epoch this primaryship began at.
    pub fn first_epoch(&self) -> u64 {
        self.first_epoch
    }

    /// Count a client op as active until the guard drops.
    fn enter(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self)
    }

    /// After [`depose`](Self::depose): wait until every client op that
    /// entered before has returned (so none can still write or acknowledge
    /// anything), at most `within`. True when drained.
    pub async fn drained(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = self.idle.notified();
            if self.active.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.active.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// Wait for a valid lease (policy `suspend`) or fail (policy `error`),
    /// then for the start-of-primaryship reconciliation.
    async fn gate(&self) -> BlockResult<()> {
        loop {
            self.gate_lease().await?;
            if self.is_ready() {
                return Ok(());
            }
            tokio::time::sleep(SUSPEND_POLL).await;
        }
    }

    /// The lease half of [`gate`](Self::gate) (the reconciliation itself
    /// and `degrade` use it: they run before the volume is ready).
    async fn gate_lease(&self) -> BlockResult<()> {
        loop {
            if self.is_deposed() {
                return Err(BlockError::Shutdown(format!("{} is no longer the primary", self.me)));
            }
            if self.ctl.lease_valid(&self.name, self.first_epoch) {
                return Ok(());
            }
            match self.policy {
                LeasePolicy::Error => {
                    return Err(BlockError::Io(std::io::Error::other("lease lost (policy error)")))
                }
                LeasePolicy::Suspend => {
                    if !self.ctl.still_primary(&self.name, self.first_epoch) {
                        self.depose("the volume moved while suspended");
                        continue;
                    }
                    tokio::time::sleep(SUSPEND_POLL).await;
                }
            }
        }
    }

    /// Still serving under a valid lease right now (no waiting)?
    fn lease_holds(&self) -> bool {
        !self.is_deposed() && self.ctl.lease_valid(&self.name, self.first_epoch)
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(BlockError::OutOfRange { offset, len, size: self.size });
        }
        Ok(())
    }

    /// Register a local op (call under the order lock). Returns the ops it
    /// must wait for: earlier overlapping ones, or every earlier op for a
    /// FLUSH (`region` None).
    fn register(&self, region: Option<(u64, u64)>) -> (InFlightGuard<'_>, Vec<watch::Receiver<bool>>) {
        let mut t = self.inflight.lock().expect("poisoned");
        let deps = t
            .ops
            .iter()
            .filter(|(_, r, _)| match (region, r) {
                (None, _) => true,
                (Some(mine), Some(theirs)) => overlaps(mine, *theirs),
                (Some(_), None) => false,
            })
            .map(|(_, _, rx)| rx.clone())
            .collect();
        t.next_id += 1;
        let id = t.next_id;
        let (done, rx) = watch::channel(false);
        t.ops.push((id, region, rx));
        (InFlightGuard { table: &self.inflight, id, done }, deps)
    }

    /// Receivers of every registered op overlapping `[offset, offset+len)`
    /// (call under the order lock, then await them before reading it).
    fn overlapping(&self, offset: u64, len: u64) -> Vec<watch::Receiver<bool>> {
        let t = self.inflight.lock().expect("poisoned");
        t.ops
            .iter()
            .filter(|(_, r, _)| r.is_some_and(|r| overlaps(r, (offset, len))))
            .map(|(_, _, rx)| rx.clone())
            .collect()
    }

    /// The mirrored mutation path shared by write, zero and flush.
    async fn mutate(&self, op: OpKind, fua: bool, region: Option<(u64, u64)>) -> BlockResult<()> {
        let _active = self.enter();
        self.gate().await?;
        self.limiter.acquire(region.map(|r| r.1).unwrap_or(0)).await;
        // The wait in the limiter may have outlived the lease.
        self.gate().await?;
        let is_flush = matches!(op, OpKind::Flush);
        let (epoch, waits, guard, deps, flush_seq) = loop {
            if let Some((off, len)) = region {
                if self.ctl.touch_would_flush(&self.name, off, len) {
                    // The activity log is full of extents no mirrored flush
                    // covers yet: make one, so they may cool.
                    Box::pin(self.mirrored_flush()).await?;
                }
            }
            let s = self.state.lock().await;
            let flush_seq = if is_flush { self.ctl.flush_begin(&self.name) } else { 0 };
            if let Some((off, len)) = region {
                match self.ctl.touch_extent(&self.name, off, len) {
                    Ok(()) => {}
                    // Filled up since we asked: flush again, outside the lock.
                    Err(e) if super::storage::is_activity_log_full(&e) => continue,
                    Err(e) => return Err(BlockError::Io(e)),
                }
                for p in s.stale_peers.iter().filter(|p| !s.catching_up.contains(p)) {
                    self.ctl.mark_dirty(&self.name, p, off, len).map_err(BlockError::Io)?;
                }
            }
            let mut waits: Vec<(String, bool, AckRx)> = Vec::new();
            let targets =
                s.in_sync_peers.iter().map(|p| (p, true)).chain(s.catching_up.iter().map(|p| (p, false)));
            for (peer, gating) in targets {
                let out = OutOp {
                    volume: self.name.clone(),
                    epoch: s.epoch,
                    size: self.size,
                    fua,
                    resync: false,
                    op: op.clone(),
                };
                let rx = match self.ctl.link(peer) {
                    Some(link) => link.enqueue(out).await,
                    None => {
                        let (tx, rx) = oneshot::channel();
                        let _ = tx.send(Err(LinkError::Down(peer.clone())));
                        rx
                    }
                };
                waits.push((peer.clone(), gating, rx));
            }
            let (guard, deps) = self.register(region);
            break (s.epoch, waits, guard, deps, flush_seq);
        };
        // Outside the order lock: the replicas apply the op meanwhile.
        wait_all(deps).await;
        let local = match &op {
            OpKind::Write { offset, data } => self.local.write(*offset, data.clone(), fua).await,
            OpKind::Zero { offset, len, punch } => self.local.write_zeroes(*offset, *len, fua, *punch).await,
            OpKind::Flush => self.local.flush().await,
            OpKind::QueryHot | OpKind::ClearHot | OpKind::Read { .. } => Ok(()),
        };
        drop(guard);
        let mut failed = Vec::new();
        for (peer, gating, rx) in waits {
            let outcome = match tokio::time::timeout(self.ack_timeout, rx).await {
                Ok(Ok(Ok(Ack { status: AckStatus::Ok, .. }))) => Outcome::Ok,
                Ok(Ok(Ok(Ack { status: AckStatus::StaleEpoch, epoch, .. }))) => Outcome::Stale(epoch),
                Ok(Ok(Ok(Ack { status, .. }))) => Outcome::Failed(format!("{status:?}")),
                Ok(Ok(Err(e))) => Outcome::Failed(e.to_string()),
                Ok(Err(_)) => Outcome::Failed("link dropped".into()),
                Err(_) => Outcome::Failed(format!("no ack within {:?}", self.ack_timeout)),
            };
            match outcome {
                Outcome::Ok => {}
                Outcome::Stale(e) => {
                    self.depose(&format!("replica {peer} holds epoch {e} > ours {epoch}"));
                    return Err(BlockError::Shutdown("a newer primary exists".into()));
                }
                Outcome::Failed(why) => {
                    if gating {
                        tracing::warn!(volume = %self.name, %peer, %why, "replica did not acknowledge");
                        failed.push(peer);
                    } else if let Some((off, len)) = region {
                        // A catching-up replica missed a live write: re-dirty it.
                        self.ctl.mark_dirty(&self.name, &peer, off, len).map_err(BlockError::Io)?;
                    } else {
                        // It missed a FLUSH: whatever it acknowledged from its
                        // cache may be gone. Mark every extent no mirrored
                        // flush covers yet, before this flush lets them cool.
                        self.ctl.mark_all_outstanding(&self.name, &peer).map_err(BlockError::Io)?;
                    }
                }
            }
        }
        if !failed.is_empty() {
            self.degrade(epoch, &failed, region).await?;
        } else if is_flush && local.is_ok() {
            self.ctl.flush_done(&self.name, flush_seq);
        }
        if let (Err(e), Some((off, len)), false) = (&local, region, is_flush) {
            // The replicas applied a change the local copy failed to: the
            // copies differ. Put the local bytes back on every in-sync
            // replica (the client gets the error, so either content is
            // allowed, but in-sync copies must be identical).
            tracing::error!(volume = %self.name, offset = off, len, error = %e, "local write failed after the replicas applied it; restoring the replicas from the local copy");
            self.restore_peers(off, len).await?;
        }
        local
    }

    /// A FLUSH mirrored to every in-sync replica (and catching-up one): on
    /// success the activity log may cool what it covers.
    async fn mirrored_flush(&self) -> BlockResult<()> {
        self.mutate(OpKind::Flush, true, None).await
    }

    /// Copy `[off, off+len)` from the local copy to every in-sync replica and
    /// make it durable there; a replica that fails is taken out of `in_sync`
    /// with the range marked dirty for it.
    async fn restore_peers(&self, off: u64, len: u64) -> BlockResult<()> {
        let peers = self.state.lock().await.in_sync_peers.clone();
        let mut failed = Vec::new();
        for peer in peers {
            let ok = match self.send_copy(&peer, off, len, |o, l| vec![(o, l)]).await {
                Ok(Some(c)) => c.acked().await && self.flush_peer(&peer).await,
                Ok(None) => false,
                Err(e) => {
                    // The local copy cannot even be read: it is the broken one.
                    self.depose(&format!("local copy unreadable after a failed write: {e}"));
                    return Err(e);
                }
            };
            if !ok {
                self.ctl.mark_dirty(&self.name, &peer, off, len).map_err(BlockError::Io)?;
                failed.push(peer);
            }
        }
        if !failed.is_empty() {
            let epoch = self.state.lock().await.epoch;
            self.degrade(epoch, &failed, Some((off, len))).await?;
        }
        Ok(())
    }

    /// Send one resync-class op (a FLUSH, `QueryHot` or `ClearHot`) to
    /// `peer` at this primary's current epoch and wait up to `within` for
    /// its answer. None: no link, no answer in time, or the link failed.
    async fn ask_peer(&self, peer: &str, op: OpKind, within: Duration) -> Option<Ack> {
        let epoch = self.state.lock().await.epoch;
        self.ask_peer_at(peer, epoch, op, within).await
    }

    /// [`ask_peer`](Self::ask_peer) at `epoch`, for a caller that holds the
    /// order lock already.
    async fn ask_peer_at(&self, peer: &str, epoch: u64, op: OpKind, within: Duration) -> Option<Ack> {
        let link = self.ctl.link(peer)?;
        let fua = matches!(op, OpKind::Flush);
        let out = OutOp { volume: self.name.clone(), epoch, size: self.size, fua, resync: true, op };
        match tokio::time::timeout(within, link.enqueue(out).await).await {
            Ok(Ok(Ok(ack))) => Some(ack),
            _ => None,
        }
    }

    /// Make everything `peer` acknowledged so far durable there (a FLUSH on
    /// the link, ordered after every op sent before). True when it did.
    pub async fn flush_peer(&self, peer: &str) -> bool {
        let ack = self.ask_peer(peer, OpKind::Flush, self.ack_timeout * 5).await;
        ack.is_some_and(|a| a.status == AckStatus::Ok)
    }

    /// Ask `peer` for its activity-log extents of this volume (a `QueryHot`
    /// op at this primary's epoch). None if it did not answer.
    pub async fn query_hot(&self, peer: &str) -> Option<Vec<(u64, u64)>> {
        let ack = self.ask_peer(peer, OpKind::QueryHot, self.ack_timeout * 3).await?;
        (ack.status == AckStatus::Ok).then_some(ack.ranges)
    }

    /// Read `[offset, offset+len)` of `peer`'s copy (a `Read` op at this
    /// primary's epoch, ordered after every op sent to it before). None if it
    /// did not answer in full.
    pub async fn read_from_peer(&self, peer: &str, offset: u64, len: u32) -> Option<bytes::Bytes> {
        let ack = self.ask_peer(peer, OpKind::Read { offset, len }, self.ack_timeout * 3).await?;
        (ack.status == AckStatus::Ok && ack.data.len() == len as usize).then_some(ack.data)
    }

    /// Tell `peer` to forget its activity-log extents (our copies over them
    /// are durable there). Best effort: kept extents only cost a copy later.
    pub async fn clear_peer_hot(&self, peer: &str) {
        let _ = self.ask_peer(peer, OpKind::ClearHot, self.ack_timeout).await;
    }

    /// `peer` answered from a new session: it may have lost every write no
    /// completed flush on it covers. Mark those (the hot extents) dirty for
    /// it, stop mirroring to it as catching up, and take it out of `in_sync`
    /// through a committed change before it gates acknowledgements again.
    pub async fn peer_lost_cache(&self, peer: &str) -> BlockResult<()> {
        let (in_sync, epoch) = {
            let mut s = self.state.lock().await;
            let known = s.in_sync_peers.iter().chain(s.stale_peers.iter()).any(|p| p == peer);
            if !known {
                return Ok(());
            }
            self.ctl.mark_all_outstanding(&self.name, peer).map_err(BlockError::Io)?;
            s.catching_up.retain(|p| p != peer);
            (s.in_sync_peers.iter().any(|p| p == peer), s.epoch)
        };
        if in_sync {
            self.degrade(epoch, &[peer.to_string()], None).await?;
        }
        Ok(())
    }

    /// Take `failed` out of `in_sync` (committed) with `ranges` marked dirty
    /// for them: the start-of-primaryship reconciliation could not make
    /// their copies equal to ours.
    pub async fn degrade_with(&self, failed: &[String], ranges: &[(u64, u64)]) -> BlockResult<()> {
        for p in failed {
            for (off, len) in ranges {
                self.ctl.mark_dirty(&self.name, p, *off, *len).map_err(BlockError::Io)?;
            }
        }
        let epoch = self.state.lock().await.epoch;
        self.degrade(epoch, failed, None).await
    }

    /// Remove `failed` replicas from `in_sync` through a committed change,
    /// then record the region as dirty for them. Holds the write until the
    /// change commits or the lease is lost.
    async fn degrade(
        &self,
        _seen_epoch: u64,
        failed: &[String],
        region: Option<(u64, u64)>,
    ) -> BlockResult<()> {
        loop {
            if self.is_deposed() {
                return Err(BlockError::Shutdown(format!("{} is no longer the primary", self.me)));
            }
            {
                let mut s = self.state.lock().await;
                let still: Vec<String> =
                    failed.iter().filter(|p| s.in_sync_peers.contains(p)).cloned().collect();
                if !still.is_empty() {
                    let keep: Vec<String> =
                        s.in_sync_peers.iter().filter(|p| !still.contains(p)).cloned().collect();
                    let mut in_sync = keep.clone();
                    in_sync.push(self.me.clone());
                    // Mark first: if the commit succeeds the marks must already be durable.
                    for p in &still {
                        self.ctl.mark_all_outstanding(&self.name, p).map_err(BlockError::Io)?;
                    }
                    // Every write acknowledged so far is on the leaving
                    // replicas too, maybe only in caches. Once they leave,
                    // the copies kept are the only in-sync ones: make those
                    // writes durable here first, or a power cut here would
                    // lose acknowledged writes that a copy still holds
                    // (found by the data-path simulation, seed 15).
                    if !crate::rt::bug(crate::rt::Bug::DegradeWithoutFlush) {
                        if let Err(e) = self.local.flush().await {
                            drop(s);
                            self.depose(&format!("local flush before leaving replicas out failed: {e}"));
                            return Err(e);
                        }
                    }
                    match self.ctl.shrink_in_sync(&self.name, s.epoch, in_sync).await {
                        Ok(new_epoch) => {
                            tracing::warn!(volume = %self.name, removed = ?still, new_epoch, "replicas removed from in_sync");
                            s.epoch = new_epoch;
                            s.in_sync_peers = keep;
                            for p in still {
                                s.catching_up.retain(|c| c != &p);
                                if !s.stale_peers.contains(&p) {
                                    s.stale_peers.push(p);
                                }
                            }
                        }
                        Err(e) => {
                            drop(s);
                            tracing::warn!(volume = %self.name, error = %e, "cannot remove replica from in_sync yet; holding I/O");
                            if !self.ctl.still_primary(&self.name, self.first_epoch) {
                                self.depose("lost primaryship while degrading");
                                return Err(BlockError::Shutdown("volume moved".into()));
                            }
                            self.gate_lease().await?;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
                if let Some((off, len)) = region {
                    for p in failed {
                        self.ctl.mark_dirty(&self.name, p, off, len).map_err(BlockError::Io)?;
                    }
                }
                return Ok(());
            }
        }
    }

    /// Used by resync: bring `[offset, offset+len)` of `peer` up to date, in
    /// order with live writes. Only data is sent; holes (per `data_ranges`,
    /// evaluated under the order lock) become punch ops. Returns the bytes of
    /// data sent, or None if the peer did not acknowledge everything.
    pub async fn copy_to_peer(
        &self,
        peer: &str,
        offset: u64,
        len: u64,
        data_ranges: impl Fn(u64, u64) -> Vec<(u64, u64)>,
    ) -> BlockResult<Option<u64>> {
        match self.send_copy(peer, offset, len, data_ranges).await? {
            Some(c) => {
                let bytes = c.bytes;
                Ok(c.acked().await.then_some(bytes))
            }
            None => Ok(None),
        }
    }

    /// The first half of [`copy_to_peer`](Self::copy_to_peer): read and
    /// queue the copy under the order lock and return without waiting for
    /// the peer, so a resync can keep several chunks in flight. None if
    /// there is no link to `peer`.
    pub async fn send_copy(
        &self,
        peer: &str,
        offset: u64,
        len: u64,
        data_ranges: impl Fn(u64, u64) -> Vec<(u64, u64)>,
    ) -> BlockResult<Option<PendingCopy>> {
        let mut waits = Vec::new();
        let mut sent = 0u64;
        let s = self.state.lock().await;
        let Some(link) = self.ctl.link(peer) else { return Ok(None) };
        // Writes ordered before this copy were already sent to the peer;
        // their local write must land before we read, or the copy would
        // overwrite them on the peer with older data.
        wait_all(self.overlapping(offset, len)).await;
        let mut pos = offset;
        let mut ops = Vec::new();
        for (d_off, d_len) in data_ranges(offset, len) {
            if d_off > pos {
                ops.push(OpKind::Zero { offset: pos, len: (d_off - pos) as u32, punch: true });
            }
            let data = self.local.read(d_off, d_len as u32).await?;
            sent += d_len;
            ops.push(OpKind::Write { offset: d_off, data });
            pos = d_off + d_len;
        }
        if pos < offset + len {
            ops.push(OpKind::Zero { offset: pos, len: (offset + len - pos) as u32, punch: true });
        }
        for op in ops {
            let out = OutOp {
                volume: self.name.clone(),
                epoch: s.epoch,
                size: self.size,
                fua: false,
                resync: true,
                op,
            };
            waits.push(link.enqueue(out).await);
        }
        Ok(Some(PendingCopy { waits, bytes: sent, timeout: self.ack_timeout * 5 }))
    }

    /// Start mirroring live writes to a stale peer (before copying).
    pub async fn begin_catch_up(&self, peer: &str) {
        let mut s = self.state.lock().await;
        if s.stale_peers.iter().any(|p| p == peer) && !s.catching_up.iter().any(|p| p == peer) {
            s.catching_up.push(peer.to_string());
        }
    }

    pub async fn abort_catch_up(&self, peer: &str) {
        self.state.lock().await.catching_up.retain(|p| p != peer);
    }

    /// Final step of a resync: flush the peer, then commit its rejoin while
    /// holding the order lock so no write slips between.
    pub async fn rejoin(&self, peer: &str) -> Result<u64, String> {
        let mut s = self.state.lock().await;
        if !s.catching_up.iter().any(|p| p == peer) {
            return Err("peer is not catching up".into());
        }
        let ok = |a: Option<Ack>| a.is_some_and(|a| a.status == AckStatus::Ok);
        if !ok(self.ask_peer_at(peer, s.epoch, OpKind::Flush, self.ack_timeout * 5).await) {
            return Err(format!("final flush on {peer} failed (no link, no answer in time, or not Ok)"));
        }
        // Its copy now equals ours and is durable there: it may forget its
        // activity-log extents and that it lost its page cache. Before the
        // commit, never after: a replica that sees itself in `in_sync` while
        // it still counts its copy as unreconciled leaves again (found with
        // real processes: a check between the two saw every replica in sync,
        // and a failover right after found none).
        if !ok(self.ask_peer_at(peer, s.epoch, OpKind::ClearHot, self.ack_timeout).await) {
            return Err(format!("{peer} could not forget its reconciled extents"));
        }
        let mut in_sync = s.in_sync_peers.clone();
        in_sync.push(peer.to_string());
        in_sync.push(self.me.clone());
        let epoch = self.ctl.rejoin(&self.name, s.epoch, in_sync, peer).await?;
        s.epoch = epoch;
        s.catching_up.retain(|p| p != peer);
        s.stale_peers.retain(|p| p != peer);
        s.in_sync_peers.push(peer.to_string());
        Ok(epoch)
    }
}

#[async_trait]
impl BlockDevice for PrimaryVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.local.block_size()
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.check_range(offset, u64::from(len))?;
        let _active = self.enter();
        self.gate().await?;
        self.limiter.acquire(u64::from(len)).await;
        loop {
            // The wait in the limiter (or the read itself) may outlive the
            // lease; a newer primary may have overwritten the range since.
            // Only data read entirely under a valid lease is returned.
            self.gate().await?;
            let data = self.local.read(offset, len).await?;
            if self.lease_holds() {
                return Ok(data);
            }
        }
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.mutate(OpKind::Write { offset, data }, fua, Some((offset, len))).await
    }

    async fn flush(&self) -> BlockResult<()> {
        self.mutate(OpKind::Flush, true, None).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BlockResult<()> {
        self.check_range(offset, u64::from(len))?;
        self.mutate(OpKind::Zero { offset, len, punch: true }, fua, Some((offset, u64::from(len)))).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool, may_punch: bool) -> BlockResult<()> {
        self.check_range(offset, u64::from(len))?;
        self.mutate(OpKind::Zero { offset, len, punch: may_punch }, fua, Some((offset, u64::from(len)))).await
    }
}
