//! What a primary volume needs from the rest of the node: leases and
//! committed reconfigurations (quorum), links to peers, and durable dirty
//! tracking (store). A trait so tests and the simulator can drive a primary
//! without a cluster.

use crate::repl::link::Link;
use async_trait::async_trait;
use std::sync::Arc;

#[async_trait]
pub trait VolumeControl: Send + Sync + 'static {
    /// Does this node hold a valid lease for the volume right now, granted
    /// at `min_epoch` or later? (The epoch this primaryship began at: a lease
    /// left over from an earlier time as primary never counts.)
    fn lease_valid(&self, volume: &str, min_epoch: u64) -> bool;
    /// Is this node still the primary in the latest applied state, in the
    /// primaryship that includes `first_epoch` (not a newer one that began
    /// after it)?
    fn still_primary(&self, volume: &str, first_epoch: u64) -> bool;
    fn link(&self, peer: &str) -> Option<Arc<Link>>;
    /// Durably record that the extent holding `[offset, offset+len)` is hot.
    fn touch_extent(&self, volume: &str, offset: u64, len: u64) -> std::io::Result<()>;
    /// Would [`touch_extent`](Self::touch_extent) have to flush the local
    /// copy first (activity log full)? The primary then lets every earlier
    /// local write finish before touching, so that flush covers them.
    fn touch_would_flush(&self, _volume: &str, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Activity-log hooks around a flush (see `VolumeStorage::flush_begin`).
    fn flush_begin(&self, volume: &str) -> u64;
    fn flush_done(&self, volume: &str, seq: u64);
    /// Durably mark a region dirty for an out-of-sync peer.
    fn mark_dirty(&self, volume: &str, peer: &str, offset: u64, len: u64) -> std::io::Result<()>;
    /// Before a peer leaves in_sync, mark what might be missing on it: the
    /// hot extents (conservative superset of unacknowledged writes).
    fn mark_all_outstanding(&self, volume: &str, peer: &str) -> std::io::Result<()>;
    /// Commit `in_sync` (a subset) with this node as primary; returns the new epoch.
    async fn shrink_in_sync(
        &self,
        volume: &str,
        expected_epoch: u64,
        in_sync: Vec<String>,
    ) -> Result<u64, String>;
    /// Commit the rejoin of `peer`; returns the new epoch.
    async fn rejoin(
        &self,
        volume: &str,
        expected_epoch: u64,
        in_sync: Vec<String>,
        peer: &str,
    ) -> Result<u64, String>;
}
