//! One attached volume's upstream: a [`BlockDevice`] whose every request
//! goes to the volume's current primary, and is re-sent to the next one when
//! the connection fails or the primary moves.
//!
//! A single dispatcher task owns the upstream connection and every request
//! not yet answered (`pending`, by sequence number, which is also the NBD
//! cookie). When the connection breaks, when the primary answers ESHUTDOWN
//! (its export is going away: a planned move, a hand-off, a lost lease), or
//! when the cluster names another primary, the dispatcher drops the
//! connection, holds new requests, connects to the primary the cluster names
//! (or that the refusing node named), and re-sends every pending request in
//! its original order before anything new. It answers a request only with
//! the upstream's answer: nothing is acknowledged that the upstream did not
//! acknowledge. After `hold` without a primary, requests fail with EIO
//! (policy `error`) or keep waiting (policy `suspend`).
//!
//! Why re-sending is safe: docs/data-path.md, "The attach agent".

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use metro_nbd::block::{BlockDevice, BlockError, BlockResult};
use metro_nbd::client::{self, ClientError, ExportInfo, Request};
use tokio::sync::{mpsc, oneshot, watch, Notify};

/// ESHUTDOWN: the server's export is going away; try the next primary.
const ESHUTDOWN: u32 = 108;
/// Requests one volume holds unanswered (in flight upstream or held).
pub const MAX_PENDING: usize = 1024;
/// Requests the dispatcher sends before one flush of the socket.
const SEND_BATCH: usize = 64;
/// Between connection attempts while no primary answers.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How long a hold lasts before the locator is asked to watch through
/// another node (the one it watches may be cut off with a stale view).
const ROTATE_AFTER: Duration = Duration::from_secs(3);

/// Where the cluster says a volume is served.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Location {
    pub primary: String,
    /// host:port of the primary's NBD server.
    pub nbd: String,
    pub epoch: u64,
}

/// What happens to requests once a hold has lasted `hold`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HoldPolicy {
    /// Fail them with EIO (new ones too, until a primary answers again).
    Error,
    /// Keep holding them, however long it takes.
    Suspend,
}

#[derive(Debug, Clone)]
pub struct FollowOptions {
    pub hold: Duration,
    pub policy: HoldPolicy,
    pub connect_timeout: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        FollowOptions {
            hold: Duration::from_secs(120),
            policy: HoldPolicy::Error,
            connect_timeout: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("no primary of `{volume}` answered within {after:?}: {last}")]
    NoPrimary { volume: String, after: Duration, last: String },
    #[error(
        "`{volume}` is {got} bytes at {addr}, but it was {want} bytes when attached: refusing to serve it"
    )]
    SizeChanged { volume: String, addr: String, got: u64, want: u64 },
}

/// Counters and the current state of one attachment (exported as metrics
/// and in `metro-attach attachments`).
#[derive(Debug, Default)]
pub struct FollowStats {
    pub reconnects: AtomicU64,
    pub resent: AtomicU64,
    pub holding: AtomicBool,
    pub failed_after_hold: AtomicU64,
    /// Finished holds (seconds each), newest last; bounded.
    pub stalls: Mutex<Vec<f64>>,
    pub primary: Mutex<String>,
}

const MAX_STALLS_KEPT: usize = 1024;

impl FollowStats {
    fn stalled(&self, secs: f64) {
        let mut s = self.stalls.lock().expect("poisoned");
        if s.len() == MAX_STALLS_KEPT {
            s.remove(0);
        }
        s.push(secs);
    }
}

struct Job {
    req: Request,
    done: oneshot::Sender<BlockResult<Bytes>>,
}

/// A volume as the agent serves it locally.
pub struct Follower {
    volume: String,
    info: ExportInfo,
    jobs: mpsc::Sender<(Request, oneshot::Sender<BlockResult<Bytes>>)>,
    pub stats: Arc<FollowStats>,
}

impl Follower {
    /// Connect to the primary `target` names (waiting up to the hold for
    /// one), and start following it. `rotate` asks the locator to watch
    /// through another node.
    pub async fn start(
        volume: &str,
        opts: FollowOptions,
        mut target: watch::Receiver<Option<Location>>,
        rotate: Arc<Notify>,
    ) -> Result<Arc<Follower>, FollowError> {
        let started = Instant::now();
        let mut last = String::from("the cluster named no primary yet");
        let mut hint = None;
        let (sender, receiver, info, at) = loop {
            let addr = hint
                .take()
                .or_else(|| target.borrow().as_ref().map(|l| l.nbd.clone()).filter(|a| !a.is_empty()));
            if let Some(addr) = addr {
                match client::connect(&addr, volume, opts.connect_timeout).await {
                    Ok((s, r, info)) => break (s, r, info, addr),
                    Err(e) => {
                        hint = refusal_hint(&e);
                        last = e.to_string();
                    }
                }
            }
            if started.elapsed() > opts.hold {
                return Err(FollowError::NoPrimary { volume: volume.into(), after: opts.hold, last });
            }
            if started.elapsed() > ROTATE_AFTER {
                rotate.notify_one();
            }
            tokio::select! {
                _ = target.changed() => {}
                _ = tokio::time::sleep(RETRY_EVERY) => {}
            }
        };
        tracing::info!(volume, primary = %at, size = info.size, "attached: following the primary");
        let stats = Arc::new(FollowStats::default());
        *stats.primary.lock().expect("poisoned") = at.clone();
        let (jobs_tx, jobs_rx) = mpsc::channel(MAX_PENDING);
        let mut d = Dispatcher {
            volume: volume.to_string(),
            size: info.size,
            opts,
            stats: stats.clone(),
            target,
            rotate,
            jobs: jobs_rx,
            pending: BTreeMap::new(),
            next: 1,
            conn: None,
            held_since: None,
            hint: None,
            last_error: String::new(),
        };
        d.install(sender, receiver, at);
        tokio::spawn(d.run());
        Ok(Arc::new(Follower { volume: volume.to_string(), info, jobs: jobs_tx, stats }))
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    async fn call(&self, req: Request) -> BlockResult<Bytes> {
        let rx = self.submit(req).await?;
        rx.await.map_err(|_| BlockError::Shutdown("the attach agent is stopping".into()))?
    }

    async fn submit(&self, req: Request) -> BlockResult<oneshot::Receiver<BlockResult<Bytes>>> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send((req, tx))
            .await
            .map_err(|_| BlockError::Shutdown("the attach agent is stopping".into()))?;
        Ok(rx)
    }
}

#[async_trait]
impl BlockDevice for Follower {
    fn size(&self) -> u64 {
        self.info.size
    }
    fn block_size(&self) -> u32 {
        self.info.preferred_block.clamp(512, 1 << 20)
    }
    fn min_block_size(&self) -> u32 {
        self.info.min_block.max(1)
    }
    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        self.call(Request::Read { offset, len }).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.call(Request::Write { offset, data, fua }).await.map(drop)
    }
    async fn write_batch(&self, writes: Vec<(u64, Bytes)>) -> Vec<BlockResult<()>> {
        // All upstream at once (in order), then their answers.
        let mut waiting = Vec::with_capacity(writes.len());
        for (offset, data) in writes {
            waiting.push(self.submit(Request::Write { offset, data, fua: false }).await);
        }
        let mut out = Vec::with_capacity(waiting.len());
        for w in waiting {
            out.push(match w {
                Ok(rx) => rx
                    .await
                    .map_err(|_| BlockError::Shutdown("the attach agent is stopping".into()))
                    .and_then(|r| r.map(drop)),
                Err(e) => Err(e),
            });
        }
        out
    }
    async fn flush(&self) -> BlockResult<()> {
        self.call(Request::Flush).await.map(drop)
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BlockResult<()> {
        self.call(Request::Trim { offset, len, fua }).await.map(drop)
    }
    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool, may_punch: bool) -> BlockResult<()> {
        self.call(Request::WriteZeroes { offset, len, fua, may_punch }).await.map(drop)
    }
}

/// An NBD error number from the upstream, as the local client will see it.
fn block_error(errno: u32, offset_len: (u64, u64), size: u64) -> BlockError {
    match errno {
        1 => BlockError::ReadOnly,
        22 => BlockError::OutOfRange { offset: offset_len.0, len: offset_len.1, size },
        28 => BlockError::NoSpace,
        e => BlockError::Io(std::io::Error::from_raw_os_error(e as i32)),
    }
}

fn range_of(r: &Request) -> (u64, u64) {
    match r {
        Request::Read { offset, len } => (*offset, *len as u64),
        Request::Write { offset, data, .. } => (*offset, data.len() as u64),
        Request::Flush => (0, 0),
        Request::Trim { offset, len, .. } | Request::WriteZeroes { offset, len, .. } => {
            (*offset, *len as u64)
        }
    }
}

/// Where to connect next: the primary a refusing node named, else the one
/// the cluster names.
fn next_upstream(hint: &mut Option<String>, target: &watch::Receiver<Option<Location>>) -> Option<String> {
    hint.take().or_else(|| target.borrow().as_ref().map(|l| l.nbd.clone()).filter(|a| !a.is_empty()))
}

/// A node that refused the export because it is not the primary names the
/// one that is (`... at nbd://HOST:PORT/VOLUME; connect there`).
pub fn refusal_hint(e: &ClientError) -> Option<String> {
    let ClientError::Refused { message, .. } = e else { return None };
    let rest = &message[message.find("nbd://")? + "nbd://".len()..];
    let addr = rest.split('/').next()?;
    (!addr.is_empty()).then(|| addr.to_string())
}

struct Conn {
    tx: client::Sender,
    replies: mpsc::Receiver<Result<(u64, client::Reply), ClientError>>,
    _reader: AbortOnDrop,
    addr: String,
}

/// The connection's reader task ends with the connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Dispatcher {
    volume: String,
    size: u64,
    opts: FollowOptions,
    stats: Arc<FollowStats>,
    target: watch::Receiver<Option<Location>>,
    rotate: Arc<Notify>,
    jobs: mpsc::Receiver<(Request, oneshot::Sender<BlockResult<Bytes>>)>,
    pending: BTreeMap<u64, Job>,
    next: u64,
    conn: Option<Conn>,
    held_since: Option<Instant>,
    hint: Option<String>,
    last_error: String,
}

async fn next_reply(conn: &mut Option<Conn>) -> Option<Result<(u64, client::Reply), ClientError>> {
    match conn {
        Some(c) => c.replies.recv().await,
        None => std::future::pending().await,
    }
}

impl Dispatcher {
    fn install(&mut self, tx: client::Sender, mut rx: client::Receiver, addr: String) {
        // Never full: at most MAX_PENDING requests are outstanding on it.
        let (rtx, rrx) = mpsc::channel(MAX_PENDING + 1);
        let reader = tokio::spawn(async move {
            loop {
                let r = rx.next().await;
                let end = r.is_err();
                if rtx.send(r).await.is_err() || end {
                    return;
                }
            }
        });
        self.conn = Some(Conn { tx, replies: rrx, _reader: AbortOnDrop(reader), addr });
    }

    async fn run(mut self) {
        loop {
            if self.conn.is_none() {
                self.try_connect().await;
            }
            self.expire_hold();
            let open = self.pending.len() < MAX_PENDING;
            tokio::select! {
                biased;
                r = next_reply(&mut self.conn) => match r {
                    Some(Ok((cookie, reply))) => self.on_reply(cookie, reply),
                    Some(Err(e)) => self.lost(&e.to_string()),
                    None => self.lost("the upstream connection closed"),
                },
                j = self.jobs.recv(), if open => match j {
                    Some((req, done)) => self.on_jobs(req, done).await,
                    None => {
                        // Every local handle is gone: the attachment ends.
                        if let Some(c) = self.conn.take() {
                            let Conn { tx, .. } = c;
                            tx.disconnect().await;
                        }
                        return;
                    }
                },
                r = self.target.changed() => {
                    if r.is_err() {
                        // The locator is gone: keep the connection we have.
                        std::future::pending::<()>().await;
                    }
                    self.on_target();
                }
                _ = tokio::time::sleep(RETRY_EVERY), if self.conn.is_none() => {}
            }
        }
    }

    /// New requests: this one and whatever else is queued, sent in one go.
    async fn on_jobs(&mut self, req: Request, done: oneshot::Sender<BlockResult<Bytes>>) {
        let mut batch = vec![(req, done)];
        while batch.len() < SEND_BATCH && self.pending.len() + batch.len() < MAX_PENDING {
            match self.jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let failing = self.hold_expired() && self.opts.policy == HoldPolicy::Error;
        let mut sent_any = false;
        for (req, done) in batch {
            if failing {
                let _ = done.send(Err(BlockError::Io(std::io::Error::other(format!(
                    "no primary of {} for {:?}: {}",
                    self.volume, self.opts.hold, self.last_error
                )))));
                continue;
            }
            let seq = self.next;
            self.next += 1;
            if let Some(c) = &mut self.conn {
                match c.tx.send(seq, &req).await {
                    Ok(()) => sent_any = true,
                    Err(e) => {
                        self.pending.insert(seq, Job { req, done });
                        self.lost(&e.to_string());
                        continue;
                    }
                }
            }
            self.pending.insert(seq, Job { req, done });
        }
        if sent_any {
            if let Some(c) = &mut self.conn {
                if let Err(e) = c.tx.flush().await {
                    self.lost(&e.to_string());
                }
            }
        }
    }

    fn on_reply(&mut self, cookie: u64, reply: client::Reply) {
        match reply {
            Err(ESHUTDOWN) => {
                // Still pending: it goes to the next primary.
                self.lost("the primary is shutting its export down (ESHUTDOWN)");
            }
            Ok(data) => {
                if let Some(j) = self.pending.remove(&cookie) {
                    let _ = j.done.send(Ok(data));
                }
            }
            Err(errno) => {
                if let Some(j) = self.pending.remove(&cookie) {
                    let _ = j.done.send(Err(block_error(errno, range_of(&j.req), self.size)));
                }
            }
        }
    }

    /// The connection is unusable: hold, and find the primary again.
    fn lost(&mut self, why: &str) {
        let Some(c) = self.conn.take() else { return };
        if self.held_since.is_none() {
            self.held_since = Some(Instant::now());
            self.stats.holding.store(true, Ordering::Relaxed);
        }
        self.last_error = why.to_string();
        tracing::warn!(volume = %self.volume, upstream = %c.addr, why, pending = self.pending.len(), "upstream lost: holding requests until the primary answers");
    }

    fn on_target(&mut self) {
        let now = self.target.borrow_and_update().clone();
        let Some(loc) = now else { return };
        if let Some(c) = &self.conn {
            if !loc.nbd.is_empty() && c.addr != loc.nbd {
                let why = format!(
                    "the cluster names {} ({}) at epoch {} as the primary",
                    loc.primary, loc.nbd, loc.epoch
                );
                self.lost(&why);
            }
        }
    }

    fn hold_expired(&self) -> bool {
        self.held_since.is_some_and(|t| t.elapsed() > self.opts.hold)
    }

    fn expire_hold(&mut self) {
        if !(self.hold_expired() && self.opts.policy == HoldPolicy::Error) || self.pending.is_empty() {
            return;
        }
        let n = self.pending.len();
        for (_, j) in std::mem::take(&mut self.pending) {
            let _ = j.done.send(Err(BlockError::Io(std::io::Error::other(format!(
                "no primary of {} answered for {:?}",
                self.volume, self.opts.hold
            )))));
        }
        self.stats.failed_after_hold.fetch_add(n as u64, Ordering::Relaxed);
        tracing::error!(volume = %self.volume, failed = n, hold = ?self.opts.hold, last = %self.last_error, "no primary answered for the whole hold: failing the held requests with EIO (policy `error`)");
    }

    async fn try_connect(&mut self) {
        let Some(addr) = next_upstream(&mut self.hint, &self.target) else { return };
        match client::connect(&addr, &self.volume, self.opts.connect_timeout).await {
            Ok((tx, rx, info)) => {
                if info.size != self.size {
                    let e = FollowError::SizeChanged {
                        volume: self.volume.clone(),
                        addr: addr.clone(),
                        got: info.size,
                        want: self.size,
                    };
                    tracing::error!(error = %e, "not following");
                    self.last_error = e.to_string();
                    return;
                }
                self.install(tx, rx, addr.clone());
                *self.stats.primary.lock().expect("poisoned") = addr.clone();
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                let stalled = self.held_since.take().map(|t| t.elapsed());
                self.stats.holding.store(false, Ordering::Relaxed);
                if let Some(s) = stalled {
                    self.stats.stalled(s.as_secs_f64());
                }
                let n = self.resend().await;
                tracing::info!(volume = %self.volume, primary = %addr, resent = n, stalled_ms = stalled.map(|s| s.as_millis() as u64), "following the primary again");
            }
            Err(e) => {
                self.hint = refusal_hint(&e);
                tracing::debug!(volume = %self.volume, %addr, error = %e, "primary not reachable yet");
                self.last_error = e.to_string();
                if self.held_since.is_some_and(|t| t.elapsed() > ROTATE_AFTER) {
                    self.rotate.notify_one();
                }
            }
        }
    }

    /// Every pending request, in its original order, on the new connection.
    async fn resend(&mut self) -> usize {
        let Some(c) = &mut self.conn else { return 0 };
        let mut n = 0;
        let mut failed = None;
        for (seq, j) in &self.pending {
            if let Err(e) = c.tx.send(*seq, &j.req).await {
                failed = Some(e.to_string());
                break;
            }
            n += 1;
        }
        if failed.is_none() {
            if let Err(e) = c.tx.flush().await {
                failed = Some(e.to_string());
            }
        }
        self.stats.resent.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(why) = failed {
            self.lost(&why);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_primary_to_try_next() {
        let e = ClientError::Refused {
            addr: "10.77.1.11:10809".into(),
            export: "v".into(),
            code: 0x8000_0006,
            message: "volume `v` is served by its primary `b1` at nbd://10.77.2.11:10809/v; connect there"
                .into(),
        };
        assert_eq!(refusal_hint(&e).as_deref(), Some("10.77.2.11:10809"));
        let other = ClientError::Refused {
            addr: "x".into(),
            export: "v".into(),
            code: 0x8000_0006,
            message: "no volume named `v`".into(),
        };
        assert_eq!(refusal_hint(&other), None);
    }
}
