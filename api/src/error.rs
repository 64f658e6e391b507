//! Stable error codes and the one place where they map to gRPC status.

use std::fmt;

/// A stable, documented error code. Operators grep for these; never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// MET-001: the request was malformed or named something invalid.
    InvalidArgument,
    /// MET-002: the named object does not exist.
    NotFound,
    /// MET-003: the object already exists.
    AlreadyExists,
    /// MET-004: the caller's identity may not do this.
    PermissionDenied,
    /// MET-005: no quorum leader is reachable right now; retry later.
    NoQuorum,
    /// MET-006: etcd (desired state) is unreachable; attached volumes keep working.
    EtcdUnavailable,
    /// MET-007: the state changed concurrently (epoch CAS failed); retry.
    Conflict,
    /// MET-008: the operation is refused because it could lose acknowledged writes.
    Unsafe,
    /// MET-009: the peer speaks another protocol version.
    VersionMismatch,
    /// MET-010: an internal error; see the daemon's log.
    Internal,
    /// MET-011: out of capacity.
    NoSpace,
    /// MET-012: a deadline expired.
    Timeout,
    /// MET-013: this daemon cannot do it; another one can (metroctl tries the next endpoint).
    WrongNode,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "MET-001",
            Code::NotFound => "MET-002",
            Code::AlreadyExists => "MET-003",
            Code::PermissionDenied => "MET-004",
            Code::NoQuorum => "MET-005",
            Code::EtcdUnavailable => "MET-006",
            Code::Conflict => "MET-007",
            Code::Unsafe => "MET-008",
            Code::VersionMismatch => "MET-009",
            Code::Internal => "MET-010",
            Code::NoSpace => "MET-011",
            Code::Timeout => "MET-012",
            Code::WrongNode => "MET-013",
        }
    }

    fn grpc(self) -> tonic::Code {
        match self {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::NoQuorum | Code::EtcdUnavailable => tonic::Code::Unavailable,
            Code::Conflict => tonic::Code::Aborted,
            Code::Unsafe | Code::VersionMismatch | Code::WrongNode => tonic::Code::FailedPrecondition,
            Code::Internal => tonic::Code::Internal,
            Code::NoSpace => tonic::Code::ResourceExhausted,
            Code::Timeout => tonic::Code::DeadlineExceeded,
        }
    }
}

/// An error meant for an operator: a code, what went wrong, and what to do next.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    pub hint: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.code.as_str(), self.message)?;
        if !self.hint.is_empty() {
            write!(f, " (next step: {})", self.hint)?;
        }
        Ok(())
    }
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self { code, message: message.into(), hint: hint.into() }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.code.grpc(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_message_carries_code_and_next_step() {
        let s: tonic::Status = ApiError::new(Code::NoQuorum, "no leader", "check the witness").into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.message(), "[MET-005] no leader (next step: check the witness)");
    }
}
