//! Node-to-node transport: the tonic `Internal` service as openraft's network.
//!
//! ```text
//!  openraft core ──► RaftNetworkFactory::new_client(target) ──► PeerNetwork
//!      PeerNetwork::append_entries ──► Peers::call(addr, RaftAppend, json)
//!          Connector::channel(addr) (lazy tonic Channel, cached per address)
//! ```
//!
//! Invariants:
//! - Every call has a deadline (tonic `grpc-timeout` plus a local
//!   `tokio::time::timeout`) and a bounded message size.
//! - Every request carries `metro_api::PROTOCOL_VERSION`; a reply in another
//!   version, or a FAILED_PRECONDITION refusal, is reported as
//!   [`RpcError::VersionMismatch`] naming both versions.
//! - Transport failures map to openraft's `Unreachable` (openraft backs off),
//!   deadlines and decode errors to `NetworkError`, and errors returned by the
//!   remote raft to `RemoteError`.
//! - How a channel is made is behind [`Connector`], so a simulator (turmoil)
//!   can run the same code over its own sockets.

use crate::incarnation::Incarnation;
use crate::rtt::RttTable;
use crate::types::{RaftId, TypeConfig};
use metro_api::pb::internal::{internal_client::InternalClient, RaftPayload};
use metro_api::PROTOCOL_VERSION;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Largest gRPC message on the internal service: bounded by the snapshot
/// chunk size (`SNAPSHOT_CHUNK_BYTES`) and AppendEntries batches, with room
/// for JSON overhead.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Snapshot chunk size handed to openraft; well under [`MAX_MESSAGE_BYTES`]
/// even after JSON escapes the bytes.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 2 * 1024 * 1024;
/// Deadline for AppendEntries and Vote: a few heartbeats; a slower peer is
/// treated as unreachable rather than stalling replication.
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(1);
pub const VOTE_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline for one snapshot chunk (2 MiB over a metro link).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for a forwarded proposal: one commit round trip plus queueing.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP connect deadline.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 keepalive: detects dead links (and recovers after a partition heals).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bound on cached channels (one per peer address; a cluster has a handful).
const MAX_CHANNELS: usize = 256;

/// Produces a tonic channel for a peer `host:port`. Implementations must not
/// block; a lazy channel is expected.
pub trait Connector: Send + Sync + 'static {
    fn channel(&self, addr: &str) -> Result<Channel, String>;
}

/// The default connector: TCP via tonic's `Endpoint`, with TLS when configured.
pub struct TcpConnector {
    tls: Option<ClientTlsConfig>,
    local: Option<std::net::IpAddr>,
}

impl TcpConnector {
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        Self { tls, local: None }
    }

    /// Originate connections from this address (the member's own): keeps
    /// per-address firewall rules (lab partitions) meaningful on shared hosts.
    pub fn with_local_address(mut self, ip: Option<std::net::IpAddr>) -> Self {
        self.local = ip;
        self
    }
}

impl Connector for TcpConnector {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("bad peer address `{addr}`: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .local_address(self.local);
        if let Some(tls) = &self.tls {
            ep = ep.tls_config(tls.clone()).map_err(|e| format!("TLS config for `{addr}`: {e}"))?;
        }
        Ok(ep.connect_lazy())
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Method {
    Append,
    Vote,
    Snapshot,
    Propose,
    Heartbeat,
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("{addr} is unreachable: {detail}")]
    Unreachable { addr: String, detail: String },
    #[error("{addr} did not answer within {ms} ms")]
    Timeout { addr: String, ms: u64 },
    #[error("{0}")]
    VersionMismatch(String),
    #[error("{addr} refused the call: {status}")]
    Status { addr: String, status: tonic::Status },
    #[error("{addr}: cannot decode the reply: {detail}")]
    Decode { addr: String, detail: String },
}

impl RpcError {
    pub fn into_quorum(self) -> crate::QuorumError {
        use crate::QuorumError as Q;
        match self {
            RpcError::Unreachable { addr, detail } => Q::Unreachable { addr, detail },
            RpcError::Timeout { addr, ms } => Q::Timeout { what: format!("calling {addr}"), ms },
            RpcError::VersionMismatch(m) => Q::VersionMismatch(m),
            RpcError::Status { addr, status } if status.code() == tonic::Code::PermissionDenied => {
                Q::Refused { addr, detail: status.message().to_string() }
            }
            RpcError::Status { addr, status } => {
                Q::Unreachable { addr, detail: format!("{}: {}", status.code(), status.message()) }
            }
            RpcError::Decode { addr, detail } => Q::Invalid(format!("{addr}: {detail}")),
        }
    }
}

/// Message shown when the two sides speak different protocol versions.
pub fn version_mismatch_message(who: &str, theirs: u32) -> String {
    format!(
        "protocol version mismatch: {who} speaks metro internal protocol v{theirs}, this node speaks v{PROTOCOL_VERSION}; run the same metro release on every node"
    )
}

/// Channel cache + the one place that makes an internal RPC.
pub(crate) struct Peers {
    connector: Arc<dyn Connector>,
    channels: Mutex<HashMap<String, Channel>>,
    me: String,
    /// Round trips of entry-less appends (raft heartbeats), per address.
    pub rtt: RttTable,
    /// Sent with every request; a higher one in a reply or refusal is reported.
    pub incarnation: Arc<Incarnation>,
}

impl Peers {
    pub fn new(connector: Arc<dyn Connector>, me: String, incarnation: Arc<Incarnation>) -> Self {
        Self { connector, channels: Mutex::new(HashMap::new()), me, rtt: RttTable::default(), incarnation }
    }

    fn channel(&self, addr: &str) -> Result<Channel, RpcError> {
        let mut g = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        let c = self
            .connector
            .channel(addr)
            .map_err(|detail| RpcError::Unreachable { addr: addr.to_string(), detail })?;
        if g.len() >= MAX_CHANNELS {
            g.clear();
        }
        g.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// Send raw bytes; returns the reply's bytes.
    pub async fn call_raw(
        &self,
        addr: &str,
        method: Method,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let ch = self.channel(addr)?;
        let mut client = InternalClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut req = tonic::Request::new(RaftPayload {
            proto_version: PROTOCOL_VERSION,
            from: self.me.clone(),
            data,
            incarnation: self.incarnation.get(),
        });
        req.set_timeout(timeout);
        let fut = async {
            match method {
                Method::Append => client.raft_append(req).await,
                Method::Vote => client.raft_vote(req).await,
                Method::Snapshot => client.raft_snapshot(req).await,
                Method::Propose => client.propose(req).await,
                Method::Heartbeat => client.heartbeat(req).await,
            }
        };
        let ms = timeout.as_millis() as u64;
        let res = tokio::time::timeout(timeout + Duration::from_millis(50), fut)
            .await
            .map_err(|_| RpcError::Timeout { addr: addr.to_string(), ms })?;
        match res {
            Ok(resp) => {
                let p = resp.into_inner();
                if p.proto_version != PROTOCOL_VERSION {
                    return Err(RpcError::VersionMismatch(version_mismatch_message(
                        &format!("peer {addr}"),
                        p.proto_version,
                    )));
                }
                self.incarnation.observe(p.incarnation, addr);
                Ok(p.data)
            }
            Err(s) => {
                let theirs = s
                    .metadata()
                    .get(crate::incarnation::METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                if let Some(g) = theirs {
                    self.incarnation.observe(g, addr);
                }
                Err(classify(addr, s, ms))
            }
        }
    }

    /// Send a serde value and decode the reply.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        method: Method,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RpcError> {
        let data = serde_json::to_vec(req)
            .map_err(|e| RpcError::Decode { addr: addr.to_string(), detail: format!("encode: {e}") })?;
        let bytes = self.call_raw(addr, method, data, timeout).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| RpcError::Decode { addr: addr.to_string(), detail: e.to_string() })
    }
}

fn classify(addr: &str, s: tonic::Status, ms: u64) -> RpcError {
    let addr = addr.to_string();
    match s.code() {
        tonic::Code::FailedPrecondition if s.message().contains("protocol version") => {
            RpcError::VersionMismatch(format!("{addr} refused us: {}", s.message()))
        }
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => RpcError::Timeout { addr, ms },
        tonic::Code::Unavailable | tonic::Code::Unknown => {
            RpcError::Unreachable { addr, detail: s.message().to_string() }
        }
        _ => RpcError::Status { addr, status: s },
    }
}

/// openraft's network factory over [`Peers`].
#[derive(Clone)]
pub(crate) struct NetworkFactory {
    pub peers: Arc<Peers>,
}

pub(crate) struct PeerNetwork {
    peers: Arc<Peers>,
    target: RaftId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: RaftId, node: &BasicNode) -> Self::Network {
        PeerNetwork { peers: self.peers.clone(), target, addr: node.addr.clone() }
    }
}

fn to_rpc_error<E: std::error::Error>(e: RpcError) -> RPCError<RaftId, BasicNode, E> {
    match &e {
        RpcError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl PeerNetwork {
    async fn rpc<Req, Resp, E>(
        &self,
        method: Method,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<RaftId, BasicNode, RaftError<RaftId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        RaftError<RaftId, E>: DeserializeOwned,
    {
        let res: Result<Resp, RaftError<RaftId, E>> =
            self.peers.call(&self.addr, method, req, timeout).await.map_err(to_rpc_error)?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn deadline(option: &RPCOption, cap: Duration) -> Duration {
    option.hard_ttl().min(cap)
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<RaftId>, RPCError<RaftId, BasicNode, RaftError<RaftId>>> {
        // An entry-less append is a heartbeat: its round trip is the link's
        // (plus the peer's scheduling), not the peer's fsync.
        let heartbeat = rpc.entries.is_empty();
        let sent = tokio::time::Instant::now();
        let res = self.rpc(Method::Append, &rpc, deadline(&option, APPEND_TIMEOUT)).await;
        if heartbeat && res.is_ok() {
            let now = tokio::time::Instant::now();
            self.peers.rtt.record(&self.addr, now - sent, now);
        }
        res
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<RaftId>,
        RPCError<RaftId, BasicNode, RaftError<RaftId, InstallSnapshotError>>,
    > {
        self.rpc(Method::Snapshot, &rpc, deadline(&option, SNAPSHOT_TIMEOUT)).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftId>,
        option: RPCOption,
    ) -> Result<VoteResponse<RaftId>, RPCError<RaftId, BasicNode, RaftError<RaftId>>> {
        self.rpc(Method::Vote, &rpc, deadline(&option, VOTE_TIMEOUT)).await
    }
}
