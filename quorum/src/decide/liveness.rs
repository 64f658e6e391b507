//! Which nodes the leader considers alive.
//!
//! A node is alive when its last heartbeat to this leader is at most
//! `node_loss_ms` old. A node the leader has not heard from yet is judged
//! from when the leader first knew of it: the start of its leadership for
//! nodes already registered then, else the moment the node's registration
//! reached the leader's state. Without that second clock, a node that
//! registers long after the leader took over (a lab whose etcd came up late,
//! a node added to a running cluster) would count as dead from its first
//! moment, and its whole site would be fenced before it sent one heartbeat.

use crate::state::{ClusterState, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// The leader's liveness memory (one per leadership term).
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    /// When this leadership began.
    since_ms: u64,
    /// node → last heartbeat received.
    last_seen_ms: BTreeMap<NodeId, u64>,
    /// node → when the leader first saw it registered (never before `since_ms`).
    known_since_ms: BTreeMap<NodeId, u64>,
}

impl Liveness {
    pub fn new(since_ms: u64) -> Self {
        Liveness { since_ms, ..Default::default() }
    }

    /// A heartbeat from `node` arrived at `now_ms`.
    pub fn heard(&mut self, node: &str, now_ms: u64) {
        self.last_seen_ms.insert(node.to_string(), now_ms);
    }

    /// Last heartbeat times (for status: age since the last heartbeat).
    pub fn last_seen_ms(&self) -> &BTreeMap<NodeId, u64> {
        &self.last_seen_ms
    }

    /// Note every node registered in `state` that this leader had not seen
    /// registered before; call on every control round, before [`Self::alive`].
    pub fn observe(&mut self, state: &ClusterState, now_ms: u64) {
        for id in state.nodes.keys() {
            self.known_since_ms.entry(id.clone()).or_insert(now_ms.max(self.since_ms));
        }
        self.known_since_ms.retain(|id, _| state.nodes.contains_key(id));
    }

    /// The registered nodes alive at `now_ms` (plus `me`, the leader).
    pub fn alive(&self, state: &ClusterState, me: &str, now_ms: u64, loss_ms: u64) -> BTreeSet<NodeId> {
        let mut alive: BTreeSet<NodeId> = state
            .nodes
            .keys()
            .filter(|id| {
                let last = self
                    .last_seen_ms
                    .get(*id)
                    .or_else(|| self.known_since_ms.get(*id))
                    .copied()
                    .unwrap_or(self.since_ms);
                now_ms.saturating_sub(last) <= loss_ms
            })
            .cloned()
            .collect();
        alive.insert(me.to_string());
        alive
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::*;
    use super::*;

    const LOSS: u64 = 2_000;

    #[test]
    fn a_node_never_heard_from_is_alive_for_the_loss_window_after_the_leader_took_over() {
        let s = lab();
        let mut l = Liveness::new(1_000);
        l.observe(&s, 1_000);
        assert!(l.alive(&s, "a1", 1_000 + LOSS, LOSS).contains("b1"));
        assert!(!l.alive(&s, "a1", 1_001 + LOSS, LOSS).contains("b1"));
    }

    #[test]
    fn a_node_registering_long_after_the_leader_took_over_gets_its_own_window() {
        let mut s = lab();
        let late = s.nodes.remove("b2").expect("b2 in the fixture");
        let mut l = Liveness::new(0);
        l.observe(&s, 0);
        // 60 s later b2 registers; the leader learns of it in this round.
        s.nodes.insert(late.id.clone(), late);
        l.observe(&s, 60_000);
        assert!(l.alive(&s, "a1", 60_000 + LOSS, LOSS).contains("b2"), "alive during its first window");
        assert!(!l.alive(&s, "a1", 60_001 + LOSS, LOSS).contains("b2"), "dead if it never heartbeats");
        l.heard("b2", 61_000);
        assert!(l.alive(&s, "a1", 61_000 + LOSS, LOSS).contains("b2"));
    }

    #[test]
    fn a_heartbeat_overrides_the_registration_clock_and_the_leader_is_always_alive() {
        let s = lab();
        let mut l = Liveness::new(0);
        l.observe(&s, 0);
        l.heard("b1", 100);
        let alive = l.alive(&s, "a1", 100 + LOSS + 1, LOSS);
        assert!(!alive.contains("b1"), "last heartbeat too old");
        assert!(alive.contains("a1"), "the leader itself");
    }

    #[test]
    fn a_removed_node_is_forgotten_and_judged_afresh_if_it_registers_again() {
        let mut s = lab();
        let mut l = Liveness::new(0);
        l.observe(&s, 0);
        let b2 = s.nodes.remove("b2").unwrap();
        l.observe(&s, 1_000);
        s.nodes.insert(b2.id.clone(), b2);
        l.observe(&s, 50_000);
        assert!(l.alive(&s, "a1", 50_000 + LOSS, LOSS).contains("b2"));
    }
}
