//! `metro-delay --queue N --delay-ms D`: hold every packet of NFQUEUE `N` for
//! `D` milliseconds (fractional allowed), then accept it. Packets leave in
//! arrival order (constant delay keeps FIFO order). Install the iptables rules
//! that feed the queue with `metro_bench::delay` (or `metro-bench delay install`).
//!
//! Invariant: a packet is never accepted before its due time and never dropped
//! by this process; the kernel queue is sized by [`QUEUE_MAX_LEN`].

use anyhow::Context;
use clap::Parser;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Kernel queue length: at 5 ms one-way and ~100k packets/s of bulk traffic
/// about 500 packets are in flight; 65536 leaves room for bursts.
const QUEUE_MAX_LEN: u32 = 65_536;
/// Bytes of each packet copied to userspace: the verdict needs none.
const COPY_RANGE: u16 = 0;
/// Longest sleep when idle, so new packets are picked up promptly.
const IDLE_POLL: Duration = Duration::from_micros(50);

#[derive(Parser)]
struct Args {
    /// NFQUEUE number the iptables rules send packets to.
    #[arg(long)]
    queue: u16,
    /// One-way delay added to every queued packet, in milliseconds.
    #[arg(long)]
    delay_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let delay = Duration::from_secs_f64(args.delay_ms.max(0.0) / 1000.0);
    let mut q = nfq::Queue::open().context("opening NFQUEUE netlink socket (root needed)")?;
    q.bind(args.queue).with_context(|| format!("binding queue {}", args.queue))?;
    q.set_queue_max_len(args.queue, QUEUE_MAX_LEN)?;
    q.set_copy_range(args.queue, COPY_RANGE)?;
    q.set_fail_open(args.queue, false)?;
    q.set_nonblocking(true);
    eprintln!("metro-delay: queue {} delay {:?}", args.queue, delay);
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        loop {
            match q.recv() {
                Ok(mut m) => {
                    m.set_verdict(nfq::Verdict::Accept);
                    held.push_back((Instant::now() + delay, m));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    eprintln!("metro-delay: kernel dropped queue messages (ENOBUFS)");
                    break;
                }
                Err(e) => return Err(e).context("recv"),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, m) = held.pop_front().expect("front exists");
            q.verdict(m).context("verdict")?;
        }
        let sleep = held.front().map(|(due, _)| due.saturating_duration_since(now)).unwrap_or(IDLE_POLL);
        std::thread::sleep(sleep.min(IDLE_POLL));
    }
}
