//! Primary leases, held in the leader's memory and never logged (DESIGN.md 2).
//!
//! The leader grants a volume's primary a lease of `lease_ms`. The holder
//! starts counting *before* it sends its request, so on the holder's clock the
//! lease ends no later than `granted_at + lease_ms`. Clocks may drift by at
//! most `drift_margin_ms` over one lease period, so the leader treats the
//! lease as **certainly expired** only once
//! `granted_at + lease_ms + drift_margin_ms < now`.
//!
//! A new leader does not know what its predecessor granted. For every volume
//! it has not granted itself, it assumes a lease was granted the instant it
//! became leader: nothing is certainly expired before
//! `leader_since + lease_ms + drift_margin_ms`.
//!
//! Invariants:
//! - Never two valid leases for one volume: [`LeaseTable::grant`] refuses a
//!   different holder while the previous holder's lease may still be valid.
//! - A lease's epoch never goes backwards for a volume.
//! - Pure: the caller passes `now_ms`; the caller grants only after confirming
//!   leadership (a quorum round trip) and only to the committed primary.

use crate::state::NodeId;
use std::collections::BTreeMap;
use std::time::Duration;

/// DESIGN.md 7: lease 2 s.
pub const DEFAULT_LEASE_MS: u64 = 2_000;
/// Bound on clock drift between leader and holder over one lease period,
/// plus scheduling slack; 250 ms is 12.5 % of a lease, far above NTP drift.
pub const DEFAULT_DRIFT_MARGIN_MS: u64 = 250;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTiming {
    pub lease_ms: u64,
    pub drift_margin_ms: u64,
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming { lease_ms: DEFAULT_LEASE_MS, drift_margin_ms: DEFAULT_DRIFT_MARGIN_MS }
    }
}

impl LeaseTiming {
    /// How long after a grant (or after taking over) the leader must wait.
    pub fn certain_expiry_ms(&self) -> u64 {
        self.lease_ms.saturating_add(self.drift_margin_ms)
    }
}

/// One lease the leader granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseGrant {
    pub holder: NodeId,
    pub epoch: u64,
    pub granted_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Retryable: another node may still hold a valid lease.
    #[error("volume `{volume}`: `{holder}` may hold the lease until {until_ms} ms; retry after")]
    HeldByOther { volume: String, holder: NodeId, until_ms: u64 },
    /// Fatal for this request: the requester runs an older configuration.
    #[error("volume `{volume}`: lease asked for epoch {asked}, already granted at epoch {granted}")]
    StaleEpoch { volume: String, asked: u64, granted: u64 },
}

/// The leader's lease book.
#[derive(Debug, Clone)]
pub struct LeaseTable {
    leader_since_ms: u64,
    timing: LeaseTiming,
    grants: BTreeMap<String, LeaseGrant>,
}

impl LeaseTable {
    /// A table for a leader that took over at `leader_since_ms`.
    pub fn new(leader_since_ms: u64, timing: LeaseTiming) -> Self {
        LeaseTable { leader_since_ms, timing, grants: BTreeMap::new() }
    }

    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    pub fn leader_since_ms(&self) -> u64 {
        self.leader_since_ms
    }

    /// The last grant this leader made for `volume`.
    pub fn grant_of(&self, volume: &str) -> Option<&LeaseGrant> {
        self.grants.get(volume)
    }

    /// Grant or renew `holder`'s lease on `volume` at `epoch`. Returns how
    /// long the holder may serve, counted from when it sent its request.
    pub fn grant(
        &mut self,
        volume: &str,
        holder: &str,
        epoch: u64,
        now_ms: u64,
    ) -> Result<Duration, LeaseError> {
        if let Some(g) = self.grants.get(volume) {
            if epoch < g.epoch {
                return Err(LeaseError::StaleEpoch { volume: volume.into(), asked: epoch, granted: g.epoch });
            }
            if g.holder != holder && !self.holder_expired(volume, now_ms) {
                return Err(LeaseError::HeldByOther {
                    volume: volume.into(),
                    holder: g.holder.clone(),
                    until_ms: g.granted_at_ms + self.timing.certain_expiry_ms(),
                });
            }
        }
        // A volume this leader never granted: the predecessor may have granted
        // it to the committed primary only, which is who the caller asks for
        // (the caller grants only to the committed primary).
        self.grants.insert(volume.into(), LeaseGrant { holder: holder.into(), epoch, granted_at_ms: now_ms });
        Ok(Duration::from_millis(self.timing.lease_ms))
    }

    /// True when no lease on `volume` can still be valid anywhere.
    pub fn holder_expired(&self, volume: &str, now_ms: u64) -> bool {
        let since = match self.grants.get(volume) {
            Some(g) => g.granted_at_ms,
            None => self.leader_since_ms,
        };
        since.saturating_add(self.timing.certain_expiry_ms()) < now_ms
    }

    /// The node that may currently hold a valid lease granted by this leader.
    pub fn valid_holder(&self, volume: &str, now_ms: u64) -> Option<&NodeId> {
        let g = self.grants.get(volume)?;
        (g.granted_at_ms.saturating_add(self.timing.lease_ms) >= now_ms).then_some(&g.holder)
    }

    /// Drop the record of a deleted volume.
    pub fn forget(&mut self, volume: &str) {
        self.grants.remove(volume);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: LeaseTiming = LeaseTiming { lease_ms: 2_000, drift_margin_ms: 250 };

    #[test]
    fn a_grant_lasts_one_lease_period() {
        let mut t = LeaseTable::new(0, T);
        assert_eq!(t.grant("v", "a1", 1, 10_000), Ok(Duration::from_millis(2_000)));
        assert_eq!(t.valid_holder("v", 12_000).map(String::as_str), Some("a1"));
        assert_eq!(t.valid_holder("v", 12_001), None);
    }

    #[test]
    fn a_lease_is_certainly_expired_only_after_lease_plus_drift_margin() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "a1", 1, 10_000).unwrap();
        assert!(!t.holder_expired("v", 12_000));
        assert!(!t.holder_expired("v", 12_250), "the boundary itself is not certain");
        assert!(t.holder_expired("v", 12_251));
    }

    #[test]
    fn a_new_leader_waits_a_full_lease_plus_margin_for_volumes_it_never_granted() {
        let t = LeaseTable::new(5_000, T);
        assert!(!t.holder_expired("v", 5_000));
        assert!(!t.holder_expired("v", 7_250));
        assert!(t.holder_expired("v", 7_251));
    }

    #[test]
    fn renewing_pushes_the_expiry_forward() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "a1", 1, 10_000).unwrap();
        t.grant("v", "a1", 1, 11_000).unwrap();
        assert!(!t.holder_expired("v", 12_500));
        assert!(t.holder_expired("v", 13_251));
    }

    #[test]
    fn a_second_holder_is_refused_while_the_first_lease_may_be_valid() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "a1", 1, 10_000).unwrap();
        let err = t.grant("v", "b1", 2, 12_100).unwrap_err();
        assert_eq!(
            err,
            LeaseError::HeldByOther { volume: "v".into(), holder: "a1".into(), until_ms: 12_250 }
        );
        assert_eq!(t.grant_of("v").unwrap().holder, "a1", "the refused grant changed nothing");
        assert_eq!(t.grant("v", "b1", 2, 12_251), Ok(Duration::from_millis(2_000)));
        assert_eq!(t.grant_of("v").unwrap().holder, "b1");
    }

    #[test]
    fn a_lease_for_an_older_epoch_is_refused() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "b1", 3, 10_000).unwrap();
        let err = t.grant("v", "b1", 2, 10_100).unwrap_err();
        assert!(matches!(err, LeaseError::StaleEpoch { asked: 2, granted: 3, .. }));
    }

    #[test]
    fn volumes_are_independent() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "a1", 1, 10_000).unwrap();
        t.grant("w", "b1", 1, 10_000).unwrap();
        assert!(!t.holder_expired("v", 11_000));
        assert!(t.holder_expired("x", 11_000), "never granted, leader since 0");
    }

    #[test]
    fn forgetting_a_volume_falls_back_to_the_takeover_rule() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "a1", 1, 10_000).unwrap();
        t.forget("v");
        assert!(t.holder_expired("v", 10_001));
        assert!(t.grant_of("v").is_none());
    }

    #[test]
    fn no_instant_has_two_valid_holders_under_any_grant_sequence() {
        // Exhaustive over a small grid: holders x times; a refused grant must
        // leave the table unchanged, an accepted one must not overlap.
        let holders = ["a1", "b1", "a2"];
        for seed in 0u64..200 {
            let mut t = LeaseTable::new(0, T);
            let mut history: Vec<(String, u64)> = Vec::new();
            let mut now = 0;
            let mut x = seed;
            for _ in 0..30 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                now += (x >> 33) % 1_500;
                let h = holders[((x >> 20) % 3) as usize];
                if t.grant("v", h, 1, now).is_ok() {
                    history.push((h.to_string(), now));
                }
            }
            for w in history.windows(2) {
                let ((h0, t0), (h1, t1)) = (&w[0], &w[1]);
                if h0 != h1 {
                    assert!(t1 > &(t0 + T.certain_expiry_ms()), "seed {seed}: {h0}@{t0} then {h1}@{t1}");
                }
            }
        }
    }
}
