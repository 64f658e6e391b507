//! Liveness as the leader sees it, for status reporting and placement.

use crate::quorum::Quorum;
use std::collections::BTreeMap;

impl Quorum {
    /// On the leader: each registered node's age since its last heartbeat, in
    /// ms. `None` on followers (they do not track liveness).
    pub fn heartbeat_ages_ms(&self) -> Option<BTreeMap<String, u64>> {
        let now = self.inner.now_ms();
        let g = self.inner.leader_state();
        let ls = g.as_ref()?;
        Some(ls.last_seen_ms.iter().map(|(n, t)| (n.clone(), now.saturating_sub(*t))).collect())
    }

    /// Node-loss detection threshold in ms (from the timings).
    pub fn node_loss_ms(&self) -> u64 {
        self.inner.cfg.timings.node_loss_ms
    }
}
