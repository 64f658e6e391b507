//! The invariant oracle: every host reports what it does, the oracle checks
//! DESIGN.md section 4 against a global, omniscient view.
//!
//! Checked at the moment of each event:
//! - at most one leader per term; a new leader holds every committed entry;
//! - committed entries are never lost (no node truncates or applies a
//!   different entry at a committed index);
//! - epochs never decrease along the committed log; a new primary always
//!   comes from the previous `in_sync` (invariant 4);
//! - a lease is granted only after a majority of voters acknowledged the
//!   granting leader's round (no quorum, no lease);
//! - a write is acknowledged only by a node holding a valid lease, and only
//!   once every replica in the committed `in_sync` holds it (RPO 0);
//! - a node that starts serving as primary holds every acknowledged write.
//!
//! Checked after every simulation step ([`Oracle::check_instant`]): at most
//! one node holds a valid primary lease per volume, each lease judged on the
//! holder's own drifting clock.

use super::clock::DriftClock;
use super::disk::Disk;
use super::msg::LogEntry;
use metro_quorum::state::{ClusterState, Command, NodeId};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

/// Keep the failure report readable.
const MAX_VIOLATIONS: usize = 20;
/// Recent events kept for the failure report.
const TRACE_LEN: usize = 60;

#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Real (simulated) time of the last lease grant and the last acknowledged write.
    pub last_grant_ms: u64,
    pub last_ack_ms: u64,
    pub elections: u64,
    pub grants: u64,
    pub acked_writes: u64,
    pub promotions: u64,
    pub fences: u64,
    pub rejoins: u64,
    /// Leases a leader ended early on the holder's release.
    pub releases: u64,
}

pub struct Oracle {
    clocks: BTreeMap<NodeId, DriftClock>,
    voters: BTreeSet<NodeId>,
    disks: BTreeMap<NodeId, Rc<RefCell<Disk>>>,
    leaders: BTreeMap<u64, NodeId>,
    committed: Vec<LogEntry>,
    state: ClusterState,
    acks: BTreeMap<(NodeId, u64, u64), BTreeSet<NodeId>>,
    /// Per volume, per node: local-clock ms until which it may serve.
    leases: BTreeMap<String, BTreeMap<NodeId, u64>>,
    acked: BTreeMap<String, BTreeSet<u64>>,
    next_wid: u64,
    pub stats: Stats,
    pub violations: Vec<String>,
    trace: std::collections::VecDeque<String>,
    /// Which hosts currently believe they lead.
    leading: BTreeSet<NodeId>,
    pub now_real_ms: u64,
}

impl Oracle {
    pub fn new(
        clocks: BTreeMap<NodeId, DriftClock>,
        voters: BTreeSet<NodeId>,
        disks: BTreeMap<NodeId, Rc<RefCell<Disk>>>,
    ) -> Self {
        Oracle {
            clocks,
            voters,
            disks,
            leaders: BTreeMap::new(),
            committed: Vec::new(),
            state: ClusterState::default(),
            acks: BTreeMap::new(),
            leases: BTreeMap::new(),
            acked: BTreeMap::new(),
            next_wid: 1,
            stats: Stats::default(),
            violations: Vec::new(),
            trace: Default::default(),
            leading: BTreeSet::new(),
            now_real_ms: 0,
        }
    }

    fn violate(&mut self, what: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(format!("t={}ms {what}", self.now_real_ms));
        }
    }

    pub fn note(&mut self, what: String) {
        if self.trace.len() == TRACE_LEN {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("t={}ms {what}", self.now_real_ms));
    }

    pub fn trace(&self) -> Vec<String> {
        self.trace.iter().cloned().collect()
    }

    pub fn committed_state(&self) -> &ClusterState {
        &self.state
    }

    pub fn committed_len(&self) -> usize {
        self.committed.len()
    }

    pub fn acked_count(&self, vol: &str) -> usize {
        self.acked.get(vol).map_or(0, BTreeSet::len)
    }

    pub fn leader_of(&self, term: u64) -> Option<&NodeId> {
        self.leaders.get(&term)
    }

    pub fn latest_leader(&self) -> Option<(u64, &NodeId)> {
        self.leaders.iter().next_back().map(|(t, n)| (*t, n))
    }

    pub fn next_wid(&mut self) -> u64 {
        self.next_wid += 1;
        self.next_wid
    }

    pub fn became_leader(&mut self, term: u64, node: &str, log: &[LogEntry]) {
        self.stats.elections += 1;
        self.note(format!("{node} leads term {term}"));
        if let Some(other) = self.leaders.get(&term) {
            if other != node {
                let other = other.clone();
                self.violate(format!("two leaders in term {term}: {other} and {node}"));
            }
        }
        self.leaders.insert(term, node.into());
        let missing =
            self.committed.iter().enumerate().find(|(i, e)| log.get(*i) != Some(*e)).map(|(i, _)| i + 1);
        if let Some(i) = missing {
            self.violate(format!("leader {node} of term {term} lacks committed entry {i}"));
        }
    }

    /// A node is about to drop its entry `idx` (and all after it).
    pub fn truncating(&mut self, node: &str, idx: u64, dropped: &LogEntry) {
        if self.committed.get(idx as usize - 1) == Some(dropped) {
            self.violate(format!("{node} truncates committed entry {idx}"));
        }
    }

    /// A node applies entry `idx`.
    pub fn applied(&mut self, node: &str, idx: u64, entry: &LogEntry) {
        let i = idx as usize;
        if i <= self.committed.len() {
            if &self.committed[i - 1] != entry {
                self.violate(format!("{node} applies a different entry at committed index {idx}"));
            }
            return;
        }
        if i != self.committed.len() + 1 {
            self.violate(format!("{node} applies {idx} past the committed prefix {}", self.committed.len()));
            return;
        }
        self.committed.push(entry.clone());
        let Some(cmd) = &entry.cmd else { return };
        let before = self.state.clone();
        let result = self.state.apply(cmd);
        match cmd {
            Command::ChangeVolume { name, primary, rejoin, .. } if result.is_ok() => {
                if let Some(r) = rejoin {
                    self.stats.rejoins += 1;
                    self.note(format!(
                        "{name}: {r} rejoins in_sync at epoch {}",
                        self.state.volumes[name].epoch
                    ));
                    let held = self.disks[r].borrow().data.get(name).cloned().unwrap_or_default();
                    let missing = self.acked.get(name).map_or(0, |a| a.difference(&held).count());
                    if missing > 0 {
                        self.violate(format!(
                            "{r} rejoined {name} missing {missing} acknowledged writes (RPO 0)"
                        ));
                    }
                }
                let (old, new) = (&before.volumes[name], self.state.volumes[name].clone());
                if new.epoch <= old.epoch {
                    self.violate(format!("epoch of {name} went {} -> {}", old.epoch, new.epoch));
                }
                if primary != &old.primary {
                    self.stats.promotions += 1;
                    self.note(format!(
                        "{name}: primary {:?} -> {:?} at epoch {}",
                        old.primary, primary, new.epoch
                    ));
                    if let Some(p) = primary {
                        if !old.is_in_sync(p) {
                            self.violate(format!("{name}: promoted {p} outside in_sync {:?}", old.in_sync));
                        }
                    }
                }
            }
            Command::SetSiteMode { site, mode } => {
                self.stats.fences += 1;
                self.note(format!("site {site} -> {}", mode.as_str()));
            }
            _ => {}
        }
    }

    pub fn voter_ack(&mut self, leader: &str, term: u64, round: u64, voter: &str) {
        if self.voters.contains(voter) {
            self.acks.entry((leader.into(), term, round)).or_default().insert(voter.into());
        }
    }

    pub fn lease_granted(&mut self, leader: &str, term: u64, round: u64, vol: &str, holder: &str) {
        self.stats.grants += 1;
        self.stats.last_grant_ms = self.now_real_ms;
        let mut ackers = self.acks.get(&(leader.to_string(), term, round)).cloned().unwrap_or_default();
        if self.voters.contains(leader) {
            ackers.insert(leader.into());
        }
        if ackers.len() * 2 <= self.voters.len() {
            self.violate(format!(
                "{leader} (term {term}) granted {vol} to {holder} after round {round} acked only by {ackers:?}"
            ));
        }
    }

    pub fn lease_released(&mut self, leader: &str, vol: &str, holder: &str) {
        self.stats.releases += 1;
        self.note(format!("{leader} ended {holder}'s lease on {vol} on its release"));
    }

    /// A node's current lease view for `vol` (0 = none).
    pub fn lease_held(&mut self, node: &str, vol: &str, until_local_ms: u64) {
        let m = self.leases.entry(vol.into()).or_default();
        if until_local_ms == 0 {
            m.remove(node);
        } else {
            m.insert(node.into(), until_local_ms);
        }
    }

    pub fn report_role(&mut self, node: &str, leader: bool) {
        if leader {
            self.leading.insert(node.into());
        } else {
            self.leading.remove(node);
        }
    }

    /// Hosts that currently believe they lead (stale ones included).
    pub fn current_leaders(&self) -> Vec<NodeId> {
        self.leading.iter().cloned().collect()
    }

    /// A node lost its memory.
    pub fn crashed(&mut self, node: &str) {
        self.leading.remove(node);
        self.note(format!("{node} crashed"));
        for m in self.leases.values_mut() {
            m.remove(node);
        }
    }

    fn lease_valid(&self, node: &str, vol: &str) -> bool {
        let until = self.leases.get(vol).and_then(|m| m.get(node)).copied().unwrap_or(0);
        until > self.clocks[node].local_ms(self.now_real_ms)
    }

    /// After every step: at most one valid primary lease per volume.
    pub fn check_instant(&mut self, now_real_ms: u64) {
        self.now_real_ms = now_real_ms;
        let vols: Vec<String> = self.leases.keys().cloned().collect();
        for vol in vols {
            let holders: Vec<NodeId> =
                self.leases[&vol].keys().filter(|n| self.lease_valid(n, &vol)).cloned().collect();
            if holders.len() > 1 {
                self.violate(format!("{vol}: {} valid primary leases at once: {holders:?}", holders.len()));
            }
        }
    }

    pub fn started_serving(&mut self, node: &str, vol: &str, epoch: u64) {
        self.note(format!("{node} serves {vol} at epoch {epoch}"));
        let held = self.disks[node].borrow().data.get(vol).cloned().unwrap_or_default();
        let acked = self.acked.get(vol).cloned().unwrap_or_default();
        let lost = acked.difference(&held).count();
        if lost > 0 {
            self.violate(format!("{node} serves {vol} missing {lost} acknowledged writes (RPO 0)"));
        }
    }

    pub fn write_acked(&mut self, node: &str, vol: &str, wid: u64) {
        self.stats.acked_writes += 1;
        self.stats.last_ack_ms = self.now_real_ms;
        if !self.lease_valid(node, vol) {
            self.violate(format!("{node} acknowledged a write on {vol} without a valid lease"));
        }
        let in_sync = self.state.volumes.get(vol).map(|v| v.in_sync.clone()).unwrap_or_default();
        for r in in_sync {
            if !self.disks[&r].borrow().data.get(vol).is_some_and(|d| d.contains(&wid)) {
                self.violate(format!("{node} acknowledged {vol}/{wid} that in-sync {r} lacks (RPO 0)"));
            }
        }
        self.acked.entry(vol.into()).or_default().insert(wid);
    }
}
