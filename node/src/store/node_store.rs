//! `NodeStore`: every volume replica under one node data directory, with
//! capacity accounting.
//!
//! ```text
//!  <data_dir>/volumes/<volume name>/{data,meta,...}   (see LocalVolume)
//! ```
//!
//! Invariants:
//! - One [`LocalVolume`] instance per volume per process (cached), so the
//!   superblock has a single writer.
//! - Volume names are `[A-Za-z0-9._-]`, 1..=200 bytes, not starting with
//!   `.`: they are directory names and never escape `volumes/`.
//! - Admission (kept simple on purpose): a volume is refused when its thin
//!   size exceeds [`NodeStore::capacity_bytes`]. Many thin volumes together
//!   may overcommit; ENOSPC then surfaces per write as `NoSpace`.
//! - On open, a directory without `meta` (interrupted create or delete,
//!   never acknowledged data) is removed; one with a bad `meta` is kept and
//!   reported by [`NodeStore::open_volume`].

use super::error::{StoreError, StoreResult};
use super::local_volume::{LocalVolume, DATA_FILE, META_FILE};
use super::superblock::{Superblock, MAX_VOLUME_NAME_BYTES};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Directory under the data dir holding one directory per volume.
pub const VOLUMES_DIR: &str = "volumes";

/// All volumes of this node.
pub struct NodeStore {
    volumes_dir: PathBuf,
    capacity: Option<u64>,
    open: Mutex<HashMap<String, LocalVolume>>,
}

impl std::fmt::Debug for NodeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeStore").field("volumes_dir", &self.volumes_dir).finish()
    }
}

/// Check a volume name (see module invariants).
pub fn validate_volume_name(name: &str) -> StoreResult<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME_BYTES
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument(format!(
            "volume name `{name}` must be 1..={MAX_VOLUME_NAME_BYTES} characters of [A-Za-z0-9._-], not starting with `.`"
        )))
    }
}

impl NodeStore {
    /// Open (creating if needed) the store under `data_dir`. `capacity_bytes`
    /// overrides the filesystem's free space as the admission bound. Blocking.
    pub fn open(data_dir: &Path, capacity_bytes: Option<u64>) -> StoreResult<NodeStore> {
        let volumes_dir = data_dir.join(VOLUMES_DIR);
        std::fs::create_dir_all(&volumes_dir)
            .map_err(|e| StoreError::io(&volumes_dir, "create directory", e))?;
        let store = NodeStore { volumes_dir, capacity: capacity_bytes, open: Mutex::new(HashMap::new()) };
        for entry in store.read_dir()? {
            let dir = entry.path();
            if dir.is_dir() && !dir.join(META_FILE).exists() {
                tracing::warn!(dir = %dir.display(), "removing volume directory without superblock (interrupted create or delete)");
                std::fs::remove_dir_all(&dir).map_err(|e| StoreError::io(&dir, "remove directory", e))?;
            }
        }
        Ok(store)
    }

    fn read_dir(&self) -> StoreResult<Vec<std::fs::DirEntry>> {
        std::fs::read_dir(&self.volumes_dir)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| StoreError::io(&self.volumes_dir, "list", e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalVolume>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Directory of volume `name` (whether or not it exists).
    pub fn volume_dir(&self, name: &str) -> StoreResult<PathBuf> {
        validate_volume_name(name)?;
        Ok(self.volumes_dir.join(name))
    }

    /// Create a volume replica. Blocking.
    pub fn create_volume(&self, name: &str, size: u64) -> StoreResult<LocalVolume> {
        let dir = self.volume_dir(name)?;
        let capacity = self.capacity_bytes()?;
        if size > capacity {
            return Err(StoreError::CapacityExceeded { requested: size, capacity });
        }
        let mut open = self.lock();
        let vol = LocalVolume::create(&dir, name, size)?;
        open.insert(name.to_string(), vol.clone());
        Ok(vol)
    }

    /// Open a volume replica (shared instance). Blocking on first open.
    pub fn open_volume(&self, name: &str) -> StoreResult<LocalVolume> {
        let dir = self.volume_dir(name)?;
        let mut open = self.lock();
        if let Some(v) = open.get(name) {
            return Ok(v.clone());
        }
        if !dir.exists() {
            return Err(StoreError::NotFound { path: dir });
        }
        let vol = LocalVolume::open(&dir)?;
        open.insert(name.to_string(), vol.clone());
        Ok(vol)
    }

    /// Delete a volume replica and everything beside it (bitmaps, logs,
    /// cursors). Callers must have stopped I/O to it. Blocking.
    pub fn delete_volume(&self, name: &str) -> StoreResult<()> {
        let dir = self.volume_dir(name)?;
        let mut open = self.lock();
        if !dir.exists() {
            return Err(StoreError::NotFound { path: dir });
        }
        LocalVolume::delete(&dir)?;
        open.remove(name);
        Ok(())
    }

    /// Names of every volume with a superblock, sorted.
    pub fn list(&self) -> StoreResult<Vec<String>> {
        let mut names: Vec<String> = self
            .read_dir()?
            .into_iter()
            .filter(|e| e.path().join(META_FILE).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Admission bound: the configured capacity, else the filesystem's
    /// space available to us (statvfs `f_bavail * f_frsize`).
    pub fn capacity_bytes(&self) -> StoreResult<u64> {
        match self.capacity {
            Some(c) => Ok(c),
            None => self.fs_available_bytes(),
        }
    }

    /// Free space of the filesystem holding the store (statvfs).
    pub fn fs_available_bytes(&self) -> StoreResult<u64> {
        statvfs_available(&self.volumes_dir)
    }

    /// Bytes allocated on disk by all volumes' data files.
    pub fn used_bytes(&self) -> StoreResult<u64> {
        let mut used = 0;
        for name in self.list()? {
            let p = self.volumes_dir.join(name).join(DATA_FILE);
            match std::fs::metadata(&p) {
                Ok(md) => used += md.blocks() * 512,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(&p, "stat", e)),
            }
        }
        Ok(used)
    }

    /// Sum of the thin sizes of all volumes (what they could grow to).
    pub fn provisioned_bytes(&self) -> StoreResult<u64> {
        let mut total = 0;
        for name in self.list()? {
            total += Superblock::load(&self.volumes_dir.join(name).join(META_FILE))?.size;
        }
        Ok(total)
    }
}

fn statvfs_available(path: &Path) -> StoreResult<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| StoreError::InvalidArgument(format!("path `{}` contains NUL", path.display())))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(StoreError::io(path, "statvfs", std::io::Error::last_os_error()));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
