//! metro's NBD protocol: the block-device seam ([`block`]), an in-house
//! server (fixed newstyle, structured replies, pipelined; TCP or unix
//! sockets) and a client ([`client`]) for the attach agent's upstream.
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
//! Use from the daemon:
//!
//! ```no_run
//! # async fn demo(registry: std::sync::Arc<dyn metro_nbd::block::ExportRegistry>) -> std::io::Result<()> {
//! use metro_nbd::{NbdLimits, NbdServer};
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:10809").await?;
//! let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
//! let server = std::sync::Arc::new(NbdServer::new(registry, NbdLimits::default()));
//! let task = tokio::spawn(server.clone().serve(listener, stop_rx));
//! // ... later: stop accepting, let in-flight requests finish, close.
//! stop_tx.send(true).ok();
//! task.await.expect("nbd task")?;
//! # Ok(()) }
//! ```
//!
//! Published NBD crates cannot serve real clients (see TESTBED.md), hence
//! this implementation; it is tested against nbdinfo, nbdcopy, qemu-io,
//! qemu-img, fio and nbdfuse in `node/tests/nbd_real_clients.rs`.

pub mod block;
pub mod client;
pub mod command;
mod connection;
pub mod handshake;
pub mod proto;
mod server;
mod stats;
pub mod wire;

pub use connection::NbdStream;
pub use server::{NbdLimits, NbdServer, HANDSHAKE_TIMEOUT, MAX_CONNECTIONS};
pub use stats::NbdStatsSnapshot;
