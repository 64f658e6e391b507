//! Primary failover: which volumes get a new primary, and which one.
//!
//! For each volume whose primary is not alive (or that has no primary):
//! 1. wait until its lease has **certainly** expired ([`LeaseTable::holder_expired`]);
//! 2. pick an alive replica from the latest `in_sync`, in a site that is not
//!    fenced or deactivated: the old primary's site first, then the other data
//!    site; ties break on the node id, so every leader picks the same one;
//! 3. emit one `ChangeVolume` (CAS on the current epoch) that sets the new
//!    primary and drops every not-alive node from `in_sync`.
//!
//! Invariants (DESIGN.md 4):
//! - 3, one primary: nothing is promoted before the old lease certainly expired.
//! - 4, no stale promotion: the candidate comes from the latest `in_sync` only;
//!   `in_sync` only shrinks here (never a rejoin).
//! - A volume with no alive in-sync replica stays put and is reported as
//!   stranded: promoting anything else could lose acknowledged writes.

use super::lease::LeaseTable;
use crate::state::{ClusterState, Command, NodeId, SiteMode, VolumeRecord};
use std::collections::BTreeSet;

/// What the leader should do now about dead primaries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailoverPlan {
    /// One `ChangeVolume` per volume to fail over, in volume-name order.
    pub commands: Vec<Command>,
    /// Volumes whose primary is gone but whose lease may still be valid.
    pub waiting_for_lease: Vec<String>,
    /// Volumes with no alive in-sync replica: they stay suspended.
    pub stranded: Vec<String>,
}

/// Plan failovers for every volume; see the module docs.
pub fn plan_failover(
    state: &ClusterState,
    alive: &BTreeSet<NodeId>,
    leases: &LeaseTable,
    now_ms: u64,
) -> FailoverPlan {
    let mut plan = FailoverPlan::default();
    for v in state.volumes.values() {
        if v.primary.as_ref().is_some_and(|p| alive.contains(p)) {
            continue;
        }
        if !leases.holder_expired(&v.name, now_ms) {
            plan.waiting_for_lease.push(v.name.clone());
            continue;
        }
        match pick_primary(state, v, alive) {
            Some(p) => {
                let in_sync: Vec<NodeId> = v.in_sync.iter().filter(|n| alive.contains(*n)).cloned().collect();
                plan.commands.push(Command::ChangeVolume {
                    name: v.name.clone(),
                    expected_epoch: v.epoch,
                    primary: Some(p),
                    in_sync,
                    rejoin: None,
                });
            }
            None => plan.stranded.push(v.name.clone()),
        }
    }
    plan
}

/// The replica to promote, or `None` when no alive in-sync replica exists.
fn pick_primary(state: &ClusterState, v: &VolumeRecord, alive: &BTreeSet<NodeId>) -> Option<NodeId> {
    let old_site = v.primary.as_deref().and_then(|p| state.site_of(p));
    let usable = |n: &&NodeId| {
        alive.contains(*n)
            && state.site_of(n).and_then(|s| state.sites.get(s)).is_some_and(|s| s.mode == SiteMode::Active)
    };
    let mut candidates: Vec<&NodeId> = v.in_sync.iter().filter(usable).collect();
    // Same site first (false < true), then by id.
    candidates.sort_by_key(|n| (state.site_of(n) != old_site, (*n).clone()));
    candidates.first().map(|n| (*n).clone())
}

#[cfg(test)]
mod tests {
    use super::super::fixture::*;
    use super::super::lease::LeaseTiming;
    use super::*;

    const T: LeaseTiming = LeaseTiming { lease_ms: 2_000, drift_margin_ms: 250 };
    const AFTER: u64 = 2_251;

    fn promoted(cmd: &Command) -> (&str, Option<&str>, &[NodeId], u64) {
        match cmd {
            Command::ChangeVolume { name, primary, in_sync, expected_epoch, rejoin: None } => {
                (name, primary.as_deref(), in_sync, *expected_epoch)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn an_alive_primary_is_left_alone() {
        let s = with_volumes(&[("v", &["a1", "b1"], "a1")]);
        let plan = plan_failover(&s, &all_but(&s, &[]), &LeaseTable::new(0, T), AFTER);
        assert_eq!(plan, FailoverPlan::default());
    }

    #[test]
    fn nothing_is_promoted_before_the_lease_certainly_expired() {
        let s = with_volumes(&[("v", &["a1", "b1"], "a1")]);
        let mut leases = LeaseTable::new(0, T);
        leases.inherit("v", "a1", 1);
        leases.grant("v", "a1", 1, 1_000).unwrap();
        let alive = all_but(&s, &["a1"]);
        let plan = plan_failover(&s, &alive, &leases, 1_000 + 2_250);
        assert!(plan.commands.is_empty());
        assert_eq!(plan.waiting_for_lease, vec!["v"]);
        let plan = plan_failover(&s, &alive, &leases, 1_000 + 2_251);
        assert_eq!(plan.commands.len(), 1);
    }

    #[test]
    fn a_fresh_leader_waits_out_a_lease_it_never_saw() {
        let s = with_volumes(&[("v", &["a1", "b1"], "a1")]);
        let leases = LeaseTable::new(10_000, T);
        let alive = all_but(&s, &["a1"]);
        assert!(plan_failover(&s, &alive, &leases, 12_250).commands.is_empty());
        assert_eq!(plan_failover(&s, &alive, &leases, 12_251).commands.len(), 1);
    }

    #[test]
    fn the_same_site_replica_is_preferred() {
        let s = with_volumes(&[("v", &["a1", "a2", "b1"], "a1")]);
        let plan = plan_failover(&s, &all_but(&s, &["a1"]), &LeaseTable::new(0, T), AFTER);
        let (name, p, in_sync, epoch) = promoted(&plan.commands[0]);
        assert_eq!((name, p, epoch), ("v", Some("a2"), 1));
        assert_eq!(in_sync, ["a2", "b1"]);
    }

    #[test]
    fn the_other_site_is_used_when_the_home_site_has_no_alive_in_sync_replica() {
        let s = with_volumes(&[("v", &["a1", "b2", "b1"], "a1")]);
        let plan = plan_failover(&s, &all_but(&s, &["a1"]), &LeaseTable::new(0, T), AFTER);
        let (_, p, in_sync, _) = promoted(&plan.commands[0]);
        assert_eq!(p, Some("b1"), "tie broken by id");
        assert_eq!(in_sync, ["b2", "b1"], "order of in_sync is kept");
    }

    #[test]
    fn a_replica_outside_in_sync_is_never_promoted() {
        let mut s = with_volumes(&[("v", &["a1", "a2", "b1"], "a1")]);
        // a2 fell out of sync earlier.
        ok(
            &mut s,
            Command::ChangeVolume {
                name: "v".into(),
                expected_epoch: 1,
                primary: Some("a1".into()),
                in_sync: vec!["a1".into(), "b1".into()],
                rejoin: None,
            },
        );
        let plan = plan_failover(&s, &all_but(&s, &["a1"]), &LeaseTable::new(0, T), AFTER);
        let (_, p, in_sync, epoch) = promoted(&plan.commands[0]);
        assert_eq!((p, epoch), (Some("b1"), 2));
        assert_eq!(in_sync, ["b1"]);
        // And the command applies cleanly.
        let mut s2 = s.clone();
        ok(&mut s2, plan.commands[0].clone());
    }

    #[test]
    fn a_volume_without_an_alive_in_sync_replica_is_stranded_not_moved() {
        let mut s = with_volumes(&[("v", &["a1", "b1"], "a1")]);
        ok(
            &mut s,
            Command::ChangeVolume {
                name: "v".into(),
                expected_epoch: 1,
                primary: Some("a1".into()),
                in_sync: vec!["a1".into()],
                rejoin: None,
            },
        );
        let plan = plan_failover(&s, &all_but(&s, &["a1"]), &LeaseTable::new(0, T), AFTER);
        assert!(plan.commands.is_empty());
        assert_eq!(plan.stranded, vec!["v"]);
    }

    #[test]
    fn replicas_in_a_fenced_site_are_not_candidates() {
        let mut s = with_volumes(&[("v", &["a1", "a2", "b1"], "a1")]);
        ok(&mut s, Command::SetSiteMode { site: "dc-a".into(), mode: SiteMode::Fenced });
        let plan = plan_failover(&s, &all_but(&s, &["a1"]), &LeaseTable::new(0, T), AFTER);
        assert_eq!(promoted(&plan.commands[0]).1, Some("b1"));
    }

    #[test]
    fn failovers_are_batched_in_volume_order_and_all_apply() {
        let s = with_volumes(&[
            ("v3", &["a1", "b1"], "a1"),
            ("v1", &["a1", "b2"], "a1"),
            ("v2", &["a2", "b1"], "a2"),
        ]);
        let plan = plan_failover(&s, &all_but(&s, &["a1", "a2"]), &LeaseTable::new(0, T), AFTER);
        let got: Vec<_> = plan.commands.iter().map(|c| (promoted(c).0, promoted(c).1.unwrap())).collect();
        assert_eq!(got, [("v1", "b2"), ("v2", "b1"), ("v3", "b1")]);
        let mut s2 = s.clone();
        for c in &plan.commands {
            ok(&mut s2, c.clone());
        }
        assert!(plan_failover(&s2, &all_but(&s, &["a1", "a2"]), &LeaseTable::new(0, T), AFTER)
            .commands
            .is_empty());
    }

    #[test]
    fn a_volume_without_a_primary_gets_one() {
        let mut s = with_volumes(&[("v", &["a1", "b1"], "a1")]);
        ok(
            &mut s,
            Command::ChangeVolume {
                name: "v".into(),
                expected_epoch: 1,
                primary: None,
                in_sync: vec!["a1".into(), "b1".into()],
                rejoin: None,
            },
        );
        let plan = plan_failover(&s, &all_but(&s, &[]), &LeaseTable::new(0, T), AFTER);
        assert_eq!(promoted(&plan.commands[0]).1, Some("a1"), "no old site: lowest id");
    }
}
