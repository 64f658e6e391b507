//! The openraft type configuration. openraft types never leave this crate:
//! other crates see [`crate::Quorum`], [`crate::QuorumError`] and the
//! [`crate::state`] types only (TESTBED.md: openraft 0.10 changes its API).

use crate::state::{Command, CommandResult};
use std::io::Cursor;

openraft::declare_raft_types!(
    /// metro's raft types: commands and results of [`crate::state`], u64 ids
    /// (see [`crate::state::raft_id_of`]), nodes addressed by their gRPC `host:port`.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::runtime::MetroRuntime,
);

pub type RaftId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<RaftId>;
pub type Vote = openraft::Vote<RaftId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<RaftId>;
pub type StoredMembership = openraft::StoredMembership<RaftId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<RaftId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
