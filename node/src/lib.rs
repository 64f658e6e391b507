//! `metro-node`: the storage daemon.
//!
//! ```text
//!  NBD client ──► nbd::server ──► ExportRegistry ──► BlockDevice (primary volume)
//!                                                     ├─► store (local sparse file)
//!                                                     └─► repl (mirror to every in-sync replica)
//! ```

pub mod block;
pub mod store;
