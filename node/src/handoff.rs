//! A clean stop: on SIGTERM a storage daemon hands its primaries to in-sync
//! replicas (the same planned move as `metroctl node drain`) before it exits.
//!
//! ```text
//!  SIGTERM ─► leader known? ── no ──► log why, stop without handing off
//!              │ yes
//!              ▼
//!  for each volume this node is primary of: target = in-sync replica, same site first
//!              ─► propose ChangeVolume(primary = target) through the leader (bounded)
//!              ─► wait until the local manager has deposed the export
//!                 (its NBD clients get ESHUTDOWN after their in-flight requests)
//! ```
//!
//! Everything is bounded by one budget: a stop never hangs on a missing
//! leader or an unreachable peer; what could not be moved fails over the
//! usual way once this node's lease lapses.

use crate::volume::manager::ClusterView;
use metro_quorum::decide::{move_target, planned_move, primaries_of};
use metro_quorum::CommandResult;
use std::time::Duration;
use tokio::time::Instant;

/// What a hand-off did, per volume.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HandOff {
    /// (volume, new primary) for every committed move.
    pub moved: Vec<(String, String)>,
    /// (volume, why) for every primary left in place.
    pub kept: Vec<(String, String)>,
}

/// Move every primary of `me` to an in-sync replica, within `budget`.
/// `has_leader`: whether a quorum leader is known (no leader: nothing can
/// commit, so nothing is tried). `served_here(volume)`: whether the local
/// volume manager still serves the volume; the hand-off waits (in the same
/// budget) until every moved volume is deposed here.
pub async fn hand_off_primaries(
    cluster: &dyn ClusterView,
    me: &str,
    has_leader: bool,
    served_here: impl Fn(&str) -> bool,
    budget: Duration,
) -> HandOff {
    let deadline = Instant::now() + budget;
    let mut out = HandOff::default();
    let state = cluster.state().borrow().clone();
    let mine: Vec<_> = primaries_of(&state, me).cloned().collect();
    if mine.is_empty() {
        return out;
    }
    if !has_leader {
        for v in mine {
            out.kept.push((v.name, "no quorum leader to commit a move".into()));
        }
        return out;
    }
    for v in mine {
        let Some(to) = move_target(&state, &v, me) else {
            out.kept.push((v.name, format!("no other in-sync replica (in sync: {})", v.in_sync.join(", "))));
            continue;
        };
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, cluster.propose(planned_move(&v, &to))).await {
            Ok(Ok(CommandResult::Ok { .. })) => out.moved.push((v.name, to)),
            Ok(Ok(other)) => out.kept.push((v.name, format!("move to {to} refused: {other:?}"))),
            Ok(Err(e)) => out.kept.push((v.name, format!("move to {to} failed: {e}"))),
            Err(_) => out.kept.push((v.name, format!("move to {to} not committed within {budget:?}"))),
        }
    }
    // The manager deposes a moved export when it applies the change.
    let mut rx = cluster.state();
    loop {
        if out.moved.iter().all(|(v, _)| !served_here(v)) {
            break;
        }
        let poll = Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()));
        if poll.is_zero() {
            break;
        }
        let _ = tokio::time::timeout(poll, rx.changed()).await;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use metro_quorum::{ClusterState, Command};
    use std::sync::{Arc, Mutex};
    use tokio::sync::watch;

    /// Applies proposals to an in-memory state, like a one-node quorum.
    struct Fake {
        tx: watch::Sender<Arc<ClusterState>>,
        proposals: Mutex<usize>,
        hang: bool,
    }

    #[async_trait]
    impl ClusterView for Fake {
        fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
            self.tx.subscribe()
        }
        fn lease_valid(&self, _: &str, _: u64) -> bool {
            true
        }
        async fn propose(&self, cmd: Command) -> Result<CommandResult, String> {
            *self.proposals.lock().unwrap() += 1;
            if self.hang {
                std::future::pending::<()>().await;
            }
            let mut s = (**self.tx.borrow()).clone();
            let r = s.apply(&cmd);
            self.tx.send_replace(Arc::new(s));
            Ok(r)
        }
    }

    fn apply(s: &mut ClusterState, cmd: Command) {
        assert!(matches!(s.apply(&cmd), CommandResult::Ok { .. }), "{cmd:?}");
    }

    /// The lab topology (dc-a preferred) with the given volumes.
    fn lab(volumes: &[(&str, &[&str], &str)]) -> ClusterState {
        metro_quorum::decide::fixture::with_volumes(volumes)
    }

    fn fake(s: ClusterState, hang: bool) -> Fake {
        Fake { tx: watch::channel(Arc::new(s)).0, proposals: Mutex::new(0), hang }
    }

    fn served_by<'a>(f: &'a Fake, me: &'a str) -> impl Fn(&str) -> bool + 'a {
        move |v| f.tx.borrow().volumes.get(v).is_some_and(|r| r.primary.as_deref() == Some(me))
    }

    #[tokio::test]
    async fn every_primary_moves_to_an_in_sync_replica_of_its_own_site_first() {
        let f = fake(
            lab(&[
                ("v1", &["a1", "a2", "b1"], "a1"),
                ("v2", &["a1", "b1"], "a1"),
                ("v3", &["a2", "b1"], "a2"),
            ]),
            false,
        );
        let r = hand_off_primaries(&f, "a1", true, served_by(&f, "a1"), Duration::from_secs(10)).await;
        assert_eq!(r.moved, vec![("v1".to_string(), "a2".to_string()), ("v2".to_string(), "b1".to_string())]);
        assert!(r.kept.is_empty(), "{r:?}");
        let s = f.tx.borrow().clone();
        assert_eq!(primaries_of(&s, "a1").count(), 0);
        assert_eq!(s.volumes["v3"].primary.as_deref(), Some("a2"), "other nodes' primaries stay");
    }

    #[tokio::test]
    async fn without_a_leader_or_an_in_sync_peer_nothing_moves_and_the_reason_is_given() {
        let f = fake(lab(&[("v1", &["a1", "b1"], "a1")]), false);
        let r = hand_off_primaries(&f, "a1", false, served_by(&f, "a1"), Duration::from_secs(10)).await;
        assert!(r.moved.is_empty());
        assert_eq!(r.kept.len(), 1);
        assert!(r.kept[0].1.contains("no quorum leader"), "{r:?}");
        assert_eq!(*f.proposals.lock().unwrap(), 0);

        let mut s = lab(&[("v1", &["a1", "b1"], "a1")]);
        let e = s.volumes["v1"].epoch;
        apply(
            &mut s,
            Command::ChangeVolume {
                name: "v1".into(),
                expected_epoch: e,
                primary: Some("a1".into()),
                in_sync: vec!["a1".into()],
                rejoin: None,
            },
        );
        let f = fake(s, false);
        let r = hand_off_primaries(&f, "a1", true, served_by(&f, "a1"), Duration::from_secs(10)).await;
        assert!(r.moved.is_empty());
        assert!(r.kept[0].1.contains("no other in-sync replica"), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_that_never_commits_is_bounded_by_the_budget() {
        let f = fake(lab(&[("v1", &["a1", "b1"], "a1")]), true);
        let r = hand_off_primaries(&f, "a1", true, served_by(&f, "a1"), Duration::from_secs(5)).await;
        assert!(r.moved.is_empty());
        assert!(r.kept[0].1.contains("not committed"), "{r:?}");
    }
}
