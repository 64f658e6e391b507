//! The storage seam the volume manager needs: local replicas, epochs,
//! the activity log and per-peer dirty bitmaps. Implemented over
//! `crate::store` for the daemon and in memory for tests and the simulator.

use crate::block::BlockDevice;
use metro_quorum::VolumeId;
use std::sync::Arc;

/// `touch_extent` found every hot extent unflushed: the primary must make a
/// mirrored FLUSH (durable on every in-sync copy) before it may add one.
#[derive(Debug, thiserror::Error)]
#[error("activity log full: all {hot} hot extents hold writes no mirrored flush covers yet")]
pub struct ActivityLogFull {
    pub hot: usize,
}

/// Is `e` an [`ActivityLogFull`]?
pub fn is_activity_log_full(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<ActivityLogFull>())
}

pub trait VolumeStorage: Send + Sync + 'static {
    /// Open the local replica of the committed volume `name` with id `id`,
    /// creating an empty thin one if missing. A replica of an earlier volume
    /// of that name is replaced by an empty one; one of a later or foreign
    /// volume is an error (see `store::node_store::judge_id`).
    /// Returns the device and the persisted epoch floor.
    fn open_or_create(
        &self,
        name: &str,
        size: u64,
        id: VolumeId,
    ) -> std::io::Result<(Arc<dyn BlockDevice>, u64)>;
    /// `(name, id)` of every local replica (for removing leftovers of
    /// deleted volumes, see `store::node_store::deleted_since`).
    fn identities(&self) -> Vec<(String, VolumeId)> {
        Vec::new()
    }
    fn delete(&self, name: &str) -> std::io::Result<()>;
    /// Names of every local replica.
    fn list(&self) -> Vec<String>;
    fn persist_epoch(&self, name: &str, epoch: u64) -> std::io::Result<()>;
    /// Activity log: durably mark the extents covering a range hot.
    fn touch_extent(&self, name: &str, offset: u64, len: u64) -> std::io::Result<()>;
    /// Would `touch_extent` refuse with [`ActivityLogFull`] (the primary then
    /// makes a mirrored FLUSH first)?
    fn touch_would_flush(&self, _name: &str, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Activity-log sequence when a flush is ordered (under the volume's
    /// order lock; the flush's local fdatasync waits for every write ordered
    /// before it, so it covers every write up to this sequence).
    fn flush_begin(&self, _name: &str) -> u64 {
        0
    }
    /// A flush covering every write up to `seq` is durable on every in-sync
    /// copy: those extents may cool.
    fn flush_done(&self, _name: &str, _seq: u64) {}
    /// Hot extents left by a crash or still active: `(offset, len)`.
    fn hot_extents(&self, name: &str) -> Vec<(u64, u64)>;
    /// Forget hot extents once this replica is back in sync under another
    /// primary (they were resynced from it).
    fn clear_hot(&self, _name: &str) -> std::io::Result<()> {
        Ok(())
    }
    fn mark_dirty(&self, name: &str, peer: &str, offset: u64, len: u64) -> std::io::Result<()>;
    /// Mark the whole volume dirty for `peer` (full resync; counted).
    fn mark_all_dirty(&self, name: &str, peer: &str) -> std::io::Result<()>;
    fn clear_dirty(&self, name: &str, peer: &str, offset: u64, len: u64) -> std::io::Result<()>;
    /// A resync copy of `[offset, offset+len)` to `peer` starts: clean in
    /// memory (a failed live write marks it dirty again), still dirty on
    /// disk until [`end_copy`](Self::end_copy) and a later persist.
    fn begin_copy(&self, name: &str, peer: &str, offset: u64, len: u64) -> std::io::Result<()>;
    /// That copy ended: acknowledged by the peer (`copied`, clean from the
    /// next [`persist_dirty`](Self::persist_dirty) on) or not (dirty again).
    fn end_copy(&self, name: &str, peer: &str, offset: u64, len: u64, copied: bool) -> std::io::Result<()>;
    /// Write the bitmap for `peer` if it changed since it was last written.
    fn persist_dirty(&self, name: &str, peer: &str) -> std::io::Result<()>;
    /// Dirty regions for `peer`, coalesced, in offset order.
    fn dirty_regions(&self, name: &str, peer: &str) -> Vec<(u64, u64)>;
    fn dirty_bytes(&self, name: &str, peer: &str) -> u64;
    /// Data (non-hole) ranges of the local replica within a range.
    fn data_ranges(&self, name: &str, offset: u64, len: u64) -> Vec<(u64, u64)>;
    /// (capacity, used) in bytes.
    fn capacity(&self) -> (u64, u64);
    /// May this copy of `name` lack writes acknowledged from a page cache
    /// that is gone (a reboot or power cut since they were written)? Set
    /// when a start follows such a loss, and it stays set, across later
    /// restarts too, until the volume's hot extents are reconciled
    /// (`clear_hot`).
    fn cache_lost(&self, _name: &str) -> bool {
        false
    }
    /// Full resyncs done so far (for reporting).
    fn full_resyncs(&self, name: &str) -> u64;
    /// The first epoch of the latest primaryship in which this node, as
    /// primary of `name`, made its copy durable before serving (None: never
    /// recorded). Durable: a power cut before that flush leaves the copy
    /// without writes of the previous primaryship, after it only without
    /// writes this node acknowledged itself.
    fn primary_flushed(&self, name: &str) -> Option<u64>;
    /// Record [`primary_flushed`](Self::primary_flushed) durably.
    fn set_primary_flushed(&self, name: &str, first_epoch: u64) -> std::io::Result<()>;
}
