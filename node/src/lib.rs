//! `metro-node`: the storage daemon.
//!
//! ```text
//!  NBD client ──► nbd::server ──► ExportRegistry ──► BlockDevice (primary volume)
//!                                                     ├─► store (local sparse file)
//!                                                     └─► repl (mirror to every in-sync replica)
//! ```

pub mod control;
pub mod daemon;
pub mod entry;
pub mod handoff;
pub mod metrics;
pub mod registry;
pub mod repl;
pub mod rt;
pub mod store;
pub mod summary;
pub mod volume;

pub use metro_nbd as nbd;
/// The NBD protocol and the block-device seam live in `metro-nbd`, which
/// the attach agent uses without linking storage.
pub use metro_nbd::block;
