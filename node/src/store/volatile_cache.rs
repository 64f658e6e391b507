//! `VolatileCache`: a test-only write-back cache in the daemon's own memory,
//! so that `kill -9` (or [`VolatileCache::power_cut`]) loses every write
//! that was not flushed, exactly like a power cut loses the page cache
//! (DESIGN.md section 3, crash model). In the lab every node shares one
//! kernel, so without it a killed daemon's writes always survive.
//!
//! ```text
//!   write / write_batch / trim / write_zeroes (no FUA)
//!        │  appended to `pending` (ordered list, one entry per op, seq)
//!        ▼
//!   pending ops ──(flush / any FUA op: every op, in order, then inner.flush)──▶ inner device
//!        └──────(over `limit` bytes: oldest ops, in order, no flush)────────▶ inner device
//!   read   = inner bytes, then every pending op overlapping it, in order
//!   power_cut = drop every pending op (a concurrent write-back may or may not land)
//! ```
//!
//! Invariants:
//! - Reads see every completed write (read-your-writes), pending or not.
//! - Ops reach the inner device in the order they were accepted; only one
//!   drain (write-back or flush) runs at a time.
//! - An op leaves `pending` only after the inner device completed it, so a
//!   reader that snapshots `pending` before reading the inner device never
//!   misses a completed write.
//! - `flush()` and FUA ops return only after every op accepted before them
//!   is on the inner device and the inner device was flushed.
//! - Pending memory stays near `limit`: a writer that pushes it over the
//!   limit writes back the oldest ops (without a flush) before returning.
//! - [`VolatileCache::data_ranges`] is a superset of the ranges that may hold
//!   data: the inner device's data ranges plus every pending write.

use crate::block::{BlockDevice, BlockError, BlockResult};
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Default bound on pending bytes per device.
pub const DEFAULT_VOLATILE_LIMIT_BYTES: u64 = 64 << 20;
/// What a pending zero/trim op counts toward the bound (its bookkeeping).
const ZERO_OP_COST: u64 = 64;

#[derive(Clone, Debug)]
enum Kind {
    Write(Bytes),
    /// Zero `len` bytes; `punch` = trim or write_zeroes that may punch.
    Zero {
        len: u64,
        punch: bool,
    },
}

#[derive(Clone, Debug)]
struct PendingOp {
    seq: u64,
    offset: u64,
    kind: Kind,
}

impl PendingOp {
    fn len(&self) -> u64 {
        match &self.kind {
            Kind::Write(d) => d.len() as u64,
            Kind::Zero { len, .. } => *len,
        }
    }
    fn cost(&self) -> u64 {
        match &self.kind {
            Kind::Write(d) => d.len() as u64,
            Kind::Zero { .. } => ZERO_OP_COST,
        }
    }
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.offset < offset + len && offset < self.offset + self.len()
    }
}

#[derive(Default)]
struct State {
    pending: VecDeque<PendingOp>,
    pending_bytes: u64,
    next_seq: u64,
    discarded_bytes: u64,
    discarded_ops: u64,
    written_back_ops: u64,
}

/// What [`VolatileCache::power_cut`] threw away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Discarded {
    pub ops: u64,
    /// Bytes of discarded writes (zero/trim ops count their length).
    pub bytes: u64,
}

/// Counters for tests and reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub pending_ops: u64,
    /// Bytes of data held in memory by pending writes.
    pub pending_bytes: u64,
    /// Ops written back to the inner device because of the bound.
    pub written_back_ops: u64,
    /// Totals over every power cut.
    pub discarded_ops: u64,
    pub discarded_bytes: u64,
}

/// A [`BlockDevice`] that keeps unflushed writes in memory (test only).
pub struct VolatileCache {
    inner: Arc<dyn BlockDevice>,
    limit: u64,
    state: Mutex<State>,
    /// Serialises drains so ops reach the inner device in order.
    drain: tokio::sync::Mutex<()>,
}

impl VolatileCache {
    /// Wrap `inner`; at most about `limit_bytes` of write data stay pending.
    pub fn new(inner: Arc<dyn BlockDevice>, limit_bytes: u64) -> VolatileCache {
        VolatileCache {
            inner,
            limit: limit_bytes.max(1),
            state: Mutex::default(),
            drain: tokio::sync::Mutex::new(()),
        }
    }

    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// Lose every pending op, as a power cut loses the page cache. A drain
    /// running at the same time may still land the ops it already started.
    pub fn power_cut(&self) -> Discarded {
        let mut s = self.lock();
        let d = Discarded { ops: s.pending.len() as u64, bytes: s.pending.iter().map(|o| o.len()).sum() };
        s.pending.clear();
        s.pending_bytes = 0;
        s.discarded_ops += d.ops;
        s.discarded_bytes += d.bytes;
        if d.ops > 0 {
            tracing::warn!(ops = d.ops, bytes = d.bytes, "volatile cache: power cut discarded pending ops");
        }
        d
    }

    pub fn stats(&self) -> CacheStats {
        let s = self.lock();
        CacheStats {
            pending_ops: s.pending.len() as u64,
            pending_bytes: s.pending_bytes,
            written_back_ops: s.written_back_ops,
            discarded_ops: s.discarded_ops,
            discarded_bytes: s.discarded_bytes,
        }
    }

    /// Ranges within `[offset, offset+len)` that may hold data: the inner
    /// device's (from `inner_ranges`, e.g. SEEK_DATA/SEEK_HOLE on the file)
    /// merged with every pending write. Pending punches are not subtracted
    /// (a range reported as data may read as zeroes, never the reverse).
    /// Sorted, coalesced.
    pub fn data_ranges<E>(
        &self,
        offset: u64,
        len: u64,
        inner_ranges: impl FnOnce(u64, u64) -> Result<Vec<(u64, u64)>, E>,
    ) -> Result<Vec<(u64, u64)>, E> {
        let end = offset.saturating_add(len).min(self.inner.size());
        if offset >= end {
            return inner_ranges(offset, len);
        }
        // Snapshot pending before asking the inner device: an op leaves
        // `pending` only once it is on the inner device.
        let mut ranges: Vec<(u64, u64)> = {
            let s = self.lock();
            s.pending
                .iter()
                .filter(|o| {
                    matches!(o.kind, Kind::Write(_)) && o.len() > 0 && o.overlaps(offset, end - offset)
                })
                .map(|o| {
                    let a = o.offset.max(offset);
                    let b = (o.offset + o.len()).min(end);
                    (a, b - a)
                })
                .collect()
        };
        ranges.extend(inner_ranges(offset, len)?);
        Ok(coalesce(ranges))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        let size = self.inner.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size }),
        }
    }

    /// Append ops (already range-checked); returns whether the bound is exceeded.
    fn push(&self, ops: impl IntoIterator<Item = (u64, Kind)>) -> bool {
        let mut s = self.lock();
        for (offset, kind) in ops {
            let seq = s.next_seq;
            s.next_seq += 1;
            let op = PendingOp { seq, offset, kind };
            s.pending_bytes += op.cost();
            s.pending.push_back(op);
        }
        s.pending_bytes > self.limit
    }

    /// Apply pending ops to the inner device in order: all of them
    /// (`until_bytes` = None) or the oldest until at most that many bytes
    /// stay pending. Does not flush the inner device.
    async fn drain(&self, until_bytes: Option<u64>) -> BlockResult<()> {
        let _order = self.drain.lock().await;
        loop {
            let batch: Vec<PendingOp> = {
                let s = self.lock();
                if s.pending.is_empty() || until_bytes.is_some_and(|u| s.pending_bytes <= u) {
                    return Ok(());
                }
                // A bounded batch per round; writes in a row go in one write_batch.
                let mut bytes = 0u64;
                s.pending
                    .iter()
                    .take_while(|o| {
                        let take = bytes < (8 << 20);
                        bytes += o.cost();
                        take
                    })
                    .cloned()
                    .collect()
            };
            let last_seq = batch.last().map(|o| o.seq).unwrap_or(0);
            self.apply(batch).await?;
            let mut s = self.lock();
            let mut moved = 0;
            while s.pending.front().is_some_and(|o| o.seq <= last_seq) {
                let op = s.pending.pop_front().expect("front exists");
                s.pending_bytes -= op.cost();
                moved += 1;
            }
            if until_bytes.is_some() {
                s.written_back_ops += moved;
            }
        }
    }

    async fn apply(&self, batch: Vec<PendingOp>) -> BlockResult<()> {
        let mut writes: Vec<(u64, Bytes)> = Vec::new();
        for op in batch {
            match op.kind {
                Kind::Write(d) => writes.push((op.offset, d)),
                Kind::Zero { len, punch } => {
                    self.apply_writes(std::mem::take(&mut writes)).await?;
                    self.inner.write_zeroes(op.offset, len as u32, false, punch).await?;
                }
            }
        }
        self.apply_writes(writes).await
    }

    async fn apply_writes(&self, writes: Vec<(u64, Bytes)>) -> BlockResult<()> {
        if writes.is_empty() {
            return Ok(());
        }
        for r in self.inner.write_batch(writes).await {
            r?;
        }
        Ok(())
    }

    /// After pushing: write back if over the bound, or make durable for FUA.
    async fn settle(&self, over_limit: bool, fua: bool) -> BlockResult<()> {
        if fua {
            return self.flush().await;
        }
        if over_limit {
            self.drain(Some(self.limit / 2)).await?;
        }
        Ok(())
    }

    async fn zero(&self, offset: u64, len: u32, fua: bool, punch: bool) -> BlockResult<()> {
        self.check_range(offset, len as u64)?;
        if len == 0 && !fua {
            return Ok(());
        }
        let over = if len > 0 { self.push([(offset, Kind::Zero { len: len as u64, punch })]) } else { false };
        self.settle(over, fua).await
    }
}

/// Sort and merge overlapping or touching ranges.
fn coalesce(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (o, l) in ranges {
        match out.last_mut() {
            Some(last) if o <= last.0 + last.1 => {
                let end = (last.0 + last.1).max(o + l);
                last.1 = end - last.0;
            }
            _ => out.push((o, l)),
        }
    }
    out
}

#[async_trait]
impl BlockDevice for VolatileCache {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn min_block_size(&self) -> u32 {
        self.inner.min_block_size()
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let overlay: Vec<PendingOp> =
            self.lock().pending.iter().filter(|o| o.overlaps(offset, len as u64)).cloned().collect();
        let base = self.inner.read(offset, len).await?;
        if overlay.is_empty() {
            return Ok(base);
        }
        let mut buf = base.to_vec();
        let end = offset + len as u64;
        for op in overlay {
            let a = op.offset.max(offset);
            let b = (op.offset + op.len()).min(end);
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match &op.kind {
                Kind::Write(d) => dst.copy_from_slice(&d[(a - op.offset) as usize..(b - op.offset) as usize]),
                Kind::Zero { .. } => dst.fill(0),
            }
        }
        Ok(Bytes::from(buf))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.check_range(offset, data.len() as u64)?;
        let over = if data.is_empty() { false } else { self.push([(offset, Kind::Write(data))]) };
        self.settle(over, fua).await
    }

    async fn write_batch(&self, writes: Vec<(u64, Bytes)>) -> Vec<BlockResult<()>> {
        let mut out = Vec::with_capacity(writes.len());
        let mut ok = Vec::with_capacity(writes.len());
        for (offset, data) in writes {
            match self.check_range(offset, data.len() as u64) {
                Ok(()) => {
                    out.push(Ok(()));
                    if !data.is_empty() {
                        ok.push((offset, Kind::Write(data)));
                    }
                }
                Err(e) => out.push(Err(e)),
            }
        }
        let over = self.push(ok);
        if let Err(e) = self.settle(over, false).await {
            // The ops are accepted and readable; only the write-back failed.
            // Report it on every accepted range, as a failed disk would.
            let msg = e.to_string();
            for r in out.iter_mut().filter(|r| r.is_ok()) {
                *r = Err(BlockError::Io(std::io::Error::other(msg.clone())));
            }
        }
        out
    }

    async fn flush(&self) -> BlockResult<()> {
        self.drain(None).await?;
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BlockResult<()> {
        self.zero(offset, len, fua, true).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool, may_punch: bool) -> BlockResult<()> {
        self.zero(offset, len, fua, may_punch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::pattern;
    use crate::store::{LocalVolume, MemVolume};

    const MIB: u64 = 1 << 20;

    fn cache(limit: u64) -> (Arc<MemVolume>, VolatileCache) {
        let inner = Arc::new(MemVolume::new(16 * MIB));
        let c = VolatileCache::new(inner.clone(), limit);
        (inner, c)
    }

    #[tokio::test]
    async fn reads_see_pending_writes_and_the_inner_device_does_not() {
        let (inner, c) = cache(64 * MIB);
        c.write(4096, pattern(1, 8192), false).await.unwrap();
        assert_eq!(c.read(4096, 8192).await.unwrap(), pattern(1, 8192), "read-your-writes");
        assert_eq!(&c.read(4000, 200).await.unwrap()[96..], &pattern(1, 8192)[..104], "partial overlap");
        assert!(
            inner.read(4096, 8192).await.unwrap().iter().all(|&b| b == 0),
            "inner untouched before flush"
        );
        assert_eq!(c.stats().pending_bytes, 8192);
    }

    #[tokio::test]
    async fn punch_and_zero_over_pending_and_flushed_data_read_as_zeroes() {
        let (inner, c) = cache(64 * MIB);
        c.write(0, pattern(2, 65536), true).await.unwrap(); // durable
        c.write(65536, pattern(3, 65536), false).await.unwrap(); // pending
        c.trim(4096, 8192, false).await.unwrap();
        c.write_zeroes(70000, 1000, false, false).await.unwrap();
        let got = c.read(0, 131072).await.unwrap();
        let mut want = pattern(2, 65536).to_vec();
        want.extend_from_slice(&pattern(3, 65536));
        want[4096..12288].fill(0);
        want[70000..71000].fill(0);
        assert!(
            got == want,
            "zeroes over pending data wrong at {:?}",
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
        // The inner device still has the durable data under the pending trim.
        assert_eq!(inner.read(4096, 8192).await.unwrap(), pattern(2, 65536).slice(4096..12288));
        c.flush().await.unwrap();
        assert_eq!(inner.read(0, 131072).await.unwrap(), Bytes::from(want), "after flush");
    }

    #[tokio::test]
    async fn a_later_overlapping_op_wins_in_the_cache_and_after_flush() {
        let (inner, c) = cache(64 * MIB);
        c.write(0, pattern(4, 16384), false).await.unwrap();
        c.trim(0, 16384, false).await.unwrap();
        c.write(4096, pattern(5, 4096), false).await.unwrap();
        c.write(6144, pattern(6, 4096), false).await.unwrap();
        let mut want = vec![0u8; 16384];
        want[4096..8192].copy_from_slice(&pattern(5, 4096));
        want[6144..10240].copy_from_slice(&pattern(6, 4096));
        assert_eq!(c.read(0, 16384).await.unwrap(), Bytes::from(want.clone()), "pending order");
        c.flush().await.unwrap();
        assert_eq!(inner.read(0, 16384).await.unwrap(), Bytes::from(want.clone()), "applied in order");
        assert_eq!(c.read(0, 16384).await.unwrap(), Bytes::from(want), "after flush");
        assert_eq!(c.stats().pending_ops, 0);
    }

    #[tokio::test]
    async fn power_cut_loses_exactly_the_unflushed_ops() {
        let (inner, c) = cache(64 * MIB);
        c.write(0, pattern(7, 4096), false).await.unwrap();
        c.flush().await.unwrap();
        c.write(8192, pattern(8, 4096), true).await.unwrap(); // FUA: durable
        c.write(0, pattern(9, 4096), false).await.unwrap(); // overwrites flushed data, pending
        c.write(16384, pattern(10, 4096), false).await.unwrap();
        c.trim(8192, 4096, false).await.unwrap();
        let d = c.power_cut();
        assert_eq!(d, Discarded { ops: 3, bytes: 3 * 4096 });
        assert_eq!(c.read(0, 4096).await.unwrap(), pattern(7, 4096), "flushed data survives, overwrite lost");
        assert_eq!(c.read(8192, 4096).await.unwrap(), pattern(8, 4096), "FUA data survives, trim lost");
        assert!(c.read(16384, 4096).await.unwrap().iter().all(|&b| b == 0), "unflushed write lost");
        assert_eq!(inner.read(8192, 4096).await.unwrap(), pattern(8, 4096));
        let st = c.stats();
        assert_eq!(
            (st.pending_ops, st.pending_bytes, st.discarded_ops, st.discarded_bytes),
            (0, 0, 3, 3 * 4096)
        );
        // Still usable afterwards.
        c.write(16384, pattern(11, 4096), false).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(inner.read(16384, 4096).await.unwrap(), pattern(11, 4096));
    }

    #[tokio::test]
    async fn fua_trim_and_zeroes_are_durable_with_everything_before_them() {
        let (inner, c) = cache(64 * MIB);
        c.write(0, pattern(12, 8192), false).await.unwrap();
        c.trim(0, 4096, true).await.unwrap();
        assert_eq!(c.power_cut(), Discarded::default(), "FUA drained everything");
        assert!(inner.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(inner.read(4096, 4096).await.unwrap(), pattern(12, 8192).slice(4096..));
        c.write(0, pattern(13, 4096), false).await.unwrap();
        c.write_zeroes(65536, 4096, true, false).await.unwrap();
        assert_eq!(c.power_cut(), Discarded::default());
        assert_eq!(inner.read(0, 4096).await.unwrap(), pattern(13, 4096));
    }

    #[tokio::test]
    async fn the_bound_writes_back_the_oldest_ops_without_losing_order() {
        let limit = 64 * 1024;
        let (inner, c) = cache(limit);
        for i in 0..64u64 {
            c.write(i * 4096, pattern(100 + i, 4096), false).await.unwrap();
            assert!(c.stats().pending_bytes <= limit, "pending {} over the bound", c.stats().pending_bytes);
        }
        let st = c.stats();
        assert!(st.written_back_ops > 0, "nothing written back: {st:?}");
        assert!(st.pending_bytes > 0, "everything written back: {st:?}");
        // The oldest ops are on the inner device (not flushed, but there).
        assert_eq!(inner.read(0, 4096).await.unwrap(), pattern(100, 4096));
        // The newest are not.
        assert!(inner.read(63 * 4096, 4096).await.unwrap().iter().all(|&b| b == 0));
        let d = c.power_cut();
        assert_eq!(d.bytes, st.pending_bytes);
        for i in 0..64u64 {
            let got = c.read(i * 4096, 4096).await.unwrap();
            let kept = got == pattern(100 + i, 4096);
            let lost = got.iter().all(|&b| b == 0);
            assert!(kept || lost, "block {i} torn");
            // Written back in order: every kept block precedes every lost one.
            let first_lost = 64 - d.ops;
            assert_eq!(kept, i < first_lost, "block {i}: kept {kept}, first lost {first_lost}");
        }
    }

    #[tokio::test]
    async fn written_back_overwrites_keep_the_newest_bytes() {
        let (_inner, c) = cache(8192);
        for i in 0..20u64 {
            c.write(0, pattern(200 + i, 4096), false).await.unwrap();
            assert_eq!(c.read(0, 4096).await.unwrap(), pattern(200 + i, 4096), "round {i}");
        }
        c.flush().await.unwrap();
        assert_eq!(c.read(0, 4096).await.unwrap(), pattern(219, 4096));
    }

    #[tokio::test]
    async fn data_ranges_include_pending_writes_and_inner_data() {
        let dir = tempfile::tempdir().unwrap();
        let vol = LocalVolume::create(&dir.path().join("v"), "v", 16 * MIB).unwrap();
        let c = VolatileCache::new(Arc::new(vol.clone()), 64 * MIB);
        c.write(MIB, pattern(14, 4096), true).await.unwrap(); // on disk
        c.write(4 * MIB, pattern(15, 8192), false).await.unwrap(); // pending only
        c.write(4 * MIB + 8192, pattern(16, 4096), false).await.unwrap(); // touching: coalesced
        c.trim(MIB, 4096, false).await.unwrap(); // pending punch over disk data
        let on_disk = vol.data_ranges(0, 16 * MIB).unwrap();
        assert!(
            !on_disk.iter().any(|&(o, l)| o < 4 * MIB + 12288 && 4 * MIB < o + l),
            "pending data not on disk"
        );
        let r = c.data_ranges(0, 16 * MIB, |o, l| vol.data_ranges(o, l)).unwrap();
        let covers = |off: u64, len: u64| r.iter().any(|&(o, l)| o <= off && off + len <= o + l);
        assert!(covers(4 * MIB, 12288), "pending writes reported as data: {r:?}");
        assert!(covers(MIB, 4096), "disk data under a pending punch may still be reported: {r:?}");
        // Clipped to the asked range.
        let r = c.data_ranges(4 * MIB + 4096, 4096, |o, l| vol.data_ranges(o, l)).unwrap();
        assert_eq!(r, vec![(4 * MIB + 4096, 4096)]);
        // After flush the same ranges come from the file alone.
        c.flush().await.unwrap();
        let on_disk = vol.data_ranges(0, 16 * MIB).unwrap();
        assert!(on_disk.iter().any(|&(o, l)| o <= 4 * MIB && 4 * MIB + 12288 <= o + l), "{on_disk:?}");
    }

    #[test]
    fn coalesce_merges_overlapping_and_touching_ranges() {
        assert_eq!(coalesce(vec![(10, 5), (0, 10), (20, 1), (14, 2), (30, 0)]), vec![(0, 16), (20, 1)]);
    }
}
