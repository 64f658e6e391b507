//! `LocalVolume`: one thin volume replica on the local filesystem.
//!
//! ```text
//!  <dir>/
//!    data                 sparse file, exactly `size` bytes
//!    meta                 superblock (name, size, epoch, generation, volume id), crc32c
//!    dirty-<peer>.bitmap  DirtyBitmap per peer replica (optional)
//!    activity.log         ActivityLog (optional)
//!    resync-<peer>.cursor ResyncCursor (optional)
//! ```
//!
//! Invariants:
//! - `meta` is written last on create and removed first on delete, so a
//!   directory with a valid `meta` is a complete volume.
//! - A bad or unknown `meta` is a typed error on open; it is never recreated.
//! - Range checks happen before any I/O ([`BlockError::OutOfRange`]).
//! - ENOSPC/EDQUOT surface as [`BlockError::NoSpace`]; a failed write never
//!   touches bytes outside its own range, so acknowledged data stays intact.
//! - FUA writes, flush, and FUA trims/zeroes return only after fdatasync.
//! - The epoch persisted in `meta` never decreases.
//!
//! Buffered (non-FUA) data writes run on the process's write lane
//! ([`super::write_lane`]); every other blocking file I/O (reads, fdatasync,
//! fallocate) runs on tokio's bounded blocking pool (`spawn_blocking`).

use super::error::{StoreError, StoreResult};
use super::superblock::{Superblock, MAX_VOLUME_NAME_BYTES};
use crate::block::{BlockDevice, BlockError, BlockResult};
use async_trait::async_trait;
use bytes::Bytes;
use metro_quorum::VolumeId;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Name of the data file inside a volume directory.
pub const DATA_FILE: &str = "data";
/// Name of the superblock file inside a volume directory.
pub const META_FILE: &str = "meta";
/// Largest buffer used when zeroes must be written explicitly: big enough to
/// amortise syscalls, small enough not to matter for memory.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// A thin volume replica stored as a sparse file plus a superblock.
/// Cheap to clone (shared state).
#[derive(Clone)]
pub struct LocalVolume {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    data_path: PathBuf,
    data: File,
    size: u64,
    /// Serialises superblock rewrites and holds the current copy.
    sb: Mutex<Superblock>,
}

impl std::fmt::Debug for LocalVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalVolume").field("dir", &self.inner.dir).field("size", &self.inner.size).finish()
    }
}

impl LocalVolume {
    /// Create a new volume replica in `dir` (created if missing). Fails with
    /// [`StoreError::AlreadyExists`] if `dir` already holds a `meta`.
    /// Blocking: call at setup or from `spawn_blocking`.
    pub fn create(dir: &Path, name: &str, size: u64) -> StoreResult<LocalVolume> {
        Self::create_identified(dir, name, size, VolumeId::LEGACY)
    }

    /// [`LocalVolume::create`] for the volume with id `id` (in the superblock).
    pub fn create_identified(dir: &Path, name: &str, size: u64, id: VolumeId) -> StoreResult<LocalVolume> {
        if name.is_empty() || name.len() > MAX_VOLUME_NAME_BYTES {
            return Err(StoreError::InvalidArgument(format!(
                "volume name must be 1..={MAX_VOLUME_NAME_BYTES} bytes, got {}",
                name.len()
            )));
        }
        if size == 0 || size > i64::MAX as u64 {
            return Err(StoreError::InvalidArgument(format!("volume size {size} out of range")));
        }
        let meta = dir.join(META_FILE);
        if meta.exists() {
            return Err(StoreError::AlreadyExists { path: meta });
        }
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, "create directory", e))?;
        super::envelope::fsync_parent(dir)?;
        let data_path = dir.join(DATA_FILE);
        // A `data` without `meta` is the leftover of an interrupted create:
        // it never held acknowledged data, so truncating it is safe.
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(|e| StoreError::io(&data_path, "create", e))?;
        data.set_len(size).map_err(|e| StoreError::io(&data_path, "set length of", e))?;
        data.sync_all().map_err(|e| StoreError::io(&data_path, "fsync", e))?;
        let sb = Superblock { name: name.to_string(), size, epoch: 0, generation: 0, id };
        sb.store(&meta)?;
        Self::open(dir)
    }

    /// Open an existing volume replica. Blocking.
    pub fn open(dir: &Path) -> StoreResult<LocalVolume> {
        let meta = dir.join(META_FILE);
        let sb = Superblock::load(&meta)?;
        let data_path = dir.join(DATA_FILE);
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(|e| StoreError::io(&data_path, "open", e))?;
        let len = data.metadata().map_err(|e| StoreError::io(&data_path, "stat", e))?.len();
        if len != sb.size {
            return Err(StoreError::Corrupt {
                path: data_path,
                what: format!("data file is {len} bytes but the superblock says {}", sb.size),
            });
        }
        Ok(LocalVolume {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                data_path,
                data,
                size: sb.size,
                sb: Mutex::new(sb),
            }),
        })
    }

    /// Remove a volume replica directory: `meta` first (so a crash leaves a
    /// directory that no longer opens as a volume), then everything. Blocking.
    pub fn delete(dir: &Path) -> StoreResult<()> {
        let meta = dir.join(META_FILE);
        match std::fs::remove_file(&meta) {
            Ok(()) => super::envelope::fsync_dir(dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&meta, "remove", e)),
        }
        std::fs::remove_dir_all(dir).map_err(|e| StoreError::io(dir, "remove directory", e))?;
        super::envelope::fsync_parent(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }
    /// Where the dirty bitmap for peer replica `peer` (a node id) lives.
    pub fn dirty_bitmap_path(&self, peer: &str) -> PathBuf {
        self.inner.dir.join(format!("dirty-{peer}.bitmap"))
    }
    /// Where this volume's activity log lives.
    pub fn activity_log_path(&self) -> PathBuf {
        self.inner.dir.join("activity.log")
    }
    /// Where the resync cursor toward peer replica `peer` lives.
    pub fn resync_cursor_path(&self, peer: &str) -> PathBuf {
        self.inner.dir.join(format!("resync-{peer}.cursor"))
    }
    pub fn name(&self) -> String {
        self.lock_sb().name.clone()
    }
    /// A copy of the current superblock.
    pub fn superblock(&self) -> Superblock {
        self.lock_sb().clone()
    }
    pub fn epoch(&self) -> u64 {
        self.lock_sb().epoch
    }
    pub fn generation(&self) -> u64 {
        self.lock_sb().generation
    }
    /// The id of the volume this replica belongs to.
    pub fn id(&self) -> VolumeId {
        self.lock_sb().id
    }

    /// Adopt a replica written before volume ids (`LEGACY`) as volume `id`:
    /// rewrite its superblock in the current format. Refuses to change an id
    /// that is already set. Blocking.
    pub fn adopt_id(&self, id: VolumeId) -> StoreResult<()> {
        let mut sb = self.lock_sb();
        if sb.id == id {
            return Ok(());
        }
        if !sb.id.is_legacy() {
            return Err(StoreError::InvalidArgument(format!(
                "replica already belongs to volume id {}",
                sb.id
            )));
        }
        let mut next = sb.clone();
        next.id = id;
        next.store(&self.inner.dir.join(META_FILE))?;
        *sb = next;
        Ok(())
    }

    /// Durably record `epoch`. Refuses to lower it (fencing, invariant 2);
    /// setting the current value again is a no-op.
    pub async fn set_epoch(&self, epoch: u64) -> StoreResult<()> {
        self.update_sb(move |sb| {
            if epoch < sb.epoch {
                return Err(StoreError::InvalidArgument(format!(
                    "epoch may not go backwards: current {}, requested {epoch}",
                    sb.epoch
                )));
            }
            let changed = epoch != sb.epoch;
            sb.epoch = epoch;
            Ok(changed)
        })
        .await
    }

    /// Durably record a new data generation (see [`Superblock::generation`]).
    pub async fn set_generation(&self, generation: u64) -> StoreResult<()> {
        self.update_sb(move |sb| {
            let changed = sb.generation != generation;
            sb.generation = generation;
            Ok(changed)
        })
        .await
    }

    async fn update_sb(
        &self,
        f: impl FnOnce(&mut Superblock) -> StoreResult<bool> + Send + 'static,
    ) -> StoreResult<()> {
        let inner = self.inner.clone();
        let meta = inner.dir.join(META_FILE);
        crate::rt::blocking(move || {
            // Holding the lock across the rewrite serialises writers and
            // keeps memory and disk in the same order.
            let mut sb = inner.sb.lock().unwrap_or_else(|p| p.into_inner());
            let mut next = sb.clone();
            if f(&mut next)? {
                next.store(&meta)?;
                *sb = next;
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::io(&self.inner.dir, "join blocking task", std::io::Error::other(e)))?
    }

    fn lock_sb(&self) -> std::sync::MutexGuard<'_, Superblock> {
        self.inner.sb.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes actually allocated on disk (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> StoreResult<u64> {
        let md = self.inner.data.metadata().map_err(|e| StoreError::io(&self.inner.data_path, "stat", e))?;
        Ok(md.blocks() * 512)
    }

    /// Ranges `(offset, len)` within `[offset, offset+len)` that may hold data,
    /// found with SEEK_DATA/SEEK_HOLE. Everything outside them reads as zero.
    /// The filesystem may report zero-filled blocks as data, never the reverse.
    /// Blocking (metadata only; cheap).
    pub fn data_ranges(&self, offset: u64, len: u64) -> StoreResult<Vec<(u64, u64)>> {
        let end = offset.saturating_add(len).min(self.inner.size);
        let fd = self.inner.data.as_raw_fd();
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let d = match lseek(fd, pos, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
                Err(e) => return Err(StoreError::io(&self.inner.data_path, "SEEK_DATA in", e)),
            };
            if d >= end {
                break;
            }
            let h = lseek(fd, d, libc::SEEK_HOLE)
                .map_err(|e| StoreError::io(&self.inner.data_path, "SEEK_HOLE in", e))?;
            let stop = h.min(end);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == d => last.1 += stop - d,
                _ => out.push((d, stop - d)),
            }
            pos = h.max(d + 1);
        }
        Ok(out)
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.inner.size => Ok(()),
            _ => Err(BlockError::OutOfRange { offset, len, size: self.inner.size }),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> std::io::Result<T> + Send + 'static,
    ) -> BlockResult<T> {
        let inner = self.inner.clone();
        match crate::rt::blocking(move || f(&inner)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(e)),
            Err(join) => Err(BlockError::Io(std::io::Error::other(join))),
        }
    }

    async fn zero_range(&self, offset: u64, len: u32, fua: bool, punch: bool) -> BlockResult<()> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(());
        }
        self.blocking(move |inner| {
            let fd = inner.data.as_raw_fd();
            let done = if punch {
                try_fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len as u64)?
            } else {
                try_fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len as u64)?
            };
            if !done {
                write_zeroes_explicitly(&inner.data, offset, len as u64)?;
            }
            if fua {
                inner.data.sync_data()?;
            }
            Ok(())
        })
        .await
    }
}

/// ENOSPC/EDQUOT → NoSpace, anything else → Io.
fn classify(e: std::io::Error) -> BlockError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => BlockError::NoSpace,
        _ => BlockError::Io(e),
    }
}

fn lseek(fd: libc::c_int, pos: u64, whence: libc::c_int) -> std::io::Result<u64> {
    // SAFETY: lseek on a valid fd owned by `Inner`; no memory is touched.
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// `Ok(false)` when the filesystem does not support this fallocate mode.
fn try_fallocate(fd: libc::c_int, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<bool> {
    // SAFETY: fallocate on a valid fd; no memory is touched.
    let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
        _ => Err(e),
    }
}

fn write_zeroes_explicitly(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; (len as usize).min(ZERO_CHUNK_BYTES)];
    let mut pos = 0u64;
    while pos < len {
        let n = ((len - pos) as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], offset + pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[async_trait]
impl BlockDevice for LocalVolume {
    fn size(&self) -> u64 {
        self.inner.size
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.check_range(offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        self.blocking(move |inner| {
            let mut buf = vec![0u8; len as usize];
            inner.data.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() && !fua {
            return Ok(());
        }
        if !fua {
            let inner = self.inner.clone();
            return match super::write_lane::run(move || inner.data.write_all_at(&data, offset)).await {
                Ok(r) => r.map_err(classify),
                Err(e) => Err(BlockError::Io(e)),
            };
        }
        self.blocking(move |inner| {
            inner.data.write_all_at(&data, offset)?;
            inner.data.sync_data()?;
            Ok(())
        })
        .await
    }

    /// Every range in one job on the write lane (one hand-off for the lot):
    /// the replica applies a whole received batch this way.
    async fn write_batch(&self, writes: Vec<(u64, Bytes)>) -> Vec<BlockResult<()>> {
        let n = writes.len();
        let mut out: Vec<Option<BlockResult<()>>> = Vec::with_capacity(n);
        let mut todo = Vec::with_capacity(n);
        for (i, (offset, data)) in writes.into_iter().enumerate() {
            match self.check_range(offset, data.len() as u64) {
                Ok(()) => {
                    out.push(None);
                    todo.push((i, offset, data));
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let inner = self.inner.clone();
        let done = super::write_lane::run(move || {
            todo.into_iter()
                .map(|(i, offset, data)| (i, inner.data.write_all_at(&data, offset)))
                .collect::<Vec<_>>()
        })
        .await;
        match done {
            Ok(results) => {
                for (i, r) in results {
                    out[i] = Some(r.map_err(classify));
                }
            }
            Err(join) => {
                for slot in out.iter_mut().filter(|s| s.is_none()) {
                    *slot = Some(Err(BlockError::Io(std::io::Error::other(join.to_string()))));
                }
            }
        }
        out.into_iter().map(|r| r.expect("every slot filled")).collect()
    }

    async fn flush(&self) -> BlockResult<()> {
        self.blocking(|inner| inner.data.sync_data()).await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BlockResult<()> {
        self.zero_range(offset, len, fua, true).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool, may_punch: bool) -> BlockResult<()> {
        self.zero_range(offset, len, fua, may_punch).await
    }
}
