//! What survives a simulated crash: the raft hard state and log, and the
//! replica data (every write is durable once stored; the model has no page
//! cache). Everything else on a host is volatile.

use super::msg::LogEntry;
use metro_quorum::state::NodeId;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, Default)]
pub struct Disk {
    pub term: u64,
    pub voted_for: Option<NodeId>,
    /// 1-based: entry `i` is `log[i - 1]`.
    pub log: Vec<LogEntry>,
    /// Per volume, the ids of the writes this replica holds.
    pub data: BTreeMap<String, BTreeSet<u64>>,
    /// Per volume, the highest epoch this replica accepted a write at.
    pub data_epoch: BTreeMap<String, u64>,
    /// How many times the host started (seeds its volatile randomness).
    pub incarnation: u64,
}

impl Disk {
    pub fn last_idx(&self) -> u64 {
        self.log.len() as u64
    }

    pub fn term_at(&self, idx: u64) -> u64 {
        if idx == 0 {
            0
        } else {
            self.log.get(idx as usize - 1).map_or(0, |e| e.term)
        }
    }
}
