//! The quorum group's incarnation: a number, durable next to the vote
//! (`data_dir/raft/incarnation`), bumped only by the quorum-loss override
//! (`Quorum::force_new_group`). Every internal RPC carries it.
//!
//! Invariants:
//! - A member refuses a request from a lower incarnation (FAILED_PRECONDITION
//!   with the number in the `metro-incarnation` metadata), so members of the
//!   old group can never again vote, append or grant in the rebuilt one.
//! - A member that sees a higher incarnation (in a request or a refusal)
//!   reports it on [`Incarnation::higher`]; the engine then adopts it (a
//!   learner: its log never decided a commit) or stops its raft core so the
//!   daemon discards its raft state and rejoins as a learner (a voter).
//! - The file is written (atomically, fsynced) before the number is used.

use crate::durable::{self, DurableError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::watch;

const MAGIC: &[u8; 8] = b"METRINCA";
const VERSION: u32 = 1;
/// gRPC metadata key carrying the refusing member's incarnation.
pub const METADATA_KEY: &str = "metro-incarnation";

fn path(raft_dir: &Path) -> PathBuf {
    raft_dir.join("incarnation")
}

/// Read the incarnation stored under `raft_dir` (0 when there is none).
pub fn read(raft_dir: &Path) -> Result<u64, DurableError> {
    let p = path(raft_dir);
    match durable::read(&p, MAGIC, VERSION)? {
        None => Ok(0),
        Some(body) => serde_json::from_slice(&body).map_err(|e| DurableError::Corrupt {
            path: p,
            reason: format!("incarnation does not decode: {e}"),
        }),
    }
}

/// Store `incarnation` under `raft_dir` (atomic, fsynced).
pub fn write(raft_dir: &Path, incarnation: u64) -> Result<(), DurableError> {
    std::fs::create_dir_all(raft_dir)
        .map_err(|source| DurableError::Io { path: raft_dir.to_path_buf(), source })?;
    let body = serde_json::to_vec(&incarnation).expect("u64 serializes");
    durable::write_atomic(&path(raft_dir), MAGIC, VERSION, &body)
}

/// This member's incarnation plus the highest one it has seen elsewhere.
pub(crate) struct Incarnation {
    dir: PathBuf,
    current: AtomicU64,
    /// `(incarnation, who)`: the highest incarnation above ours seen so far.
    higher: watch::Sender<Option<(u64, String)>>,
}

impl Incarnation {
    pub fn open(raft_dir: &Path) -> Result<Self, DurableError> {
        let current = read(raft_dir)?;
        let (higher, _) = watch::channel(None);
        Ok(Self { dir: raft_dir.to_path_buf(), current: AtomicU64::new(current), higher })
    }

    pub fn get(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Persist, then use, `incarnation` (never lowers it).
    pub fn set(&self, incarnation: u64) -> Result<(), DurableError> {
        if incarnation <= self.get() {
            return Ok(());
        }
        write(&self.dir, incarnation)?;
        self.current.fetch_max(incarnation, Ordering::SeqCst);
        Ok(())
    }

    /// Note that `who` speaks `theirs`; reported when above ours.
    pub fn observe(&self, theirs: u64, who: &str) {
        if theirs <= self.get() {
            return;
        }
        self.higher.send_if_modified(|h| match h {
            Some((g, _)) if *g >= theirs => false,
            _ => {
                *h = Some((theirs, who.to_string()));
                true
            }
        });
    }

    pub fn higher(&self) -> watch::Receiver<Option<(u64, String)>> {
        self.higher.subscribe()
    }
}

/// The message of the refusal a member sends to a member of an older incarnation.
pub fn stale_message(who: &str, theirs: u64, mine: u64) -> String {
    format!(
        "stale quorum group: {who} is in group incarnation {theirs}, this node in {mine} (the group was rebuilt by `metroctl site activate` without a quorum); {who} must discard its raft state and rejoin as a learner, which it does on its own"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_incarnation_survives_a_restart_and_never_goes_down() {
        let dir = tempfile::tempdir().unwrap();
        let inc = Incarnation::open(dir.path()).unwrap();
        assert_eq!(inc.get(), 0);
        inc.set(2).unwrap();
        inc.set(1).unwrap();
        assert_eq!(inc.get(), 2);
        assert_eq!(Incarnation::open(dir.path()).unwrap().get(), 2);
    }

    #[test]
    fn only_a_higher_incarnation_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let inc = Incarnation::open(dir.path()).unwrap();
        inc.set(1).unwrap();
        let rx = inc.higher();
        inc.observe(1, "b1");
        inc.observe(0, "a1");
        assert_eq!(*rx.borrow(), None);
        inc.observe(3, "b1");
        inc.observe(2, "b2");
        assert_eq!(*rx.borrow(), Some((3, "b1".to_string())));
    }
}
