//! The attach agent (issue 13): its overhead against a direct connection
//! (fio QD1 p50 and QD32 IOPS, interleaved per round), and the stall an
//! application sees through it when the primary's site is killed, next to
//! the storage RTO of the same trial.
//!
//! The application is the libnbd oracle writer (tests/tools/oracle_writer.py)
//! pinned to the agent's socket with a request timeout longer than any
//! failover: its longest gap between acknowledged writes is the stall.

use crate::fio::{self, Job};
use crate::lab::BenchLab;
use crate::report::{Section, Target};
use crate::stats::{median, percentile};
use anyhow::{bail, Context};
use serde_json::json;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JOBS: [Job; 2] = [
    Job { name: "randwrite-4k-qd1", rw: "randwrite", bs: "4k", iodepth: 1, fsync: 32 },
    Job { name: "randwrite-4k-qd32", rw: "randwrite", bs: "4k", iodepth: 32, fsync: 32 },
];
const VOL: &str = "attach";

struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn uri(&self) -> String {
        format!("nbd+unix:///{VOL}?socket={}", self.socket.display())
    }
}

async fn start_agent(lab: &BenchLab) -> anyhow::Result<Agent> {
    let dir = lab.dir().join("attach");
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (&lab.info.client_cert, &lab.info.client_key);
    let child = metroctl::lab::attach_command(&lab.info, &lab.spec.bin_dir, VOL, &dir, cert, key)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("agent.log"))?)
        .spawn()
        .context("metro-attach (build it: cargo build --release --bins)")?;
    let agent = Agent { child, socket: dir.join(format!("{VOL}.sock")) };
    let t = Instant::now();
    while !metroctl::lab::attachment_listed(&dir, VOL) {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("metro-attach did not serve {VOL} in 30 s (see {})", dir.join("agent.log").display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(agent)
}

fn primary(lab: &BenchLab) -> anyhow::Result<(String, String)> {
    let v = lab.ctl.volume(VOL)?;
    Ok((
        v["primary"].as_str().unwrap_or_default().to_string(),
        v["nbd"].as_str().unwrap_or_default().to_string(),
    ))
}

/// `rounds` rounds of every job, direct then through the agent.
pub async fn run(
    lab: &BenchLab,
    fio_s: Duration,
    rounds: usize,
    stall_trials: usize,
) -> anyhow::Result<Section> {
    lab.ctl.run(&["volume", "create", VOL, "--size", "512MiB", "--site", "dc-a"])?;
    lab.wait_in_sync(VOL, Duration::from_secs(60)).await?;
    let agent = start_agent(lab).await?;
    let (_, direct) = primary(lab)?;
    fio::prefill(&direct)?;
    let mut md = String::from(
        "Overhead: the same fio job on a direct connection to the primary and through the agent's unix socket, interleaved, median of the rounds.\n\n| job | direct p50 µs | agent p50 µs | direct IOPS | agent IOPS | agent/direct IOPS |\n|---|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for job in &JOBS {
        let (mut d, mut a) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            d.push(fio::run(&direct, job, fio_s)?);
            a.push(fio::run(&agent.uri(), job, fio_s)?);
        }
        let m = |xs: &[fio::FioResult], f: fn(&fio::FioResult) -> f64| {
            median(&xs.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
        };
        let (dp, ap) = (m(&d, |r| r.p50_us), m(&a, |r| r.p50_us));
        let (di, ai) = (m(&d, |r| r.iops), m(&a, |r| r.iops));
        md +=
            &format!("| {} | {dp:.0} | {ap:.0} | {di:.0} | {ai:.0} | {:.2} |\n", job.name, ai / di.max(1.0));
        rows.push(json!({"job": job.name, "direct": d, "agent": a}));
        if job.iodepth == 1 {
            targets.push(Target::ours(
                "attach",
                "agent QD1 write p50 overhead",
                "≤ 100 µs over direct".into(),
                format!("{:+.0} µs", ap - dp),
                ap - dp <= 100.0,
            ));
        } else {
            targets.push(Target::ours(
                "attach",
                "agent QD32 write IOPS",
                "≥ 90 % of direct".into(),
                format!("{:.0} %", 100.0 * ai / di.max(1.0)),
                ai >= 0.9 * di,
            ));
        }
    }

    md += "\nStall: an application writing through the agent (libnbd, 4 KiB writes, a FLUSH every 16, request timeout 100 s) while the primary's site is killed with `kill -9`; its longest gap between acknowledged writes, next to the storage RTO (first write acknowledged by a new primary, direct).\n\n";
    let (mut stalls, mut rtos, mut errors, mut invalid) =
        (Vec::new(), Vec::new(), 0u64, Vec::<String>::new());
    let writer = crate::workspace().join("tests/tools/oracle_writer.py");
    let mut trial = 0;
    while stalls.len() < stall_trials && trial < 2 * stall_trials {
        trial += 1;
        lab.wait_in_sync(VOL, Duration::from_secs(120)).await?;
        // The same validity rules as the rto section: a voter in every site,
        // no membership change in flight, a stable leader and primary.
        let old = match crate::rto::wait_ready(lab, VOL, Duration::from_secs(120)).await {
            Ok(r) => r.primary,
            Err(why) => {
                invalid.push(why);
                continue;
            }
        };
        let site = lab.site_of(&old).context("the primary's site")?;
        let acks = lab.dir().join(format!("attach-acks-{trial}.jsonl"));
        let w = Command::new("/usr/bin/python3")
            .arg(&writer)
            .args(["write", "--volume", VOL, "--metroctl", "/bin/false", "--out"])
            .arg(&acks)
            .args(["--seconds", "14", "--timeout", "100", "--flush-every", "16", "--pin", &agent.uri()])
            .stdout(Stdio::piped())
            .spawn()
            .context("python3-libnbd")?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let t0 = Instant::now();
        metroctl::lab::kill_site(lab.dir(), &site)?;
        let mut rto = None;
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok((p, uri)) = primary(lab) {
                if !p.is_empty() && p != old && !uri.is_empty() && crate::rto::probe_write(&uri) {
                    rto = Some(t0.elapsed().as_secs_f64());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = w.wait_with_output()?;
        let report: serde_json::Value =
            serde_json::from_slice(out.stdout.trim_ascii()).context("the writer's report")?;
        let errs = report["errors"].as_u64().unwrap_or(0);
        let gaps = Command::new("/usr/bin/python3").arg(&writer).arg("gaps").arg(&acks).output()?;
        let gap: serde_json::Value = serde_json::from_slice(&gaps.stdout).context("gaps")?;
        let stall = gap["max_gap_s"].as_f64().context("max_gap_s")?;
        eprintln!("attach: trial {trial}: stall {stall:.2} s, storage RTO {rto:?} s, {errs} errors ({old} in {site} killed)");
        match rto {
            Some(r) => {
                stalls.push(stall);
                rtos.push(r);
                errors += errs;
            }
            None => invalid.push(format!("trial {trial}: no new primary within 60 s of killing {site}")),
        }
        metroctl::lab::start_site(lab.dir(), &site).await?;
    }
    let p = |xs: &[f64], q: f64| percentile(xs, q).map_or("-".into(), |v| format!("{v:.2}"));
    md += &format!(
        "| fault | valid trials | app stall p50 s | p99 s | max s | storage RTO p50 s | p99 s | application errors | invalid trials |\n|---|---|---|---|---|---|---|---|---|\n| primary site killed | {} | {} | {} | {} | {} | {} | {errors} | {} |\n",
        stalls.len(),
        p(&stalls, 50.0),
        p(&stalls, 99.0),
        p(&stalls, 100.0),
        p(&rtos, 50.0),
        p(&rtos, 99.0),
        invalid.len(),
    );
    for why in &invalid {
        md += &format!("\n- invalid: {why}");
    }
    md += "\n";
    if !stalls.is_empty() {
        let s50 = percentile(&stalls, 50.0).unwrap_or(f64::MAX);
        let r50 = percentile(&rtos, 50.0).unwrap_or(0.0);
        targets.push(Target::ours(
            "attach",
            "app stall through the agent, site kill, p50",
            "≤ storage RTO p50 + 1 s, no error".into(),
            format!("{s50:.2} s (RTO {r50:.2} s), {errors} errors"),
            s50 <= r50 + 1.0 && errors == 0,
        ));
    }
    Ok(Section {
        json: json!({"overhead": rows, "stall_s": stalls, "rto_s": rtos, "app_errors": errors, "invalid": invalid}),
        markdown: md,
        targets,
    })
}
