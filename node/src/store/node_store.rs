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
//! - Identity (DESIGN.md §3, "the volume's unique id"): a replica is opened
//!   as volume `name` only when its superblock holds the committed
//!   [`VolumeId`] ([`NodeStore::open_identified`], [`judge_id`]). A
//!   directory of an *earlier* volume of that name (deleted while this node
//!   was down) is removed and a fresh, all-zero replica created; one of a
//!   *later* volume (this node's state is behind) or of a foreign one is
//!   refused, never removed. A replica from before ids (`LEGACY`) is adopted:
//!   its superblock is rewritten with the committed id.

use super::error::{StoreError, StoreResult};
use super::local_volume::{LocalVolume, DATA_FILE, META_FILE};
use super::superblock::{Superblock, MAX_VOLUME_NAME_BYTES};
use metro_quorum::VolumeId;
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

/// What to do with a replica directory whose superblock holds `found` when
/// the committed volume of that name has id `committed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdVerdict {
    /// The replica of this volume (or the committed volume predates ids).
    Same,
    /// Written before ids: adopt it as the committed volume.
    Adopt,
    /// An earlier volume of the same name (deleted since): remove it.
    Stale,
    /// A later volume than the committed one: this node's state is behind.
    Later,
    /// Same serial, other nonce: not ours to judge.
    Foreign,
}

/// Judge a replica's id against the committed one (pure; see [`IdVerdict`]).
pub fn judge_id(found: VolumeId, committed: VolumeId) -> IdVerdict {
    if found == committed || committed.is_legacy() {
        IdVerdict::Same
    } else if found.is_legacy() {
        IdVerdict::Adopt
    } else if found.serial < committed.serial {
        IdVerdict::Stale
    } else if found.serial > committed.serial {
        IdVerdict::Later
    } else {
        IdVerdict::Foreign
    }
}

/// Is a replica with id `found` whose name the committed state no longer
/// holds certainly left over from a deleted volume? `highest_serial` is the
/// highest serial the state has allocated: a volume with a serial up to it
/// was created before the state's point in the log, so its absence means it
/// was deleted; a later serial means the state is behind (keep it). A
/// `LEGACY` replica predates every serial, so any allocated serial proves
/// the state is past its creation.
pub fn deleted_since(found: VolumeId, highest_serial: u64) -> bool {
    if found.is_legacy() {
        highest_serial > 0
    } else {
        found.serial <= highest_serial
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
        self.create_identified(name, size, VolumeId::LEGACY)
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

    /// Open the replica of the committed volume `name` with id `id`, or
    /// create an empty one (size `size`) if there is none. A directory left
    /// by an earlier volume of that name is removed first (logged); a later
    /// or foreign one is an error ([`StoreError::LaterVolume`],
    /// [`StoreError::ForeignVolume`]); a `LEGACY` one is adopted. Blocking.
    pub fn open_identified(&self, name: &str, size: u64, id: VolumeId) -> StoreResult<LocalVolume> {
        let dir = self.volume_dir(name)?;
        let vol = match self.open_volume(name) {
            Ok(v) => v,
            Err(StoreError::NotFound { .. }) => return self.create_identified(name, size, id),
            Err(e) => return Err(e),
        };
        let found = vol.id();
        match judge_id(found, id) {
            IdVerdict::Same => Ok(vol),
            IdVerdict::Adopt => {
                tracing::info!(volume = %name, %id, "replica from before volume ids: adopting it as the committed volume");
                vol.adopt_id(id)?;
                Ok(vol)
            }
            IdVerdict::Stale => {
                tracing::warn!(volume = %name, found = %found, committed = %id, dir = %dir.display(),
                    "REMOVING the replica of an earlier, deleted volume of the same name (deleted while this node was away); the new volume starts empty");
                drop(vol);
                self.delete_volume(name)?;
                self.create_identified(name, size, id)
            }
            IdVerdict::Later => {
                Err(StoreError::LaterVolume { path: dir, found: found.to_string(), wanted: id.to_string() })
            }
            IdVerdict::Foreign => {
                Err(StoreError::ForeignVolume { path: dir, found: found.to_string(), wanted: id.to_string() })
            }
        }
    }

    fn create_identified(&self, name: &str, size: u64, id: VolumeId) -> StoreResult<LocalVolume> {
        let dir = self.volume_dir(name)?;
        let capacity = self.capacity_bytes()?;
        if size > capacity {
            return Err(StoreError::CapacityExceeded { requested: size, capacity });
        }
        let mut open = self.lock();
        let vol = LocalVolume::create_identified(&dir, name, size, id)?;
        open.insert(name.to_string(), vol.clone());
        Ok(vol)
    }

    /// `(name, id)` of every local replica with a readable superblock.
    pub fn identities(&self) -> StoreResult<Vec<(String, VolumeId)>> {
        let mut out = Vec::new();
        for name in self.list()? {
            if let Some(v) = self.lock().get(&name) {
                out.push((name, v.id()));
                continue;
            }
            match Superblock::load(&self.volumes_dir.join(&name).join(META_FILE)) {
                Ok(sb) => out.push((name, sb.id)),
                Err(e) => tracing::warn!(volume = %name, error = %e, "cannot read the superblock"),
            }
        }
        Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    const A: VolumeId = VolumeId { serial: 1, nonce: 11 };
    const B: VolumeId = VolumeId { serial: 2, nonce: 22 };

    #[test]
    fn ids_are_judged_by_serial() {
        assert_eq!(judge_id(A, A), IdVerdict::Same);
        assert_eq!(judge_id(A, VolumeId::LEGACY), IdVerdict::Same);
        assert_eq!(judge_id(VolumeId::LEGACY, A), IdVerdict::Adopt);
        assert_eq!(judge_id(A, B), IdVerdict::Stale);
        assert_eq!(judge_id(B, A), IdVerdict::Later);
        assert_eq!(judge_id(A, VolumeId { serial: 1, nonce: 12 }), IdVerdict::Foreign);
        assert!(deleted_since(A, 1) && !deleted_since(B, 1));
        assert!(deleted_since(VolumeId::LEGACY, 1) && !deleted_since(VolumeId::LEGACY, 0));
    }

    #[test]
    fn a_legacy_replica_is_adopted_and_an_earlier_volume_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = NodeStore::open(dir.path(), Some(1 << 30)).unwrap();
        store.create_volume("v", 1 << 20).unwrap();
        let v = store.open_identified("v", 1 << 20, A).unwrap();
        assert_eq!(v.id(), A);
        assert_eq!(
            Superblock::load(&dir.path().join("volumes/v/meta")).unwrap().id,
            A,
            "adoption not durable"
        );
        let later = store.open_identified("v", 1 << 20, B).unwrap();
        assert_eq!(later.id(), B);
        let e = store.open_identified("v", 1 << 20, A).unwrap_err();
        assert!(matches!(e, StoreError::LaterVolume { .. }), "{e:?}");
        assert_eq!(store.identities().unwrap(), vec![("v".to_string(), B)]);
    }
}
