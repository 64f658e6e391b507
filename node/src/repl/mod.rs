//! Synchronous replication: the wire format, the primary's links, the
//! replica's server and epoch fencing.

pub mod link;
pub mod replica;
pub mod server;
pub mod wire;
