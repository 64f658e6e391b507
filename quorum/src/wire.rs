//! Payloads of the `Internal` RPCs that are not openraft's own (serde_json in
//! `RaftPayload.data`). Only add fields with `#[serde(default)]`; a change in
//! meaning needs a new `metro_api::PROTOCOL_VERSION`.

use crate::state::CommandResult;
use serde::{Deserialize, Serialize};

/// Reply to `Propose`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ProposeReply {
    /// Committed and applied; the state machine's result.
    Applied(CommandResult),
    /// This member does not lead; `leader` is the leader's `host:port` when known.
    NotLeader { leader: Option<String> },
    /// The leader could not commit (e.g. lost leadership mid-way); retry.
    Failed(String),
}

/// A node's periodic liveness report and lease request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub node_id: String,
    /// `(volume, epoch)` for every volume this node serves as primary.
    pub primaries: Vec<(String, u64)>,
    /// `(volume, epoch)` leases this node gave up: it stopped serving them.
    #[serde(default)]
    pub released: Vec<(String, u64)>,
}

/// Reply to `Heartbeat`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HeartbeatReply {
    Granted {
        /// The leader's node id.
        leader: String,
        term: u64,
        /// `(volume, epoch)` whose lease was (re)granted.
        granted: Vec<(String, u64)>,
        lease_ms: u64,
        /// The leader asks this voter (in the preferred site) to take over leadership.
        #[serde(default)]
        take_over: bool,
        /// During a hand-over, the other members hold their elections this
        /// long so the preferred voter's campaign is not raced.
        #[serde(default)]
        hold_elections_ms: u64,
    },
    NotLeader {
        leader: Option<String>,
        /// The answering member's last log id as `(term, index)`: the
        /// quorum-loss override refuses to run on a member whose log is behind
        /// a member it can reach.
        #[serde(default)]
        last_log: Option<(u64, u64)>,
    },
}
