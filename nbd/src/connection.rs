//! The transmission phase of one connection: a reader that pipelines
//! requests, one task per request, and a single writer that owns the socket's
//! write half.
//!
//! ```text
//!  socket rd ──► reader ──(permit)──► spawn request task ──► device
//!                  │                          │
//!                  └─ immediate error replies ┴──► mpsc (bounded) ──► writer ──► socket wr
//! ```
//!
//! Invariants:
//! - at most `max_in_flight` requests are between "header read" and "reply
//!   queued", and at most [`IN_FLIGHT_BYTES`] of READ/WRITE payload; the
//!   reader stops reading until a permit frees, so memory is bounded;
//! - every request that was read gets exactly one reply (one simple reply or
//!   one structured chunk with `NBD_REPLY_FLAG_DONE`), matched by its cookie;
//! - a rejected WRITE's payload is always consumed (or the connection closed)
//!   so the stream never desynchronises;
//! - on DISC, EOF, bad magic, server shutdown, or a device `Shutdown` error,
//!   the reader stops taking requests, in-flight requests finish (bounded by
//!   [`DRAIN_TIMEOUT`]) and are answered, then the socket is closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use super::command::{classify, payload_len, Command, Geometry};
use super::handshake::{skip, Negotiated};
use super::proto::*;
use super::stats::NbdStats;
use super::wire;
use crate::block::{BlockDevice, BlockError};

/// Budget of READ/WRITE payload bytes held by one connection's in-flight
/// requests: 128 MiB lets four maximum-size (32 MiB) requests overlap while
/// 64 small ones fill the pipeline, and caps memory per client.
pub const IN_FLIGHT_BYTES: u64 = 128 * 1024 * 1024;
/// Granularity of the byte budget (semaphore permits are counted in these).
const BUDGET_UNIT_BYTES: u64 = 64 * 1024;
/// Oversized WRITE payloads up to this size are read and discarded so the
/// connection survives; bigger ones are answered and the connection closed,
/// since reading gigabytes of garbage is not worth keeping a broken client.
pub const MAX_SKIPPED_WRITE_BYTES: u64 = 256 * 1024 * 1024;
/// Once a header arrived, its payload must follow within this time.
pub const PAYLOAD_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that does not read its replies for this long is dropped.
pub const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long in-flight requests may take to finish after the connection stops
/// reading (device I/O is suspended at most this long before we give up).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket buffer sizes for the reader and the writer.
const IO_BUFFER_BYTES: usize = 256 * 1024;

/// One reply ready for the wire: header bytes, then optional read data.
struct Reply {
    head: Vec<u8>,
    data: Option<Bytes>,
}

/// Per-connection state shared with request tasks.
struct Conn {
    device: Arc<dyn BlockDevice>,
    structured: bool,
    stats: Arc<NbdStats>,
    replies: mpsc::Sender<Reply>,
    /// Set when the connection must stop taking requests (device shutdown, writer failure).
    stop: watch::Sender<bool>,
}

impl Conn {
    async fn send(&self, reply: Reply) {
        // A closed channel means the writer died; the reader is stopping too.
        let _ = self.replies.send(reply).await;
    }

    async fn reply_error(&self, h: &wire::RequestHeader, errno: u32, message: &str) {
        NbdStats::add(&self.stats.errors, 1);
        tracing::debug!(cookie = h.cookie, cmd = command_name(h.kind), errno, message, "nbd request failed");
        let head = if self.structured {
            wire::encode_error_chunk(h.cookie, errno, message)
        } else {
            wire::encode_simple_reply(&wire::SimpleReply { error: errno, cookie: h.cookie }).to_vec()
        };
        self.send(Reply { head, data: None }).await;
    }

    async fn reply_ok(&self, cookie: u64) {
        let head = wire::encode_simple_reply(&wire::SimpleReply { error: 0, cookie }).to_vec();
        self.send(Reply { head, data: None }).await;
    }

    async fn reply_read(&self, cookie: u64, offset: u64, data: Bytes) {
        NbdStats::add(&self.stats.bytes_read, data.len() as u64);
        let head = if self.structured {
            if data.is_empty() {
                let h = wire::ChunkHeader {
                    flags: NBD_REPLY_FLAG_DONE,
                    kind: NBD_REPLY_TYPE_NONE,
                    cookie,
                    length: 0,
                };
                wire::encode_chunk_header(&h).to_vec()
            } else {
                wire::encode_offset_data_prefix(cookie, offset, data.len() as u32).to_vec()
            }
        } else {
            wire::encode_simple_reply(&wire::SimpleReply { error: 0, cookie }).to_vec()
        };
        self.send(Reply { head, data: Some(data) }).await;
    }

    /// Run one accepted command against the device and queue its reply.
    async fn execute(&self, h: wire::RequestHeader, cmd: Command, payload: Option<Bytes>) {
        let result: Result<Option<Bytes>, BlockError> = match cmd {
            Command::Read { offset, len } => match self.device.read(offset, len).await {
                Ok(data) if data.len() == len as usize => Ok(Some(data)),
                Ok(data) => Err(BlockError::Io(std::io::Error::other(format!(
                    "device returned {} bytes for a {len}-byte read",
                    data.len()
                )))),
                Err(e) => Err(e),
            },
            Command::Write { offset, fua, .. } => {
                let data = payload.unwrap_or_default();
                let n = data.len() as u64;
                let r = self.device.write(offset, data, fua).await;
                if r.is_ok() {
                    NbdStats::add(&self.stats.bytes_written, n);
                }
                r.map(|_| None)
            }
            Command::Flush => self.device.flush().await.map(|_| None),
            Command::Trim { offset, len, fua } => self.device.trim(offset, len, fua).await.map(|_| None),
            Command::WriteZeroes { offset, len, fua, may_punch } => {
                self.device.write_zeroes(offset, len, fua, may_punch).await.map(|_| None)
            }
            Command::Noop => Ok(if h.kind == NBD_CMD_READ { Some(Bytes::new()) } else { None }),
            Command::Disconnect => Ok(None),
        };
        match result {
            Ok(Some(data)) => self.reply_read(h.cookie, h.offset, data).await,
            Ok(None) => self.reply_ok(h.cookie).await,
            Err(e) => {
                let shutdown = matches!(e, BlockError::Shutdown(_));
                self.reply_error(&h, e.nbd_errno(), &e.to_string()).await;
                if shutdown {
                    tracing::info!(error = %e, "nbd export shutting down; closing the connection after in-flight requests");
                    let _ = self.stop.send(true);
                }
            }
        }
    }
}

/// The writer task: drains replies in batches and flushes once per batch.
async fn write_replies<W: tokio::io::AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Reply>,
    stop: watch::Sender<bool>,
) {
    let mut wr = BufWriter::with_capacity(IO_BUFFER_BYTES, wr);
    while let Some(first) = rx.recv().await {
        let batch = async {
            let mut next = Some(first);
            while let Some(r) = next.take() {
                wr.write_all(&r.head).await?;
                if let Some(d) = &r.data {
                    wr.write_all(d).await?;
                }
                next = rx.try_recv().ok();
            }
            wr.flush().await
        };
        match tokio::time::timeout(REPLY_WRITE_TIMEOUT, batch).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "nbd reply write failed; closing");
                break;
            }
            Err(_) => {
                tracing::warn!("nbd client did not read replies for {REPLY_WRITE_TIMEOUT:?}; closing");
                break;
            }
        }
    }
    let _ = stop.send(true);
    let _ = wr.shutdown().await;
}

/// Why the reader stopped.
#[derive(Debug)]
enum StopReason {
    Disconnect,
    Eof,
    Stopped,
    ServerShutdown,
    Broken(String),
}

/// Serve the transmission phase until the connection ends.
pub(crate) async fn transmit<S: NbdStream>(
    stream: S,
    neg: Negotiated,
    max_in_flight: usize,
    stats: Arc<NbdStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (rd, wr) = stream.split_owned();
    let (tx, rx) = mpsc::channel::<Reply>(max_in_flight.max(1));
    let (stop, mut stopped) = watch::channel(false);
    let writer = tokio::spawn(write_replies(wr, rx, stop.clone()));
    let conn = Arc::new(Conn { device: neg.device, structured: neg.structured, stats, replies: tx, stop });
    let mut rd = BufReader::with_capacity(IO_BUFFER_BYTES, rd);
    let mut tasks = JoinSet::new();
    let reason =
        read_requests(&mut rd, &conn, &neg.geometry, max_in_flight, &mut tasks, &mut stopped, &mut shutdown)
            .await;
    match &reason {
        StopReason::Broken(why) => tracing::warn!(why, "nbd connection closed on a protocol error"),
        other => tracing::debug!(reason = ?other, "nbd connection stopping"),
    }
    let drained =
        tokio::time::timeout(DRAIN_TIMEOUT, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "nbd in-flight requests did not finish in {DRAIN_TIMEOUT:?}; dropping them"
        );
        tasks.shutdown().await;
    }
    drop(conn); // last reply sender: the writer flushes and exits
    let _ = writer.await;
}

/// A connected byte stream the server can serve: split into halves that
/// the reader and the writer tasks own (lock-free for TCP and unix sockets).
pub trait NbdStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    type Read: tokio::io::AsyncRead + Unpin + Send + 'static;
    type Write: tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn split_owned(self) -> (Self::Read, Self::Write);
}

impl NbdStream for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl NbdStream for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split_owned(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// Resolves once the flag is true; never, if its sender is gone.
pub(crate) async fn wait_true(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn read_requests<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    conn: &Arc<Conn>,
    geometry: &Geometry,
    max_in_flight: usize,
    tasks: &mut JoinSet<()>,
    stopped: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> StopReason {
    let slots = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let budget_units = (IN_FLIGHT_BYTES / BUDGET_UNIT_BYTES) as u32;
    let budget = Arc::new(Semaphore::new(budget_units as usize));
    loop {
        while tasks.try_join_next().is_some() {}
        let slot = tokio::select! {
            biased;
            _ = wait_true(stopped) => return StopReason::Stopped,
            _ = wait_true(shutdown) => return StopReason::ServerShutdown,
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        let read = tokio::select! {
            biased;
            _ = wait_true(stopped) => return StopReason::Stopped,
            _ = wait_true(shutdown) => return StopReason::ServerShutdown,
            r = rd.read_exact(&mut raw) => r,
        };
        match read {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return StopReason::Eof,
            Err(e) => return StopReason::Broken(format!("reading a request header: {e}")),
        }
        let h = match wire::parse_request(&raw) {
            Ok(h) => h,
            Err(e) => return StopReason::Broken(format!("request header: {e}")),
        };
        NbdStats::add(&conn.stats.requests, 1);
        tracing::trace!(
            cookie = h.cookie,
            cmd = command_name(h.kind),
            offset = h.offset,
            len = h.length,
            "nbd request"
        );
        let cmd = match classify(&h, geometry) {
            Ok(cmd) => cmd,
            Err(rej) => {
                let skip_len = u64::from(payload_len(&h));
                if skip_len > MAX_SKIPPED_WRITE_BYTES {
                    conn.reply_error(&h, rej.errno, &rej.message).await;
                    return StopReason::Broken(format!(
                        "{} with a {skip_len}-byte payload",
                        command_name(h.kind)
                    ));
                }
                if skip_len > 0 {
                    match tokio::time::timeout(PAYLOAD_READ_TIMEOUT, skip(rd, skip_len)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return StopReason::Broken(format!("skipping a rejected payload: {e}")),
                        Err(_) => return StopReason::Broken("payload did not arrive in time".into()),
                    }
                }
                conn.reply_error(&h, rej.errno, &rej.message).await;
                continue;
            }
        };
        let payload_bytes = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => u64::from(len),
            Command::Disconnect => return StopReason::Disconnect,
            _ => 0,
        };
        let units = payload_bytes.div_ceil(BUDGET_UNIT_BYTES).clamp(1, u64::from(budget_units)) as u32;
        let bytes_permit = tokio::select! {
            biased;
            _ = wait_true(stopped) => return StopReason::Stopped,
            _ = wait_true(shutdown) => return StopReason::ServerShutdown,
            p = budget.clone().acquire_many_owned(units) => p.expect("semaphore never closed"),
        };
        let payload = if let Command::Write { len, .. } = cmd {
            let mut buf = BytesMut::zeroed(len as usize);
            match tokio::time::timeout(PAYLOAD_READ_TIMEOUT, rd.read_exact(&mut buf)).await {
                Ok(Ok(_)) => Some(buf.freeze()),
                Ok(Err(e)) => return StopReason::Broken(format!("reading a WRITE payload: {e}")),
                Err(_) => return StopReason::Broken("WRITE payload did not arrive in time".into()),
            }
        } else {
            None
        };
        let conn = conn.clone();
        tasks.spawn(async move {
            conn.execute(h, cmd, payload).await;
            drop((slot, bytes_permit));
        });
    }
}
