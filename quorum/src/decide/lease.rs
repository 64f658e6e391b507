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
    /// The holder said it stopped serving (planned move): the lease is over
    /// now rather than at `granted_at_ms + lease + drift margin`.
    pub released: bool,
    /// Not granted by this leader: the committed primary when it took over,
    /// which a predecessor may have granted until `leader_since + lease`.
    pub inherited: bool,
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

    /// Record that `holder` was the committed primary of `volume` at `epoch`
    /// when this leader took over: a predecessor may have granted it a lease
    /// that runs until `leader_since + lease + drift margin`. That holder is
    /// renewed at once; anyone else waits that lease out (a planned move
    /// right after a leader change must not skip it), and the record cannot
    /// be released early. Call once per volume with a primary, before any
    /// grant. A volume with no record waits the same way before its first
    /// grant, whoever asks.
    pub fn inherit(&mut self, volume: &str, holder: &str, epoch: u64) {
        self.grants.entry(volume.into()).or_insert_with(|| LeaseGrant {
            holder: holder.into(),
            epoch,
            granted_at_ms: self.leader_since_ms,
            released: false,
            inherited: true,
        });
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
        match self.grants.get(volume) {
            Some(g) => {
                if epoch < g.epoch {
                    return Err(LeaseError::StaleEpoch {
                        volume: volume.into(),
                        asked: epoch,
                        granted: g.epoch,
                    });
                }
                if g.holder != holder && !self.holder_expired(volume, now_ms) {
                    return Err(LeaseError::HeldByOther {
                        volume: volume.into(),
                        holder: g.holder.clone(),
                        until_ms: g.granted_at_ms + self.timing.certain_expiry_ms(),
                    });
                }
            }
            // Neither granted by this leader nor inherited (the primary this
            // leader found when it took over, see `inherit`): a predecessor may
            // have granted it to someone this leader does not know of.
            None if !self.holder_expired(volume, now_ms) => {
                return Err(LeaseError::HeldByOther {
                    volume: volume.into(),
                    holder: "a primary of the previous leader".into(),
                    until_ms: self.leader_since_ms + self.timing.certain_expiry_ms(),
                });
            }
            None => {}
        }
        self.grants.insert(
            volume.into(),
            LeaseGrant {
                holder: holder.into(),
                epoch,
                granted_at_ms: now_ms,
                released: false,
                inherited: false,
            },
        );
        Ok(Duration::from_millis(self.timing.lease_ms))
    }

    /// `holder` stopped serving `volume` (every op it accepted under a lease
    /// at `epoch` or before has finished) and will not serve it again without
    /// a new grant. Honoured only when this leader's own last grant for the
    /// volume went to `holder` at an epoch no newer than `epoch`: only then is
    /// `holder` the one node that may hold a valid lease (a grant to anyone
    /// else waits for the previous holder's lease to be certainly over). A
    /// lease a predecessor leader granted is never released early. Returns
    /// whether the release was honoured.
    pub fn release(&mut self, volume: &str, holder: &str, epoch: u64) -> bool {
        match self.grants.get_mut(volume) {
            Some(g) if !g.inherited && g.holder == holder && g.epoch <= epoch => {
                g.released = true;
                true
            }
            _ => false,
        }
    }

    /// True when no lease on `volume` can still be valid anywhere.
    pub fn holder_expired(&self, volume: &str, now_ms: u64) -> bool {
        let since = match self.grants.get(volume) {
            Some(g) if g.released => return true,
            Some(g) => g.granted_at_ms,
            None => self.leader_since_ms,
        };
        since.saturating_add(self.timing.certain_expiry_ms()) < now_ms
    }

    /// The node that may currently hold a valid lease granted by this leader.
    pub fn valid_holder(&self, volume: &str, now_ms: u64) -> Option<&NodeId> {
        let g = self.grants.get(volume).filter(|g| !g.released)?;
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
    fn after_a_leader_change_the_inherited_primary_is_renewed_at_once_and_a_new_one_waits() {
        // Regression (the simulator, seed 1009744): a planned move right after
        // a leader change granted the new primary while the old one, cut off,
        // still held its predecessor-granted lease.
        let mut t = LeaseTable::new(50_000, T);
        t.inherit("v", "a1", 1);
        assert!(t.grant("v", "a1", 1, 50_100).is_ok(), "the primary found at takeover renews at once");
        let mut t = LeaseTable::new(50_000, T);
        t.inherit("v", "a1", 1);
        assert!(matches!(t.grant("v", "b1", 2, 50_100), Err(LeaseError::HeldByOther { .. })));
        assert!(!t.release("v", "a1", 1), "an inherited lease is not this leader's to release");
        assert!(matches!(t.grant("v", "b1", 2, 52_250), Err(LeaseError::HeldByOther { .. })));
        assert!(t.grant("v", "b1", 2, 52_251).is_ok(), "after the predecessor's lease certainly ended");
    }

    #[test]
    fn a_volume_unknown_at_takeover_waits_out_the_predecessor_before_its_first_grant() {
        let mut t = LeaseTable::new(50_000, T);
        assert!(matches!(t.grant("v", "a1", 1, 51_000), Err(LeaseError::HeldByOther { .. })));
        assert!(t.grant("v", "a1", 1, 52_251).is_ok());
    }

    #[test]
    fn a_released_lease_lets_another_holder_in_at_once() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "a1", 1, 10_000).unwrap();
        assert!(matches!(t.grant("v", "b1", 2, 10_500), Err(LeaseError::HeldByOther { .. })));
        assert!(t.release("v", "a1", 1));
        assert!(t.holder_expired("v", 10_500));
        assert_eq!(t.valid_holder("v", 10_500), None);
        assert_eq!(t.grant("v", "b1", 2, 10_500), Ok(Duration::from_millis(2_000)));
        assert_eq!(t.valid_holder("v", 10_600).map(String::as_str), Some("b1"));
    }

    #[test]
    fn only_the_last_grantee_can_release_and_only_up_to_its_epoch() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "a1", 3, 10_000).unwrap();
        assert!(!t.release("v", "b1", 3), "another node cannot end a1's lease");
        assert!(!t.release("v", "a1", 2), "a release for an older epoch does not cover the epoch-3 lease");
        assert!(!t.release("w", "a1", 3), "a volume this leader never granted");
        assert!(!t.holder_expired("v", 10_500));
        assert!(matches!(t.grant("v", "b1", 4, 10_500), Err(LeaseError::HeldByOther { .. })));
    }

    #[test]
    fn a_lease_granted_by_a_predecessor_is_never_released_early() {
        // This leader took over at 50 s and granted nothing: whatever its
        // predecessor granted may be valid until 52.25 s, release or not.
        let mut t = LeaseTable::new(50_000, T);
        assert!(!t.release("v", "a1", 9));
        assert!(!t.holder_expired("v", 51_000));
        assert!(t.holder_expired("v", 52_251));
    }

    #[test]
    fn a_renewal_after_a_release_makes_the_holder_hold_again() {
        let mut t = LeaseTable::new(0, T);
        t.grant("v", "a1", 1, 10_000).unwrap();
        assert!(t.release("v", "a1", 1));
        t.grant("v", "a1", 2, 10_100).unwrap();
        assert!(!t.holder_expired("v", 10_200), "a fresh grant is a fresh lease");
        assert_eq!(t.valid_holder("v", 10_200).map(String::as_str), Some("a1"));
    }

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
