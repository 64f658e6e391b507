//! `metro-attach`: the attach agent of a storage-less application host.
//!
//! ```text
//!  app (nbd-client -unix, nbdfuse, qemu, fio, libnbd)
//!     │ NBD over /run/metro/attach/<volume>.sock
//!     ▼
//!  agent::Agent ── metro_nbd::NbdServer ── follower::Follower (BlockDevice)
//!                                              │ one upstream NBD connection
//!                                              ▼
//!                                       the volume's primary
//!  locator::Locator ── WatchVolume (control API, mTLS, client:<host>) ──► where the primary is
//! ```
//!
//! It links the NBD protocol (`metro-nbd`) and the API contracts
//! (`metro-api`), never the storage engine.

pub mod agent;
pub mod follower;
pub mod locator;
pub mod metrics;
