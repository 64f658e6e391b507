//! `metro-quorum`: the configuration manager.
//!
//! It owns the authoritative cluster state (sites, nodes, volumes with their
//! replicas, `in_sync`, primary and epoch) as a replicated state machine, see
//! [`state`]. Decisions (arbitration, promotion, voter placement) are pure
//! functions tested directly; the openraft plumbing only carries them out.

pub mod cluster_config;
mod control;
pub mod decide;
pub mod durable;
pub mod error;
mod heartbeat;
pub mod incarnation;
mod liveness;
pub(crate) mod log_store;
pub mod network;
pub mod quorum;
pub mod rtt;
pub mod runtime;
mod service;
pub mod state;
pub(crate) mod state_machine;
pub(crate) mod types;
mod wire;

pub use cluster_config::{ClusterConfig, ClusterConfigError};
pub use error::QuorumError;
pub use network::{Connector, TcpConnector};
pub use quorum::{
    discard_raft_state, EngineConfig, HeldLease, OverrideReport, Quorum, QuorumStatus, Restart,
};
pub use rtt::RttEstimate;
pub use state::{
    ClusterState, Command, CommandResult, LeasePolicy, NodeRecord, SiteMode, VolumeId, VolumeRecord,
};
