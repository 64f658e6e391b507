//! Round-trip times to peers, measured by the raft leader on its heartbeats.
//!
//! ```text
//!  leader ── AppendEntries (no entries: a heartbeat) ──► peer
//!         ◄─────────────── reply ───────────────────────
//!  sample = reply instant − send instant   (tokio monotonic clock)
//! ```
//!
//! Only entry-less appends are sampled: an append with entries waits for the
//! peer's fsync and would measure its disk, not the link. A failed or timed
//! out call is not a sample (its RTT is unknown). The smoothed value is an
//! EWMA with gain 1/8 (TCP's SRTT, RFC 6298), seeded by the first sample.
//! Samples older than the caller's freshness bound are reported as unknown,
//! so a dead peer never shows its last good RTT.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Peers tracked at most (one per member address; a cluster has a handful).
const MAX_PEERS: usize = 256;

/// One peer's RTT estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttEstimate {
    /// EWMA (gain 1/8) of the samples, in microseconds.
    pub smoothed_us: u64,
    /// The most recent sample, in microseconds.
    pub last_us: u64,
    /// Samples taken since the member started.
    pub samples: u64,
    /// When the most recent sample was taken.
    pub at: Instant,
}

impl RttEstimate {
    fn first(sample_us: u64, at: Instant) -> Self {
        RttEstimate { smoothed_us: sample_us, last_us: sample_us, samples: 1, at }
    }

    fn add(&mut self, sample_us: u64, at: Instant) {
        // srtt += (sample - srtt) / 8, in integers without underflow.
        self.smoothed_us = (self.smoothed_us.saturating_mul(7).saturating_add(sample_us)) / 8;
        self.last_us = sample_us;
        self.samples += 1;
        self.at = at;
    }
}

/// RTT estimates keyed by peer address (`host:port`).
#[derive(Debug, Default)]
pub(crate) struct RttTable {
    peers: Mutex<HashMap<String, RttEstimate>>,
}

impl RttTable {
    pub fn record(&self, addr: &str, rtt: Duration, at: Instant) {
        // A sample is never 0 µs: a reply cannot come back before it was sent.
        let us = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        let mut g = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        match g.get_mut(addr) {
            Some(e) => e.add(us, at),
            None => {
                if g.len() >= MAX_PEERS {
                    g.clear();
                }
                g.insert(addr.to_string(), RttEstimate::first(us, at));
            }
        }
    }

    /// The estimate for `addr` if its last sample is at most `fresh` old.
    pub fn get(&self, addr: &str, fresh: Duration) -> Option<RttEstimate> {
        let g = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        g.get(addr).copied().filter(|e| e.at.elapsed() <= fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sample_seeds_and_later_ones_move_an_eighth_of_the_way() {
        let t = RttTable::default();
        let now = Instant::now();
        t.record("w:1", Duration::from_millis(200), now);
        let e = t.get("w:1", Duration::from_secs(60)).unwrap();
        assert_eq!((e.smoothed_us, e.last_us, e.samples), (200_000, 200_000, 1));
        t.record("w:1", Duration::from_millis(1), now);
        let e = t.get("w:1", Duration::from_secs(60)).unwrap();
        assert_eq!(e.last_us, 1_000);
        assert_eq!(e.smoothed_us, (200_000 * 7 + 1_000) / 8);
        assert_eq!(e.samples, 2);
    }

    #[test]
    fn a_steady_rtt_converges_and_a_zero_sample_counts_as_one_microsecond() {
        let t = RttTable::default();
        let now = Instant::now();
        t.record("a:1", Duration::from_millis(5), now);
        for _ in 0..64 {
            t.record("a:1", Duration::from_millis(200), now);
        }
        let e = t.get("a:1", Duration::from_secs(60)).unwrap();
        assert!(e.smoothed_us > 199_000 && e.smoothed_us <= 200_000, "{e:?}");
        t.record("b:1", Duration::ZERO, now);
        assert_eq!(t.get("b:1", Duration::from_secs(60)).unwrap().last_us, 1);
    }

    #[test]
    fn a_stale_estimate_is_unknown() {
        let t = RttTable::default();
        let now = Instant::now();
        t.record("w:1", Duration::from_millis(3), now);
        assert!(t.get("w:1", Duration::from_secs(2)).is_some());
        let old = now.checked_sub(Duration::from_secs(3)).expect("monotonic clock is past 3 s");
        t.record("w:2", Duration::from_millis(3), old);
        assert!(t.get("w:2", Duration::from_secs(2)).is_none());
        assert!(t.get("unknown:1", Duration::from_secs(2)).is_none());
    }
}
