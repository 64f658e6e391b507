//! [`NbdServer`]: accepts TCP connections and runs handshake then
//! transmission for each, until the shutdown signal.
//!
//! Invariants:
//! - at most [`MAX_CONNECTIONS`] connections are served at once; more are
//!   closed right after accept with a log line;
//! - a handshake that does not finish within [`HANDSHAKE_TIMEOUT`] is dropped;
//! - on shutdown the listener stops accepting, every connection stops taking
//!   requests and answers what is in flight, and `serve` returns after at most
//!   [`SHUTDOWN_GRACE`].

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::connection::{transmit, wait_true, NbdStream, DRAIN_TIMEOUT};
use super::handshake::{negotiate, HandshakeError, HandshakeOutcome};
use super::stats::{NbdStats, NbdStatsSnapshot};
use crate::block::ExportRegistry;

/// Connections served at once; an appliance has a handful of clients per volume.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a client has from connect to entering transmission.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `serve` waits for connections to drain after shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(DRAIN_TIMEOUT.as_secs() + 5);
/// Idle time before TCP keepalive probes start, so dead clients are noticed.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Pause after a failed accept (e.g. EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Upper bound on `max_request_bytes`: a reply chunk length (data + 8) must fit in u32,
/// and no client asks for more than a few tens of MiB.
pub const MAX_REQUEST_CEILING: u32 = 1 << 30;
/// Lower bound on `max_request_bytes`: one 4 KiB block must fit.
pub const MIN_REQUEST_FLOOR: u32 = 4096;
/// Upper bound on `max_in_flight` per connection.
pub const MAX_IN_FLIGHT_CEILING: usize = 1024;

/// Limits one server applies to every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    /// Largest READ/WRITE payload; advertised as the maximum block size.
    pub max_request_bytes: u32,
    /// Requests executed concurrently per connection.
    pub max_in_flight: usize,
}

impl Default for NbdLimits {
    fn default() -> Self {
        // 32 MiB is what qemu-nbd and nbdkit advertise; 64 in flight covers
        // fio iodepth 64 and qemu's default of 16 coroutines per connection.
        NbdLimits { max_request_bytes: 32 * 1024 * 1024, max_in_flight: 64 }
    }
}

impl NbdLimits {
    fn clamped(self) -> Self {
        NbdLimits {
            max_request_bytes: self.max_request_bytes.clamp(MIN_REQUEST_FLOOR, MAX_REQUEST_CEILING),
            max_in_flight: self.max_in_flight.clamp(1, MAX_IN_FLIGHT_CEILING),
        }
    }
}

/// The NBD server for one daemon.
pub struct NbdServer {
    registry: Arc<dyn ExportRegistry>,
    limits: NbdLimits,
    stats: Arc<NbdStats>,
}

impl NbdServer {
    pub fn new(registry: Arc<dyn ExportRegistry>, limits: NbdLimits) -> Self {
        let clamped = limits.clamped();
        if clamped != limits {
            tracing::warn!(?limits, ?clamped, "nbd limits out of range; clamped");
        }
        NbdServer { registry, limits: clamped, stats: Arc::new(NbdStats::default()) }
    }

    /// The limits in force (after clamping).
    pub fn limits(&self) -> NbdLimits {
        self.limits
    }

    /// Counters since start.
    pub fn stats(&self) -> NbdStatsSnapshot {
        self.stats.snapshot()
    }

    /// Serve `listener` until `shutdown` becomes true. A dropped shutdown
    /// sender means "never shut down".
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        tracing::info!(%local, "nbd server listening");
        let listener = Arc::new(listener);
        self.accept_loop(shutdown, move || {
            let listener = listener.clone();
            async move {
                let (stream, peer) = listener.accept().await?;
                if let Err(e) = tune_socket(&stream) {
                    tracing::warn!(error = %e, "nbd socket options not applied");
                }
                Ok((stream, peer.to_string()))
            }
        })
        .await
    }

    /// Serve a unix-socket `listener` (the attach agent's local endpoint)
    /// until `shutdown` becomes true.
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let local = listener.local_addr()?;
        tracing::info!(local = ?local.as_pathname(), "nbd server listening on a unix socket");
        let listener = Arc::new(listener);
        self.accept_loop(shutdown, move || {
            let listener = listener.clone();
            async move {
                let (stream, _) = listener.accept().await?;
                let peer = match stream.peer_cred() {
                    Ok(c) => format!("unix:pid={}", c.pid().unwrap_or(0)),
                    Err(_) => "unix".to_string(),
                };
                Ok((stream, peer))
            }
        })
        .await
    }

    async fn accept_loop<S, F, Fut>(
        self: Arc<Self>,
        shutdown: watch::Receiver<bool>,
        accept: F,
    ) -> std::io::Result<()>
    where
        S: NbdStream,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<(S, String)>>,
    {
        let mut conns = JoinSet::new();
        let mut stop = shutdown.clone();
        loop {
            tokio::select! {
                biased;
                _ = wait_true(&mut stop) => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = accept() => match accepted {
                    Ok((stream, peer)) => {
                        if conns.len() >= MAX_CONNECTIONS {
                            tracing::warn!(%peer, "nbd connection refused: {MAX_CONNECTIONS} connections already open");
                            continue;
                        }
                        let server = self.clone();
                        let shutdown = shutdown.clone();
                        let span = tracing::info_span!("nbd", %peer);
                        conns.spawn(async move { server.serve_one(stream, peer, shutdown).await }.instrument(span));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "nbd accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
        tracing::info!(open = conns.len(), "nbd server shutting down");
        drop(accept); // the listener: new clients are refused while the open ones drain
        let drained =
            tokio::time::timeout(SHUTDOWN_GRACE, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                left = conns.len(),
                "nbd connections did not close in {SHUTDOWN_GRACE:?}; aborting them"
            );
            conns.shutdown().await;
        }
        Ok(())
    }

    async fn serve_one<S: NbdStream>(
        self: Arc<Self>,
        mut stream: S,
        peer: String,
        mut shutdown: watch::Receiver<bool>,
    ) {
        NbdStats::add(&self.stats.connections_accepted, 1);
        let handshake = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            negotiate(&mut stream, self.registry.as_ref(), &self.limits),
        );
        let outcome = tokio::select! {
            r = handshake => r,
            _ = wait_true(&mut shutdown) => {
                tracing::debug!("nbd handshake abandoned: server shutting down");
                return;
            }
        };
        let neg = match outcome {
            Ok(Ok(HandshakeOutcome::Transmission(neg))) => neg,
            Ok(Ok(HandshakeOutcome::Closed)) => {
                tracing::debug!("nbd client ended the handshake");
                return;
            }
            Ok(Err(HandshakeError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                tracing::debug!("nbd client closed during the handshake");
                return;
            }
            Ok(Err(e)) => {
                NbdStats::add(&self.stats.handshake_failures, 1);
                tracing::warn!(error = %e, "nbd handshake failed; closing");
                return;
            }
            Err(_) => {
                NbdStats::add(&self.stats.handshake_failures, 1);
                tracing::warn!("nbd handshake did not finish in {HANDSHAKE_TIMEOUT:?}; closing");
                return;
            }
        };
        tracing::info!(
            export = %neg.export,
            size = neg.geometry.size,
            structured = neg.structured,
            "nbd client entered transmission"
        );
        NbdStats::add(&self.stats.connections_active, 1);
        transmit(stream, neg, self.limits.max_in_flight, self.stats.clone(), shutdown).await;
        self.stats.connections_active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(%peer, "nbd connection closed");
    }
}

fn tune_socket(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new().with_time(KEEPALIVE_IDLE).with_interval(KEEPALIVE_IDLE),
    )
}
