//! Shared contracts of metro: the gRPC protos, the daemon configuration file,
//! TLS identities, stable error codes and telemetry (tracing, metrics, systemd).
//!
//! Everything here is used by more than one daemon; nothing here does I/O on
//! the data path.

pub mod config;
pub mod error;
pub mod identity;
pub mod telemetry;
pub mod tls;

/// Version of the node-to-node protocols (raft RPCs, replication links).
/// A peer that speaks another version is refused with a clear message.
///
/// 2: raft log entries `SetClusterConfig` and `ForceInSync`, and the group
/// incarnation on every raft RPC (a version-1 peer could neither read those
/// entries nor refuse a superseded group).
/// 3: replication links carry the replica's session (boot id + process
/// incarnation) in `HelloAck`, and the `QueryHot`/`ClearHot` ops with their
/// `HotAck` answer (activity-log reconciliation on every change of primary).
pub const PROTOCOL_VERSION: u32 = 3;

/// Generated protobuf/tonic code.
pub mod pb {
    pub mod control {
        tonic::include_proto!("metro.control.v1");
    }
    pub mod internal {
        tonic::include_proto!("metro.internal.v1");
    }
}
