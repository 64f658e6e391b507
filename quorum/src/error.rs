//! The quorum engine's typed errors. [`QuorumError::is_retryable`] separates
//! "try again soon" (no leader, unreachable, deadline) from fatal errors.

use metro_api::error::{ApiError, Code};

#[derive(Debug, Clone, thiserror::Error)]
pub enum QuorumError {
    /// No leader is known or reachable right now (election in progress, or no quorum).
    #[error("no quorum leader: {0}")]
    NoLeader(String),
    /// A peer could not be reached.
    #[error("peer {addr} is unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
    /// A deadline expired.
    #[error("deadline of {ms} ms expired while {what}")]
    Timeout { what: String, ms: u64 },
    /// The peer speaks another protocol version (fatal until one side is upgraded).
    #[error("{0}")]
    VersionMismatch(String),
    /// The peer refused us (certificate identity, permission).
    #[error("refused by {addr}: {detail}")]
    Refused { addr: String, detail: String },
    /// The local raft storage failed (disk error, corrupt file): the member must stop.
    #[error("raft storage: {0}")]
    Storage(String),
    /// Invalid configuration or use of the API.
    #[error("invalid: {0}")]
    Invalid(String),
    /// `site activate` refused (see `decide::activate`).
    #[error("{0}")]
    Activate(#[from] crate::decide::ActivateRefusal),
    /// The raft core stopped (shutdown or a fatal storage error).
    #[error("the quorum engine stopped: {0}")]
    Stopped(String),
}

impl QuorumError {
    /// True when the same call may succeed later without operator action.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            QuorumError::NoLeader(_) | QuorumError::Unreachable { .. } | QuorumError::Timeout { .. }
        )
    }
}

impl From<QuorumError> for ApiError {
    fn from(e: QuorumError) -> Self {
        let (code, hint) = match &e {
            QuorumError::NoLeader(_) | QuorumError::Unreachable { .. } => (
                Code::NoQuorum,
                "retry; check that a majority of voters (two sites, or one site and the witness) is up",
            ),
            QuorumError::Timeout { .. } => (Code::Timeout, "retry; check the links between the sites"),
            QuorumError::VersionMismatch(_) => {
                (Code::VersionMismatch, "run the same metro release on every node")
            }
            QuorumError::Refused { .. } => {
                (Code::PermissionDenied, "check the node certificates (CN node:<id> or witness)")
            }
            QuorumError::Invalid(_) => (Code::InvalidArgument, ""),
            QuorumError::Activate(r) => {
                use crate::decide::ActivateRefusal as R;
                match r {
                    R::MayLackWrites { .. } => (
                        Code::Unsafe,
                        "bring the other site back if you can; otherwise add --force to accept losing them",
                    ),
                    R::WrongSite { .. } | R::NotAVoter { .. } => (
                        Code::WrongNode,
                        "run it against a voter of that site (metroctl tries every endpoint)",
                    ),
                    R::UnknownSite(_) | R::NotADataSite(_) => {
                        (Code::InvalidArgument, "see `metroctl site list`")
                    }
                    R::LogBehind { .. } => (
                        Code::Unsafe,
                        "activate the site while that member's voter is up, or bring the lost site back",
                    ),
                    R::VotersReachable(_) => (
                        Code::Unsafe,
                        "if that site is really lost, stop those daemons (or cut them off) and retry",
                    ),
                }
            }
            QuorumError::Storage(_) | QuorumError::Stopped(_) => (Code::Internal, "see the daemon's log"),
        };
        ApiError::new(code, e.to_string(), hint)
    }
}
