//! The raft state machine: [`ClusterState`] plus the last applied log id and
//! membership, with its snapshot persisted atomically under `data_dir/raft/`.
//!
//! Invariants:
//! - `apply` is the only writer of the state; it runs [`ClusterState::apply`]
//!   in log order and publishes the new state on a `watch` channel after
//!   every batch (on every member, learners included).
//! - The snapshot file (`snapshot`, durable envelope) holds the serde_json of
//!   the state, the last applied log id and the membership; it is written
//!   whole and atomically (write, fsync, rename, fsync dir). On start the
//!   state machine resumes from it and openraft re-applies the log after it.

use crate::durable::{self, DurableError};
use crate::state::{ClusterState, CommandResult};
use crate::types::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

const SNAP_MAGIC: &[u8; 8] = b"METRSNAP";
/// Snapshot format version.
pub const SNAPSHOT_VERSION: u32 = 1;

/// What a snapshot carries (also the payload streamed to lagging members).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub state: ClusterState,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

struct Inner {
    data: SmData,
    snapshot: Option<SnapshotFile>,
    snapshot_seq: u64,
}

/// The state machine store. Cheap to clone.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Inner>>,
    path: PathBuf,
    tx: Arc<watch::Sender<Arc<ClusterState>>>,
}

fn sm_err(verb: ErrorVerb, e: impl ToString) -> StorageError {
    StorageError::from_io_error(ErrorSubject::StateMachine, verb, io::Error::other(e.to_string()))
}

impl StateMachine {
    /// Open the state machine under `dir`, resuming from the snapshot there.
    pub fn open(dir: &Path) -> Result<Self, DurableError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| DurableError::Io { path: dir.to_path_buf(), source })?;
        let path = dir.join("snapshot");
        let snapshot: Option<SnapshotFile> = match durable::read(&path, SNAP_MAGIC, SNAPSHOT_VERSION)? {
            Some(body) => Some(serde_json::from_slice(&body).map_err(|e| DurableError::Corrupt {
                path: path.clone(),
                reason: format!("snapshot does not decode: {e}"),
            })?),
            None => None,
        };
        let data = match &snapshot {
            Some(s) => serde_json::from_slice(&s.data).map_err(|e| DurableError::Corrupt {
                path: path.clone(),
                reason: format!("snapshot data: {e}"),
            })?,
            None => SmData::default(),
        };
        let (tx, _) = watch::channel(Arc::new(data.state.clone()));
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner { data, snapshot, snapshot_seq: 0 })),
            path,
            tx: Arc::new(tx),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of the state, updated after every applied batch.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.tx.subscribe()
    }

    /// The applied state and the id of the last entry applied to it (read together).
    pub fn applied(&self) -> (ClusterState, Option<LogId>) {
        let g = self.lock();
        (g.data.state.clone(), g.data.last_applied)
    }

    /// The current state.
    pub fn current(&self) -> Arc<ClusterState> {
        self.tx.borrow().clone()
    }

    #[allow(clippy::result_large_err)] // openraft's error type, returned as is
    fn persist(&self, file: &SnapshotFile) -> Result<(), StorageError> {
        let body = serde_json::to_vec(file).map_err(|e| sm_err(ErrorVerb::Write, e))?;
        durable::write_atomic(&self.path, SNAP_MAGIC, SNAPSHOT_VERSION, &body)
            .map_err(|e| sm_err(ErrorVerb::Write, e))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let file = {
            let mut g = self.lock();
            g.snapshot_seq += 1;
            let data = serde_json::to_vec(&g.data).map_err(|e| sm_err(ErrorVerb::Read, e))?;
            let last = g.data.last_applied;
            let snapshot_id = match last {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, g.snapshot_seq),
                None => format!("none-{}", g.snapshot_seq),
            };
            SnapshotFile {
                meta: SnapshotMeta {
                    last_log_id: last,
                    last_membership: g.data.membership.clone(),
                    snapshot_id,
                },
                data,
            }
        };
        self.persist(&file)?;
        let snap = Snapshot { meta: file.meta.clone(), snapshot: Box::new(Cursor::new(file.data.clone())) };
        self.lock().snapshot = Some(file);
        Ok(snap)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let g = self.lock();
        Ok((g.data.last_applied, g.data.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let snapshot_of_state = {
            let mut g = self.lock();
            for e in entries {
                g.data.last_applied = Some(e.log_id);
                let r = match &e.payload {
                    EntryPayload::Blank => CommandResult::Ok { epoch: 0 },
                    EntryPayload::Normal(cmd) => g.data.state.apply(cmd),
                    EntryPayload::Membership(m) => {
                        g.data.membership = StoredMembership::new(Some(e.log_id), m.clone());
                        CommandResult::Ok { epoch: 0 }
                    }
                };
                out.push(r);
            }
            Arc::new(g.data.state.clone())
        };
        self.tx.send_replace(snapshot_of_state);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let data: SmData = serde_json::from_slice(&bytes).map_err(|e| sm_err(ErrorVerb::Read, e))?;
        let file = SnapshotFile { meta: meta.clone(), data: bytes };
        self.persist(&file)?;
        let state = {
            let mut g = self.lock();
            g.data = SmData {
                state: data.state,
                last_applied: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
            g.snapshot = Some(file);
            Arc::new(g.data.state.clone())
        };
        self.tx.send_replace(state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let g = self.lock();
        Ok(g.snapshot
            .as_ref()
            .map(|f| Snapshot { meta: f.meta.clone(), snapshot: Box::new(Cursor::new(f.data.clone())) }))
    }
}
