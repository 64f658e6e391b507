//! [`VolumeStorage`] over the on-disk store (`crate::store`): thin sparse
//! volumes with superblocks, per-peer persistent dirty bitmaps and the
//! activity log. Every mark is durable before it returns.
//!
//! With the test-only `storage.volatile_write_cache`, each opened volume's
//! [`LocalVolume`] is wrapped once in a [`VolatileCache`]; that one instance
//! serves everything (primary and replica paths, resync reads, flushes,
//! `data_ranges`), so `kill -9` loses exactly the unflushed writes.

use super::storage::VolumeStorage;
use crate::block::BlockDevice;
use crate::store::{
    judge_id, ActivityLog, AlOutcome, DirtyBitmap, IdVerdict, LoadOutcome, LocalVolume, NodeStore,
    StoreError, VolatileCache, DEFAULT_VOLATILE_LIMIT_BYTES,
};
use metro_api::config::DaemonConfig;
use metro_quorum::VolumeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Hot extents kept before flushed ones are evicted (4 GiB at 4 MiB extents).
const MAX_HOT_EXTENTS: usize = 1024;

struct Vol {
    /// The replica on disk (superblock, paths, SEEK_DATA).
    local: LocalVolume,
    /// The device every data path uses: `local`, or `cache` over it.
    dev: Arc<dyn BlockDevice>,
    /// Set in the test-only volatile mode.
    cache: Option<Arc<VolatileCache>>,
    size: u64,
    al: Mutex<ActivityLog>,
    bitmaps: Mutex<HashMap<String, DirtyBitmap>>,
    full_resyncs: AtomicU64,
    /// Its copy may lack writes acknowledged from a lost page cache (the
    /// [`CACHE_LOST_MARKER`] file exists).
    suspect: std::sync::atomic::AtomicBool,
}

/// In a volume's directory: this copy lost its page cache since its hot
/// extents were last reconciled. Durable, so that a second restart (a kill
/// after the power cut, before any reconciliation) still knows.
pub const CACHE_LOST_MARKER: &str = "cache-lost";

/// In a volume's directory: the first epoch of the latest primaryship in
/// which this node flushed its copy before serving
/// ([`VolumeStorage::primary_flushed`]).
pub const PRIMARY_FLUSHED: &str = "primary-flushed";
const PRIMARY_FLUSHED_MAGIC: &[u8; 8] = b"METROPFL";

fn write_marker(dir: &std::path::Path) -> std::io::Result<()> {
    let path = dir.join(CACHE_LOST_MARKER);
    let f = std::fs::File::create(&path)?;
    f.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

pub struct FileStorage {
    store: NodeStore,
    region: u64,
    extent: u64,
    vols: Mutex<HashMap<String, Arc<Vol>>>,
    /// This start follows a reboot or power cut (the boot id changed since
    /// the last start on this data directory): unflushed writes are gone.
    cache_lost: std::sync::atomic::AtomicBool,
    /// Test only: wrap every volume in a [`VolatileCache`].
    volatile: bool,
    /// Simulator only: the caches belong to the simulated machine, not to
    /// this process, so they outlive it (a kill keeps them; a power cut
    /// empties them, [`MachineCache::power_cut`]).
    machine: Option<Arc<MachineCache>>,
    /// Activity-log extents kept hot before flushed ones are evicted.
    max_hot: usize,
}

/// The simulated machine's page cache: one [`VolatileCache`] per volume
/// directory and identity, kept across the "process" (a [`FileStorage`])
/// restarting on the same data directory, as the kernel keeps its page cache
/// across a `kill -9`. A power cut loses every pending write in it.
#[derive(Default)]
pub struct MachineCache {
    caches: Mutex<HashMap<(std::path::PathBuf, VolumeId), Arc<VolatileCache>>>,
}

impl MachineCache {
    /// Lose every unflushed write (the machine lost power); returns the
    /// bytes discarded.
    pub fn power_cut(&self) -> u64 {
        let caches: Vec<Arc<VolatileCache>> =
            self.caches.lock().expect("poisoned").drain().map(|(_, c)| c).collect();
        caches.iter().map(|c| c.power_cut().bytes).sum()
    }

    /// Bytes written but not yet flushed, over every volume.
    pub fn pending_bytes(&self) -> u64 {
        self.caches.lock().expect("poisoned").values().map(|c| c.stats().pending_bytes).sum()
    }
}

/// The kernel's boot id (changes on every boot).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Did the page cache go away since the last start on `dir`? Compares the
/// boot id recorded there with this boot's, then records this boot's.
fn cache_lost_since_last_start(dir: &std::path::Path) -> bool {
    let path = dir.join("last-boot-id");
    let now = boot_id();
    let before = std::fs::read_to_string(&path).map(|s| s.trim().to_string()).ok();
    if before.as_deref() != Some(now.as_str()) {
        if let Err(e) = std::fs::write(&path, &now) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the boot id");
        }
    }
    before.is_some_and(|b| b != now)
}

fn io(e: StoreError) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl FileStorage {
    pub fn open(cfg: &DaemonConfig) -> Result<FileStorage, StoreError> {
        let cap = (cfg.storage.capacity_bytes > 0).then_some(cfg.storage.capacity_bytes);
        let store = NodeStore::open(&cfg.data_dir, cap)?;
        if cfg.storage.volatile_write_cache {
            tracing::warn!(
                "storage.volatile_write_cache is on (TEST ONLY): unflushed volume writes live in this \
                 process's memory and a crash loses them like a power cut"
            );
        }
        // In the volatile mode every start follows a "power cut".
        let lost = cache_lost_since_last_start(&cfg.data_dir) || cfg.storage.volatile_write_cache;
        if lost {
            tracing::warn!("the machine rebooted since the last start: unflushed writes here may be lost; volumes this node was primary of move to an in-sync replica first");
        }
        Ok(FileStorage {
            store,
            region: cfg.storage.dirty_region_bytes,
            extent: cfg.storage.activity_extent_bytes,
            vols: Mutex::default(),
            cache_lost: std::sync::atomic::AtomicBool::new(lost),
            volatile: cfg.storage.volatile_write_cache,
            machine: None,
            max_hot: MAX_HOT_EXTENTS,
        })
    }

    /// Over an open store, with dirty-bitmap regions and activity-log
    /// extents of the given sizes (tests; the daemon uses [`FileStorage::open`]).
    pub fn with_store(store: NodeStore, region: u64, extent: u64) -> FileStorage {
        FileStorage {
            store,
            region,
            extent,
            vols: Mutex::default(),
            cache_lost: std::sync::atomic::AtomicBool::new(false),
            volatile: false,
            machine: None,
            max_hot: MAX_HOT_EXTENTS,
        }
    }

    /// Over an open store whose volumes write into `machine`'s page cache
    /// (the simulator: unflushed writes survive this process but not a
    /// power cut of the machine). `cache_lost`: the machine lost power since
    /// the last start on this directory. `max_hot`: activity-log extents kept
    /// hot (a small volume needs a small log, or every extent stays hot).
    pub fn with_machine_cache(
        store: NodeStore,
        (region, extent, max_hot): (u64, u64, usize),
        machine: Arc<MachineCache>,
        cache_lost: bool,
    ) -> FileStorage {
        FileStorage {
            store,
            region,
            extent,
            vols: Mutex::default(),
            cache_lost: std::sync::atomic::AtomicBool::new(cache_lost),
            volatile: true,
            machine: Some(machine),
            max_hot,
        }
    }

    /// Test-only volatile mode: write every pending write of every volume
    /// to disk and fdatasync, as an orderly shutdown syncs the page cache.
    /// A no-op otherwise. Errors are logged (the daemon is stopping).
    pub async fn flush_volatile(&self) {
        let caches: Vec<(String, Arc<VolatileCache>)> = self
            .vols
            .lock()
            .expect("poisoned")
            .iter()
            .filter_map(|(n, v)| v.cache.clone().map(|c| (n.clone(), c)))
            .collect();
        for (name, c) in caches {
            let pending = c.stats().pending_bytes;
            match c.flush().await {
                Ok(()) => tracing::info!(volume = %name, pending, "volatile cache flushed at shutdown"),
                Err(e) => tracing::error!(volume = %name, %e, "volatile cache: flush at shutdown failed"),
            }
        }
    }

    /// Treat this start as one after a power cut (tests and the simulator).
    pub fn assume_cache_lost(&self) {
        self.cache_lost.store(true, Ordering::SeqCst);
    }

    fn vol(&self, name: &str) -> std::io::Result<Arc<Vol>> {
        self.vols.lock().expect("poisoned").get(name).cloned().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("volume {name} not open"))
        })
    }

    fn bitmap<R>(&self, name: &str, peer: &str, f: impl FnOnce(&mut DirtyBitmap) -> R) -> std::io::Result<R> {
        let v = self.vol(name)?;
        let mut maps = v.bitmaps.lock().expect("poisoned");
        if !maps.contains_key(peer) {
            let path = v.local.dirty_bitmap_path(peer);
            let (bm, outcome) = DirtyBitmap::open_or_create(&path, v.size, self.region).map_err(io)?;
            if let LoadOutcome::FullyDirty { reason } = &outcome {
                tracing::warn!(volume = %name, %peer, %reason, "dirty bitmap untrusted: full resync");
                v.full_resyncs.fetch_add(1, Ordering::Relaxed);
            }
            maps.insert(peer.to_string(), bm);
        }
        Ok(f(maps.get_mut(peer).expect("inserted")))
    }
}

impl VolumeStorage for FileStorage {
    fn open_or_create(
        &self,
        name: &str,
        size: u64,
        id: VolumeId,
    ) -> std::io::Result<(Arc<dyn BlockDevice>, u64)> {
        if let Ok(v) = self.vol(name) {
            if judge_id(v.local.id(), id) == IdVerdict::Same {
                return Ok((v.dev.clone(), v.local.epoch()));
            }
            // Another volume of that name is open: judged again below.
            self.vols.lock().expect("poisoned").remove(name);
        }
        let dev = self.store.open_identified(name, size, id).map_err(io)?;
        let (al, outcome) =
            ActivityLog::open(&dev.activity_log_path(), size, self.extent, self.max_hot).map_err(io)?;
        if let AlOutcome::AllHot { reason } = &outcome {
            tracing::warn!(volume = %name, %reason, "activity log untrusted: every extent counts as hot");
        }
        let recovered = al.recovered_extents();
        if recovered > 0 {
            tracing::info!(volume = %name, extents = recovered, "activity log holds hot extents from before a restart");
        }
        let cache = self.volatile.then(|| {
            let fresh = || Arc::new(VolatileCache::new(Arc::new(dev.clone()), DEFAULT_VOLATILE_LIMIT_BYTES));
            match &self.machine {
                Some(m) => {
                    let key = (dev.dir().to_path_buf(), dev.id());
                    m.caches.lock().expect("poisoned").entry(key).or_insert_with(fresh).clone()
                }
                None => {
                    tracing::warn!(volume = %name, "volatile write cache (TEST ONLY): unflushed writes are lost on kill");
                    fresh()
                }
            }
        });
        let shared: Arc<dyn BlockDevice> = match &cache {
            Some(c) => c.clone(),
            None => Arc::new(dev.clone()),
        };
        let epoch = dev.epoch();
        let marker = dev.dir().join(CACHE_LOST_MARKER);
        let suspect = if self.cache_lost.load(Ordering::SeqCst) && !marker.exists() {
            write_marker(dev.dir()).map_err(|e| {
                std::io::Error::other(format!("recording the lost page cache at {}: {e}", marker.display()))
            })?;
            true
        } else {
            marker.exists()
        };
        if suspect && recovered > 0 {
            tracing::warn!(volume = %name, extents = recovered, "this copy lost its page cache since its hot extents were last reconciled: they may lack acknowledged writes");
        }
        let v = Arc::new(Vol {
            suspect: std::sync::atomic::AtomicBool::new(suspect),
            size: dev.superblock().size,
            local: dev,
            dev: shared.clone(),
            cache,
            al: Mutex::new(al),
            bitmaps: Mutex::default(),
            full_resyncs: AtomicU64::new(0),
        });
        self.vols.lock().expect("poisoned").insert(name.to_string(), v);
        Ok((shared, epoch))
    }

    fn delete(&self, name: &str) -> std::io::Result<()> {
        if let (Some(v), Some(m)) = (self.vols.lock().expect("poisoned").remove(name), &self.machine) {
            m.caches.lock().expect("poisoned").remove(&(v.local.dir().to_path_buf(), v.local.id()));
        }
        self.store.delete_volume(name).map_err(io)
    }

    fn list(&self) -> Vec<String> {
        self.store.list().unwrap_or_default()
    }

    fn identities(&self) -> Vec<(String, VolumeId)> {
        self.store.identities().unwrap_or_default()
    }

    fn persist_epoch(&self, name: &str, epoch: u64) -> std::io::Result<()> {
        let v = self.vol(name)?;
        let dev = v.local.clone();
        // Called from sync context on the replica path; the superblock write is small.
        futures::executor::block_on(dev.set_epoch(epoch)).map_err(io)
    }

    fn touch_extent(&self, name: &str, offset: u64, len: u64) -> std::io::Result<()> {
        let v = self.vol(name)?;
        let mut al = v.al.lock().expect("poisoned");
        match al.begin_write(offset, len) {
            Ok(_) => Ok(()),
            Err(StoreError::ActivityLogFull { hot }) => {
                // Every hot extent holds writes no completed flush covers on
                // every in-sync copy. A local flush would not let them cool
                // (a replica may still lose them): the primary must issue a
                // mirrored FLUSH first (it asks `touch_would_flush`).
                Err(std::io::Error::other(super::storage::ActivityLogFull { hot }))
            }
            Err(e) => Err(io(e)),
        }
    }

    fn touch_would_flush(&self, name: &str, offset: u64, len: u64) -> bool {
        self.vol(name).is_ok_and(|v| v.al.lock().expect("poisoned").would_be_full(offset, len))
    }

    fn clear_hot(&self, name: &str) -> std::io::Result<()> {
        let v = self.vol(name)?;
        let mut al = v.al.lock().expect("poisoned");
        if v.suspect.load(Ordering::SeqCst) {
            // Reconciled: the hot extents are what the copies agreed on.
            match std::fs::remove_file(v.local.dir().join(CACHE_LOST_MARKER)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            v.suspect.store(false, Ordering::SeqCst);
        }
        if al.hot_extents().is_empty() {
            return Ok(());
        }
        let seq = al.current_seq();
        al.mark_flushed(seq);
        al.cool_down().map_err(io)?;
        al.clear_recovered().map_err(io)
    }

    fn flush_begin(&self, name: &str) -> u64 {
        self.vol(name).map(|v| v.al.lock().expect("poisoned").current_seq()).unwrap_or(0)
    }

    fn flush_done(&self, name: &str, seq: u64) {
        if let Ok(v) = self.vol(name) {
            v.al.lock().expect("poisoned").mark_flushed(seq);
        }
    }

    fn hot_extents(&self, name: &str) -> Vec<(u64, u64)> {
        self.vol(name).map(|v| v.al.lock().expect("poisoned").hot_extents()).unwrap_or_default()
    }

    fn mark_dirty(&self, name: &str, peer: &str, offset: u64, len: u64) -> std::io::Result<()> {
        self.bitmap(name, peer, |b| b.mark_durable(offset, len).map(|_| ()).map_err(io))?
    }

    fn mark_all_dirty(&self, name: &str, peer: &str) -> std::io::Result<()> {
        let v = self.vol(name)?;
        v.full_resyncs.fetch_add(1, Ordering::Relaxed);
        self.bitmap(name, peer, |b| {
            b.set_all();
            b.persist().map_err(io)
        })?
    }

    fn clear_dirty(&self, name: &str, peer: &str, offset: u64, len: u64) -> std::io::Result<()> {
        self.bitmap(name, peer, |b| {
            let r = b.regions_of(offset, len);
            b.clear(r);
            b.persist().map_err(io)
        })?
    }

    fn begin_copy(&self, name: &str, peer: &str, offset: u64, len: u64) -> std::io::Result<()> {
        self.bitmap(name, peer, |b| b.begin_copy(offset, len))
    }

    fn end_copy(&self, name: &str, peer: &str, offset: u64, len: u64, copied: bool) -> std::io::Result<()> {
        self.bitmap(name, peer, |b| b.end_copy(offset, len, copied))
    }

    fn persist_dirty(&self, name: &str, peer: &str) -> std::io::Result<()> {
        self.bitmap(name, peer, |b| b.persist().map_err(io))?
    }

    fn dirty_regions(&self, name: &str, peer: &str) -> Vec<(u64, u64)> {
        self.bitmap(name, peer, |b| b.dirty_regions().collect()).unwrap_or_default()
    }

    fn dirty_bytes(&self, name: &str, peer: &str) -> u64 {
        self.bitmap(name, peer, |b| b.dirty_bytes()).unwrap_or(0)
    }

    fn data_ranges(&self, name: &str, offset: u64, len: u64) -> Vec<(u64, u64)> {
        self.vol(name)
            .and_then(|v| {
                let on_disk = |o, l| v.local.data_ranges(o, l);
                match &v.cache {
                    // Pending (unflushed) writes are not on the file yet.
                    Some(c) => c.data_ranges(offset, len, on_disk),
                    None => on_disk(offset, len),
                }
                .map_err(io)
            })
            .unwrap_or_else(|_| vec![(offset, len)])
    }

    fn capacity(&self) -> (u64, u64) {
        (self.store.capacity_bytes().unwrap_or(0), self.store.used_bytes().unwrap_or(0))
    }

    fn cache_lost(&self, name: &str) -> bool {
        self.vol(name).is_ok_and(|v| v.suspect.load(Ordering::SeqCst))
    }

    fn full_resyncs(&self, name: &str) -> u64 {
        self.vol(name).map(|v| v.full_resyncs.load(Ordering::Relaxed)).unwrap_or(0)
    }

    fn primary_flushed(&self, name: &str) -> Option<u64> {
        let path = self.vol(name).ok()?.local.dir().join(PRIMARY_FLUSHED);
        match crate::store::envelope::read_file(&path, PRIMARY_FLUSHED_MAGIC, 1) {
            Ok(p) if p.len() == 8 => Some(u64::from_le_bytes(p[..8].try_into().expect("8 bytes"))),
            Ok(_) => {
                tracing::warn!(volume = %name, path = %path.display(), "primary-flushed record has a bad length: ignored");
                None
            }
            Err(crate::store::StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                None
            }
            Err(e) => {
                tracing::warn!(volume = %name, error = %e, "primary-flushed record unreadable: ignored");
                None
            }
        }
    }

    fn set_primary_flushed(&self, name: &str, first_epoch: u64) -> std::io::Result<()> {
        let path = self.vol(name)?.local.dir().join(PRIMARY_FLUSHED);
        let bytes = crate::store::envelope::encode(PRIMARY_FLUSHED_MAGIC, 1, &first_epoch.to_le_bytes());
        crate::store::envelope::atomic_write(&path, &bytes).map_err(io)
    }
}
