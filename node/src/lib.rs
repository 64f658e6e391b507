//! `metro-node`: the storage daemon.
//!
//! ```text
//!  NBD client ──► nbd::server ──► ExportRegistry ──► BlockDevice (primary volume)
//!                                                     ├─► store (local sparse file)
//!                                                     └─► repl (mirror to every in-sync replica)
//! ```

pub mod block;
pub mod control;
pub mod daemon;
pub mod entry;
pub mod handoff;
pub mod metrics;
pub mod nbd;
pub mod registry;
pub mod repl;
pub mod rt;
pub mod store;
pub mod summary;
pub mod volume;
