//! Volume reconfigurations whose outcome must be known (issue 12, class 5/6).
//!
//! Invariant: a proposal whose outcome is unknown (a timeout or transport
//! error, possibly after the leader committed it, or an `EpochMismatch` from
//! a retry of a change that had already committed) is never assumed to have
//! failed, nor to have succeeded. It is resolved from the committed state:
//! once the local state machine shows the volume past `expected_epoch`
//! (the leader's apply moved it there, so the local replay gets there too),
//! the change counts as done only if that record is the one the change
//! itself makes: epoch `expected_epoch + 1` (every change bumps the epoch by
//! one), same volume id, primary and `in_sync`. Any other record is a
//! definite rejection, including a later epoch that happens to show the same
//! primary and `in_sync` after other changes (seed 134: a failover away and
//! back, then a degrade, ended where a stale primary's degrade wanted; taking
//! it as done acknowledged writes that the copies in between never held).
//! When another change follows ours too quickly to be seen, that rejection
//! is a false negative, which is safe: held writes are failed, never acked. Without such a record within the
//! wait, the outcome stays unknown ([`ChangeError::OutcomeUnknown`]): the
//! caller keeps I/O held and asks again with the same expected epoch, which
//! resolves it.

use super::manager::ClusterView;
use metro_quorum::{ClusterState, Command, CommandResult, VolumeId};
use std::time::Duration;

/// How long to wait for the local state to show the volume past the expected
/// epoch after an unknown outcome.
pub const RESOLVE_WAIT: Duration = Duration::from_secs(3);

/// Why a volume reconfiguration did not (certainly) happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// The committed state does not show the change: it did not happen.
    #[error("the change of volume `{volume}` was refused: {detail}")]
    Rejected { volume: String, detail: String },
    /// Neither committed state nor an answer settles it yet.
    #[error("the outcome of the change of volume `{volume}` is unknown ({detail}); retry with the same expected epoch")]
    OutcomeUnknown { volume: String, detail: String },
}

/// Commit `ChangeVolume{name, expected_epoch, primary, in_sync, rejoin}` and
/// return the committed epoch, resolving unknown outcomes from the committed
/// state (module doc). `wait` bounds that resolution.
pub async fn change_volume(
    cluster: &dyn ClusterView,
    name: &str,
    expected_epoch: u64,
    primary: Option<String>,
    in_sync: Vec<String>,
    rejoin: Option<String>,
    wait: Duration,
) -> Result<u64, ChangeError> {
    let id = cluster.state().borrow().volumes.get(name).map(|v| v.id);
    let cmd = Command::ChangeVolume {
        name: name.to_string(),
        expected_epoch,
        primary: primary.clone(),
        in_sync: in_sync.clone(),
        rejoin,
    };
    let unknown = match cluster.propose(cmd).await {
        Ok(CommandResult::Ok { epoch }) => return Ok(epoch),
        Ok(CommandResult::Rejected { reason: metro_quorum::state::Rejection::EpochMismatch, detail }) => {
            detail
        }
        Ok(CommandResult::Rejected { reason, detail }) => {
            return Err(ChangeError::Rejected {
                volume: name.to_string(),
                detail: format!("{reason:?}: {detail}"),
            })
        }
        Ok(CommandResult::Batch(_)) => {
            return Err(ChangeError::Rejected {
                volume: name.to_string(),
                detail: "unexpected batch result".into(),
            })
        }
        Err(e) => e,
    };
    tracing::info!(volume = %name, expected_epoch, why = %unknown, "outcome of a volume change unknown; resolving it from the committed state");
    let mut rx = cluster.state();
    let past =
        rx.wait_for(|s| s.volumes.get(name).is_none_or(|v| v.epoch > expected_epoch || Some(v.id) != id));
    let state = match tokio::time::timeout(wait, past).await {
        Ok(Ok(s)) => s.clone(),
        _ => return Err(ChangeError::OutcomeUnknown { volume: name.to_string(), detail: unknown }),
    };
    judge(&state, name, id, expected_epoch, primary.as_deref(), &in_sync).map_err(|detail| {
        ChangeError::Rejected { volume: name.to_string(), detail: format!("{detail} (after: {unknown})") }
    })
}

/// Does the committed `state` show the intended change (volume `id` at
/// exactly `expected_epoch + 1` with exactly this primary and `in_sync`)?
/// `Ok(epoch)`.
fn judge(
    state: &ClusterState,
    name: &str,
    id: Option<VolumeId>,
    expected_epoch: u64,
    primary: Option<&str>,
    in_sync: &[String],
) -> Result<u64, String> {
    let Some(v) = state.volumes.get(name) else { return Err("the volume was deleted".into()) };
    if Some(v.id) != id {
        return Err(format!("the volume was recreated (id {})", v.id));
    }
    let mut want: Vec<&String> = in_sync.iter().collect();
    let mut have: Vec<&String> = v.in_sync.iter().collect();
    want.sort();
    have.sort();
    if v.epoch == expected_epoch + 1 && v.primary.as_deref() == primary && want == have {
        Ok(v.epoch)
    } else {
        Err(format!(
            "the volume is at epoch {} with primary {:?} and in_sync {:?}; the change would have made epoch {} \
             with primary {primary:?} and in_sync {in_sync:?}",
            v.epoch,
            v.primary,
            v.in_sync,
            expected_epoch + 1
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use metro_quorum::{LeasePolicy, VolumeRecord};
    use std::sync::{Arc, Mutex};
    use tokio::sync::watch;

    /// How the stub's propose behaves.
    #[derive(Clone, Copy)]
    enum Mode {
        /// Commits, then reports a timeout (the reply was lost).
        CommitThenTimeout,
        /// Commits, times out, and the retry answers with the state
        /// machine's EpochMismatch (what `Quorum::propose` does inside).
        CommitThenRetryMismatch,
        /// Does not commit and reports a timeout.
        LostThenTimeout,
        /// Another change (the leader's failover) commits first.
        OtherChangeFirst,
        /// Our change never commits, but others do, and the volume ends up
        /// (at a later epoch) with the very primary and `in_sync` we asked
        /// for: a failover away, a failover back, a degrade by the new
        /// primary. Seed 134 of the data-path simulation.
        SameShapeLater,
    }

    struct Stub {
        tx: watch::Sender<Arc<ClusterState>>,
        mode: Mode,
        proposals: Mutex<u32>,
    }

    #[async_trait]
    impl ClusterView for Stub {
        fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
            self.tx.subscribe()
        }
        fn lease_valid(&self, _: &str, _: u64) -> bool {
            true
        }
        async fn propose(&self, cmd: Command) -> Result<CommandResult, String> {
            *self.proposals.lock().unwrap() += 1;
            let mut s = (**self.tx.borrow()).clone();
            let timeout = Err("deadline of 3000 ms expired while committing a command".to_string());
            match self.mode {
                Mode::CommitThenTimeout => {
                    assert!(s.apply(&cmd).is_ok());
                    self.tx.send_replace(Arc::new(s));
                    timeout
                }
                Mode::CommitThenRetryMismatch => {
                    assert!(s.apply(&cmd).is_ok());
                    let retry = s.apply(&cmd);
                    self.tx.send_replace(Arc::new(s));
                    Ok(retry)
                }
                Mode::LostThenTimeout => timeout,
                Mode::SameShapeLater => {
                    let change = |e: u64, p: &str, i: &[&str], rejoin: Option<&str>| Command::ChangeVolume {
                        name: "v".into(),
                        expected_epoch: e,
                        primary: Some(p.into()),
                        in_sync: i.iter().map(|n| n.to_string()).collect(),
                        rejoin: rejoin.map(str::to_string),
                    };
                    assert!(s.apply(&change(5, "b1", &["b1"], None)).is_ok());
                    assert!(s.apply(&change(6, "b1", &["a1", "b1"], Some("a1"))).is_ok());
                    assert!(s.apply(&change(7, "a1", &["a1", "b1"], None)).is_ok());
                    assert!(s.apply(&change(8, "a1", &["a1"], None)).is_ok());
                    self.tx.send_replace(Arc::new(s));
                    timeout
                }
                Mode::OtherChangeFirst => {
                    let failover = Command::ChangeVolume {
                        name: "v".into(),
                        expected_epoch: 5,
                        primary: Some("b1".into()),
                        in_sync: vec!["b1".into()],
                        rejoin: None,
                    };
                    assert!(s.apply(&failover).is_ok());
                    let r = s.apply(&cmd);
                    self.tx.send_replace(Arc::new(s));
                    Ok(r)
                }
            }
        }
    }

    fn stub(mode: Mode) -> Stub {
        let mut s = ClusterState::default();
        s.volumes.insert(
            "v".into(),
            VolumeRecord {
                name: "v".into(),
                id: VolumeId { serial: 1, nonce: 9 },
                size_bytes: 1 << 20,
                iops_limit: 0,
                bandwidth_limit: 0,
                lease_policy: LeasePolicy::Suspend,
                replicas: vec!["a1".into(), "b1".into()],
                in_sync: vec!["a1".into(), "b1".into()],
                primary: Some("a1".into()),
                epoch: 5,
                primary_since: 1,
                previous_primary: None,
            },
        );
        s.volume_serial = 1;
        let (tx, _) = watch::channel(Arc::new(s));
        Stub { tx, mode, proposals: Mutex::new(0) }
    }

    async fn shrink(c: &Stub) -> Result<u64, ChangeError> {
        let wait = Duration::from_millis(200);
        change_volume(c, "v", 5, Some("a1".into()), vec!["a1".into()], None, wait).await
    }

    #[tokio::test]
    async fn a_committed_change_whose_reply_timed_out_is_a_success_at_the_committed_epoch() {
        assert_eq!(shrink(&stub(Mode::CommitThenTimeout)).await, Ok(6));
    }

    #[tokio::test]
    async fn an_epoch_mismatch_from_the_retry_of_a_committed_change_is_a_success() {
        assert_eq!(shrink(&stub(Mode::CommitThenRetryMismatch)).await, Ok(6));
    }

    #[tokio::test]
    async fn a_timeout_without_a_commit_stays_unknown_never_a_success() {
        let r = shrink(&stub(Mode::LostThenTimeout)).await;
        assert!(matches!(r, Err(ChangeError::OutcomeUnknown { .. })), "{r:?}");
    }

    /// A later record that only looks like the intended result is not it:
    /// writes held for the change were never on the copies in between, so
    /// counting it as done would acknowledge them at a stale epoch.
    #[tokio::test]
    async fn the_same_primary_and_in_sync_at_a_later_epoch_is_not_our_change() {
        let r = shrink(&stub(Mode::SameShapeLater)).await;
        assert!(
            matches!(&r, Err(ChangeError::Rejected { detail, .. }) if detail.contains("epoch 9")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_mismatch_from_another_change_is_a_definite_rejection() {
        let r = shrink(&stub(Mode::OtherChangeFirst)).await;
        assert!(matches!(&r, Err(ChangeError::Rejected { detail, .. }) if detail.contains("b1")), "{r:?}");
    }
}
