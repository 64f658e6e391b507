//! DESIGN.md section 5, one test per row, at the level of the pure decisions:
//! a leader loop made only of `SiteTracker`, `plan_failover`, `desired_voters`
//! and `ClusterState::apply`, driven by a virtual clock.

use super::fixture::*;
use super::*;
use crate::state::{ClusterState, Command, NodeId, SiteMode};
use std::collections::BTreeSet;

const TIMING: LeaseTiming = LeaseTiming { lease_ms: 2_000, drift_margin_ms: 250 };
const STABLE_MS: u64 = 10_000;
const TICK_MS: u64 = 250;

/// A leader made only of the pure decisions.
struct Leader {
    state: ClusterState,
    leases: LeaseTable,
    sites: SiteTracker,
    voters: BTreeSet<NodeId>,
    /// A membership change in flight (decided last round).
    pending_voters: Option<BTreeSet<NodeId>>,
    now_ms: u64,
    /// Every command the leader committed, in order.
    log: Vec<Command>,
}

impl Leader {
    fn new(state: ClusterState) -> Self {
        let mut l = Leader {
            voters: set(&["a1", "b1", "w1"]),
            pending_voters: None,
            state,
            leases: LeaseTable::new(0, TIMING),
            sites: SiteTracker::new(STABLE_MS),
            now_ms: 0,
            log: Vec::new(),
        };
        // Primaries hold fresh leases at t=0.
        let prims: Vec<_> =
            l.state.volumes.values().map(|v| (v.name.clone(), v.primary.clone().unwrap(), v.epoch)).collect();
        for (v, p, e) in prims {
            l.leases.inherit(&v, &p, e);
            l.leases.grant(&v, &p, e, 0).unwrap();
        }
        l
    }

    /// Run for `ms` with `alive` fixed; alive primaries renew every tick.
    fn run(&mut self, alive: &BTreeSet<NodeId>, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            self.now_ms += TICK_MS;
            if !has_quorum(&self.voters, alive) {
                continue; // No quorum: no leader, no decision, no lease.
            }
            // A membership change commits one round after it was decided,
            // and only with a majority of the old and the new voters (joint).
            if let Some(next) = self.pending_voters.take() {
                if has_quorum(&next, alive) {
                    self.voters = next;
                }
            }
            // As control.rs: membership is decided from the state at the
            // start of the round, one step per round, after the site modes.
            let round_start = self.state.clone();
            let cmds = self.sites.observe(&self.state, alive, self.now_ms);
            let (mut cmds, returning) = gate_activations(cmds, &self.state, Some(&self.voters), alive, 1);
            for c in &cmds {
                assert!(self.state.apply(c).is_ok());
            }
            let plan = plan_failover(&self.state, alive, &self.leases, self.now_ms);
            for c in &plan.commands {
                assert!(self.state.apply(c).is_ok(), "{c:?}");
            }
            cmds.extend(plan.commands);
            self.log.extend(cmds);
            let want = desired_voters_returning(&round_start, &self.voters, alive, 1, &returning);
            if let Some(step) = membership_steps(&self.voters, &want, alive).into_iter().next() {
                assert!(has_quorum(&step, alive), "unsafe step {step:?}");
                self.pending_voters = Some(step);
            }
            let prims: Vec<_> = self
                .state
                .volumes
                .values()
                .filter_map(|v| Some((v.name.clone(), v.primary.clone()?, v.epoch)))
                .collect();
            for (v, p, e) in prims {
                if alive.contains(&p) {
                    self.leases.grant(&v, &p, e, self.now_ms).unwrap();
                }
            }
        }
    }

    fn primary(&self, v: &str) -> &str {
        self.state.volumes[v].primary.as_deref().unwrap()
    }

    fn mode(&self, site: &str) -> SiteMode {
        self.state.sites[site].mode
    }
}

fn two_volumes() -> ClusterState {
    with_volumes(&[("va", &["a1", "b1"], "a1"), ("vb", &["a2", "b2"], "b2")])
}

#[test]
fn loss_of_dc_a_promotes_in_sync_replicas_in_dc_b_after_the_lease() {
    let mut l = Leader::new(two_volumes());
    let alive = all_but(&l.state, &["a1", "a2"]);
    l.run(&alive, 2_250);
    assert_eq!(l.primary("va"), "a1", "not before the lease plus margin");
    l.run(&alive, TICK_MS);
    assert_eq!(l.primary("va"), "b1");
    assert_eq!(l.state.volumes["va"].in_sync, ["b1"]);
    assert_eq!(l.primary("vb"), "b2", "volumes already in dc-b do not move");
    assert_eq!(l.mode("dc-a"), SiteMode::Fenced);
    assert!(l.now_ms <= 5_000, "RTO target 5 s");
    assert_eq!(l.voters, set(&["b1", "w1"]), "shrunk to the survivors plus the witness");
}

#[test]
fn loss_of_dc_b_promotes_in_sync_replicas_in_dc_a_after_the_lease() {
    let mut l = Leader::new(two_volumes());
    let alive = all_but(&l.state, &["b1", "b2"]);
    l.run(&alive, 2_500);
    assert_eq!((l.primary("va"), l.primary("vb")), ("a1", "a2"));
    assert_eq!(l.state.volumes["vb"].in_sync, ["a2"]);
    assert_eq!(l.mode("dc-b"), SiteMode::Fenced);
}

#[test]
fn dc_cut_with_witness_seeing_both_keeps_the_preferred_site() {
    let mut l = Leader::new(two_volumes());
    let winner = arbitrate(&l.state, Some("dc-b"), &["dc-a".into(), "dc-b".into()].into()).unwrap();
    assert_eq!(winner, "dc-a");
    // The quorum that remains is dc-a + witness; from there dc-b is unreachable.
    let alive = all_but(&l.state, &["b1", "b2"]);
    l.run(&alive, 2_500);
    assert_eq!(l.mode("dc-b"), SiteMode::Fenced, "the losing site fences within one lease period");
    assert_eq!(l.primary("vb"), "a2", "its volumes fail over");
}

#[test]
fn dc_cut_with_witness_seeing_only_dc_b_keeps_dc_b_even_though_dc_a_is_preferred() {
    let mut l = Leader::new(two_volumes());
    let winner = arbitrate(&l.state, Some("dc-a"), &["dc-b".to_string()].into()).unwrap();
    assert_eq!(winner, "dc-b");
    let alive = all_but(&l.state, &["a1", "a2"]);
    l.run(&alive, 2_500);
    assert_eq!(l.primary("va"), "b1");
}

#[test]
fn witness_loss_changes_nothing() {
    let mut l = Leader::new(two_volumes());
    let before = l.state.clone();
    l.run(&all_but(&l.state, &["w1"]), 60_000);
    assert_eq!(l.state, before);
    assert!(l.log.is_empty());
    assert_eq!(l.voters, set(&["a1", "b1", "w1"]));
}

#[test]
fn witness_loss_then_dc_a_loss_leaves_no_quorum_and_promotes_nothing() {
    let mut l = Leader::new(two_volumes());
    l.run(&all_but(&l.state, &["w1"]), 5_000);
    let alive = all_but(&l.state, &["w1", "a1", "a2"]);
    assert!(!has_quorum(&l.voters, &alive));
    assert_eq!(arbitrate(&l.state, None, &BTreeSet::new()), None);
    let before = l.state.clone();
    l.run(&alive, 60_000);
    assert_eq!(l.state, before, "suspended until an operator activates dc-b");
}

#[test]
fn one_storage_node_lost_fails_its_volumes_over_to_an_in_sync_replica() {
    let mut l = Leader::new(with_volumes(&[("v", &["a1", "a2", "b1"], "a1"), ("w", &["a2", "b1"], "a2")]));
    let alive = all_but(&l.state, &["a1"]);
    l.run(&alive, 2_500);
    assert_eq!(l.primary("v"), "a2", "same site first");
    assert_eq!(l.state.volumes["v"].in_sync, ["a2", "b1"]);
    assert_eq!(l.primary("w"), "a2");
    assert_eq!(l.mode("dc-a"), SiteMode::Active, "one node is not a site");
    assert_eq!(l.voters, set(&["a2", "b1", "w1"]), "the dead voter is replaced");
}

#[test]
fn flapping_site_stays_fenced_until_stable() {
    let mut l = Leader::new(two_volumes());
    let all = all_but(&l.state, &[]);
    let no_a = all_but(&l.state, &["a1", "a2"]);
    l.run(&no_a, 2_500);
    assert_eq!(l.mode("dc-a"), SiteMode::Fenced);
    let fenced_at = l.log.len();
    for _ in 0..20 {
        l.run(&all, 3_000);
        l.run(&no_a, 500);
    }
    assert_eq!(l.mode("dc-a"), SiteMode::Fenced);
    assert_eq!(l.log[fenced_at..], [], "no failover storm: nothing committed while flapping");
    l.run(&all, STABLE_MS);
    assert_eq!(l.mode("dc-a"), SiteMode::Fenced, "first reachable tick starts the timer");
    l.run(&all, TICK_MS);
    assert_eq!(l.mode("dc-a"), SiteMode::Fenced, "stable: its voter comes back first");
    l.run(&all, TICK_MS);
    assert_eq!(l.mode("dc-a"), SiteMode::Active);
    assert!(l.voters.contains("a1"));
}

#[test]
fn returning_site_becomes_active_and_gets_its_voters_back_without_a_manual_step() {
    let mut l = Leader::new(two_volumes());
    l.run(&all_but(&l.state, &["a1", "a2"]), 2_500);
    assert_eq!(l.voters, set(&["b1", "w1"]));
    // Stable after STABLE_MS; one round for the voter, one for the activation.
    l.run(&all_but(&l.state, &[]), STABLE_MS + 2 * TICK_MS);
    assert_eq!(l.mode("dc-a"), SiteMode::Active);
    assert_eq!(l.voters, set(&["a1", "b1", "w1"]));
    // Rejoining in_sync waits for the resync (data path), never a promotion.
    assert_eq!(l.state.volumes["va"].in_sync, ["b1"]);
}

/// Bench `rto` regression (5 of 7 dc-b kills never failed over): dc-a came
/// back, was re-activated, and dc-b was killed the moment every site showed
/// Active. The voters were still {b1, w1}, so w1 was left alone: no quorum,
/// no failover, ever. The activation must wait for dc-a's voter.
#[test]
fn killing_the_other_site_the_moment_a_returned_site_is_active_still_fails_over() {
    let mut l = Leader::new(two_volumes());
    l.run(&all_but(&l.state, &["a1", "a2"]), 3_000);
    assert_eq!(l.mode("dc-a"), SiteMode::Fenced);
    assert_eq!(l.voters, set(&["b1", "w1"]));
    assert_eq!(l.primary("va"), "b1");
    let everyone = all_but(&l.state, &[]);
    let mut waited = 0;
    while l.mode("dc-a") != SiteMode::Active {
        l.run(&everyone, TICK_MS);
        waited += TICK_MS;
        assert!(waited <= STABLE_MS + 10 * TICK_MS, "dc-a never re-activated");
    }
    assert!(l.voters.contains("a1"), "dc-a has its voter back before it is Active: {:?}", l.voters);
    // a1 rejoins va's in_sync after its resync (data path, committed by the primary).
    let va = l.state.volumes["va"].clone();
    let rejoin = Command::ChangeVolume {
        name: "va".into(),
        expected_epoch: va.epoch,
        primary: va.primary.clone(),
        in_sync: vec!["b1".into(), "a1".into()],
        rejoin: Some("a1".into()),
    };
    assert!(l.state.apply(&rejoin).is_ok());
    let dc_b_lost = all_but(&l.state, &["b1", "b2"]);
    l.run(&dc_b_lost, 3_000);
    assert!(has_quorum(&l.voters, &dc_b_lost), "voters {:?}", l.voters);
    assert_eq!(l.primary("va"), "a1", "failed over to dc-a");
    assert_eq!(l.mode("dc-b"), SiteMode::Fenced);
}
