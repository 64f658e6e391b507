//! Plain atomic counters for the NBD server (no metrics dependency); the
//! daemon copies a [`NbdStatsSnapshot`] into its prometheus registry.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct NbdStats {
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
}

/// A point-in-time copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NbdStatsSnapshot {
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub handshake_failures: u64,
    /// Transmission requests received (including rejected ones).
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl NbdStats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> NbdStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NbdStatsSnapshot {
            connections_accepted: get(&self.connections_accepted),
            connections_active: get(&self.connections_active),
            handshake_failures: get(&self.handshake_failures),
            requests: get(&self.requests),
            errors: get(&self.errors),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
        }
    }
}
