//! `MemVolume`: an in-memory [`BlockDevice`] for tests and the simulator.
//!
//! Storage is sparse: fixed-size chunks allocated on first write and freed
//! when a trim or zeroing covers them whole, so a large thin volume costs
//! memory only for what was written. Unwritten bytes read as zero.

use crate::block::{BlockDevice, BlockError, BlockResult};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Chunk granularity of the sparse map: the dirty-bitmap region size, so a
/// resync test's holes line up with chunks.
pub const MEM_CHUNK_BYTES: u64 = 64 << 10;

/// In-memory sparse block device.
pub struct MemVolume {
    size: u64,
    chunks: Mutex<HashMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
}

impl MemVolume {
    pub fn new(size: u64) -> MemVolume {
        MemVolume { size, chunks: Mutex::new(HashMap::new()), flushes: AtomicU64::new(0) }
    }

    /// Number of completed flushes (FUA writes count as one too).
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Bytes of memory held by allocated chunks.
    pub fn allocated_bytes(&self) -> u64 {
        self.lock().len() as u64 * MEM_CHUNK_BYTES
    }

    /// Ranges of allocated chunks within `[offset, offset+len)`, coalesced:
    /// the in-memory analogue of [`super::LocalVolume::data_ranges`].
    pub fn data_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.size);
        let chunks = self.lock();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut idx = offset / MEM_CHUNK_BYTES;
        while idx * MEM_CHUNK_BYTES < end {
            if chunks.contains_key(&idx) {
                let s = (idx * MEM_CHUNK_BYTES).max(offset);
                let e = ((idx + 1) * MEM_CHUNK_BYTES).min(end);
                match out.last_mut() {
                    Some(l) if l.0 + l.1 == s => l.1 += e - s,
                    _ => out.push((s, e - s)),
                }
            }
            idx += 1;
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<[u8]>>> {
        self.chunks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size: self.size }),
        }
    }

    /// Visit each chunk piece of `[offset, offset+len)`: (chunk index, offset
    /// within chunk, piece length, offset within the request).
    fn pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let mut pos = offset;
        let end = offset + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let idx = pos / MEM_CHUNK_BYTES;
            let within = (pos % MEM_CHUNK_BYTES) as usize;
            let n = ((MEM_CHUNK_BYTES as usize) - within).min((end - pos) as usize);
            let item = (idx, within, n, (pos - offset) as usize);
            pos += n as u64;
            Some(item)
        })
    }

    fn zero(&self, offset: u64, len: u64) {
        let mut chunks = self.lock();
        for (idx, within, n, _) in Self::pieces(offset, len) {
            if n as u64 == MEM_CHUNK_BYTES {
                chunks.remove(&idx);
            } else if let Some(c) = chunks.get_mut(&idx) {
                c[within..within + n].fill(0);
            }
        }
    }
}

#[async_trait]
impl BlockDevice for MemVolume {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.check_range(offset, len as u64)?;
        let mut out = BytesMut::zeroed(len as usize);
        let chunks = self.lock();
        for (idx, within, n, at) in Self::pieces(offset, len as u64) {
            if let Some(c) = chunks.get(&idx) {
                out[at..at + n].copy_from_slice(&c[within..within + n]);
            }
        }
        Ok(out.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.check_range(offset, data.len() as u64)?;
        let mut chunks = self.lock();
        for (idx, within, n, at) in Self::pieces(offset, data.len() as u64) {
            let c =
                chunks.entry(idx).or_insert_with(|| vec![0u8; MEM_CHUNK_BYTES as usize].into_boxed_slice());
            c[within..within + n].copy_from_slice(&data[at..at + n]);
        }
        if fua {
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn flush(&self) -> BlockResult<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> BlockResult<()> {
        self.check_range(offset, len as u64)?;
        self.zero(offset, len as u64);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool, _may_punch: bool) -> BlockResult<()> {
        self.check_range(offset, len as u64)?;
        self.zero(offset, len as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn data_ranges_follow_allocated_chunks_and_whole_chunk_trims_free_memory() {
        let v = MemVolume::new(16 * MEM_CHUNK_BYTES);
        v.write(MEM_CHUNK_BYTES + 10, Bytes::from(vec![1; 100]), false).await.unwrap();
        v.write(5 * MEM_CHUNK_BYTES, Bytes::from(vec![2; 2 * MEM_CHUNK_BYTES as usize]), false)
            .await
            .unwrap();
        assert_eq!(
            v.data_ranges(0, 16 * MEM_CHUNK_BYTES),
            vec![(MEM_CHUNK_BYTES, MEM_CHUNK_BYTES), (5 * MEM_CHUNK_BYTES, 2 * MEM_CHUNK_BYTES)]
        );
        assert_eq!(v.allocated_bytes(), 3 * MEM_CHUNK_BYTES);
        v.trim(5 * MEM_CHUNK_BYTES, MEM_CHUNK_BYTES as u32, false).await.unwrap();
        assert_eq!(v.allocated_bytes(), 2 * MEM_CHUNK_BYTES);
        // A partial trim zeroes but keeps the chunk.
        v.trim(6 * MEM_CHUNK_BYTES, 10, false).await.unwrap();
        assert_eq!(v.allocated_bytes(), 2 * MEM_CHUNK_BYTES);
        assert!(v.read(6 * MEM_CHUNK_BYTES, 10).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(v.read(6 * MEM_CHUNK_BYTES + 10, 1).await.unwrap()[0], 2);
    }
}
