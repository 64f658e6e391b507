//! The primary's side of a replication link to one peer node: one persistent,
//! pipelined TLS connection carrying every volume's ops to that peer.
//!
//! ```text
//!  send(op) ─► bounded queue ─► writer task: assign seq, remember responder, write frame
//!                                reader task: Ack{seq} ─► responder
//! ```
//! Ordering: frames are written in queue order, so a volume's ops reach the
//! peer in the order the primary enqueued them. When the connection drops,
//! every outstanding op fails at once with [`LinkError::Down`]; the link
//! reconnects in the background with bounded backoff.

use super::wire::{read_frame, AckStatus, Frame, OpKind, VERSION};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot};

/// Bound on queued, not yet written ops per link (back-pressure beyond it).
pub const LINK_QUEUE: usize = 1024;
/// Deadline for TCP connect + TLS + hello.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A link with unacknowledged data and no progress for this long is dead
/// (TCP_USER_TIMEOUT); keeps silent drops from hanging forever.
pub const TCP_USER_TIMEOUT: Duration = Duration::from_millis(1500);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// The link's own dead-peer check, beside TCP_USER_TIMEOUT (which only the
/// daemon's TCP transport sets, and which a middlebox or another transport
/// may not honour): an op unacknowledged this long with nothing received
/// meanwhile ends the connection, and the link reconnects. Without it, a
/// connection whose segments were dropped hangs forever (found by the
/// data-path simulation: a resync's final flush waited on a dead connection
/// after a partition healed).
pub const LINK_STALL: Duration = Duration::from_secs(5);
/// How often the dead-peer check runs.
const STALL_CHECK: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("link to {0} is down")]
    Down(String),
    #[error("peer {peer} refused the link: {message}")]
    Refused { peer: String, message: String },
}

/// What the peer answered for one op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub status: AckStatus,
    pub epoch: u64,
    /// The ranges a `QueryHot` op returned (empty for every other op).
    pub ranges: Vec<(u64, u64)>,
    /// The bytes a `Read` op returned (empty for every other op).
    pub data: bytes::Bytes,
}

/// An op as queued by a volume; the link assigns the sequence number.
#[derive(Debug, Clone)]
pub struct OutOp {
    pub volume: String,
    pub epoch: u64,
    pub size: u64,
    pub fua: bool,
    pub resync: bool,
    pub op: OpKind,
}

type Responder = oneshot::Sender<Result<Ack, LinkError>>;

/// Called with the divergent ranges a peer reports when a link comes up.
pub type HotHandler = Arc<dyn Fn(&str, Vec<(String, u64, u64)>) + Send + Sync>;

/// Called when a peer answers from a new session (it restarted, maybe after a
/// power cut that emptied its page cache) before the link carries any op:
/// the writes no completed flush on it covers may be gone. The link comes up
/// only once the handler returns true (the primaries that used the peer have
/// marked what it may lack and taken it out of `in_sync` where needed).
pub type SessionHandler = Arc<dyn Fn(String) -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// A byte stream a replication link runs over: TLS over TCP in the daemon,
/// a simulated connection in the deterministic simulator.
pub trait LinkStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> LinkStream for T {}
pub type BoxStream = Box<dyn LinkStream>;

/// Opens the byte stream to a peer's replication endpoint (the seam the
/// simulator replaces). The handshake and the frames on top are the same.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    async fn dial(&self, addr: &str, peer: &str) -> Result<BoxStream, LinkError>;
}

/// The daemon's transport: TCP tuned with socket2, then mutual TLS.
pub struct TlsTransport {
    pub tls: Arc<rustls::ClientConfig>,
    /// Source address for links (this node's own), so per-address firewall
    /// rules apply on hosts where several nodes share one network stack.
    pub local_ip: Option<std::net::IpAddr>,
}

#[async_trait::async_trait]
impl Transport for TlsTransport {
    async fn dial(&self, addr: &str, peer: &str) -> Result<BoxStream, LinkError> {
        let down = |why: String| LinkError::Down(format!("{peer} ({why})"));
        let sa = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| down(e.to_string()))?
            .next()
            .ok_or_else(|| down("no address".into()))?;
        let sock =
            if sa.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
                .map_err(|e| down(e.to_string()))?;
        if let Some(ip) = self.local_ip {
            sock.bind(std::net::SocketAddr::new(ip, 0)).map_err(|e| down(format!("bind {ip}: {e}")))?;
        }
        let tcp = sock.connect(sa).await.map_err(|e| down(e.to_string()))?;
        tune(&tcp).map_err(|e| down(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let name = rustls::pki_types::ServerName::try_from(metro_api::tls::SERVER_NAME).expect("static name");
        let tls = connector.connect(name, tcp).await.map_err(|e| down(format!("TLS: {e}")))?;
        Ok(Box::new(tls))
    }
}

/// Everything needed to dial a peer.
#[derive(Clone)]
pub struct Dialer {
    pub my_node: String,
    pub transport: Arc<dyn Transport>,
    /// Receives the peer's hot ranges before the link carries any op.
    pub on_hot: Option<HotHandler>,
    /// Runs when the peer's session changed, before the link carries any op.
    pub on_session: Option<SessionHandler>,
}

impl Dialer {
    /// The daemon's dialer: mutual TLS over TCP from `local_ip`.
    pub fn tls(my_node: String, tls: Arc<rustls::ClientConfig>, local_ip: Option<std::net::IpAddr>) -> Self {
        Dialer {
            my_node,
            transport: Arc::new(TlsTransport { tls, local_ip }),
            on_hot: None,
            on_session: None,
        }
    }
}

pub struct Link {
    peer: String,
    tx: Mutex<Option<mpsc::Sender<(OutOp, Responder)>>>,
    connected: AtomicBool,
    last_error: Mutex<Option<LinkError>>,
    /// The peer's session as of the last connection.
    session: Mutex<Option<String>>,
    /// Bumped on every connection: acknowledgements from an older one say
    /// nothing about what the peer still holds after a reconnect.
    generation: AtomicU64,
}

impl Link {
    /// Create a link and keep it connected in the background until dropped.
    pub fn spawn(peer: String, addr: String, dialer: Dialer) -> Arc<Link> {
        let link = Arc::new(Link {
            peer,
            tx: Mutex::new(None),
            connected: AtomicBool::new(false),
            last_error: Mutex::new(None),
            session: Mutex::new(None),
            generation: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&link);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            loop {
                let Some(link) = weak.upgrade() else { return };
                match connect(&addr, &link.peer, &dialer).await {
                    Ok((stream, session)) => {
                        let previous = link.session.lock().expect("poisoned").clone();
                        if previous.as_ref().is_some_and(|p| *p != session) {
                            tracing::warn!(peer = %link.peer, ?previous, %session, "peer restarted (new session): writes no completed flush covers may be lost there");
                            let ok = match &dialer.on_session {
                                Some(h) => h(link.peer.clone()).await,
                                None => true,
                            };
                            if !ok {
                                drop(stream);
                                drop(link);
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(BACKOFF_MAX);
                                continue;
                            }
                        }
                        *link.session.lock().expect("poisoned") = Some(session);
                        link.generation.fetch_add(1, Ordering::SeqCst);
                        backoff = Duration::from_millis(50);
                        let (tx, rx) = mpsc::channel(LINK_QUEUE);
                        *link.tx.lock().expect("poisoned") = Some(tx);
                        link.connected.store(true, Ordering::SeqCst);
                        *link.last_error.lock().expect("poisoned") = None;
                        tracing::info!(peer = %link.peer, %addr, "replication link up");
                        drop(link);
                        let reason = run_connection(stream, rx).await;
                        let Some(link) = weak.upgrade() else { return };
                        link.connected.store(false, Ordering::SeqCst);
                        *link.tx.lock().expect("poisoned") = None;
                        tracing::warn!(peer = %link.peer, %reason, "replication link down");
                    }
                    Err(e) => {
                        if link.last_error.lock().expect("poisoned").as_ref() != Some(&e) {
                            tracing::warn!(peer = %link.peer, error = %e, "cannot connect replication link");
                        }
                        *link.last_error.lock().expect("poisoned") = Some(e);
                        drop(link);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        });
        link
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Connections made so far; compare two readings to know whether every
    /// acknowledgement in between came from one connection.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The peer's session as of the last connection.
    pub fn session(&self) -> Option<String> {
        self.session.lock().expect("poisoned").clone()
    }

    pub fn last_error(&self) -> Option<LinkError> {
        self.last_error.lock().expect("poisoned").clone()
    }

    /// Queue an op. Returns a receiver for its ack; a down link fails at once.
    /// Callers enqueue under their volume's order lock, which fixes the order.
    pub async fn enqueue(&self, op: OutOp) -> oneshot::Receiver<Result<Ack, LinkError>> {
        let (rtx, rrx) = oneshot::channel();
        let tx = self.tx.lock().expect("poisoned").clone();
        match tx {
            Some(tx) => {
                if let Err(mpsc::error::SendError((_, r))) = tx.send((op, rtx)).await {
                    let _ = r.send(Err(LinkError::Down(self.peer.clone())));
                }
            }
            None => {
                let _ =
                    rtx.send(Err(self.last_error().unwrap_or_else(|| LinkError::Down(self.peer.clone()))));
            }
        }
        rrx
    }
}

async fn connect(addr: &str, peer: &str, dialer: &Dialer) -> Result<(BoxStream, String), LinkError> {
    let down = |why: String| LinkError::Down(format!("{peer} ({why})"));
    let fut = async {
        let mut stream = dialer.transport.dial(addr, peer).await?;
        let hello = Frame::Hello { version: VERSION, from: dialer.my_node.clone() };
        stream.write_all(&hello.encode()).await.map_err(|e| down(e.to_string()))?;
        stream.flush().await.map_err(|e| down(e.to_string()))?;
        match read_frame(&mut stream).await {
            Ok(Frame::HelloAck { hot, session, .. }) => {
                if let (Some(h), false) = (&dialer.on_hot, hot.is_empty()) {
                    h(peer, hot);
                }
                Ok((stream, session))
            }
            Ok(Frame::Error { message }) => Err(LinkError::Refused { peer: peer.to_string(), message }),
            Ok(other) => Err(down(format!("unexpected frame {other:?}"))),
            Err(e) => Err(LinkError::Refused { peer: peer.to_string(), message: e.to_string() }),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, fut).await.map_err(|_| down("connect timeout".into()))?
}

/// NODELAY, keepalive and TCP_USER_TIMEOUT on a replication socket.
pub fn tune(tcp: &tokio::net::TcpStream) -> std::io::Result<()> {
    let s = socket2::SockRef::from(tcp);
    s.set_tcp_nodelay(true)?;
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(1))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    s.set_tcp_keepalive(&ka)?;
    s.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
    Ok(())
}

/// Ops written and not yet acknowledged, by sequence number, with when
/// each was written.
type Pending = Arc<Mutex<HashMap<u64, (Responder, tokio::time::Instant)>>>;

async fn run_connection(stream: BoxStream, mut rx: mpsc::Receiver<(OutOp, Responder)>) -> String {
    let pending: Pending = Arc::default();
    let last_rx = Arc::new(Mutex::new(tokio::time::Instant::now()));
    let (mut rd, wr) = tokio::io::split(stream);
    let (p2, rx2) = (pending.clone(), last_rx.clone());
    let mut reader = tokio::spawn(async move {
        loop {
            let frame = read_frame(&mut rd).await;
            *rx2.lock().expect("poisoned") = tokio::time::Instant::now();
            match frame {
                Ok(Frame::Ack { seq, status, epoch }) => {
                    if let Some((r, _)) = p2.lock().expect("poisoned").remove(&seq) {
                        let _ =
                            r.send(Ok(Ack { status, epoch, ranges: Vec::new(), data: bytes::Bytes::new() }));
                    }
                }
                Ok(Frame::HotAck { seq, status, epoch, ranges }) => {
                    if let Some((r, _)) = p2.lock().expect("poisoned").remove(&seq) {
                        let _ = r.send(Ok(Ack { status, epoch, ranges, data: bytes::Bytes::new() }));
                    }
                }
                Ok(Frame::DataAck { seq, status, epoch, data }) => {
                    if let Some((r, _)) = p2.lock().expect("poisoned").remove(&seq) {
                        let _ = r.send(Ok(Ack { status, epoch, ranges: Vec::new(), data }));
                    }
                }
                Ok(Frame::Error { message }) => return format!("peer error: {message}"),
                Ok(other) => return format!("unexpected frame from peer: {other:?}"),
                Err(e) => return format!("read: {e}"),
            }
        }
    });
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    let mut seq: u64 = 0;
    let mut check = tokio::time::interval(STALL_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let reason = loop {
        // `biased` (a seed replays exactly in the simulator): a finished
        // reader first, then the dead-connection check (every 250 ms, so it
        // cannot starve behind a busy queue), then the queue.
        tokio::select! {
            biased;
            r = &mut reader => break r.unwrap_or_else(|e| e.to_string()),
            _ = check.tick() => {
                let now = tokio::time::Instant::now();
                let oldest = pending.lock().expect("poisoned").values().map(|(_, at)| *at).min();
                let heard = *last_rx.lock().expect("poisoned");
                if let Some(oldest) = oldest {
                    if now.duration_since(oldest) > LINK_STALL && now.duration_since(heard) > LINK_STALL {
                        break format!("no acknowledgement and nothing received for {LINK_STALL:?}: the connection is dead");
                    }
                }
            }
            m = rx.recv() => {
                let Some((op, resp)) = m else { break "link closed".to_string() };
                let mut batch = vec![(op, resp)];
                while batch.len() < 64 {
                    match rx.try_recv() { Ok(x) => batch.push(x), Err(_) => break }
                }
                let mut failed = None;
                for (op, resp) in batch {
                    seq += 1;
                    pending.lock().expect("poisoned").insert(seq, (resp, tokio::time::Instant::now()));
                    let f = Frame::Op { seq, volume: op.volume, epoch: op.epoch, size: op.size, fua: op.fua, resync: op.resync, op: op.op };
                    if let Err(e) = wr.write_all(&f.encode()).await { failed = Some(e); break; }
                }
                if failed.is_none() { if let Err(e) = wr.flush().await { failed = Some(e); } }
                if let Some(e) = failed { break format!("write: {e}"); }
            }
        }
    };
    reader.abort();
    rx.close();
    let peer_down = LinkError::Down("peer".into());
    for (_, (r, _)) in pending.lock().expect("poisoned").drain() {
        let _ = r.send(Err(peer_down.clone()));
    }
    while let Ok((_, r)) = rx.try_recv() {
        let _ = r.send(Err(peer_down.clone()));
    }
    reason
}
