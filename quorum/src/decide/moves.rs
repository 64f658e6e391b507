//! Planned primary moves (`volume attach --node`, `node drain`, and a storage
//! daemon handing off its primaries on SIGTERM): where a primary goes and the
//! committed change that moves it.
//!
//! Invariants:
//! - the target is always in the volume's latest `in_sync` (DESIGN.md §4.4);
//! - the change carries the volume's current epoch (the CAS fails if anything
//!   moved meanwhile) and takes the old primary out of `in_sync`: a write it
//!   applied locally but never got acknowledged must not stay on a replica
//!   counted as in sync, so it is resynced and rejoins by itself.

use crate::state::{ClusterState, Command, NodeId, VolumeRecord};

/// The in-sync replica a planned move of `v` off `node` goes to: a replica in
/// `node`'s own site first (the application likely runs there), then by id.
/// `None` when no other replica is in sync.
pub fn move_target(state: &ClusterState, v: &VolumeRecord, node: &str) -> Option<NodeId> {
    let site = state.site_of(node);
    let mut candidates: Vec<&NodeId> = v.in_sync.iter().filter(|n| n.as_str() != node).collect();
    candidates.sort_by_key(|n| (site.is_none() || state.site_of(n) != site, (*n).clone()));
    candidates.first().map(|n| (*n).clone())
}

/// The committed change that makes `to` the primary of `v`.
pub fn planned_move(v: &VolumeRecord, to: &str) -> Command {
    let in_sync: Vec<NodeId> = v.in_sync.iter().filter(|n| v.primary.as_ref() != Some(*n)).cloned().collect();
    Command::ChangeVolume {
        name: v.name.clone(),
        expected_epoch: v.epoch,
        primary: Some(to.to_string()),
        in_sync,
        rejoin: None,
    }
}

/// Volumes `node` is the primary of, by name.
pub fn primaries_of<'a>(
    state: &'a ClusterState,
    node: &'a str,
) -> impl Iterator<Item = &'a VolumeRecord> + 'a {
    state.volumes.values().filter(move |v| v.primary.as_deref() == Some(node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::fixture::{ok, with_volumes};
    use crate::state::CommandResult;

    fn in_sync(s: &mut ClusterState, vol: &str, nodes: &[&str]) {
        let v = s.volumes[vol].clone();
        ok(
            s,
            Command::ChangeVolume {
                name: vol.into(),
                expected_epoch: v.epoch,
                primary: v.primary.clone(),
                in_sync: nodes.iter().map(|n| n.to_string()).collect(),
                rejoin: None,
            },
        );
    }

    #[test]
    fn the_target_is_in_sync_and_in_the_same_site_first() {
        let mut s = with_volumes(&[("v", &["a1", "a2", "b1"], "a1")]);
        let v = s.volumes["v"].clone();
        assert_eq!(move_target(&s, &v, "a1").as_deref(), Some("a2"));
        // a2 falls out of sync: the other site's replica is next.
        in_sync(&mut s, "v", &["a1", "b1"]);
        let v = s.volumes["v"].clone();
        assert_eq!(move_target(&s, &v, "a1").as_deref(), Some("b1"));
        // Nothing else in sync: no target.
        in_sync(&mut s, "v", &["a1"]);
        let v = s.volumes["v"].clone();
        assert_eq!(move_target(&s, &v, "a1"), None);
    }

    #[test]
    fn a_planned_move_commits_and_takes_the_old_primary_out_of_in_sync() {
        let mut s = with_volumes(&[("v", &["a1", "b1"], "a1")]);
        let v = s.volumes["v"].clone();
        let to = move_target(&s, &v, "a1").expect("b1 is in sync");
        let r = s.apply(&planned_move(&v, &to));
        assert!(matches!(r, CommandResult::Ok { .. }), "{r:?}");
        let after = &s.volumes["v"];
        assert_eq!(after.primary.as_deref(), Some("b1"));
        assert_eq!(after.in_sync, vec!["b1".to_string()]);
        assert!(after.epoch > v.epoch);
        assert_eq!(primaries_of(&s, "a1").count(), 0);
        assert_eq!(primaries_of(&s, "b1").map(|v| v.name.as_str()).collect::<Vec<_>>(), ["v"]);
        // A second, stale move fails the epoch CAS.
        let r = s.apply(&planned_move(&v, "b1"));
        assert!(matches!(r, CommandResult::Rejected { .. }), "{r:?}");
    }
}
