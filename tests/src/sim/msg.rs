//! Messages between simulated hosts (one UDP datagram each, JSON encoded).

use metro_quorum::state::{Command, NodeId};
use serde::{Deserialize, Serialize};

/// A replicated log entry of the model consensus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub term: u64,
    /// `None` is the no-op a new leader commits to learn its commit index.
    pub cmd: Option<Command>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    Vote {
        term: u64,
        cand: NodeId,
        last_idx: u64,
        last_term: u64,
    },
    VoteResp {
        term: u64,
        from: NodeId,
        granted: bool,
    },
    Append {
        term: u64,
        leader: NodeId,
        prev_idx: u64,
        prev_term: u64,
        entries: Vec<LogEntry>,
        commit: u64,
        round: u64,
    },
    AppendResp {
        term: u64,
        from: NodeId,
        ok: bool,
        match_idx: u64,
        round: u64,
    },
    /// A primary asks the leader for (a renewal of) its lease.
    LeaseReq {
        vol: String,
        epoch: u64,
        from: NodeId,
        req: u64,
    },
    LeaseGrant {
        vol: String,
        epoch: u64,
        req: u64,
        lease_ms: u64,
    },
    /// A former primary stopped serving `vol` and gives up its lease at `epoch`.
    LeaseRelease {
        vol: String,
        epoch: u64,
        from: NodeId,
    },
    /// A primary asks the leader to drop an unresponsive replica from in_sync.
    RemoveReq {
        vol: String,
        epoch: u64,
        node: NodeId,
        from: NodeId,
    },
    Write {
        vol: String,
        epoch: u64,
        wid: u64,
        from: NodeId,
    },
    /// A primary copies every write it holds to a returning replica.
    Resync {
        vol: String,
        epoch: u64,
        wids: Vec<u64>,
        from: NodeId,
    },
    ResyncAck {
        vol: String,
        from: NodeId,
        ok: bool,
    },
    /// A primary asks the leader to put a caught-up replica back in `in_sync`.
    RejoinReq {
        vol: String,
        epoch: u64,
        node: NodeId,
        from: NodeId,
    },
    WriteAck {
        vol: String,
        wid: u64,
        from: NodeId,
        ok: bool,
    },
}

impl Msg {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("messages always serialize")
    }

    pub fn decode(buf: &[u8]) -> Option<Msg> {
        serde_json::from_slice(buf).ok()
    }
}
