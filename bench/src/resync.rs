//! Resync section: write a volume while its replica node is down, restart
//! the node, and measure the time and bytes moved until it is back in sync,
//! against the raw speed of a plain TCP bulk copy between the two sites.

use crate::ctl::CtlExt;
use crate::delay::connect_from;
use crate::lab::BenchLab;
use crate::report::{Section, Target};
use anyhow::{bail, Context};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpListener};
use std::process::Command;
use std::time::{Duration, Instant};

/// Required resync throughput as a fraction of the measured link speed.
pub const LINK_FRACTION: f64 = 0.25;
/// Resync must move at most this multiple of the dirty bytes.
pub const MAX_AMPLIFICATION: f64 = 1.5;
const SYNC_DEADLINE: Duration = Duration::from_secs(600);
const COPY_BUF: usize = 1 << 20;

/// Bytes/s of one TCP stream from a dc-a address to a dc-b address.
pub fn link_speed(lab: &BenchLab, bytes: u64) -> anyhow::Result<f64> {
    let listener = TcpListener::bind(SocketAddrV4::new(lab.probe_addr("dc-b"), 0))?;
    let addr = listener.local_addr()?;
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; COPY_BUF];
        let mut n = 0u64;
        loop {
            let r = s.read(&mut buf)?;
            if r == 0 {
                return Ok(n);
            }
            n += r as u64;
        }
    });
    let mut c = connect_from(lab.probe_addr("dc-a"), addr)?;
    let buf = vec![0x5au8; COPY_BUF];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        c.write_all(&buf)?;
        sent += COPY_BUF as u64;
    }
    drop(c);
    let got = sink.join().expect("sink thread")?;
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for d in it.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn field(line: &str, key: &str) -> Option<u64> {
    let i = line.find(&format!("{key}="))? + key.len() + 1;
    line[i..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().ok()
}

/// (dirty_bytes, data_bytes_sent, ms, ok) of every "resync pass" log line for `vol`.
pub fn resync_passes(log: &str, vol: &str) -> Vec<(u64, u64, u64, bool)> {
    log.lines()
        .map(strip_ansi)
        .filter(|l| l.contains("resync pass") && l.contains(&format!("volume={vol} ")))
        .filter_map(|l| {
            Some((
                field(&l, "dirty_bytes")?,
                field(&l, "data_bytes_sent")?,
                field(&l, "ms")?,
                l.contains("ok=true"),
            ))
        })
        .collect()
}

pub async fn run(lab: &BenchLab, write_bytes: u64, link_bytes: u64) -> anyhow::Result<Section> {
    let vol = "resync";
    lab.ctl.run(&["volume", "create", vol, "--size", "2GiB", "--site", "dc-a"])?;
    lab.wait_in_sync(vol, Duration::from_secs(60)).await?;
    let v = lab.ctl.volume(vol)?;
    let primary = v["primary"].as_str().context("primary")?.to_string();
    let uri = v["nbd"].as_str().context("nbd")?.to_string();
    let replica = v["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .find(|n| *n != primary)
        .context("second replica")?
        .to_string();
    let log_path = lab.info.daemon(&primary).context("primary info")?.proc.log.clone();
    let passes_before = resync_passes(&std::fs::read_to_string(&log_path).unwrap_or_default(), vol).len();

    metroctl::lab::kill_node(lab.dir(), &replica)?;
    eprintln!("resync: {replica} down, writing {} MiB of 4k-64k random writes to {uri}", write_bytes >> 20);
    let t = Instant::now();
    let out = Command::new("fio")
        .args([
            "--name=resync",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-64k",
        ])
        .args([
            "--size=2G",
            &format!("--io_size={write_bytes}"),
            "--iodepth=16",
            "--randrepeat=0",
            "--fsync=256",
        ])
        .args(["--output-format=json"])
        .output()
        .context("fio")?;
    if !out.status.success() {
        bail!("fio: {}", String::from_utf8_lossy(&out.stderr));
    }
    let write_s = t.elapsed().as_secs_f64();
    let v = lab.ctl.volume(vol)?;
    let dirty_before = v["replica_status"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["node"] == replica.as_str())
        .and_then(|r| r["dirty_bytes"].as_u64())
        .unwrap_or(0);
    eprintln!("resync: wrote in {write_s:.1} s; {replica} dirty {dirty_before} bytes; restarting it");

    let t0 = Instant::now();
    metroctl::lab::start_node(lab.dir(), &replica).await?;
    let mut peak_rate = 0u64;
    loop {
        if t0.elapsed() > SYNC_DEADLINE {
            bail!("{replica} not in sync after {SYNC_DEADLINE:?}");
        }
        if let Ok(v) = lab.ctl.volume(vol) {
            for r in v["replica_status"].as_array().into_iter().flatten() {
                peak_rate = peak_rate.max(r["resync_rate_bps"].as_u64().unwrap_or(0));
            }
        }
        if lab.ctl.in_sync(vol).unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sync_s = t0.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let passes: Vec<_> = resync_passes(&log, vol).into_iter().skip(passes_before).collect();
    let dirty_logged: u64 = passes.iter().filter(|p| p.3).map(|p| p.0).sum();
    let sent: u64 = passes.iter().map(|p| p.1).sum();
    let pass_ms: u64 = passes.iter().map(|p| p.2).sum();
    let link = link_speed(lab, link_bytes)?;
    let copy_rate = if pass_ms > 0 { sent as f64 / (pass_ms as f64 / 1000.0) } else { 0.0 };
    let end_to_end_rate = sent as f64 / sync_s;
    let amplification = if dirty_before > 0 { sent as f64 / dirty_before as f64 } else { 0.0 };
    let mib = |b: f64| b / 1048576.0;
    let md = format!(
        "| written while down | dirty (volume show) | resync passes | bytes sent | restart→in-sync | copy time (log) | copy rate | end-to-end rate | link speed | copy rate / link | sent / dirty |\n|---|---|---|---|---|---|---|---|---|---|---|\n| {:.0} MiB in {write_s:.1} s | {:.1} MiB | {} | {:.1} MiB | {sync_s:.1} s | {:.1} s | {:.1} MiB/s | {:.1} MiB/s | {:.0} MiB/s | {:.3} | {:.2} |\n",
        mib(write_bytes as f64),
        mib(dirty_before as f64),
        passes.len(),
        mib(sent as f64),
        pass_ms as f64 / 1000.0,
        mib(copy_rate),
        mib(end_to_end_rate),
        mib(link),
        copy_rate / link,
        amplification,
    );
    let targets = vec![
        Target::ours(
            "resync",
            "resync copy rate vs plain TCP link",
            format!("≥ {:.0}% of link", LINK_FRACTION * 100.0),
            format!("{:.1}% ({:.1} of {:.0} MiB/s)", copy_rate / link * 100.0, mib(copy_rate), mib(link)),
            copy_rate >= link * LINK_FRACTION,
        ),
        Target::ours(
            "resync",
            "bytes moved vs dirty bytes",
            format!("≤ {MAX_AMPLIFICATION}×"),
            format!("{amplification:.2}×"),
            dirty_before > 0 && amplification <= MAX_AMPLIFICATION,
        ),
    ];
    let json = json!({"primary": primary, "replica": replica, "written_bytes": write_bytes, "write_s": write_s,
        "dirty_bytes_before_restart": dirty_before, "passes": passes.iter().map(|p| json!({"dirty_bytes": p.0,
        "data_bytes_sent": p.1, "ms": p.2, "ok": p.3})).collect::<Vec<_>>(), "dirty_bytes_logged": dirty_logged,
        "bytes_sent": sent, "restart_to_in_sync_s": sync_s, "copy_rate_bps": copy_rate,
        "end_to_end_rate_bps": end_to_end_rate, "peak_rate_bps_volume_show": peak_rate, "link_bps": link,
        "link_probe_bytes": link_bytes});
    Ok(Section { json, markdown: md, targets })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resync_pass_lines_are_parsed_through_ansi_colours() {
        let log = "\u{1b}[2m2026\u{1b}[0m INFO resync pass \u{1b}[3mvolume\u{1b}[0m\u{1b}[2m=\u{1b}[0mresync \u{1b}[3mpeer\u{1b}[0m=b2 dirty_bytes=65536 data_bytes_sent=4096 ms=12 ok=true\nother volume=resync2 resync pass dirty_bytes=1 data_bytes_sent=1 ms=1 ok=true";
        assert_eq!(resync_passes(log, "resync"), vec![(65536, 4096, 12, true)]);
    }
}
