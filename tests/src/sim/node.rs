//! One simulated host: the model consensus ([`Raft`]), the REAL decision code
//! of the leader (`metro_quorum::decide`: `LeaseTable`, `SiteTracker`,
//! `plan_failover`) applied through the REAL `ClusterState::apply`, and a
//! model of the primary/replica write path (DESIGN.md 3).
//!
//! ```text
//!  leader: alive set ─► SiteTracker::observe ─┐
//!                      ─► plan_failover ──────┼─► propose ─► commit ─► apply
//!          RemoveReq ─────────────────────────┘
//!          LeaseReq ─► wait for a round confirmed after it ─► LeaseTable::grant
//!  primary: lease (counted from its request) ─► write ─► every in_sync replica
//!           acks ─► acknowledge; a silent replica ─► RemoveReq, wait for commit
//!  replica: accept a write only at an epoch >= the highest it has seen
//!  move:    operator ─► leader: planned_move to an in-sync replica (real
//!           decide code) ─► old primary stops serving, sends LeaseRelease ─►
//!           LeaseTable::release ─► the new primary is granted at once
//!  rejoin:  copy every write to a returning replica (and mirror new writes to
//!           it, waiting for its acks) ─► RejoinReq ─► committed with `rejoin`;
//!           a replica that stops answering meanwhile is fenced by an epoch bump
//! ```
//!
//! The rejoin copies the primary's whole write set (a model of the dirty-region
//! resync); what matters here is the ordering that keeps RPO 0.
//!
//! Sans-IO: the host (see `harness`) feeds messages and ticks with the local
//! (drifting) clock and sends the outbox.

use super::clock::DriftClock;
use super::disk::Disk;
use super::msg::{LogEntry, Msg};
use super::oracle::Oracle;
use super::raft::{Outbox, Raft};
use metro_quorum::decide::{move_target, plan_failover, planned_move, LeaseTable, LeaseTiming, SiteTracker};
use metro_quorum::state::{ClusterState, Command, NodeId};
use rand::rngs::StdRng;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// Timing of the simulated cluster (local-clock milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct SimTiming {
    pub lease: LeaseTiming,
    /// Tighter than the 2 s default so the lease, not slow detection, is what
    /// keeps a single primary: a promotion that skips the lease wait overlaps.
    pub node_loss_ms: u64,
    pub lease_renew_ms: u64,
    pub replica_ack_timeout_ms: u64,
    pub write_retry_ms: u64,
    pub write_interval_ms: u64,
    pub site_stable_ms: u64,
}

impl Default for SimTiming {
    fn default() -> Self {
        SimTiming {
            lease: LeaseTiming { lease_ms: 2_000, drift_margin_ms: 250 },
            node_loss_ms: 1_000,
            lease_renew_ms: 500,
            replica_ack_timeout_ms: 1_000,
            write_retry_ms: 100,
            write_interval_ms: 50,
            site_stable_ms: 5_000,
        }
    }
}

/// Deliberate bugs, so a test can show the simulator catches them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bugs {
    /// The leader promotes and grants without waiting out the old lease.
    pub promote_without_lease_wait: bool,
    /// A primary releases every lease as soon as it is granted, while it
    /// keeps serving under it.
    pub release_while_serving: bool,
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub me: NodeId,
    pub voters: BTreeSet<NodeId>,
    pub members: BTreeSet<NodeId>,
    pub bootstrap_len: u64,
    pub timing: SimTiming,
    pub bugs: Bugs,
    pub clock: DriftClock,
}

/// Pending lease requests kept by a leader; older ones are dropped (the
/// holder retries every `lease_renew_ms`).
const MAX_PENDING_LEASE_REQS: usize = 64;

struct PendingLease {
    vol: String,
    epoch: u64,
    from: NodeId,
    req: u64,
    after_round: u64,
}

/// What only the leader of one term keeps (volatile).
struct LeaderDuty {
    term: u64,
    leases: LeaseTable,
    sites: SiteTracker,
    lease_reqs: Vec<PendingLease>,
    remove_reqs: BTreeSet<(String, u64, NodeId, NodeId)>,
    rejoin_reqs: BTreeSet<(String, u64, NodeId, NodeId)>,
    /// Commands proposed and not yet committed (deduplication).
    proposed: BTreeMap<String, u64>,
    /// An operator asked for a planned move of every primary.
    moves_wanted: bool,
}

struct PendingWrite {
    wid: u64,
    waiting: BTreeSet<NodeId>,
    started_ms: u64,
    last_send_ms: u64,
    last_remove_ms: u64,
}

/// A returning replica being brought back into `in_sync` by this primary.
struct Join {
    node: NodeId,
    /// The epoch the rejoin is asked at (its CAS).
    epoch: u64,
    started_ms: u64,
    last_send_ms: u64,
    /// The replica acknowledged the full copy; the rejoin request is out.
    copied: bool,
}

/// Between two rejoin attempts of one volume.
const JOIN_RETRY_MS: u64 = 2_000;

#[derive(Default)]
struct PrimarySide {
    join: Option<Join>,
    next_join_ms: u64,
    /// Local ms until which the lease is valid.
    until_ms: u64,
    /// Highest epoch a lease was granted at (what a release gives up).
    lease_epoch: u64,
    serving: bool,
    outstanding: Option<(u64, u64)>,
    last_req_ms: Option<u64>,
    pending: Option<PendingWrite>,
    next_write_ms: u64,
    published_until: u64,
}

pub struct Node {
    cfg: NodeConfig,
    disk: Rc<RefCell<Disk>>,
    raft: Raft,
    state: ClusterState,
    applied: u64,
    duty: Option<LeaderDuty>,
    primary: BTreeMap<String, PrimarySide>,
    next_req: u64,
}

impl Node {
    pub fn new(cfg: NodeConfig, disk: Rc<RefCell<Disk>>, rng: StdRng, now_ms: u64) -> Self {
        let raft = Raft::new(
            cfg.me.clone(),
            cfg.voters.clone(),
            cfg.members.clone(),
            cfg.bootstrap_len,
            rng,
            now_ms,
        );
        Node {
            cfg,
            disk,
            raft,
            state: ClusterState::default(),
            applied: 0,
            duty: None,
            primary: BTreeMap::new(),
            next_req: 0,
        }
    }

    pub fn me(&self) -> &NodeId {
        &self.cfg.me
    }

    pub fn is_leader(&self) -> bool {
        self.raft.is_leader()
    }

    /// Operator: move every primary to another in-sync replica (as
    /// `metroctl node drain` does). Only a ready leader acts on it.
    pub fn request_moves(&mut self) {
        if let Some(d) = self.duty.as_mut() {
            d.moves_wanted = true;
        }
    }

    pub fn on_message(&mut self, oracle: &mut Oracle, msg: Msg, now_ms: u64, out: &mut Outbox) {
        match msg {
            Msg::LeaseReq { vol, epoch, from, req } => {
                if let (Some(l), Some(d)) = (self.raft.leader(), self.duty.as_mut()) {
                    if d.lease_reqs.len() == MAX_PENDING_LEASE_REQS {
                        d.lease_reqs.remove(0);
                    }
                    d.lease_reqs.push(PendingLease { vol, epoch, from, req, after_round: l.round });
                }
            }
            Msg::LeaseRelease { vol, epoch, from } => {
                if let Some(d) = self.duty.as_mut() {
                    if d.leases.release(&vol, &from, epoch) {
                        oracle.lease_released(&self.cfg.me, &vol, &from);
                    }
                }
            }
            Msg::RemoveReq { vol, epoch, node, from } => {
                if let Some(d) = self.duty.as_mut().filter(|_| self.raft.is_leader()) {
                    d.remove_reqs.insert((vol, epoch, node, from));
                }
            }
            Msg::RejoinReq { vol, epoch, node, from } => {
                if let Some(d) = self.duty.as_mut().filter(|_| self.raft.is_leader()) {
                    d.rejoin_reqs.insert((vol, epoch, node, from));
                }
            }
            Msg::Resync { vol, epoch, wids, from } => {
                let view = self.state.volumes.get(&vol).map_or(0, |v| v.epoch);
                let mut d = self.disk.borrow_mut();
                let known = d.data_epoch.get(&vol).copied().unwrap_or(0).max(view);
                let ok = epoch >= known;
                if ok {
                    d.data.entry(vol.clone()).or_default().extend(wids);
                    d.data_epoch.insert(vol.clone(), epoch);
                }
                out.push((from, Msg::ResyncAck { vol, from: self.cfg.me.clone(), ok }));
            }
            Msg::ResyncAck { vol, from, ok } => {
                if let Some(p) = self.primary.get_mut(&vol) {
                    if let Some(j) = p.join.as_mut().filter(|j| ok && j.node == from && !j.copied) {
                        j.copied = true;
                        j.last_send_ms = 0;
                    }
                }
            }
            Msg::LeaseGrant { vol, epoch, req, lease_ms } => {
                if let Some(p) = self.primary.get_mut(&vol) {
                    if let Some((r, sent_ms)) = p.outstanding {
                        if r == req {
                            p.until_ms = p.until_ms.max(sent_ms + lease_ms);
                            p.lease_epoch = p.lease_epoch.max(epoch);
                            if self.cfg.bugs.release_while_serving {
                                for voter in &self.cfg.voters {
                                    let m = Msg::LeaseRelease {
                                        vol: vol.clone(),
                                        epoch,
                                        from: self.cfg.me.clone(),
                                    };
                                    out.push((voter.clone(), m));
                                }
                            }
                        }
                    }
                }
            }
            Msg::Write { vol, epoch, wid, from } => {
                let view = self.state.volumes.get(&vol).map_or(0, |v| v.epoch);
                let mut d = self.disk.borrow_mut();
                let known = d.data_epoch.get(&vol).copied().unwrap_or(0).max(view);
                let ok = epoch >= known;
                if ok {
                    d.data.entry(vol.clone()).or_default().insert(wid);
                    d.data_epoch.insert(vol.clone(), epoch);
                }
                out.push((from, Msg::WriteAck { vol, wid, from: self.cfg.me.clone(), ok }));
            }
            Msg::WriteAck { vol, wid, from, ok } => {
                if let Some(w) = self.primary.get_mut(&vol).and_then(|p| p.pending.as_mut()) {
                    if ok && w.wid == wid {
                        w.waiting.remove(&from);
                    }
                }
            }
            raft_msg => {
                let mut d = self.disk.borrow_mut();
                self.raft.on_message(&mut d, oracle, raft_msg, now_ms, out);
            }
        }
        self.apply_committed(oracle);
    }

    pub fn tick(&mut self, oracle: &mut Oracle, now_ms: u64, out: &mut Outbox) {
        {
            let mut d = self.disk.borrow_mut();
            self.raft.tick(&mut d, oracle, now_ms, out);
        }
        self.apply_committed(oracle);
        if self.raft.leader_ready() {
            self.leader_duties(oracle, now_ms, out);
        } else {
            self.duty = None;
        }
        self.primary_duties(oracle, now_ms, out);
    }

    fn apply_committed(&mut self, oracle: &mut Oracle) {
        let d = self.disk.borrow();
        while self.applied < self.raft.commit {
            self.applied += 1;
            let e = &d.log[self.applied as usize - 1];
            oracle.applied(&self.cfg.me, self.applied, e);
            if let Some(cmd) = &e.cmd {
                self.state.apply(cmd);
            }
        }
    }

    fn leader_duties(&mut self, oracle: &mut Oracle, now_ms: u64, out: &mut Outbox) {
        let mut d = self.disk.borrow_mut();
        let term = d.term;
        let l = self.raft.leader().expect("leader_ready");
        let timing = self.cfg.timing;
        if self.duty.as_ref().is_none_or(|x| x.term != term) {
            let mut leases = LeaseTable::new(l.since_ms, timing.lease);
            for v in self.state.volumes.values() {
                if let Some(p) = &v.primary {
                    leases.inherit(&v.name, p, v.epoch);
                }
            }
            self.duty = Some(LeaderDuty {
                term,
                leases,
                sites: SiteTracker::new(timing.site_stable_ms),
                lease_reqs: Vec::new(),
                remove_reqs: BTreeSet::new(),
                rejoin_reqs: BTreeSet::new(),
                proposed: BTreeMap::new(),
                moves_wanted: false,
            });
        }
        let mut alive: BTreeSet<NodeId> = l
            .last_heard_ms
            .iter()
            .filter(|(_, t)| **t + timing.node_loss_ms >= now_ms)
            .map(|(n, _)| n.clone())
            .collect();
        alive.insert(self.cfg.me.clone());
        let confirmed = l.confirmed_round;
        let duty = self.duty.as_mut().expect("set above");

        let mut cmds = duty.sites.observe(&self.state, &alive, now_ms);
        let failover_now = if self.cfg.bugs.promote_without_lease_wait {
            now_ms + timing.lease.certain_expiry_ms() + 1
        } else {
            now_ms
        };
        cmds.extend(plan_failover(&self.state, &alive, &duty.leases, failover_now).commands);
        if std::mem::take(&mut duty.moves_wanted) {
            // The real decision code of `metroctl node drain`: the target is
            // an in-sync replica, same site first; the old primary leaves
            // in_sync (it is resynced from its hot extents).
            for v in self.state.volumes.values() {
                let Some(from) = v.primary.as_deref() else { continue };
                if let Some(to) = move_target(&self.state, v, from).filter(|t| alive.contains(t)) {
                    cmds.push(planned_move(v, &to));
                }
            }
        }
        for (vol, epoch, node, from) in std::mem::take(&mut duty.remove_reqs) {
            let Some(v) = self.state.volumes.get(&vol) else { continue };
            if v.primary.as_ref() == Some(&from) && !v.is_in_sync(&node) && v.epoch == epoch {
                // A joining replica went silent: bump the epoch so its pending
                // rejoin (CAS on `epoch`) can never commit, and the primary may drop it.
                cmds.push(Command::ChangeVolume {
                    name: vol,
                    expected_epoch: v.epoch,
                    primary: v.primary.clone(),
                    in_sync: v.in_sync.clone(),
                    rejoin: None,
                });
                continue;
            }
            if v.primary.as_ref() == Some(&from) && v.is_in_sync(&node) && node != from {
                cmds.push(Command::ChangeVolume {
                    name: vol,
                    expected_epoch: v.epoch,
                    primary: v.primary.clone(),
                    in_sync: v.in_sync.iter().filter(|n| **n != node).cloned().collect(),
                    rejoin: None,
                });
            }
        }
        for (vol, epoch, node, from) in std::mem::take(&mut duty.rejoin_reqs) {
            let Some(v) = self.state.volumes.get(&vol) else { continue };
            let site_active = self
                .state
                .site_of(&node)
                .and_then(|s| self.state.sites.get(s))
                .is_some_and(|s| s.mode == metro_quorum::state::SiteMode::Active);
            if v.primary.as_ref() == Some(&from)
                && v.epoch == epoch
                && v.replicas.contains(&node)
                && !v.is_in_sync(&node)
                && alive.contains(&node)
                && site_active
            {
                let mut in_sync = v.in_sync.clone();
                in_sync.push(node.clone());
                cmds.push(Command::ChangeVolume {
                    name: vol,
                    expected_epoch: epoch,
                    primary: Some(from),
                    in_sync,
                    rejoin: Some(node),
                });
            }
        }
        let commit = self.raft.commit;
        duty.proposed.retain(|_, idx| *idx > commit);
        let mut proposed_any = false;
        for cmd in cmds {
            let key = format!("{cmd:?}");
            if duty.proposed.contains_key(&key) {
                continue;
            }
            if let Some(idx) = self.raft.propose(&mut d, LogEntry { term, cmd: Some(cmd) }) {
                duty.proposed.insert(key, idx);
                proposed_any = true;
            }
        }
        if proposed_any {
            self.raft.flush(&d, now_ms, out);
        }

        let reqs = std::mem::take(&mut duty.lease_reqs);
        for r in reqs {
            if confirmed <= r.after_round {
                duty.lease_reqs.push(r);
                continue;
            }
            let Some(v) = self.state.volumes.get(&r.vol) else { continue };
            if v.primary.as_ref() != Some(&r.from) || v.epoch != r.epoch {
                continue;
            }
            if self.cfg.bugs.promote_without_lease_wait {
                duty.leases.forget(&r.vol);
            }
            if let Ok(lease) = duty.leases.grant(&r.vol, &r.from, r.epoch, now_ms) {
                oracle.lease_granted(&self.cfg.me, term, confirmed, &r.vol, &r.from);
                let lease_ms = lease.as_millis() as u64;
                out.push((r.from, Msg::LeaseGrant { vol: r.vol, epoch: r.epoch, req: r.req, lease_ms }));
            }
        }
    }

    fn primary_duties(&mut self, oracle: &mut Oracle, now_ms: u64, out: &mut Outbox) {
        let me = self.cfg.me.clone();
        let timing = self.cfg.timing;
        let vols: Vec<String> = self.state.volumes.keys().cloned().collect();
        for vol in vols {
            let v = &self.state.volumes[&vol];
            let mine = v.primary.as_ref() == Some(&me);
            let p = self.primary.entry(vol.clone()).or_default();
            if !mine {
                if p.published_until != 0 {
                    oracle.lease_held(&me, &vol, 0);
                }
                // Stopped serving (its pending write is dropped, never
                // acknowledged): give the lease up so the next primary
                // need not wait for it to run out.
                if p.lease_epoch > 0 && p.until_ms > now_ms {
                    for voter in &self.cfg.voters {
                        let m =
                            Msg::LeaseRelease { vol: vol.clone(), epoch: p.lease_epoch, from: me.clone() };
                        out.push((voter.clone(), m));
                    }
                }
                self.primary.remove(&vol);
                continue;
            }
            // Ask for (a renewal of) the lease.
            if p.last_req_ms.is_none_or(|t| now_ms >= t + timing.lease_renew_ms) {
                self.next_req += 1;
                p.outstanding = Some((self.next_req, now_ms));
                p.last_req_ms = Some(now_ms);
                for voter in &self.cfg.voters {
                    let m = Msg::LeaseReq {
                        vol: vol.clone(),
                        epoch: v.epoch,
                        from: me.clone(),
                        req: self.next_req,
                    };
                    out.push((voter.clone(), m));
                }
            }
            if p.published_until != p.until_ms {
                p.published_until = p.until_ms;
                oracle.lease_held(&me, &vol, p.until_ms);
            }
            let serving = p.until_ms > now_ms;
            if serving && !p.serving {
                oracle.started_serving(&me, &vol, v.epoch);
            }
            p.serving = serving;

            // Rejoin: at most one returning replica at a time per volume.
            if let Some(j) = p.join.as_mut() {
                if j.copied && v.epoch > j.epoch {
                    // Decided: either it joined (now in in_sync) or it was fenced.
                    if v.is_in_sync(&j.node) {
                        oracle.note(format!("{} rejoined {vol} at epoch {}", j.node, v.epoch));
                    }
                    p.join = None;
                    p.next_join_ms = now_ms + JOIN_RETRY_MS;
                } else if !j.copied
                    && (v.epoch != j.epoch || now_ms >= j.started_ms + timing.replica_ack_timeout_ms)
                {
                    // No rejoin request was sent: abandoning is safe.
                    p.join = None;
                    p.next_join_ms = now_ms + JOIN_RETRY_MS;
                } else if now_ms >= j.last_send_ms + timing.write_retry_ms * 5 {
                    j.last_send_ms = now_ms;
                    if j.copied {
                        for voter in &self.cfg.voters {
                            let m = Msg::RejoinReq {
                                vol: vol.clone(),
                                epoch: j.epoch,
                                node: j.node.clone(),
                                from: me.clone(),
                            };
                            out.push((voter.clone(), m));
                        }
                    } else {
                        let wids = self
                            .disk
                            .borrow()
                            .data
                            .get(&vol)
                            .map(|d| d.iter().copied().collect())
                            .unwrap_or_default();
                        out.push((
                            j.node.clone(),
                            Msg::Resync { vol: vol.clone(), epoch: j.epoch, wids, from: me.clone() },
                        ));
                    }
                }
            } else if serving && p.pending.is_none() && now_ms >= p.next_join_ms {
                let returning = v.replicas.iter().find(|r| {
                    !v.is_in_sync(r)
                        && self
                            .state
                            .site_of(r)
                            .and_then(|s| self.state.sites.get(s))
                            .is_some_and(|s| s.mode == metro_quorum::state::SiteMode::Active)
                });
                if let Some(r) = returning {
                    let wids = self
                        .disk
                        .borrow()
                        .data
                        .get(&vol)
                        .map(|d| d.iter().copied().collect())
                        .unwrap_or_default();
                    out.push((
                        r.clone(),
                        Msg::Resync { vol: vol.clone(), epoch: v.epoch, wids, from: me.clone() },
                    ));
                    p.join = Some(Join {
                        node: r.clone(),
                        epoch: v.epoch,
                        started_ms: now_ms,
                        last_send_ms: now_ms,
                        copied: false,
                    });
                }
            }
            let joining = p.join.as_ref().map(|j| j.node.clone());

            // The write path: one write in flight per volume.
            let Some(w) = p.pending.as_mut() else {
                if serving && now_ms >= p.next_write_ms {
                    let wid = oracle.next_wid();
                    {
                        let mut d = self.disk.borrow_mut();
                        d.data.entry(vol.clone()).or_default().insert(wid);
                        let e = d.data_epoch.entry(vol.clone()).or_default();
                        *e = (*e).max(v.epoch);
                    }
                    // A joining replica gets every write too, and is waited for.
                    let waiting: BTreeSet<NodeId> =
                        v.in_sync.iter().filter(|n| **n != me).cloned().chain(joining.clone()).collect();
                    for r in &waiting {
                        out.push((
                            r.clone(),
                            Msg::Write { vol: vol.clone(), epoch: v.epoch, wid, from: me.clone() },
                        ));
                    }
                    p.pending = Some(PendingWrite {
                        wid,
                        waiting,
                        started_ms: now_ms,
                        last_send_ms: now_ms,
                        last_remove_ms: 0,
                    });
                }
                continue;
            };
            w.waiting.retain(|n| v.is_in_sync(n) || joining.as_ref() == Some(n));
            if w.waiting.is_empty() {
                if serving {
                    oracle.write_acked(&me, &vol, w.wid);
                    p.pending = None;
                    p.next_write_ms = now_ms + timing.write_interval_ms;
                }
                continue;
            }
            if now_ms >= w.last_send_ms + timing.write_retry_ms {
                w.last_send_ms = now_ms;
                for r in &w.waiting {
                    out.push((
                        r.clone(),
                        Msg::Write { vol: vol.clone(), epoch: v.epoch, wid: w.wid, from: me.clone() },
                    ));
                }
            }
            if now_ms >= w.started_ms + timing.replica_ack_timeout_ms
                && now_ms >= w.last_remove_ms + timing.replica_ack_timeout_ms / 2
            {
                w.last_remove_ms = now_ms;
                for r in &w.waiting {
                    for voter in &self.cfg.voters {
                        let m = Msg::RemoveReq {
                            vol: vol.clone(),
                            epoch: v.epoch,
                            node: r.clone(),
                            from: me.clone(),
                        };
                        out.push((voter.clone(), m));
                    }
                }
            }
        }
    }
}
