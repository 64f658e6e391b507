//! Server side of the `Internal` gRPC service.
//!
//! Every handler first checks the caller (mTLS identity `node:*` or
//! `witness`, when TLS is on) and the protocol version, then decodes the
//! serde_json payload. A version mismatch is FAILED_PRECONDITION with a
//! message naming both versions.

use crate::network::{version_mismatch_message, MAX_MESSAGE_BYTES};
use crate::quorum::Shared;
use crate::state::Command;
use crate::types::TypeConfig;
use crate::wire::{HeartbeatRequest, ProposeReply};
use metro_api::error::{ApiError, Code};
use metro_api::identity::{authorize, Access};
use metro_api::pb::internal::internal_server::{Internal, InternalServer};
use metro_api::pb::internal::RaftPayload;
use metro_api::PROTOCOL_VERSION;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct InternalService {
    shared: Arc<Shared>,
}

impl InternalService {
    pub(crate) fn server(shared: Arc<Shared>) -> InternalServer<InternalService> {
        InternalServer::new(InternalService { shared })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Check identity and version; decode the payload.
    fn open<T: DeserializeOwned>(&self, req: Request<RaftPayload>) -> Result<(String, T), Status> {
        if self.shared.tls_enabled {
            authorize(&req, Access::Internal)?;
        }
        let p = req.into_inner();
        if p.proto_version != PROTOCOL_VERSION {
            let who = if p.from.is_empty() { "the caller".to_string() } else { format!("node `{}`", p.from) };
            return Err(ApiError::new(
                Code::VersionMismatch,
                version_mismatch_message(&who, p.proto_version),
                "upgrade the older node",
            )
            .into());
        }
        let mine = self.shared.peers.incarnation.get();
        let who = if p.from.is_empty() { "the caller".to_string() } else { format!("node `{}`", p.from) };
        if p.incarnation < mine {
            let mut status: Status =
                ApiError::new(Code::Unsafe, crate::incarnation::stale_message(&who, p.incarnation, mine), "")
                    .into();
            if let Ok(v) = mine.to_string().parse() {
                status.metadata_mut().insert(crate::incarnation::METADATA_KEY, v);
            }
            return Err(status);
        }
        if p.incarnation > mine {
            self.shared.peers.incarnation.observe(p.incarnation, &p.from);
            return Err(Status::unavailable(format!(
                "this node is moving from quorum group incarnation {mine} to {} (seen from {who}); retry",
                p.incarnation
            )));
        }
        let v = serde_json::from_slice(&p.data).map_err(|e| {
            Status::from(ApiError::new(Code::InvalidArgument, format!("cannot decode the payload: {e}"), ""))
        })?;
        Ok((p.from, v))
    }

    fn reply<T: Serialize>(&self, v: &T) -> Result<Response<RaftPayload>, Status> {
        let data = serde_json::to_vec(v)
            .map_err(|e| Status::from(ApiError::new(Code::Internal, format!("encode reply: {e}"), "")))?;
        Ok(Response::new(RaftPayload {
            proto_version: PROTOCOL_VERSION,
            from: String::new(),
            data,
            incarnation: self.shared.peers.incarnation.get(),
        }))
    }
}

#[tonic::async_trait]
impl Internal for InternalService {
    async fn raft_append(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (_, req): (_, AppendEntriesRequest<TypeConfig>) = self.open(request)?;
        self.reply(&self.shared.raft.append_entries(req).await)
    }

    async fn raft_vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (_, req): (_, VoteRequest<u64>) = self.open(request)?;
        self.reply(&self.shared.raft.vote(req).await)
    }

    async fn raft_snapshot(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (_, req): (_, InstallSnapshotRequest<TypeConfig>) = self.open(request)?;
        self.reply(&self.shared.raft.install_snapshot(req).await)
    }

    async fn propose(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (from, cmd): (_, Command) = self.open(request)?;
        let s = &self.shared;
        if !s.is_leader() {
            return self.reply(&ProposeReply::NotLeader { leader: s.leader_addr().map(|(_, a)| a) });
        }
        let reply = match s.write_local(cmd.clone()).await {
            Ok(r) => {
                if let (Command::RegisterNode(rec), true) = (&cmd, r.is_ok()) {
                    s.ensure_learner(rec).await;
                }
                ProposeReply::Applied(r)
            }
            Err(Ok(leader)) => ProposeReply::NotLeader { leader },
            Err(Err(e)) => {
                tracing::warn!(%from, error = %e, "forwarded proposal failed");
                ProposeReply::Failed(e.to_string())
            }
        };
        self.reply(&reply)
    }

    async fn heartbeat(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let (_, req): (_, HeartbeatRequest) = self.open(request)?;
        self.reply(&crate::heartbeat::handle_heartbeat(&self.shared, req).await)
    }
}
