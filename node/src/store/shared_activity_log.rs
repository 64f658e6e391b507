//! `SharedActivityLog`: an async, shareable [`ActivityLog`] for the
//! primary's write path, with group commit.
//!
//! ```text
//!  write into a hot, durable extent ──► one mutex, no I/O ──► issue write
//!  write into a cold extent ──► note in memory ──► leader persists the set
//!                                 (concurrent cold extents share one persist) ──► issue write
//! ```
//!
//! Invariants:
//! - [`SharedActivityLog::begin_write`] returns only when the file holds
//!   every extent of the range (including one added moments ago by another
//!   writer whose persist is still running).
//! - Persisting never blocks the async runtime (`spawn_blocking`) and at
//!   most one persist runs at a time.

use super::activity_log::ActivityLog;
use super::envelope;
use super::error::{StoreError, StoreResult};
use std::path::PathBuf;
use std::sync::Mutex;
use tokio::sync::Notify;

struct State {
    log: ActivityLog,
    writing: bool,
    persists: u64,
}

/// An [`ActivityLog`] shared by concurrent writers.
pub struct SharedActivityLog {
    path: PathBuf,
    state: Mutex<State>,
    done: Notify,
}

impl SharedActivityLog {
    pub fn new(log: ActivityLog) -> SharedActivityLog {
        SharedActivityLog {
            path: log.path().to_path_buf(),
            state: Mutex::new(State { log, writing: false, persists: 0 }),
            done: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Call before issuing a write/trim/zeroes to `[offset, offset+len)`;
    /// returns its sequence number once its extents are durably hot.
    /// [`StoreError::ActivityLogFull`]: flush, [`mark_flushed`](Self::mark_flushed), retry.
    pub async fn begin_write(&self, offset: u64, len: u64) -> StoreResult<u64> {
        let noted = self.lock().log.note_write(offset, len)?;
        self.wait_durable(noted.needs_version).await?;
        Ok(noted.seq)
    }

    /// See [`ActivityLog::mark_flushed`].
    pub fn mark_flushed(&self, durable_upto_seq: u64) {
        self.lock().log.mark_flushed(durable_upto_seq);
    }

    /// See [`ActivityLog::current_seq`].
    pub fn current_seq(&self) -> u64 {
        self.lock().log.current_seq()
    }

    /// See [`ActivityLog::hot_extents`].
    pub fn hot_extents(&self) -> Vec<(u64, u64)> {
        self.lock().log.hot_extents()
    }

    /// Cool every flushed extent and persist; returns how many cooled.
    pub async fn cool_down(&self) -> StoreResult<usize> {
        let (cooled, target) = {
            let mut st = self.lock();
            let cooled = st.log.cool_in_memory();
            (cooled, st.log.encode_file().1)
        };
        self.wait_durable(target).await?;
        Ok(cooled)
    }

    /// See [`ActivityLog::clear_recovered`].
    pub async fn clear_recovered(&self) -> StoreResult<()> {
        let target = {
            let mut st = self.lock();
            st.log.forget_recovered_in_memory();
            st.log.encode_file().1
        };
        self.wait_durable(target).await
    }

    /// Run `f` on the log.
    pub fn with<R>(&self, f: impl FnOnce(&ActivityLog) -> R) -> R {
        f(&self.lock().log)
    }

    /// File writes so far.
    pub fn persist_count(&self) -> u64 {
        self.lock().persists
    }

    async fn wait_durable(&self, target: u64) -> StoreResult<()> {
        loop {
            let notified = self.done.notified();
            let image = {
                let mut st = self.lock();
                if st.log.durable_version() >= target {
                    return Ok(());
                }
                if st.writing {
                    None
                } else {
                    st.writing = true;
                    Some(st.log.encode_file())
                }
            };
            let Some((image, version)) = image else {
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
                    st.log.set_durable(version);
                }
            }
            self.done.notify_waiters();
            result?;
        }
    }
}
