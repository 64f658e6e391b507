//! Test fixtures for the NBD server: an in-memory `BlockDevice`, a registry,
//! a server on 127.0.0.1 with a random port, a raw protocol client, and a
//! runner for real client processes with a kill-after deadline.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use metro_node::block::{BlockDevice, BlockError, BlockResult, ExportError, ExportRegistry};
use metro_node::nbd::proto::*;
use metro_node::nbd::wire;
use metro_node::nbd::{NbdLimits, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Every client process and every raw-socket wait gets this deadline.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);
pub const MIB: u64 = 1024 * 1024;

/// Operation counters a test can assert on.
#[derive(Default, Debug)]
pub struct MemCounters {
    pub writes: AtomicU64,
    pub fua_writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub zeroes_no_hole: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
}

/// A RAM-backed block device with knobs for fault and timing tests.
pub struct MemDevice {
    data: Mutex<Vec<u8>>,
    block_size: u32,
    min_block: u32,
    pub counters: MemCounters,
    /// Every operation sleeps this long (makes overlap observable).
    op_delay: Mutex<Duration>,
    /// Reads at exactly this offset sleep this long.
    slow_read: Mutex<Option<(u64, Duration)>>,
    /// Writes fail with `BlockError::Shutdown`.
    pub shutdown_writes: AtomicBool,
}

impl MemDevice {
    pub fn new(size: u64) -> Arc<Self> {
        Self::with_blocks(size, 4096, 1)
    }

    pub fn with_blocks(size: u64, block_size: u32, min_block: u32) -> Arc<Self> {
        Arc::new(MemDevice {
            data: Mutex::new(vec![0u8; size as usize]),
            block_size,
            min_block,
            counters: MemCounters::default(),
            op_delay: Mutex::new(Duration::ZERO),
            slow_read: Mutex::new(None),
            shutdown_writes: AtomicBool::new(false),
        })
    }

    pub fn set_op_delay(&self, d: Duration) {
        *self.op_delay.lock().unwrap() = d;
    }

    pub fn set_slow_read(&self, offset: u64, d: Duration) {
        *self.slow_read.lock().unwrap() = Some((offset, d));
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub fn fill(&self, bytes: &[u8]) {
        let mut d = self.data.lock().unwrap();
        d[..bytes.len()].copy_from_slice(bytes);
    }

    fn check(&self, offset: u64, len: u64) -> BlockResult<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(BlockError::OutOfRange { offset, len, size });
        }
        Ok(())
    }

    async fn op<T>(&self, f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
        let c = &self.counters;
        let now = c.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        c.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let delay = *self.op_delay.lock().unwrap();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let r = f(&mut self.data.lock().unwrap());
        c.in_flight.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn min_block_size(&self) -> u32 {
        self.min_block
    }
    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.check(offset, u64::from(len))?;
        let slow = *self.slow_read.lock().unwrap();
        if let Some((at, d)) = slow {
            if at == offset {
                tokio::time::sleep(d).await;
            }
        }
        Ok(self.op(|d| Bytes::copy_from_slice(&d[offset as usize..offset as usize + len as usize])).await)
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        if self.shutdown_writes.load(Ordering::SeqCst) {
            return Err(BlockError::Shutdown("planned move to node-b".into()));
        }
        self.check(offset, data.len() as u64)?;
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.counters.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        self.op(|d| d[offset as usize..offset as usize + data.len()].copy_from_slice(&data)).await;
        Ok(())
    }
    async fn flush(&self) -> BlockResult<()> {
        self.counters.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> BlockResult<()> {
        self.check(offset, u64::from(len))?;
        self.counters.trims.fetch_add(1, Ordering::SeqCst);
        self.op(|d| d[offset as usize..offset as usize + len as usize].fill(0)).await;
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool, may_punch: bool) -> BlockResult<()> {
        self.check(offset, u64::from(len))?;
        self.counters.zeroes.fetch_add(1, Ordering::SeqCst);
        if !may_punch {
            self.counters.zeroes_no_hole.fetch_add(1, Ordering::SeqCst);
        }
        self.op(|d| d[offset as usize..offset as usize + len as usize].fill(0)).await;
        Ok(())
    }
}

/// Exports by name, plus names that are refused with a given error.
#[derive(Default)]
pub struct MemRegistry {
    exports: Mutex<HashMap<String, Arc<MemDevice>>>,
    refused: Mutex<HashMap<String, ExportError>>,
}

impl MemRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    pub fn add(&self, name: &str, dev: Arc<MemDevice>) {
        self.exports.lock().unwrap().insert(name.to_owned(), dev);
    }
    pub fn refuse(&self, name: &str, err: ExportError) {
        self.refused.lock().unwrap().insert(name.to_owned(), err);
    }
}

impl ExportRegistry for MemRegistry {
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, ExportError> {
        if let Some(d) = self.exports.lock().unwrap().get(name) {
            return Ok(d.clone());
        }
        if let Some(e) = self.refused.lock().unwrap().get(name) {
            return Err(e.clone());
        }
        Err(ExportError::NotFound(name.to_owned()))
    }
    fn list(&self) -> Vec<String> {
        let mut v: Vec<_> = self.exports.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }
}

/// A running server; dropping it without `stop` leaves the task to the runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Arc<NbdServer>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    pub async fn start(registry: Arc<MemRegistry>, limits: NbdLimits) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(NbdServer::new(registry, limits));
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(server.clone().serve(listener, rx));
        TestServer { addr, server, shutdown, task }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.addr.port())
    }

    /// Signal shutdown and wait for `serve` to return.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        tokio::time::timeout(CLIENT_TIMEOUT, self.task).await.expect("serve returned").unwrap().unwrap();
    }

    pub fn signal_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

/// Output of a client process run under a deadline.
pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Run `program args` with a kill-after deadline; never hangs the test.
pub async fn run(program: &str, args: &[&str]) -> Run {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    let out = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish in {CLIENT_TIMEOUT:?}"))
        .unwrap();
    let r = Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    eprintln!("$ {program} {}\n{}{}", args.join(" "), r.stdout, r.stderr);
    r
}

/// Like [`run`] but the command must succeed.
pub async fn run_ok(program: &str, args: &[&str]) -> Run {
    let r = run(program, args).await;
    assert!(r.ok, "{program} {args:?} failed:\n{}\n{}", r.stdout, r.stderr);
    r
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

// --- A raw protocol client ---------------------------------------------------

/// One reply as seen by the raw client.
#[derive(Debug)]
pub struct RawReply {
    pub cookie: u64,
    pub error: u32,
    pub message: String,
    pub data: Vec<u8>,
}

pub struct RawClient {
    pub stream: TcpStream,
    pub structured: bool,
    /// Read lengths by cookie, needed to parse simple read replies.
    reads: HashMap<u64, u32>,
}

async fn deadline<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CLIENT_TIMEOUT, f).await.expect("raw client deadline")
}

impl RawClient {
    /// Connect, check the greeting and send client flags (fixed newstyle, no zeroes).
    pub async fn greet(addr: SocketAddr) -> TcpStream {
        let mut s = deadline(TcpStream::connect(addr)).await.unwrap();
        let mut g = [0u8; 18];
        deadline(s.read_exact(&mut g)).await.unwrap();
        assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBD_MAGIC);
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        let flags = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(flags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
        s
    }

    pub async fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
        let h = wire::encode_option_header(&wire::OptionHeader { option, length: data.len() as u32 });
        s.write_all(&h).await.unwrap();
        s.write_all(data).await.unwrap();
    }

    /// Read one option reply: (reply type, data).
    pub async fn read_option_reply(s: &mut TcpStream) -> (u32, Vec<u8>) {
        let mut h = [0u8; wire::OPTION_REPLY_HEADER_LEN];
        deadline(s.read_exact(&mut h)).await.unwrap();
        let h = wire::parse_option_reply_header(&h).unwrap();
        let mut data = vec![0u8; h.length as usize];
        deadline(s.read_exact(&mut data)).await.unwrap();
        (h.reply_type, data)
    }

    /// Full handshake with NBD_OPT_GO; returns the client and the INFO replies.
    pub async fn connect(addr: SocketAddr, export: &str, structured: bool) -> RawClient {
        let mut s = Self::greet(addr).await;
        if structured {
            Self::send_option(&mut s, NBD_OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(Self::read_option_reply(&mut s).await.0, NBD_REP_ACK);
        }
        let req = wire::InfoRequest { name: export.to_owned(), requests: vec![NBD_INFO_BLOCK_SIZE] };
        Self::send_option(&mut s, NBD_OPT_GO, &wire::encode_info_request(&req)).await;
        loop {
            let (t, data) = Self::read_option_reply(&mut s).await;
            match t {
                NBD_REP_INFO => continue,
                NBD_REP_ACK => break,
                other => panic!("NBD_OPT_GO failed with {other:#x}: {}", String::from_utf8_lossy(&data)),
            }
        }
        RawClient { stream: s, structured, reads: HashMap::new() }
    }

    /// Wrap a stream that is already in transmission.
    pub fn from_stream(stream: TcpStream, structured: bool) -> RawClient {
        RawClient { stream, structured, reads: HashMap::new() }
    }

    pub async fn send(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        if kind == NBD_CMD_READ {
            self.reads.insert(cookie, length);
        }
        let h = wire::encode_request(&wire::RequestHeader { flags, kind, cookie, offset, length });
        self.stream.write_all(&h).await.unwrap();
        self.stream.write_all(payload).await.unwrap();
    }

    /// Read the next (complete) reply.
    pub async fn recv(&mut self) -> RawReply {
        deadline(self.recv_inner()).await
    }

    async fn recv_inner(&mut self) -> RawReply {
        let mut magic = [0u8; 4];
        self.stream.read_exact(&mut magic).await.expect("reply magic");
        match u32::from_be_bytes(magic) {
            NBD_SIMPLE_REPLY_MAGIC => {
                let mut rest = [0u8; 12];
                self.stream.read_exact(&mut rest).await.unwrap();
                let mut full = magic.to_vec();
                full.extend_from_slice(&rest);
                let r = wire::parse_simple_reply(&full).unwrap();
                let mut data = Vec::new();
                if let Some(len) = self.reads.remove(&r.cookie) {
                    if r.error == 0 {
                        data = vec![0u8; len as usize];
                        self.stream.read_exact(&mut data).await.unwrap();
                    }
                }
                RawReply { cookie: r.cookie, error: r.error, message: String::new(), data }
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let mut rest = [0u8; 16];
                self.stream.read_exact(&mut rest).await.unwrap();
                let mut full = magic.to_vec();
                full.extend_from_slice(&rest);
                let c = wire::parse_chunk_header(&full).unwrap();
                assert_eq!(
                    c.flags & NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_FLAG_DONE,
                    "server sends one chunk per reply"
                );
                let mut payload = vec![0u8; c.length as usize];
                self.stream.read_exact(&mut payload).await.unwrap();
                self.reads.remove(&c.cookie);
                match c.kind {
                    NBD_REPLY_TYPE_NONE => {
                        RawReply { cookie: c.cookie, error: 0, message: String::new(), data: vec![] }
                    }
                    NBD_REPLY_TYPE_OFFSET_DATA => RawReply {
                        cookie: c.cookie,
                        error: 0,
                        message: String::new(),
                        data: payload[8..].to_vec(),
                    },
                    NBD_REPLY_TYPE_ERROR => {
                        let (error, message) = wire::parse_error_payload(&payload).unwrap();
                        RawReply { cookie: c.cookie, error, message, data: vec![] }
                    }
                    other => panic!("unexpected chunk type {other}"),
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }

    /// True when the server closed the connection (EOF within the deadline).
    pub async fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(deadline(self.stream.read(&mut b)).await, Ok(0) | Err(_))
    }
}

/// The default limits with a small maximum request, handy for oversize tests.
pub fn small_limits() -> NbdLimits {
    NbdLimits { max_request_bytes: 64 * 1024, max_in_flight: 16 }
}
