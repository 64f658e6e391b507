//! `DirtyBitmap`: the persistent set of regions a peer replica missed while
//! it was out of `in_sync` (one bitmap per volume and peer).
//!
//! ```text
//!  write not mirrored to peer P ──► mark(off,len) ──new bits?──► persist() ──► ack
//!                                                     └─no───────────────────► ack
//!  resync of P copies a region ──► clear(regions) ──► persist() when convenient
//! ```
//!
//! File: the common envelope (magic `MTRODBM1`, version 1, crc32c) around
//! `volume_size: u64, region_size: u64, region_count: u64, words: [u64]`.
//!
//! Invariants:
//! - Before a write the peer did not receive is acknowledged, its regions are
//!   durable in the file: [`DirtyBitmap::mark`] says whether a
//!   [`DirtyBitmap::persist`] is needed; only the first touch of a region
//!   costs a write, and several marks can share one persist (batching).
//! - On-disk bits are a superset of the truly dirty regions: clearing may be
//!   persisted late, setting never is.
//! - A file that fails its checksum (torn write, bit rot) or whose geometry
//!   does not match is never trusted: it loads as fully dirty (a full resync)
//!   and the outcome says so, so the caller can count and report it.
//!
//! Cost: the whole file is rewritten atomically on persist; at 64 KiB
//! regions that is 2 KiB per GiB of volume (2 MiB for 1 TiB).

use super::envelope::{self, Dec, Enc};
use super::error::{StoreError, StoreResult};
use std::ops::Range;
use std::path::{Path, PathBuf};

pub const BITMAP_MAGIC: &[u8; 8] = b"MTRODBM1";
pub const BITMAP_VERSION: u32 = 1;
/// Default region size (DESIGN.md section 7).
pub const DEFAULT_REGION_BYTES: u64 = 64 << 10;
/// Smallest region: one filesystem block.
pub const MIN_REGION_BYTES: u64 = 4096;

/// How a bitmap came back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadOutcome {
    /// The file was intact and matches the volume geometry.
    Intact,
    /// The file could not be trusted; every region is now dirty (full resync)
    /// and that state is already persisted. `reason` names the defect.
    FullyDirty { reason: String },
}

/// Persistent bitmap of dirty regions.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    path: PathBuf,
    volume_size: u64,
    region_size: u64,
    regions: u64,
    words: Vec<u64>,
    /// Regions being copied to the peer: clear in `words` (a write that fails
    /// on the peer meanwhile sets them again there) but still written as
    /// dirty to the file until the copy is acknowledged, so a crash during a
    /// resync never persists a region as clean before the peer has it.
    copying: Vec<u64>,
    dirty_regions: u64,
    /// Memory differs from disk.
    unpersisted: bool,
    /// Some dirty bit set in memory is not yet on disk.
    pending_sets: bool,
}

impl DirtyBitmap {
    fn empty(path: &Path, volume_size: u64, region_size: u64) -> StoreResult<DirtyBitmap> {
        if region_size < MIN_REGION_BYTES || !region_size.is_power_of_two() {
            return Err(StoreError::InvalidArgument(format!(
                "bitmap region size {region_size} must be a power of two >= {MIN_REGION_BYTES}"
            )));
        }
        let regions = volume_size.div_ceil(region_size);
        if regions.div_ceil(64) * 8 > envelope::MAX_PAYLOAD_BYTES as u64 - 24 {
            return Err(StoreError::InvalidArgument(format!(
                "volume of {volume_size} bytes needs too many {region_size}-byte regions; use a larger region size"
            )));
        }
        Ok(DirtyBitmap {
            path: path.to_path_buf(),
            volume_size,
            region_size,
            regions,
            words: vec![0; regions.div_ceil(64) as usize],
            copying: vec![0; regions.div_ceil(64) as usize],
            dirty_regions: 0,
            unpersisted: true,
            pending_sets: false,
        })
    }

    /// Create a clean bitmap file at `path`; refuses to overwrite one.
    pub fn create(path: &Path, volume_size: u64, region_size: u64) -> StoreResult<DirtyBitmap> {
        if path.exists() {
            return Err(StoreError::AlreadyExists { path: path.to_path_buf() });
        }
        let mut b = Self::empty(path, volume_size, region_size)?;
        b.persist()?;
        Ok(b)
    }

    /// Load the bitmap at `path`. A missing file is [`StoreError::NotFound`];
    /// an unknown version is [`StoreError::UnsupportedVersion`]; anything else
    /// wrong loads as fully dirty (see [`LoadOutcome`]).
    pub fn load(path: &Path, volume_size: u64, region_size: u64) -> StoreResult<(DirtyBitmap, LoadOutcome)> {
        let mut b = Self::empty(path, volume_size, region_size)?;
        let bytes = std::fs::read(path).map_err(|e| StoreError::io(path, "read dirty bitmap", e))?;
        match b.decode_into(&bytes) {
            Ok(()) => {
                b.unpersisted = false;
                Ok((b, LoadOutcome::Intact))
            }
            Err(e @ StoreError::UnsupportedVersion { .. }) => Err(e),
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(path = %path.display(), %reason, "dirty bitmap untrusted; treating the whole volume as dirty (full resync)");
                b.set_all();
                b.persist()?;
                Ok((b, LoadOutcome::FullyDirty { reason }))
            }
        }
    }

    /// [`load`](Self::load) if the file exists, else [`create`](Self::create).
    pub fn open_or_create(
        path: &Path,
        volume_size: u64,
        region_size: u64,
    ) -> StoreResult<(DirtyBitmap, LoadOutcome)> {
        if path.exists() {
            Self::load(path, volume_size, region_size)
        } else {
            Ok((Self::create(path, volume_size, region_size)?, LoadOutcome::Intact))
        }
    }

    fn decode_into(&mut self, bytes: &[u8]) -> StoreResult<()> {
        let payload = envelope::decode(&self.path, BITMAP_MAGIC, BITMAP_VERSION, bytes)?;
        let mut d = Dec::new(&self.path, payload);
        let (vs, rs, rc) = (d.u64()?, d.u64()?, d.u64()?);
        if vs != self.volume_size || rs != self.region_size || rc != self.regions {
            return Err(d.corrupt(format!(
                "geometry mismatch: file has volume {vs} B / region {rs} B / {rc} regions, expected {} / {} / {}",
                self.volume_size, self.region_size, self.regions
            )));
        }
        let mut words = Vec::with_capacity(self.words.len());
        for _ in 0..self.words.len() {
            words.push(d.u64()?);
        }
        d.finish()?;
        // Bits past the last region must be zero.
        if let Some(last) = words.last() {
            let used = self.regions - (self.words.len() as u64 - 1) * 64;
            if used < 64 && last >> used != 0 {
                return Err(d.corrupt("bits set past the last region"));
            }
        }
        self.dirty_regions = words.iter().map(|w| w.count_ones() as u64).sum();
        self.words = words;
        Ok(())
    }

    fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.volume_size).u64(self.region_size).u64(self.regions);
        for (w, c) in self.words.iter().zip(&self.copying) {
            e.u64(*w | *c);
        }
        envelope::encode(BITMAP_MAGIC, BITMAP_VERSION, &e.0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn region_size(&self) -> u64 {
        self.region_size
    }
    pub fn region_count(&self) -> u64 {
        self.regions
    }
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }
    /// True when memory holds changes not yet in the file.
    pub fn needs_persist(&self) -> bool {
        self.unpersisted
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        region < self.regions && self.words[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    fn set(&mut self, region: u64) -> bool {
        let w = &mut self.words[(region / 64) as usize];
        let bit = 1u64 << (region % 64);
        if *w & bit == 0 {
            *w |= bit;
            self.dirty_regions += 1;
            true
        } else {
            false
        }
    }

    /// Region indices touched by `[offset, offset+len)`, clipped to the volume.
    pub fn regions_of(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len).min(self.volume_size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        offset / self.region_size..end.div_ceil(self.region_size)
    }

    /// Mark the regions touched by `[offset, offset+len)` dirty in memory.
    /// Returns true if any dirty bit in memory (this call's or an earlier
    /// one's) is not yet on disk: the caller must then
    /// [`persist`](Self::persist) before acknowledging the write.
    pub fn mark(&mut self, offset: u64, len: u64) -> bool {
        let mut changed = false;
        for r in self.regions_of(offset, len) {
            changed |= self.set(r);
        }
        self.unpersisted |= changed;
        self.pending_sets |= changed;
        self.pending_sets
    }

    /// [`mark`](Self::mark) then [`persist`](Self::persist) if needed; returns
    /// whether the file was written.
    pub fn mark_durable(&mut self, offset: u64, len: u64) -> StoreResult<bool> {
        if self.mark(offset, len) {
            self.persist()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Mark every region dirty (full resync).
    pub fn set_all(&mut self) {
        for r in 0..self.regions {
            self.set(r);
        }
        self.unpersisted = true;
        self.pending_sets = true;
    }

    /// Clear regions (indices) after they were copied to the peer.
    pub fn clear(&mut self, regions: Range<u64>) {
        for r in regions.start..regions.end.min(self.regions) {
            let w = &mut self.words[(r / 64) as usize];
            let bit = 1u64 << (r % 64);
            if *w & bit != 0 {
                *w &= !bit;
                self.dirty_regions -= 1;
                self.unpersisted = true;
            }
        }
    }

    /// A copy of the regions touched by `[offset, offset+len)` to the peer
    /// starts: they read as clean in memory (so a write that fails on the
    /// peer meanwhile marks them dirty again, and that survives the copy),
    /// but stay dirty in the file until [`end_copy`](Self::end_copy).
    pub fn begin_copy(&mut self, offset: u64, len: u64) {
        for r in self.regions_of(offset, len) {
            let i = (r / 64) as usize;
            let bit = 1u64 << (r % 64);
            if self.words[i] & bit != 0 {
                self.words[i] &= !bit;
                self.dirty_regions -= 1;
                self.copying[i] |= bit;
            }
        }
    }

    /// The copy begun by [`begin_copy`](Self::begin_copy) ended: when the
    /// peer acknowledged it (`copied`) the regions may be written as clean
    /// at the next persist; otherwise they are dirty again.
    pub fn end_copy(&mut self, offset: u64, len: u64, copied: bool) {
        for r in self.regions_of(offset, len) {
            let i = (r / 64) as usize;
            let bit = 1u64 << (r % 64);
            if self.copying[i] & bit == 0 {
                continue;
            }
            self.copying[i] &= !bit;
            if copied {
                self.unpersisted = true;
            } else {
                self.set(r);
            }
        }
    }

    /// Clear everything (peer fully caught up).
    pub fn clear_all(&mut self) {
        self.clear(0..self.regions);
    }

    /// Write the bitmap durably if memory changed since the last persist.
    pub fn persist(&mut self) -> StoreResult<()> {
        if self.unpersisted {
            envelope::atomic_write(&self.path, &self.encode())?;
            self.unpersisted = false;
            self.pending_sets = false;
        }
        Ok(())
    }

    /// The file image of the current state (for callers that write it
    /// outside a lock, see [`super::SharedDirtyBitmap`]).
    pub fn encode_file(&self) -> Vec<u8> {
        self.encode()
    }

    /// Record that a file image taken when memory had no further changes
    /// is durable.
    pub(crate) fn mark_persisted(&mut self) {
        self.unpersisted = false;
        self.pending_sets = false;
    }

    /// Dirty byte ranges `(offset, len)`, coalesced, clipped to the volume.
    pub fn dirty_regions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut r = 0u64;
        std::iter::from_fn(move || {
            while r < self.regions && !self.is_dirty(r) {
                // Skip clean words quickly.
                if r.is_multiple_of(64) && self.words[(r / 64) as usize] == 0 {
                    r += 64;
                } else {
                    r += 1;
                }
            }
            if r >= self.regions {
                return None;
            }
            let start = r;
            while r < self.regions && self.is_dirty(r) {
                r += 1;
            }
            let off = start * self.region_size;
            let end = (r * self.region_size).min(self.volume_size);
            Some((off, end - off))
        })
    }

    /// Total dirty bytes (clipped to the volume size).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_regions().map(|(_, l)| l).sum()
    }

    /// Number of dirty regions.
    pub fn dirty_region_count(&self) -> u64 {
        self.dirty_regions
    }

    /// Delete the file (peer removed from the volume). Blocking.
    pub fn remove(path: &Path) -> StoreResult<()> {
        match std::fs::remove_file(path) {
            Ok(()) => envelope::fsync_parent(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(path, "remove", e)),
        }
    }
}
