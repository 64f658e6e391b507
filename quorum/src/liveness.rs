//! Liveness as the leader sees it, for status reporting and placement.

use crate::quorum::Quorum;
use crate::rtt::RttEstimate;
use std::collections::BTreeMap;
use std::time::Duration;

impl Quorum {
    /// On the leader: each registered node's age since its last heartbeat, in
    /// ms. `None` on followers (they do not track liveness).
    pub fn heartbeat_ages_ms(&self) -> Option<BTreeMap<String, u64>> {
        let now = self.inner.now_ms();
        let g = self.inner.leader_state();
        let ls = g.as_ref()?;
        Some(ls.liveness.last_seen_ms().iter().map(|(n, t)| (n.clone(), now.saturating_sub(*t))).collect())
    }

    /// Node-loss detection threshold in ms: the committed cluster config's
    /// when there is one, else this daemon's `[quorum] node_loss_ms`.
    pub fn node_loss_ms(&self) -> u64 {
        self.inner.node_loss_ms()
    }

    /// On the leader: the round trip to `node` measured on raft heartbeats
    /// (see [`crate::rtt`]). `None` on followers, for this member itself, for
    /// unknown nodes, and when the last sample is older than `node_loss_ms`.
    pub fn peer_rtt(&self, node: &str) -> Option<RttEstimate> {
        if !self.inner.is_leader() || node == self.inner.cfg.node_id {
            return None;
        }
        let addr = self.inner.sm.current().nodes.get(node)?.api.clone();
        self.inner.peers.rtt.get(&addr, Duration::from_millis(self.node_loss_ms()))
    }
}
