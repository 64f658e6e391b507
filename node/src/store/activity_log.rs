//! `ActivityLog`: the extents a primary may have written without every
//! replica acknowledging (DESIGN.md section 3, "Activity log").
//!
//! ```text
//!  seq = begin_write(off,len) ── extent already hot? ──yes──► write
//!                                   └─no─► add (evict a flushed LRU extent
//!                                          if full) ─► persist ─► write
//!  flush completed on all in-sync replicas ─► mark_flushed(seq_before_flush)
//!  restart after crash ─► open() ─► hot_extents() ─► add to resync set
//!                                 ─► clear_recovered() once that is recorded
//! ```
//!
//! File: the common envelope (magic `MTROACT1`, version 1, crc32c) around
//! `volume_size: u64, extent_size: u64, count: u32, extent_index: [u64]`.
//!
//! Invariants:
//! - An extent is in the file before any write into it is issued.
//! - An extent leaves the hot set only by eviction or [`ActivityLog::cool_down`],
//!   and only if every write into it has a sequence number at or below the
//!   last [`ActivityLog::mark_flushed`] value (durable on every replica).
//! - The hot set is bounded by `max_hot`; when every hot extent is unflushed
//!   the log refuses with [`StoreError::ActivityLogFull`] rather than grow.
//! - A file that fails its checksum makes every extent hot (full resync),
//!   reported through [`AlOutcome::AllHot`]; it is never silently trusted.

use super::envelope::{self, Dec, Enc};
use super::error::{StoreError, StoreResult};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

pub const ACTIVITY_MAGIC: &[u8; 8] = b"MTROACT1";
pub const ACTIVITY_VERSION: u32 = 1;
/// Default extent size (DESIGN.md section 7).
pub const DEFAULT_EXTENT_BYTES: u64 = 4 << 20;
/// Default bound on hot extents: 1024 x 4 MiB = 4 GiB to resync after a
/// primary crash at most, while a random-write workload rarely evicts.
pub const DEFAULT_MAX_HOT_EXTENTS: usize = 1024;

/// How the log came back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlOutcome {
    /// No file: a fresh log.
    Fresh,
    /// The file was intact; its extents are the recovered set.
    Intact,
    /// The file could not be trusted: every extent is recovered as hot.
    AllHot { reason: String },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_write_seq: u64,
    last_use: u64,
    /// `version` when the extent was added; durable once `durable_version`
    /// reaches it.
    added_version: u64,
}

/// Result of [`ActivityLog::note_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotedWrite {
    /// The write's sequence number (for [`ActivityLog::mark_flushed`]).
    pub seq: u64,
    /// The write may be issued once [`ActivityLog::durable_version`] is at
    /// least this.
    pub needs_version: u64,
}

/// Persistent, bounded set of hot extents.
#[derive(Debug)]
pub struct ActivityLog {
    path: PathBuf,
    volume_size: u64,
    extent_size: u64,
    max_hot: usize,
    hot: HashMap<u64, Entry>,
    /// Extents found in the file at open; kept on disk until cleared.
    recovered: BTreeSet<u64>,
    seq: u64,
    flushed_upto: u64,
    tick: u64,
    /// Bumped by every change of the on-disk set.
    version: u64,
    /// Highest version known to be in the file.
    durable_version: u64,
}

impl ActivityLog {
    /// Open the log at `path`, creating it if missing.
    pub fn open(
        path: &Path,
        volume_size: u64,
        extent_size: u64,
        max_hot: usize,
    ) -> StoreResult<(ActivityLog, AlOutcome)> {
        if extent_size == 0 || !extent_size.is_power_of_two() || max_hot == 0 {
            return Err(StoreError::InvalidArgument(format!(
                "activity log extent size {extent_size} must be a power of two and max_hot {max_hot} > 0"
            )));
        }
        let mut log = ActivityLog {
            path: path.to_path_buf(),
            volume_size,
            extent_size,
            max_hot,
            hot: HashMap::new(),
            recovered: BTreeSet::new(),
            seq: 0,
            flushed_upto: 0,
            tick: 0,
            version: 0,
            durable_version: 0,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                log.persist()?;
                return Ok((log, AlOutcome::Fresh));
            }
            Err(e) => return Err(StoreError::io(path, "read activity log", e)),
        };
        match log.decode(&bytes) {
            Ok(set) => {
                log.recovered = set;
                Ok((log, AlOutcome::Intact))
            }
            Err(e @ StoreError::UnsupportedVersion { .. }) => Err(e),
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(path = %path.display(), %reason, "activity log untrusted; every extent is hot (full resync)");
                log.recovered = (0..log.extent_count()).collect();
                log.version += 1;
                log.persist()?;
                Ok((log, AlOutcome::AllHot { reason }))
            }
        }
    }

    fn extent_count(&self) -> u64 {
        self.volume_size.div_ceil(self.extent_size)
    }

    fn decode(&self, bytes: &[u8]) -> StoreResult<BTreeSet<u64>> {
        let payload = envelope::decode(&self.path, ACTIVITY_MAGIC, ACTIVITY_VERSION, bytes)?;
        let mut d = Dec::new(&self.path, payload);
        let (vs, es) = (d.u64()?, d.u64()?);
        if vs != self.volume_size || es != self.extent_size {
            return Err(d.corrupt(format!(
                "geometry mismatch: file has volume {vs} B / extent {es} B, expected {} / {}",
                self.volume_size, self.extent_size
            )));
        }
        let n = d.u32()?;
        let mut set = BTreeSet::new();
        for _ in 0..n {
            let idx = d.u64()?;
            if idx >= self.extent_count() {
                return Err(d.corrupt(format!("extent index {idx} past the end of the volume")));
            }
            set.insert(idx);
        }
        d.finish()?;
        Ok(set)
    }

    fn persist(&mut self) -> StoreResult<()> {
        let (image, version) = self.encode_file();
        envelope::atomic_write(&self.path, &image)?;
        self.set_durable(version);
        Ok(())
    }

    /// The file image of the current set and the version it represents
    /// (for callers that write it outside a lock, see
    /// [`super::SharedActivityLog`]).
    pub fn encode_file(&self) -> (Vec<u8>, u64) {
        let all: BTreeSet<u64> = self.recovered.iter().copied().chain(self.hot.keys().copied()).collect();
        let mut e = Enc::default();
        e.u64(self.volume_size).u64(self.extent_size).u32(all.len() as u32);
        for idx in all {
            e.u64(idx);
        }
        (envelope::encode(ACTIVITY_MAGIC, ACTIVITY_VERSION, &e.0), self.version)
    }

    /// Record that the image of `version` is durable.
    pub fn set_durable(&mut self, version: u64) {
        self.durable_version = self.durable_version.max(version);
    }

    /// Highest version known to be in the file.
    pub fn durable_version(&self) -> u64 {
        self.durable_version
    }

    fn extents_of(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let end = offset.saturating_add(len).min(self.volume_size);
        if len == 0 || offset >= end {
            return 0..0;
        }
        offset / self.extent_size..end.div_ceil(self.extent_size)
    }

    /// Call before issuing a write (or trim/zeroes) to `[offset, offset+len)`.
    /// Makes its extents hot, durably if any was cold. Returns the write's
    /// sequence number for [`mark_flushed`](Self::mark_flushed). Blocking
    /// when it persists; async callers use [`super::SharedActivityLog`].
    pub fn begin_write(&mut self, offset: u64, len: u64) -> StoreResult<u64> {
        let noted = self.note_write(offset, len)?;
        if self.durable_version < noted.needs_version {
            if let Err(e) = self.persist() {
                // Not durable: forget the new extents so a retry persists again.
                let durable = self.durable_version;
                self.hot.retain(|_, e| e.added_version <= durable);
                return Err(e);
            }
        }
        Ok(noted.seq)
    }

    /// Would a write to `[offset, offset+len)` be refused with
    /// [`StoreError::ActivityLogFull`] right now (no flushed extent to evict)?
    pub fn would_be_full(&self, offset: u64, len: u64) -> bool {
        let range = self.extents_of(offset, len);
        let new = range.clone().filter(|e| !self.hot.contains_key(e)).count();
        let need = (self.hot.len() + new).saturating_sub(self.max_hot);
        need > 0
            && self
                .hot
                .iter()
                .filter(|(idx, e)| {
                    e.last_write_seq <= self.flushed_upto
                        && e.added_version <= self.durable_version
                        && !range.contains(*idx)
                })
                .count()
                < need
    }

    /// The in-memory half of [`begin_write`](Self::begin_write): make the
    /// extents hot (evicting flushed ones if the set is full) without
    /// writing the file. The write may be issued only once the file holds
    /// version `needs_version` (see [`encode_file`](Self::encode_file),
    /// [`set_durable`](Self::set_durable)).
    pub fn note_write(&mut self, offset: u64, len: u64) -> StoreResult<NotedWrite> {
        let range = self.extents_of(offset, len);
        let new = range.clone().filter(|e| !self.hot.contains_key(e)).count();
        let need = (self.hot.len() + new).saturating_sub(self.max_hot);
        let mut victims = Vec::new();
        if need > 0 {
            let mut cold: Vec<(u64, u64)> = self
                .hot
                .iter()
                .filter(|(idx, e)| {
                    e.last_write_seq <= self.flushed_upto
                        && e.added_version <= self.durable_version
                        && !range.contains(*idx)
                })
                .map(|(idx, e)| (e.last_use, *idx))
                .collect();
            if cold.len() < need {
                return Err(StoreError::ActivityLogFull { hot: self.hot.len() });
            }
            cold.sort_unstable();
            victims.extend(cold.into_iter().take(need).map(|(_, idx)| idx));
        }
        self.seq += 1;
        self.tick += 1;
        if new > 0 || !victims.is_empty() {
            self.version += 1;
        }
        let (seq, tick, version) = (self.seq, self.tick, self.version);
        for v in &victims {
            self.hot.remove(v);
        }
        let mut needs_version = 0;
        for idx in range {
            let e = self.hot.entry(idx).or_insert(Entry {
                last_write_seq: seq,
                last_use: tick,
                added_version: version,
            });
            e.last_write_seq = seq;
            e.last_use = tick;
            needs_version = needs_version.max(e.added_version);
        }
        Ok(NotedWrite { seq, needs_version })
    }

    /// Sequence number of the latest [`begin_write`](Self::begin_write).
    pub fn current_seq(&self) -> u64 {
        self.seq
    }

    /// Every write with a sequence number `<= durable_upto_seq` is complete
    /// and durable on every in-sync replica (a flush finished after they all
    /// completed). Their extents may now cool.
    pub fn mark_flushed(&mut self, durable_upto_seq: u64) {
        self.flushed_upto = self.flushed_upto.max(durable_upto_seq.min(self.seq));
    }

    /// Drop every flushed extent from the hot set and persist (e.g. on a
    /// clean shutdown). Returns how many extents cooled.
    pub fn cool_down(&mut self) -> StoreResult<usize> {
        let cooled = self.cool_in_memory();
        if cooled > 0 {
            self.persist()?;
        }
        Ok(cooled)
    }

    /// The in-memory half of [`cool_down`](Self::cool_down).
    pub fn cool_in_memory(&mut self) -> usize {
        let before = self.hot.len();
        let (upto, durable) = (self.flushed_upto, self.durable_version);
        self.hot.retain(|_, e| e.last_write_seq > upto || e.added_version > durable);
        let cooled = before - self.hot.len();
        if cooled > 0 {
            self.version += 1;
        }
        cooled
    }

    /// Extents `(offset, len)` that may hold writes not on every replica:
    /// recovered from the file at open, plus currently hot. Coalesced, sorted.
    pub fn hot_extents(&self) -> Vec<(u64, u64)> {
        let all: BTreeSet<u64> = self.recovered.iter().copied().chain(self.hot.keys().copied()).collect();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for idx in all {
            let off = idx * self.extent_size;
            let len = self.extent_size.min(self.volume_size - off);
            match out.last_mut() {
                Some(l) if l.0 + l.1 == off => l.1 += len,
                _ => out.push((off, len)),
            }
        }
        out
    }

    /// Extents recovered from the file at open (a crash left them hot).
    pub fn recovered_extents(&self) -> usize {
        self.recovered.len()
    }

    /// Number of extents currently hot (excluding recovered ones).
    pub fn hot_count(&self) -> usize {
        self.hot.len()
    }

    /// Forget the recovered set, once the caller has durably added it to
    /// its resync set (e.g. the peers' dirty bitmaps).
    pub fn clear_recovered(&mut self) -> StoreResult<()> {
        if self.forget_recovered_in_memory() {
            self.persist()?;
        }
        Ok(())
    }

    /// The in-memory half of [`clear_recovered`](Self::clear_recovered);
    /// true if anything changed.
    pub fn forget_recovered_in_memory(&mut self) -> bool {
        if self.recovered.is_empty() {
            return false;
        }
        self.recovered.clear();
        self.version += 1;
        true
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn extent_size(&self) -> u64 {
        self.extent_size
    }
}
