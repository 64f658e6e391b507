//! Liveness and primary leases.
//!
//! ```text
//!  node (every heartbeat_ms)                 leader
//!  sent = now()
//!  Heartbeat{node, primaries, released} ───► last_seen[node] = now; end released leases
//!                                            is_leader()  (quorum round trip)
//!                                            grant each (volume, epoch) whose
//!                                            committed primary is `node`
//!  valid_until = sent + lease_ms ◄────────── Granted{granted, lease_ms, take_over}
//! ```
//!
//! Invariants (DESIGN.md 4.3):
//! - The holder counts its lease from *before* it sent the request; the
//!   leader counts from after it confirmed leadership, and adds the drift
//!   margin before it considers the lease certainly over. So the holder always
//!   stops first.
//! - A lease is granted only to the committed primary at the committed epoch,
//!   and only after a quorum round trip proved the leader still leads.
//! - Leases live in memory only, on both sides.

use crate::network::Method;
use crate::quorum::{HeldLease, Shared};
use crate::state::SiteMode;
use crate::wire::{HeartbeatReply, HeartbeatRequest};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Upper bound on one heartbeat round trip: a reply later than this is
/// useless (most of the lease it would grant has already run out).
const MAX_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between the quick lease retries after a wake-up.
const QUICK_RETRY: Duration = Duration::from_millis(40);
/// Quick retries after one wake-up (then the normal tick takes over).
const QUICK_RETRIES: u32 = 10;

pub(crate) type PrimariesFn = Box<dyn Fn() -> Vec<(String, u64)> + Send + Sync>;

fn heartbeat_timeout(s: &Shared) -> Duration {
    let t = &s.cfg.timings;
    Duration::from_millis((t.heartbeat_ms * 4).min(t.lease_ms / 2).max(1)).min(MAX_HEARTBEAT_TIMEOUT)
}

/// Leader side: record liveness, confirm leadership, grant leases.
pub(crate) async fn handle_heartbeat(s: &Shared, req: HeartbeatRequest) -> HeartbeatReply {
    let not_leader = || HeartbeatReply::NotLeader {
        leader: s.leader_addr().map(|(_, a)| a),
        last_log: s.log.last_and_vote().0.map(|l| (l.leader_id.term, l.index)),
    };
    if !s.is_leader() {
        return not_leader();
    }
    {
        let now = s.now_ms();
        let mut g = s.leader_state();
        match g.as_mut() {
            Some(ls) => {
                ls.liveness.heard(&req.node_id, now);
                for (vol, epoch) in &req.released {
                    if ls.leases.release(vol, &req.node_id, *epoch) {
                        tracing::info!(node = %req.node_id, volume = %vol, epoch, "lease released");
                    }
                }
            }
            None => return not_leader(),
        }
    }
    // Quorum round trip: a deposed leader must not grant anything.
    match tokio::time::timeout(heartbeat_timeout(s), s.raft.ensure_linearizable()).await {
        Ok(Ok(_)) => {}
        _ => return not_leader(),
    }
    let now = s.now_ms();
    let term = s.raft.metrics().borrow().current_term;
    let state = s.sm.current();
    let mut granted = Vec::new();
    let lease_ms;
    {
        let mut g = s.leader_state();
        let Some(ls) = g.as_mut().filter(|ls| ls.term == term) else {
            return not_leader();
        };
        // The period the leader's table judges expiry by (the committed one).
        lease_ms = ls.leases.timing().lease_ms;
        for (vol, epoch) in &req.primaries {
            let Some(v) = state.volumes.get(vol) else { continue };
            let site_active = state
                .site_of(&req.node_id)
                .and_then(|site| state.sites.get(site))
                .is_some_and(|site| site.mode == SiteMode::Active);
            if v.primary.as_deref() != Some(req.node_id.as_str()) || v.epoch != *epoch || !site_active {
                continue;
            }
            match ls.leases.grant(vol, &req.node_id, *epoch, now) {
                Ok(_) => granted.push((vol.clone(), *epoch)),
                Err(e) => tracing::info!(node = %req.node_id, error = %e, "lease refused"),
            }
        }
    }
    let take_over = crate::control::should_hand_over(s, &req.node_id, &state);
    let hold_elections_ms = crate::control::hold_elections_for(s, &req.node_id);
    HeartbeatReply::Granted {
        leader: s.cfg.node_id.clone(),
        term,
        granted,
        lease_ms,
        take_over,
        hold_elections_ms,
    }
}

/// Node side: heartbeat the leader forever, keeping `Shared::leases` current.
pub(crate) async fn heartbeat_loop(s: Arc<Shared>, primaries: PrimariesFn) {
    let mut tick = tokio::time::interval(Duration::from_millis(s.cfg.timings.heartbeat_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a wake-up (a release, or a new primary wanting its lease), a
    // primary still without a lease asks again every QUICK_RETRY, a bounded
    // number of times, instead of waiting a whole tick: the release that
    // frees it is usually a few milliseconds behind.
    let mut quick_left = 0u32;
    let mut retry_at: Option<Instant> = None;
    loop {
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        // `biased`: tokio picks among ready branches at random otherwise
        // (its generator is seeded only under `tokio_unstable`), and the
        // simulator needs a seed to replay exactly.
        tokio::select! {
            biased;
            _ = s.heartbeat_now.notified() => quick_left = QUICK_RETRIES,
            _ = tick.tick() => {}
            _ = retry => {}
        }
        retry_at = None;
        let released = std::mem::take(&mut *s.released.lock().expect("poisoned"));
        let req = HeartbeatRequest { node_id: s.cfg.node_id.clone(), primaries: primaries(), released };
        let asked = req.primaries.clone();
        let sent = Instant::now();
        let reply = if s.is_leader() {
            handle_heartbeat(&s, req).await
        } else if let Some((_, addr)) = s.leader_addr() {
            match s.peers.call(&addr, Method::Heartbeat, &req, heartbeat_timeout(&s)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(leader = %addr, error = %e, "heartbeat failed");
                    continue;
                }
            }
        } else {
            continue;
        };
        if let HeartbeatReply::Granted { granted, lease_ms, take_over, hold_elections_ms, .. } = reply {
            if quick_left > 0 && asked.iter().any(|p| !granted.contains(p)) {
                quick_left -= 1;
                retry_at = Some(Instant::now() + QUICK_RETRY);
            } else {
                quick_left = 0;
            }
            let valid_until = sent + Duration::from_millis(lease_ms);
            let now = Instant::now();
            let floor = s.released_floor.lock().expect("poisoned");
            s.leases.send_modify(|m| {
                let m = Arc::make_mut(m);
                m.retain(|_, l| l.valid_until > now);
                for (vol, epoch) in granted {
                    // A grant from before a release of this epoch (the reply
                    // overtook nothing: it was simply late) stays given up.
                    if floor.get(&vol).is_some_and(|f| epoch <= *f) {
                        continue;
                    }
                    m.insert(vol, HeldLease { epoch, valid_until });
                }
            });
            drop(floor);
            if hold_elections_ms > 0 {
                hold_elections(&s, Duration::from_millis(hold_elections_ms));
            }
            if take_over && !s.is_leader() {
                campaign_after_lease(&s);
            }
        }
    }
}

/// Disable this member's elections until `now + hold` (a hand-over is running).
fn hold_elections(s: &Arc<Shared>, hold: Duration) {
    let until = Instant::now() + hold;
    {
        let mut g = s.hold_elections_until.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_some_and(|u| u >= until) {
            return;
        }
        *g = Some(until);
    }
    s.raft.runtime_config().elect(false);
    let s = s.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(until).await;
        let mut g = s.hold_elections_until.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_some_and(|u| u <= Instant::now()) {
            *g = None;
            s.raft.runtime_config().elect(true);
        }
    });
}

/// The leader asked us to take over: campaign once the followers' openraft
/// leader lease (`election_timeout_max`) has lapsed after its last heartbeat.
fn campaign_after_lease(s: &Arc<Shared>) {
    tracing::info!(node = %s.cfg.node_id, "the leader hands leadership to the preferred site; campaigning");
    let s = s.clone();
    let t = &s.cfg.timings;
    let wait = Duration::from_millis(t.election_timeout_max_ms + t.heartbeat_ms * 2);
    tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        if !s.is_leader() {
            if let Err(e) = s.raft.trigger().elect().await {
                tracing::warn!(error = %e, "could not start an election");
            }
        }
    });
}
