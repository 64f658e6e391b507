//! The leader's control loop (runs on every member, acts only on the leader).
//!
//! Every `heartbeat_ms`, on the leader:
//! 1. **failover** — `decide::plan_failover` over the alive set (nodes heard
//!    from within `node_loss_ms`) and the leader's lease table; the promotions
//!    commit as one `Command::Batch` per `MAX_BATCH` volumes;
//! 2. **site modes** — `decide::SiteTracker` (fence a data site with no live
//!    node; re-activate after `site_stable_ms` of reachability);
//! 3. **membership** — registered nodes become learners; voters converge to
//!    `decide::desired_voters` one single-node step at a time (openraft joint
//!    consensus for each step), only towards caught-up learners.
//!
//! Invariants:
//! - Nothing is promoted before the old primary's lease has certainly expired
//!   (a new leader first waits `lease_ms + drift_margin_ms`, see `decide::lease`).
//! - At most one membership change is in flight; the leader never removes itself.

use crate::decide::{self, LeaseTable, LeaseTiming, Liveness, SiteTracker};
use crate::quorum::{Handover, LeaderState, Shared};
use crate::state::{ClusterState, Command, NodeId};
use crate::types::RaftId;
use openraft::{BasicNode, ChangeMembers, ServerState};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Volumes per failover entry: 1000 ChangeVolume commands are ~200 KiB of
/// JSON, well inside one AppendEntries message.
pub const MAX_BATCH: usize = 1000;
/// A learner within this many entries of the leader's log counts as caught up
/// and may become a voter.
const MAX_VOTER_LAG: u64 = 100;
/// Deadline for one membership change (joint + final config commit).
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(5);

/// Keep `Shared::leader` in step with openraft's view of who leads.
pub(crate) async fn role_watcher(s: Arc<Shared>) {
    let mut rx = s.raft.metrics();
    loop {
        let (leading, term) = {
            let m = rx.borrow_and_update();
            (m.state == ServerState::Leader && m.current_leader == Some(s.raft_id), m.current_term)
        };
        {
            let mut g = s.leader_state();
            match (&*g, leading) {
                (Some(ls), true) if ls.term == term => {}
                (_, true) => {
                    let now = s.now_ms();
                    let t = &s.cfg.timings;
                    // The committed timings (every member was checked against
                    // them at registration) rule over this member's own.
                    let timing = match s.sm.current().lease_timings {
                        Some(c) => LeaseTiming { lease_ms: c.lease_ms, drift_margin_ms: c.drift_margin_ms },
                        None => LeaseTiming { lease_ms: t.lease_ms, drift_margin_ms: t.drift_margin_ms },
                    };
                    tracing::info!(node = %s.cfg.node_id, term, "became leader; waiting one lease period before any promotion");
                    let mut leases = LeaseTable::new(now, timing);
                    for v in s.sm.current().volumes.values() {
                        if let Some(p) = &v.primary {
                            leases.inherit(&v.name, p, v.epoch);
                        }
                    }
                    *g = Some(LeaderState {
                        term,
                        liveness: Liveness::new(now),
                        leases,
                        sites: SiteTracker::new(t.site_stable_ms),
                    });
                }
                (Some(_), false) => *g = None,
                (None, false) => {}
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// The nodes the leader considers alive now (itself included).
pub(crate) fn alive_set(s: &Shared, ls: &LeaderState, state: &ClusterState, now_ms: u64) -> BTreeSet<NodeId> {
    ls.liveness.alive(state, &s.cfg.node_id, now_ms, s.node_loss_ms())
}

pub(crate) async fn control_loop(s: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(s.cfg.timings.heartbeat_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !s.is_leader() {
            continue;
        }
        control_round(&s).await;
    }
}

async fn control_round(s: &Shared) {
    let state = s.sm.current();
    let now = s.now_ms();
    let (alive, leases, site_cmds) = {
        let mut g = s.leader_state();
        let Some(ls) = g.as_mut() else { return };
        ls.liveness.observe(&state, now);
        let alive = alive_set(s, ls, &state, now);
        if let Some(c) = &state.config {
            ls.sites.set_stable_ms(c.site_stable_ms);
        }
        let site_cmds = ls.sites.observe(&state, &alive, now);
        (alive, ls.leases.clone(), site_cmds)
    };

    // 1. failover
    let plan = decide::plan_failover(&state, &alive, &leases, now);
    if !plan.stranded.is_empty() {
        tracing::warn!(volumes = ?plan.stranded, "volumes have no alive in-sync replica; they stay suspended");
    }
    for chunk in plan.commands.chunks(MAX_BATCH) {
        let cmd = if chunk.len() == 1 { chunk[0].clone() } else { Command::Batch(chunk.to_vec()) };
        match s.write_local(cmd).await {
            Ok(r) => tracing::info!(volumes = chunk.len(), ok = r.is_ok(), "committed failover"),
            Err(e) => {
                tracing::warn!(error = ?e, "failover commit failed; retrying next round");
                return;
            }
        }
    }

    // 2. site modes; a returning site is activated only once its voters are
    //    back (membership below), so "every site active" means the loss of
    //    either data site is survivable.
    let per_site = voters_per_site(s, &state);
    let current = current_voters(s, &state);
    let (site_cmds, returning) =
        decide::gate_activations(site_cmds, &state, current.as_ref(), &alive, per_site);
    if !returning.is_empty() {
        tracing::info!(sites = ?returning, "restoring the voters of returning sites before activating them");
    }
    for cmd in site_cmds {
        tracing::info!(?cmd, "site mode change");
        if let Err(e) = s.write_local(cmd).await {
            tracing::warn!(error = ?e, "site mode commit failed");
            return;
        }
    }

    // 3. membership
    reconcile_membership(s, &state, &alive, &returning).await;
}

/// Voters per data site: the committed cluster config's, else this daemon's.
fn voters_per_site(s: &Shared, state: &ClusterState) -> usize {
    let n = state.config.as_ref().map_or(s.cfg.timings.voters_per_site, |c| c.voters_per_site);
    usize::from(n.max(1))
}

/// The current voters by node name; None while a joint change is in flight
/// or a voter cannot be named yet.
fn current_voters(s: &Shared, state: &ClusterState) -> Option<BTreeSet<NodeId>> {
    let m = s.raft.metrics().borrow().clone();
    let mem = m.membership_config.membership();
    if mem.get_joint_config().len() != 1 {
        return None;
    }
    mem.voter_ids().map(|id| state.node_by_raft_id(id).map(|n| n.id.clone())).collect()
}

async fn reconcile_membership(
    s: &Shared,
    state: &ClusterState,
    alive: &BTreeSet<NodeId>,
    returning: &BTreeSet<String>,
) {
    let m = s.raft.metrics().borrow().clone();
    let mem = m.membership_config.membership().clone();
    for rec in state.nodes.values() {
        match mem.get_node(&rec.raft_id) {
            None => {
                s.ensure_learner(rec).await;
                return;
            }
            Some(n) if n.addr != rec.api => {
                // The node re-registered from a new address (same name, so the
                // same raft id): point replication at it.
                let nodes = BTreeMap::from([(rec.raft_id, BasicNode { addr: rec.api.clone() })]);
                tracing::info!(node = %rec.id, from = %n.addr, to = %rec.api, "updating a member's address");
                let change = s.raft.change_membership(ChangeMembers::SetNodes(nodes), true);
                match tokio::time::timeout(MEMBERSHIP_TIMEOUT, change).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "address update failed"),
                    Err(_) => tracing::warn!("address update timed out"),
                }
                return;
            }
            Some(_) => {}
        }
    }
    let joint = mem.get_joint_config();
    if joint.len() != 1 {
        // A change left half-done (e.g. the previous leader died mid-way):
        // finish it towards its target config before anything else.
        let target = joint.last().cloned().unwrap_or_default();
        tracing::info!(?target, "finishing an interrupted membership change");
        match tokio::time::timeout(MEMBERSHIP_TIMEOUT, s.raft.change_membership(target, true)).await {
            Ok(Ok(_)) => tracing::info!("membership change finished"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not finish the membership change"),
            Err(_) => tracing::warn!("finishing the membership change timed out"),
        }
        return;
    }
    let mut current = BTreeSet::new();
    for id in mem.voter_ids() {
        match state.node_by_raft_id(id) {
            Some(n) => {
                current.insert(n.id.clone());
            }
            None => return, // a voter we cannot name yet (registration not applied)
        }
    }
    let per_site = voters_per_site(s, state);
    let desired = decide::desired_voters_returning(state, &current, alive, per_site, returning);
    if desired == current || desired.is_empty() {
        return;
    }
    let steps = decide::membership_steps(&current, &desired, alive);
    // Skip even-sized intermediate sets when a later step is odd: a 2-voter
    // group loses its majority with either voter (e.g. {a1} → {a1,b1,w1} in one
    // joint change, never stopping at {a1,b1}). Joint consensus keeps any
    // multi-node change safe.
    let pick = steps.iter().position(|v| v.len() % 2 == 1).unwrap_or(0);
    let Some(next) = steps.into_iter().nth(pick) else { return };
    if !next.contains(&s.cfg.node_id) {
        return;
    }
    let last = m.last_log_index.unwrap_or(0);
    let matched: BTreeMap<RaftId, u64> = m
        .replication
        .as_ref()
        // A learner that never acknowledged an append (None) is not caught up,
        // however short the log: it may be dead (a new leader counts every
        // node alive for its first `node_loss_ms`).
        .map(|r| r.iter().filter_map(|(k, v)| v.map(|l| (*k, l.index))).collect())
        .unwrap_or_default();
    let mut ids = BTreeSet::new();
    for name in &next {
        let Some(rec) = state.nodes.get(name) else { return };
        if !current.contains(name) {
            let caught_up = matched.get(&rec.raft_id).is_some_and(|i| i + MAX_VOTER_LAG >= last);
            if mem.get_node(&rec.raft_id).is_none() || !caught_up {
                return;
            }
        }
        ids.insert(rec.raft_id);
    }
    tracing::info!(from = ?current, to = ?next, "changing voters");
    match tokio::time::timeout(MEMBERSHIP_TIMEOUT, s.raft.change_membership(ids, true)).await {
        Ok(Ok(_)) => tracing::info!(voters = ?next, "voters changed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "membership change failed"),
        Err(_) => tracing::warn!("membership change timed out"),
    }
}

/// How long a hand-over pauses the leader's heartbeats (and holds the other
/// members' elections): long enough for the followers' openraft leader lease
/// (`election_timeout_max`) to lapse and the target to win one election.
pub(crate) fn handover_pause_ms(s: &Shared) -> u64 {
    s.cfg.timings.election_timeout_max_ms * 2 + s.cfg.timings.heartbeat_ms * 4
}

/// During a hand-over: how long `requester` (not the target) should hold its elections.
pub(crate) fn hold_elections_for(s: &Shared, requester: &str) -> u64 {
    let g = s.handover.lock().unwrap_or_else(|p| p.into_inner());
    let Some(h) = g.as_ref() else { return 0 };
    let end = h.started_ms + handover_pause_ms(s);
    let now = s.now_ms();
    if h.target == requester || now >= end {
        return 0;
    }
    end - now
}

/// Leader side of leadership placement ([`decide::hand_over_wanted`]): tell
/// `requester` to take over when leadership belongs in its site (the
/// preferred site, or any active data site rather than the witness), the
/// group is healthy, and `requester` is a caught-up voter. The leader pauses
/// its heartbeats and the other members hold their elections, so the
/// target's campaign (started once the followers' openraft lease lapsed)
/// wins. At most one hand-over per `10 × election_timeout_max` (no storms
/// when the target cannot win).
pub(crate) fn should_hand_over(s: &Shared, requester: &str, state: &ClusterState) -> bool {
    if requester == s.cfg.node_id {
        return false;
    }
    let Some(rec) = state.nodes.get(requester) else { return false };
    let m = s.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    if !membership.voter_ids().any(|v| v == rec.raft_id) || membership.get_joint_config().len() != 1 {
        return false;
    }
    let last = m.last_log_index.unwrap_or(0);
    let matched =
        |id: RaftId| m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index);
    let caught_up = |id: RaftId| matched(id).is_some_and(|i| i + 1 >= last);
    let preferred_ready = state.preferred_site.as_deref().is_some_and(|p| {
        membership.voter_ids().any(|v| state.node_by_raft_id(v).is_some_and(|n| n.site == p) && caught_up(v))
    });
    if !decide::hand_over_wanted(state, &s.cfg.site, &rec.site, preferred_ready) || !caught_up(rec.raft_id) {
        return false;
    }
    // Only a healthy group hands over: every voter caught up, so the pause in
    // heartbeats cannot cost the group its majority.
    let healthy = membership
        .voter_ids()
        .filter(|v| *v != s.raft_id)
        .all(|v| matched(v).is_some_and(|i| i + MAX_VOTER_LAG >= last));
    if !healthy {
        return false;
    }
    // A leader timing a fenced site's return keeps leading until that site
    // is active: a new leader would start the stability window from zero
    // (seeds 128 and 639325102 of the data-path simulation: a hand-over
    // mid-window kept a volume whose only in-sync copy is in the returning
    // site suspended for twice `site_stable_ms` after the heal).
    if s.leader_state().as_ref().is_some_and(|ls| ls.sites.timing_a_return(state)) {
        return false;
    }
    let now = s.now_ms();
    let cooldown = s.cfg.timings.election_timeout_max_ms * 10;
    {
        let mut g = s.handover.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref().is_some_and(|h| now.saturating_sub(h.started_ms) < cooldown) {
            return false;
        }
        *g = Some(Handover { target: requester.to_string(), started_ms: now });
    }
    tracing::info!(to = %requester, site = %rec.site, "handing leadership over");
    s.raft.runtime_config().heartbeat(false);
    let raft = s.raft.clone();
    let pause = Duration::from_millis(handover_pause_ms(s));
    tokio::spawn(async move {
        tokio::time::sleep(pause).await;
        raft.runtime_config().heartbeat(true);
    });
    true
}
