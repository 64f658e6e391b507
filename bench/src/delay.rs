//! Delay injection between two subnets without netem (TESTBED.md "Latency"):
//! iptables `mangle PREROUTING ... -j NFQUEUE` rules at the receiver plus the
//! `metro-delay` process holding each queued packet for half the RTT.
//!
//! Invariant: rules are only installed after the delayer has bound its queue
//! (an unbound queue drops packets), and a [`Delay`] removes its rules before
//! stopping its delayer, on drop too.

use anyhow::{bail, Context};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Time the delayer gets to bind its queue before rules point at it.
const BIND_GRACE: Duration = Duration::from_millis(300);
/// TCP connects per RTT measurement.
const RTT_SAMPLES: usize = 15;
/// Deadline for one measuring connect (well above any injected RTT).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One installed delay: rules plus the delayer process.
pub struct Delay {
    queue: u16,
    rules: Vec<Vec<String>>,
    child: Option<Child>,
    pub rtt_ms: f64,
}

fn iptables(args: &[String]) -> anyhow::Result<()> {
    let out = Command::new("iptables").args(args).output().context("running iptables")?;
    if !out.status.success() {
        bail!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn rule(op: &str, src: &str, dst: &str, queue: u16) -> Vec<String> {
    [
        "-t",
        "mangle",
        op,
        "PREROUTING",
        "-s",
        src,
        "-d",
        dst,
        "-j",
        "NFQUEUE",
        "--queue-num",
        &queue.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Delay {
    /// Add `rtt_ms` of round-trip time between every subnet in `side_a` and
    /// every subnet in `side_b` (half on each direction) through queue `queue`.
    pub fn install(
        bin_dir: &Path,
        queue: u16,
        side_a: &[&str],
        side_b: &[&str],
        rtt_ms: f64,
    ) -> anyhow::Result<Delay> {
        let child = Command::new(bin_dir.join("metro-delay"))
            .args(["--queue", &queue.to_string(), "--delay-ms", &(rtt_ms / 2.0).to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting metro-delay")?;
        let mut d = Delay { queue, rules: Vec::new(), child: Some(child), rtt_ms };
        std::thread::sleep(BIND_GRACE);
        if let Some(c) = d.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("metro-delay exited at start: {st}");
            }
        }
        for a in side_a {
            for b in side_b {
                for (s, t) in [(a, b), (b, a)] {
                    iptables(&rule("-A", s, t, queue))?;
                    d.rules.push(rule("-D", s, t, queue));
                }
            }
        }
        Ok(d)
    }

    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Remove the rules and stop the delayer.
    pub fn remove(mut self) -> anyhow::Result<()> {
        self.cleanup()
    }

    fn cleanup(&mut self) -> anyhow::Result<()> {
        let mut first_err = None;
        for r in self.rules.drain(..) {
            if let Err(e) = iptables(&r) {
                first_err.get_or_insert(e);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for Delay {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("removing delay on queue {}: {e}", self.queue);
        }
    }
}

/// Round-trip times measured by [`measure_rtt`], in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rtt {
    /// The fastest handshake: the path's own delay with the least scheduling
    /// noise on top (noise only ever adds time, so this is the tightest
    /// estimate of what the delayer injects).
    pub min_ms: f64,
    /// The typical handshake, what a client of the path sees.
    pub median_ms: f64,
}

/// TCP handshake times (SYN to SYN-ACK, one round trip) from `from` to a
/// throwaway listener on `to`, over 15 connects.
pub fn measure_rtt(from: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<Rtt> {
    let listener = TcpListener::bind(SocketAddrV4::new(to, 0)).with_context(|| format!("bind {to}"))?;
    let addr = listener.local_addr()?;
    let accept = std::thread::spawn(move || {
        for _ in 0..RTT_SAMPLES {
            if listener.accept().is_err() {
                break;
            }
        }
    });
    let mut samples = Vec::with_capacity(RTT_SAMPLES);
    for _ in 0..RTT_SAMPLES {
        let sock = Socket::bound(from)?;
        let t = Instant::now();
        let stream = sock.connect(&addr).context("measuring connect")?;
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        samples.push(t.elapsed().as_secs_f64() * 1000.0);
        drop(stream);
    }
    let _ = accept.join();
    let median_ms = crate::stats::median(&samples).context("no samples")?;
    let min_ms = samples.iter().copied().fold(f64::INFINITY, f64::min);
    Ok(Rtt { min_ms, median_ms })
}

/// Median TCP handshake time from `from` to `to`, in milliseconds.
pub fn measure_rtt_ms(from: Ipv4Addr, to: Ipv4Addr) -> anyhow::Result<f64> {
    Ok(measure_rtt(from, to)?.median_ms)
}

/// A blocking TCP connection to `to` originating from `from` (a site address).
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> anyhow::Result<TcpStream> {
    Ok(Socket::bound(from)?.connect(&to)?)
}

/// Minimal client socket bound to a source address (std's TcpStream cannot bind first).
struct Socket(i32);

impl Socket {
    fn bound(from: Ipv4Addr) -> anyhow::Result<Socket> {
        // SAFETY: plain socket/bind syscalls on a fresh descriptor we own.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(from.octets()) },
                sin_zero: [0; 8],
            };
            if libc::bind(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32) < 0
            {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e.into());
            }
            Ok(Socket(fd))
        }
    }

    fn connect(self, to: &SocketAddr) -> std::io::Result<TcpStream> {
        let SocketAddr::V4(v4) = to else { return Err(std::io::ErrorKind::InvalidInput.into()) };
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(v4.ip().octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: blocking connect on our own descriptor; ownership moves to
        // the TcpStream on success and the fd is closed on failure.
        unsafe {
            use std::os::fd::FromRawFd;
            let fd = self.0;
            std::mem::forget(self);
            if libc::connect(fd, &sa as *const _ as *const libc::sockaddr, std::mem::size_of_val(&sa) as u32)
                < 0
            {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
            Ok(TcpStream::from_raw_fd(fd))
        }
    }
}

impl Drop for Socket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}
