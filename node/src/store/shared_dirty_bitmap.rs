//! `SharedDirtyBitmap`: an async, shareable [`DirtyBitmap`] with group
//! commit, for the replication layer's write path.
//!
//! ```text
//!  writer 1 ─ mark ─┐                       ┌─► ack 1
//!  writer 2 ─ mark ─┼─► one leader writes ──┼─► ack 2     (one fdatasync+rename
//!  writer 3 ─ mark ─┘   the file image      └─► ack 3      for many first touches)
//! ```
//!
//! Invariants:
//! - [`SharedDirtyBitmap::mark_durable`] returns only when a file image that
//!   contains this call's regions is durable. A region already set in memory
//!   by a call whose persist is still running is not assumed durable: the
//!   caller waits for it too.
//! - Every mutation bumps a version; the file is "current" only when the
//!   durable version equals it. At most one persist runs at a time.
//! - Marks of regions already durable cost one uncontended mutex.

use super::dirty_bitmap::DirtyBitmap;
use super::envelope;
use super::error::{StoreError, StoreResult};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;
use tokio::sync::Notify;

struct State {
    bitmap: DirtyBitmap,
    /// Bumped by every mutation.
    version: u64,
    /// Highest version whose image is durable.
    durable: u64,
    writing: bool,
    persists: u64,
}

/// A [`DirtyBitmap`] shared by concurrent writers, persisted by group commit.
pub struct SharedDirtyBitmap {
    path: PathBuf,
    state: Mutex<State>,
    done: Notify,
}

impl SharedDirtyBitmap {
    /// Wrap a loaded or created bitmap. Pending in-memory changes are
    /// written by the next [`persist`](Self::persist) or mark.
    pub fn new(bitmap: DirtyBitmap) -> SharedDirtyBitmap {
        let pending = bitmap.needs_persist();
        SharedDirtyBitmap {
            path: bitmap.path().to_path_buf(),
            state: Mutex::new(State {
                bitmap,
                version: pending as u64,
                durable: 0,
                writing: false,
                persists: 0,
            }),
            done: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mark `[offset, offset+len)` dirty and return once that is durable.
    /// Call before acknowledging a write the peer did not receive.
    pub async fn mark_durable(&self, offset: u64, len: u64) -> StoreResult<()> {
        let target = {
            let mut st = self.lock();
            let before = st.bitmap.dirty_region_count();
            st.bitmap.mark(offset, len);
            if st.bitmap.dirty_region_count() != before {
                st.version += 1;
            }
            st.version
        };
        self.wait_durable(target).await
    }

    /// Clear regions (indices) in memory; durable at the next persist or
    /// mark (late clearing is safe: a stale dirty bit only costs a copy).
    pub fn clear(&self, regions: Range<u64>) {
        let mut st = self.lock();
        let before = st.bitmap.dirty_region_count();
        st.bitmap.clear(regions);
        if st.bitmap.dirty_region_count() != before {
            st.version += 1;
        }
    }

    /// Make every change so far durable.
    pub async fn persist(&self) -> StoreResult<()> {
        let target = self.lock().version;
        self.wait_durable(target).await
    }

    async fn wait_durable(&self, target: u64) -> StoreResult<()> {
        loop {
            let notified = self.done.notified();
            let (image, version) = {
                let mut st = self.lock();
                if st.durable >= target {
                    return Ok(());
                }
                if st.writing {
                    (None, 0)
                } else {
                    st.writing = true;
                    (Some(st.bitmap.encode_file()), st.version)
                }
            };
            let Some(image) = image else {
                notified.await;
                continue;
            };
            let path = self.path.clone();
            let result =
                crate::rt::blocking(move || envelope::atomic_write(&path, &image)).await.unwrap_or_else(
                    |e| Err(StoreError::io(&self.path, "join blocking task", std::io::Error::other(e))),
                );
            {
                let mut st = self.lock();
                st.writing = false;
                if result.is_ok() {
                    st.persists += 1;
                    st.durable = st.durable.max(version);
                    if st.durable == st.version {
                        st.bitmap.mark_persisted();
                    }
                }
            }
            self.done.notify_waiters();
            result?;
        }
    }

    /// Run `f` on the bitmap (e.g. `|b| b.dirty_regions().collect()`).
    pub fn with<R>(&self, f: impl FnOnce(&DirtyBitmap) -> R) -> R {
        f(&self.lock().bitmap)
    }

    /// Dirty bytes (for status: "dirty/resync bytes per replica").
    pub fn dirty_bytes(&self) -> u64 {
        self.with(DirtyBitmap::dirty_bytes)
    }

    /// File writes so far (group commit makes this far below the marks).
    pub fn persist_count(&self) -> u64 {
        self.lock().persists
    }
}
