//! A host's local clock: real (simulated) time with a bounded rate drift and
//! an arbitrary offset.
//!
//! `local(real) = offset + real + real * rate_ppm / 1e6`, monotonic for
//! `|rate_ppm| < 1e6`. The lease arithmetic is safe while
//! `(lease + margin) / (1 + ρ) > lease / (1 - ρ)`; with a 2 s lease and a
//! 250 ms margin that holds up to ρ ≈ 5.9 %, and the simulator draws drifts
//! within [`MAX_DRIFT_PPM`].

/// 2 %: far above real NTP-disciplined drift, still inside the lease margin.
pub const MAX_DRIFT_PPM: i64 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriftClock {
    pub offset_ms: u64,
    pub rate_ppm: i64,
}

impl DriftClock {
    pub const EXACT: DriftClock = DriftClock { offset_ms: 0, rate_ppm: 0 };

    /// Local milliseconds at simulated real time `real_ms`.
    pub fn local_ms(&self, real_ms: u64) -> u64 {
        let skew = (real_ms as i128 * self.rate_ppm as i128) / 1_000_000;
        (self.offset_ms as i128 + real_ms as i128 + skew).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fast_clock_runs_ahead_and_a_slow_one_behind() {
        let fast = DriftClock { offset_ms: 100, rate_ppm: 20_000 };
        let slow = DriftClock { offset_ms: 0, rate_ppm: -20_000 };
        assert_eq!(fast.local_ms(10_000), 100 + 10_200);
        assert_eq!(slow.local_ms(10_000), 9_800);
        assert!(slow.local_ms(10_001) >= slow.local_ms(10_000));
    }
}
