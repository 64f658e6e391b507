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
pub const PROTOCOL_VERSION: u32 = 1;

/// Generated protobuf/tonic code.
pub mod pb {
    pub mod control {
        tonic::include_proto!("metro.control.v1");
    }
    pub mod internal {
        tonic::include_proto!("metro.internal.v1");
    }
}
