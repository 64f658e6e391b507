//! One process-wide thread for buffered (page-cache) data writes.
//!
//! A 4 KiB `pwrite` into the page cache takes a few microseconds; handing each
//! one to tokio's blocking pool costs a thread wake-up and a context switch
//! (both ways), which on a small machine costs more than the write itself.
//! The lane thread drains a bounded queue, so under load one wake-up carries
//! many writes. FUA writes and flushes (fdatasync, milliseconds) never use
//! the lane: they would hold up every other volume's writes behind them.
//!
//! Invariants:
//! - Jobs run in submission order, one at a time.
//! - The queue is bounded ([`LANE_DEPTH`]); when it is full, or the thread
//!   could not be started, [`submit`] hands the job back and the caller runs
//!   it on the blocking pool instead. Nothing waits on a full lane.

use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::OnceLock;

/// Jobs queued for the lane before callers fall back to the blocking pool.
pub const LANE_DEPTH: usize = 4096;

pub type Job = Box<dyn FnOnce() + Send + 'static>;

static LANE: OnceLock<Option<SyncSender<Job>>> = OnceLock::new();

fn lane() -> Option<&'static SyncSender<Job>> {
    LANE.get_or_init(|| {
        let (tx, rx) = sync_channel::<Job>(LANE_DEPTH);
        let spawned = std::thread::Builder::new().name("metro-write-lane".into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                job();
            }
        });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the write lane thread; buffered writes use the blocking pool");
                None
            }
        }
    })
    .as_ref()
}

/// Queue `job` on the lane. `Err(job)`: the lane is full or absent; run it
/// elsewhere.
pub fn submit(job: Job) -> Result<(), Job> {
    match lane() {
        Some(tx) => match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(job)) | Err(TrySendError::Disconnected(job)) => Err(job),
        },
        None => Err(job),
    }
}

/// Run `job` on the lane, or on tokio's blocking pool when the lane is full.
pub async fn run<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> std::io::Result<T> {
    if crate::rt::inline() {
        return Ok(job());
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let wrapped: Job = Box::new(move || {
        let _ = tx.send(job());
    });
    if let Err(job) = submit(wrapped) {
        crate::rt::blocking(job).await.map_err(std::io::Error::other)?;
    }
    rx.await.map_err(|_| std::io::Error::other("write lane dropped a job"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn jobs_run_in_submission_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        for i in 0..1000u32 {
            let seen = seen.clone();
            assert!(submit(Box::new(move || seen.lock().unwrap().push(i))).is_ok(), "lane took job {i}");
        }
        let (tx, rx) = std::sync::mpsc::channel();
        assert!(submit(Box::new(move || tx.send(()).unwrap())).is_ok());
        rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the lane ran every job");
        assert_eq!(*seen.lock().unwrap(), (0..1000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn run_returns_the_job_result() {
        let waits: Vec<_> = (0..100u32).map(|i| tokio::spawn(run(move || i * 2))).collect();
        for (i, w) in waits.into_iter().enumerate() {
            assert_eq!(w.await.unwrap().unwrap(), i as u32 * 2);
        }
    }
}
