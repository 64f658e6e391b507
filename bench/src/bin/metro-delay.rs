//! `metro-delay --queue N --delay-ms D`: hold every packet of NFQUEUE `N` for
//! `D` milliseconds (fractional allowed), then accept it. Packets leave in
//! arrival order (constant delay keeps FIFO order). Install the iptables rules
//! that feed the queue with `metro_bench::delay` (or `metro-bench delay install`).
//!
//! The loop sleeps in `ppoll` on the queue's socket until a packet arrives or
//! the oldest held one is due (timer slack 1 ns), so it adds about 0.1 ms per
//! round trip beyond the set delay and uses no CPU while idle. (It used to
//! poll every 50 µs: ~0.4 ms extra per round trip and 20% of a core at idle.)
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
    // The default 50 µs timer slack would let every sleep below overshoot,
    // adding up to ~100 µs to each packet's delay on top of the one asked for.
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) } != 0 {
        eprintln!("metro-delay: cannot lower the timer slack: {}", std::io::Error::last_os_error());
    }
    let before = socket_fds();
    let mut q = nfq::Queue::open().context("opening NFQUEUE netlink socket (root needed)")?;
    // The nfq crate does not expose its socket; it is the one socket that
    // opening the queue added. We wait on it with ppoll, so the loop sleeps
    // until a packet arrives or the next one is due, instead of polling.
    let fd = socket_fds()
        .difference(&before)
        .copied()
        .next()
        .context("cannot find the NFQUEUE netlink socket in /proc/self/fd")?;
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
        let wait = held.front().map(|(due, _)| due.saturating_duration_since(now));
        wait_readable(fd, wait).context("ppoll on the NFQUEUE socket")?;
    }
}

/// Descriptors of this process that are sockets.
fn socket_fds() -> std::collections::BTreeSet<i32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else { return Default::default() };
    dir.flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Block until `fd` is readable or `timeout` passed (forever if None).
fn wait_readable(fd: i32, timeout: Option<Duration>) -> std::io::Result<()> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: one valid pollfd, a valid or null timespec, no signal mask.
    let r = unsafe { libc::ppoll(&mut pfd, 1, tsp, std::ptr::null()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}
