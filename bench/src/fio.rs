//! fio runs against an NBD URI (`--ioengine=nbd`) and the numbers we keep
//! from its JSON output.

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// One workload of the io section.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Job {
    pub name: &'static str,
    pub rw: &'static str,
    pub bs: &'static str,
    pub iodepth: u32,
    /// `--fsync=N`: a FLUSH after every N writes (0 = none).
    pub fsync: u32,
}

/// The four workloads issue 8 asks for.
pub const JOBS: [Job; 4] = [
    Job { name: "randwrite-4k-qd1", rw: "randwrite", bs: "4k", iodepth: 1, fsync: 32 },
    Job { name: "randwrite-4k-qd32", rw: "randwrite", bs: "4k", iodepth: 32, fsync: 32 },
    Job { name: "randread-4k-qd32", rw: "randread", bs: "4k", iodepth: 32, fsync: 0 },
    Job { name: "seqwrite-1m-qd4", rw: "write", bs: "1m", iodepth: 4, fsync: 32 },
];

/// What one fio run measured.
#[derive(Debug, Clone, Serialize)]
pub struct FioResult {
    pub iops: f64,
    pub bw_bytes: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Working-set size of every job (small, so runs are quick and mostly hit
/// the page cache on both sides, as the comparison is about the replication path).
pub const SIZE: &str = "256M";

pub fn run(uri: &str, job: &Job, runtime: Duration) -> anyhow::Result<FioResult> {
    let out = command(uri, job, runtime).output().context("running fio")?;
    finish(uri, job, out)
}

/// The same job against two URIs at once (each its own server and file),
/// reported per copy as the slower of the two: what this machine does when
/// every byte is written twice with nothing else in the way.
pub fn run_two_copies(uris: [&str; 2], job: &Job, runtime: Duration) -> anyhow::Result<FioResult> {
    let spawn = |uri: &str| {
        command(uri, job, runtime)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting fio")
    };
    let first = spawn(uris[0])?;
    let second = spawn(uris[1])?;
    let a = finish(uris[0], job, first.wait_with_output().context("waiting for fio")?)?;
    let b = finish(uris[1], job, second.wait_with_output().context("waiting for fio")?)?;
    Ok(FioResult {
        iops: a.iops.min(b.iops),
        bw_bytes: a.bw_bytes.min(b.bw_bytes),
        p50_us: a.p50_us.max(b.p50_us),
        p99_us: a.p99_us.max(b.p99_us),
    })
}

/// Write the whole working set once (1 MiB sequential, then a flush), so the
/// measured jobs see allocated blocks on every side: random writes into a
/// fresh sparse file would otherwise measure the filesystem's block
/// allocation, not the path under test.
pub fn prefill(uri: &str) -> anyhow::Result<()> {
    let out =
        nbd_fio("prefill", uri, "write", "1m", 4).arg("--end_fsync=1").output().context("running fio")?;
    if !out.status.success() {
        bail!("fio prefill on {uri}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// fio with the nbd engine over the working set, JSON output.
fn nbd_fio(name: &str, uri: &str, rw: &str, bs: &str, iodepth: u32) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        format!("--name={name}"),
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={iodepth}"),
        format!("--size={SIZE}"),
        "--output-format=json".into(),
    ]);
    cmd
}

fn command(uri: &str, job: &Job, runtime: Duration) -> Command {
    let mut cmd = nbd_fio("bench", uri, job.rw, job.bs, job.iodepth);
    cmd.args([
        "--time_based".into(),
        format!("--runtime={}", runtime.as_secs().max(1)),
        "--ramp_time=1".into(),
        "--randrepeat=0".into(),
    ]);
    if job.fsync > 0 {
        cmd.arg(format!("--fsync={}", job.fsync));
    }
    cmd
}

fn finish(uri: &str, job: &Job, out: Output) -> anyhow::Result<FioResult> {
    if !out.status.success() {
        bail!("fio {} on {uri}: {}", job.name, String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // fio may print notes before the JSON document.
    let start = text.find('{').context("no JSON in fio output")?;
    let v: Value = serde_json::from_str(&text[start..]).context("parsing fio JSON")?;
    parse(&v, job)
}

fn parse(v: &Value, job: &Job) -> anyhow::Result<FioResult> {
    let dir = if job.rw.contains("read") { "read" } else { "write" };
    let j = &v["jobs"][0][dir];
    let pct = |p: &str| j["clat_ns"]["percentile"][p].as_f64().map(|ns| ns / 1000.0);
    Ok(FioResult {
        iops: j["iops"].as_f64().context("iops")?,
        bw_bytes: j["bw_bytes"].as_f64().context("bw_bytes")?,
        p50_us: pct("50.000000").context("p50")?,
        p99_us: pct("99.000000").context("p99")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reads_the_write_side_of_a_write_job() {
        let v: Value = serde_json::json!({"jobs": [{"write": {"iops": 100.5, "bw_bytes": 411648.0,
            "clat_ns": {"percentile": {"50.000000": 2000000.0, "99.000000": 5000000.0}}},
            "read": {"iops": 0.0, "bw_bytes": 0.0}}]});
        let r = parse(&v, &JOBS[0]).unwrap();
        assert_eq!(r.iops, 100.5);
        assert_eq!(r.p50_us, 2000.0);
        assert_eq!(r.p99_us, 5000.0);
        assert!(parse(&v, &JOBS[2]).is_err(), "a read job must not read write numbers");
    }
}
