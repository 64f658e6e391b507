//! Replica placement for a new volume (DESIGN.md 2: at least one replica in
//! each data site).
//!
//! One replica per **active** data site, on the alive storage node of that
//! site with the most free space (`capacity - used`, ties by node id); the
//! primary goes to the hinted site, else the preferred site, else the first
//! active data site by name.
//!
//! Invariants:
//! - The result satisfies `CreateVolume`'s checks: storage nodes only, no
//!   duplicates, every active data site covered, primary among replicas.
//! - Every chosen node has at least `size_bytes` free.
//! - Deterministic for equal inputs.

use crate::state::{ClusterState, NodeId, SiteMode};
use metro_api::config::Role;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no active data site; activate a site with `metroctl site activate`")]
    NoActiveSite,
    #[error(
        "site `{site}` has no alive storage node with {size_bytes} bytes free; free space or add a node"
    )]
    NoRoom { site: String, size_bytes: u64 },
    #[error("`{site}` is not an active data site; pick one from `metroctl site list`")]
    BadSiteHint { site: String },
}

/// Choose `(replicas, primary)` for a new volume of `size_bytes`.
pub fn place_volume(
    state: &ClusterState,
    alive: &BTreeSet<NodeId>,
    used_bytes: &BTreeMap<NodeId, u64>,
    size_bytes: u64,
    primary_site: Option<&str>,
) -> Result<(Vec<NodeId>, NodeId), PlacementError> {
    let active: Vec<&str> =
        state.data_sites().filter(|s| s.mode == SiteMode::Active).map(|s| s.name.as_str()).collect();
    if active.is_empty() {
        return Err(PlacementError::NoActiveSite);
    }
    let home = match primary_site {
        Some(h) if active.contains(&h) => h,
        Some(h) => return Err(PlacementError::BadSiteHint { site: h.into() }),
        None => state.preferred_site.as_deref().filter(|p| active.contains(p)).unwrap_or(active[0]),
    };
    let mut replicas = Vec::with_capacity(active.len());
    let mut primary = None;
    for site in active {
        let best = state
            .nodes
            .values()
            .filter(|n| n.site == site && n.role == Role::Storage && alive.contains(&n.id))
            .map(|n| (n.capacity_bytes.saturating_sub(used_bytes.get(&n.id).copied().unwrap_or(0)), &n.id))
            .filter(|(free, _)| *free >= size_bytes)
            // Most free space first, then the lowest id.
            .min_by(|(fa, ia), (fb, ib)| fb.cmp(fa).then_with(|| ia.cmp(ib)))
            .map(|(_, id)| id.clone())
            .ok_or_else(|| PlacementError::NoRoom { site: site.into(), size_bytes })?;
        if site == home {
            primary = Some(best.clone());
        }
        replicas.push(best);
    }
    let primary = primary.expect("home is one of the active sites");
    Ok((replicas, primary))
}

#[cfg(test)]
mod tests {
    use super::super::fixture::*;
    use super::*;
    use crate::state::{Command, LeasePolicy};

    fn used(pairs: &[(&str, u64)]) -> BTreeMap<NodeId, u64> {
        pairs.iter().map(|(n, u)| (n.to_string(), *u)).collect()
    }

    #[test]
    fn one_replica_per_site_on_the_emptiest_node_with_the_primary_in_the_preferred_site() {
        let s = lab();
        let (r, p) =
            place_volume(&s, &all_but(&s, &[]), &used(&[("a1", 5 * GIB), ("b2", GIB)]), GIB, None).unwrap();
        assert_eq!(r, ["a2", "b1"]);
        assert_eq!(p, "a2");
    }

    #[test]
    fn the_hint_moves_the_primary() {
        let s = lab();
        let (r, p) = place_volume(&s, &all_but(&s, &[]), &used(&[]), GIB, Some("dc-b")).unwrap();
        assert_eq!((r.as_slice(), p.as_str()), (["a1".to_string(), "b1".to_string()].as_slice(), "b1"));
    }

    #[test]
    fn dead_nodes_and_full_nodes_are_skipped() {
        let s = lab();
        let (r, _) = place_volume(&s, &all_but(&s, &["a2"]), &used(&[("b1", 10 * GIB)]), GIB, None).unwrap();
        assert_eq!(r, ["a1", "b2"]);
    }

    #[test]
    fn a_site_without_room_is_an_error_naming_the_site() {
        let s = lab();
        let err = place_volume(&s, &all_but(&s, &["b1", "b2"]), &used(&[]), GIB, None).unwrap_err();
        assert_eq!(err, PlacementError::NoRoom { site: "dc-b".into(), size_bytes: GIB });
        let err = place_volume(&s, &all_but(&s, &[]), &used(&[]), 11 * GIB, None).unwrap_err();
        assert!(matches!(err, PlacementError::NoRoom { .. }));
    }

    #[test]
    fn a_fenced_site_gets_no_replica_and_a_bad_hint_is_refused() {
        let mut s = lab();
        ok(&mut s, Command::SetSiteMode { site: "dc-a".into(), mode: SiteMode::Fenced });
        let (r, p) = place_volume(&s, &all_but(&s, &[]), &used(&[]), GIB, None).unwrap();
        assert_eq!((r, p.as_str()), (vec!["b1".to_string()], "b1"));
        let err = place_volume(&s, &all_but(&s, &[]), &used(&[]), GIB, Some("dc-a")).unwrap_err();
        assert_eq!(err, PlacementError::BadSiteHint { site: "dc-a".into() });
        let err = place_volume(&s, &all_but(&s, &[]), &used(&[]), GIB, Some("witness")).unwrap_err();
        assert!(matches!(err, PlacementError::BadSiteHint { .. }));
    }

    #[test]
    fn no_active_site_is_an_error() {
        let mut s = lab();
        for site in ["dc-a", "dc-b"] {
            ok(&mut s, Command::SetSiteMode { site: site.into(), mode: SiteMode::Deactivated });
        }
        assert_eq!(
            place_volume(&s, &all_but(&s, &[]), &used(&[]), GIB, None),
            Err(PlacementError::NoActiveSite)
        );
    }

    #[test]
    fn the_placement_is_accepted_by_the_state_machine() {
        let mut s = lab();
        let (replicas, primary) = place_volume(&s, &all_but(&s, &[]), &used(&[]), GIB, None).unwrap();
        ok(
            &mut s,
            Command::CreateVolume {
                name: "v".into(),
                size_bytes: GIB,
                iops_limit: 0,
                bandwidth_limit: 0,
                lease_policy: LeasePolicy::Suspend,
                replicas,
                primary,
                nonce: 1,
            },
        );
    }
}
