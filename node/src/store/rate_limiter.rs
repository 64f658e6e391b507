//! `RateLimiter`: per-volume IOPS and bandwidth limits (token buckets in
//! their GCRA form: one "theoretical arrival time" per bucket).
//!
//! Each request costs one I/O and `bytes` bytes. A bucket that was idle lets
//! [`BURST`] worth of work through at once; after that requests are spaced
//! at the configured rate. A single request larger than the burst is let
//! through and its cost delays the requests after it (debt), so large I/O
//! never deadlocks. Reservations are taken in call order under a short lock
//! and the sleep happens outside it, so waiters are served FIFO.
//! Time is tokio's clock, so tests run with paused time.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Burst tolerance: 100 ms of work may pass at once after idleness. Small
/// enough that a limit holds over any 1 s window within 10 %, large enough
/// that a queue-depth-32 client is not serialised by timer granularity.
pub const BURST: Duration = Duration::from_millis(100);
/// Largest delay one request can add (a huge request against a tiny limit):
/// keeps clock arithmetic far from overflow.
const MAX_COST: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct Bucket {
    /// Seconds per unit (1 I/O or 1 byte), in nanoseconds as f64.
    ns_per_unit: f64,
    /// Theoretical arrival time.
    tat: Option<Instant>,
}

impl Bucket {
    fn new(per_sec: u64) -> Option<Bucket> {
        (per_sec > 0).then(|| Bucket { ns_per_unit: 1e9 / per_sec as f64, tat: None })
    }

    /// Reserve `units`; returns the instant the request may start.
    fn reserve(&mut self, now: Instant, units: u64) -> Instant {
        let tat = self.tat.unwrap_or(now).max(now);
        let start = tat.checked_sub(BURST).unwrap_or(now).max(now);
        let cost = Duration::from_nanos((self.ns_per_unit * units as f64).round() as u64).min(MAX_COST);
        self.tat = Some(tat + cost);
        start
    }
}

/// IOPS + bandwidth limiter for one volume. 0 means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    iops: u64,
    bytes_per_sec: u64,
    buckets: Mutex<(Option<Bucket>, Option<Bucket>)>,
}

impl RateLimiter {
    pub fn new(iops: u64, bytes_per_sec: u64) -> RateLimiter {
        RateLimiter {
            iops,
            bytes_per_sec,
            buckets: Mutex::new((Bucket::new(iops), Bucket::new(bytes_per_sec))),
        }
    }

    /// A limiter that never waits.
    pub fn unlimited() -> RateLimiter {
        Self::new(0, 0)
    }

    pub fn limits(&self) -> (u64, u64) {
        (self.iops, self.bytes_per_sec)
    }

    pub fn is_unlimited(&self) -> bool {
        self.iops == 0 && self.bytes_per_sec == 0
    }

    /// Wait until one I/O of `bytes` bytes may proceed.
    pub async fn acquire(&self, bytes: u64) {
        if self.is_unlimited() {
            return;
        }
        let start = {
            let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let a = b.0.as_mut().map(|k| k.reserve(now, 1)).unwrap_or(now);
            let c = b.1.as_mut().map(|k| k.reserve(now, bytes)).unwrap_or(now);
            a.max(c)
        };
        if start > Instant::now() {
            tokio::time::sleep_until(start).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn unlimited_limiter_never_waits() {
        let l = RateLimiter::unlimited();
        let t = Instant::now();
        for _ in 0..10_000 {
            l.acquire(1 << 20).await;
        }
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn iops_limit_spaces_requests_after_the_burst() {
        let l = RateLimiter::new(100, 0);
        let t = Instant::now();
        for _ in 0..300 {
            l.acquire(4096).await;
        }
        // 300 I/Os at 100/s with 100 ms of burst: the last starts at 2.89 s.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(2880) && e <= Duration::from_millis(2900), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn bandwidth_limit_holds_for_large_requests() {
        let l = RateLimiter::new(0, 10 << 20); // 10 MiB/s
        let t = Instant::now();
        for _ in 0..50 {
            l.acquire(1 << 20).await; // 50 MiB in 1 MiB requests
        }
        // The 50th request starts after 49 MiB have been paid for, minus burst.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(4790) && e <= Duration::from_millis(4810), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_tighter_of_the_two_limits_wins() {
        let l = RateLimiter::new(1000, 1 << 20); // 1000 IOPS but 1 MiB/s
        let t = Instant::now();
        for _ in 0..64 {
            l.acquire(64 << 10).await; // 4 MiB total
        }
        let e = t.elapsed();
        // Bandwidth-bound: 63 x 64 KiB = 3.94 s, minus 100 ms burst.
        assert!(e >= Duration::from_millis(3830) && e <= Duration::from_millis(3850), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_budget() {
        let l = Arc::new(RateLimiter::new(200, 0));
        let t = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move {
                    for _ in 0..100 {
                        l.acquire(512).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // 400 I/Os at 200/s: the last starts at 399 x 5 ms - 100 ms = 1.895 s.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(1890) && e <= Duration::from_millis(1900), "{e:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_limiter_allows_a_burst_again() {
        let l = RateLimiter::new(100, 0);
        for _ in 0..50 {
            l.acquire(1).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t = Instant::now();
        for _ in 0..11 {
            l.acquire(1).await; // 100 ms of burst = 10 I/Os + the first
        }
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
