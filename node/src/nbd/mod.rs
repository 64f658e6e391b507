//! In-house NBD server (fixed newstyle, structured replies, pipelined).
//!
//! ```text
//!  TcpListener ─► server (accept, limits) ─► handshake (options, GO/EXPORT_NAME)
//!                                              │ ExportRegistry::open(name)
//!                                              ▼
//!                                 connection (reader ─► tasks ─► writer)
//!                                              │ BlockDevice
//! ```
//!
//! Files: `proto` (constants), `wire` (pure encode/decode), `command`
//! (request validation), `handshake`, `connection` (transmission),
//! `server` (public entry point), `stats` (counters).
//!
//! Published NBD crates cannot serve real clients (see TESTBED.md), hence
//! this implementation; it is tested against nbdinfo, nbdcopy, qemu-io,
//! qemu-img, fio and nbdfuse in `node/tests/nbd_real_clients.rs`.

pub mod command;
mod connection;
pub mod handshake;
pub mod proto;
mod server;
mod stats;
pub mod wire;

pub use server::{NbdLimits, NbdServer, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};
pub use stats::NbdStatsSnapshot;
