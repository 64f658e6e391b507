//! Local storage layer of a storage node (DESIGN.md section 3; invariants
//! 1, 2 and 6): what the NBD server and the replication layer call.
//!
//! ```text
//!  NodeStore ── volumes/<name>/ ── LocalVolume (BlockDevice: sparse data + superblock)
//!                               ├─ DirtyBitmap per peer (what the peer missed),
//!                               │    SharedDirtyBitmap = async + group commit
//!                               ├─ ActivityLog (extents possibly not on every replica),
//!                               │    SharedActivityLog = async + group commit
//!                               └─ ResyncCursor per peer (resume an interrupted resync)
//!  ResyncPlan (pure): dirty ∪ hot, split by source data ranges into copy / punch
//!  MemVolume, FaultyVolume: other BlockDevice backends; testing::conformance_suite
//!  VolatileCache: test-only write-back cache in memory (kill -9 = power cut)
//!  RateLimiter: per-volume IOPS / bandwidth
//!  write_lane: one thread for buffered data writes (fewer thread hand-offs)
//! ```
//!
//! Every persisted file shares one envelope (magic, version, crc32c) and is
//! replaced atomically (temp file, fdatasync, rename, directory fsync).

pub mod activity_log;
pub mod dirty_bitmap;
pub mod envelope;
pub mod error;
pub mod faulty_volume;
pub mod local_volume;
pub mod mem_volume;
pub mod node_store;
pub mod ranges;
pub mod rate_limiter;
pub mod resync_cursor;
pub mod resync_plan;
pub mod shared_activity_log;
pub mod shared_dirty_bitmap;
pub mod superblock;
pub mod testing;
pub mod volatile_cache;
pub mod write_lane;

pub use activity_log::{ActivityLog, AlOutcome, DEFAULT_EXTENT_BYTES, DEFAULT_MAX_HOT_EXTENTS};
pub use dirty_bitmap::{DirtyBitmap, LoadOutcome, DEFAULT_REGION_BYTES};
pub use error::{StoreError, StoreResult};
pub use faulty_volume::{FaultKind, FaultyVolume, Op};
pub use local_volume::LocalVolume;
pub use mem_volume::MemVolume;
pub use node_store::{deleted_since, judge_id, IdVerdict, NodeStore};
pub use rate_limiter::RateLimiter;
pub use resync_cursor::ResyncCursor;
pub use resync_plan::{ResyncPlan, ResyncStep};
pub use shared_activity_log::SharedActivityLog;
pub use shared_dirty_bitmap::SharedDirtyBitmap;
pub use superblock::Superblock;
pub use volatile_cache::{VolatileCache, DEFAULT_VOLATILE_LIMIT_BYTES};
