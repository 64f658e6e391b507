//! Failover RTO (issue 5.7): the clock starts at fault injection and stops at
//! the first write acknowledged on the new primary, by a client that polls
//! `volume show` every 100 ms and reconnects as soon as it names a new primary.
//!
//! Kinds: `site` (kill -9 every process of the primary's site), `link` (cut
//! dc-a<->dc-b with the primary in the non-preferred dc-b), `node` (kill the
//! primary node alone). Between trials the fault is undone and the lab is
//! back to full health before the next one starts ([`wait_ready`]): a leader,
//! a voter in each data site plus the witness, every site active, the volume
//! fully in sync, and a probe write acknowledged by the primary status names
//! (so the old primary is the real one, not a stale answer).
//!
//! A trial is *valid* when it started from that state; one that could not
//! (the lab did not recover in time) is *invalid* and reported with why. A
//! valid trial with no acknowledged write on a new primary within
//! [`TRIAL_DEADLINE`] is a *failed* failover: a bug, reported as such.

use crate::ctl::CtlExt;
use crate::lab::{BenchLab, LabSpec};
use crate::report::{Section, Target};
use crate::stats::percentile;
use anyhow::{bail, Context};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

/// Status poll period of the reconnecting client (issue 5.7).
const POLL: Duration = Duration::from_millis(100);
/// A trial with no acknowledged write on a new primary by then failed.
const TRIAL_DEADLINE: Duration = Duration::from_secs(45);
/// Recovery (restart/heal plus resync) deadline between trials.
const RECOVER_DEADLINE: Duration = Duration::from_secs(180);
/// One probe write's deadline (a suspended primary holds I/O).
const WRITE_TIMEOUT_S: &str = "5";
pub const TARGET_P50_S: f64 = 5.0;
pub const TARGET_P99_S: f64 = 10.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Site,
    Link,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Site => "primary site killed",
            Kind::Link => "inter-site link cut",
            Kind::Node => "primary node killed",
        }
    }
    fn volume(self) -> &'static str {
        match self {
            Kind::Site => "rto-site",
            Kind::Link => "rto-link",
            Kind::Node => "rto-node",
        }
    }
    fn home(self) -> &'static str {
        if self == Kind::Link {
            "dc-b"
        } else {
            "dc-a"
        }
    }
}

/// One 4 KiB write through qemu-io; true when acknowledged.
pub fn probe_write(uri: &str) -> bool {
    Command::new("timeout")
        .args([WRITE_TIMEOUT_S, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", uri])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn primary_of(lab: &BenchLab, vol: &str) -> anyhow::Result<(String, String)> {
    let v = lab.ctl.volume(vol)?;
    let p = v["primary"].as_str().context("no primary")?.to_string();
    let uri = v["nbd"].as_str().unwrap_or_default().to_string();
    Ok((p, uri))
}

/// What a valid trial measured.
struct Measured {
    rto_s: f64,
    old: String,
    new: String,
    leader: String,
    leader_in_fault: bool,
}

/// The lab state a trial starts from.
pub(crate) struct Ready {
    pub(crate) primary: String,
    pub(crate) leader: String,
}

/// Wait until the lab is fit for a valid trial of `vol` (see the module docs).
pub(crate) async fn wait_ready(lab: &BenchLab, vol: &str, deadline: Duration) -> Result<Ready, String> {
    // Two passing checks a second apart naming the same leader and primary:
    // a just-restarted node answers from its pre-crash view for a moment.
    let t = Instant::now();
    let mut why = String::from("not checked yet");
    let mut first: Option<(Instant, String, String)> = None;
    while t.elapsed() < deadline {
        match ready_now(lab, vol) {
            Ok(r) => match &first {
                Some((at, l, p)) if *l == r.leader && *p == r.primary => {
                    if at.elapsed() >= Duration::from_secs(1) {
                        return Ok(r);
                    }
                }
                _ => first = Some((Instant::now(), r.leader.clone(), r.primary.clone())),
            },
            Err(e) => {
                why = e;
                first = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("lab not ready after {deadline:?}: {why}"))
}

fn ready_now(lab: &BenchLab, vol: &str) -> Result<Ready, String> {
    let st = lab.ctl.json(&["status"]).map_err(|e| format!("status: {e:#}"))?;
    let leader = st["leader"].as_str().ok_or("no leader")?.to_string();
    let voters: Vec<&str> =
        st["voters"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
    for site in ["dc-a", "dc-b", "witness"] {
        if !voters.iter().any(|v| lab.site_of(v).as_deref() == Some(site)) {
            return Err(format!("no voter in {site} (voters {voters:?})"));
        }
    }
    if voters.len().is_multiple_of(2) {
        return Err(format!("membership change in flight (voters {voters:?})"));
    }
    let sites = st["sites"].as_array().ok_or("no sites in status")?;
    if let Some(s) = sites.iter().find(|s| s["state"] != "active") {
        return Err(format!("site {} is {}", s["name"], s["state"]));
    }
    if !lab.ctl.in_sync(vol).map_err(|e| format!("volume show: {e:#}"))? {
        return Err(format!("{vol} not fully in sync"));
    }
    let (primary, uri) = primary_of(lab, vol).map_err(|e| format!("{e:#}"))?;
    if uri.is_empty() || !probe_write(&uri) {
        return Err(format!("the primary status names ({primary}) does not acknowledge a write"));
    }
    Ok(Ready { primary, leader })
}

/// Outer error: the lab could not be recovered after the trial. Inner:
/// `Ok(None)` invalid trial (reason in the string), `Ok(Some(Err))` failed failover.
async fn one_trial(lab: &BenchLab, kind: Kind) -> anyhow::Result<Result<Result<Measured, String>, String>> {
    let vol = kind.volume();
    let ready = match wait_ready(lab, vol, RECOVER_DEADLINE).await {
        Ok(r) => r,
        Err(why) => return Ok(Err(why)),
    };
    let old = ready.primary.clone();
    let old_site = lab.site_of(&old).context("primary's site")?;
    let leader_site = lab.site_of(&ready.leader).unwrap_or_default();
    let leader_in_fault = match kind {
        Kind::Site => leader_site == old_site,
        Kind::Node => ready.leader == old,
        // The cut isolates dc-b (non-preferred): the leader is on the losing side if it was there.
        Kind::Link => leader_site == old_site,
    };
    let t0 = Instant::now();
    match kind {
        Kind::Site => {
            metroctl::lab::kill_site(lab.dir(), &old_site)?;
        }
        Kind::Link => metroctl::lab::partition(lab.dir(), "dc-a", "dc-b")?,
        Kind::Node => {
            metroctl::lab::kill_node(lab.dir(), &old)?;
        }
    }
    let mut outcome: Result<(f64, String), String> = Err(String::new());
    while t0.elapsed() <= TRIAL_DEADLINE {
        if let Ok((p, uri)) = primary_of(lab, vol) {
            if p != old && !uri.is_empty() && probe_write(&uri) {
                outcome = Ok((t0.elapsed().as_secs_f64(), p));
                break;
            }
        }
        tokio::time::sleep(POLL).await;
    }
    if outcome.is_err() {
        // Evidence for the report: what status said when the trial gave up.
        let vol_now =
            lab.ctl.json(&["volume", "show", vol]).map(|v| v.to_string()).unwrap_or_else(|e| e.to_string());
        let st = lab.ctl.json(&["status"]).map(|v| v.to_string()).unwrap_or_else(|e| e.to_string());
        let keep = std::env::temp_dir()
            .join("metro-bench-failures")
            .join(format!("{vol}-{}", std::process::id()))
            .join(t0.elapsed().as_millis().to_string());
        let _ = std::fs::create_dir_all(&keep);
        for d in lab.info.nodes.iter().chain(std::iter::once(&lab.info.witness)) {
            let _ = std::fs::copy(&d.proc.log, keep.join(format!("{}.log", d.id)));
        }
        outcome = Err(format!(
            "no write acknowledged on a new primary within {TRIAL_DEADLINE:?} after killing/cutting {old_site} (old primary {old}, leader {}); volume: {vol_now}; status: {st}; logs: {}",
            ready.leader,
            keep.display()
        ));
    }
    // Undo the fault; the next trial waits for full health itself.
    match kind {
        Kind::Site => {
            metroctl::lab::start_site(lab.dir(), &old_site).await?;
        }
        Kind::Link => metroctl::lab::heal(lab.dir())?,
        Kind::Node => {
            metroctl::lab::start_node(lab.dir(), &old).await?;
        }
    }
    Ok(Ok(outcome.map(|(rto_s, new)| Measured { rto_s, old, new, leader: ready.leader, leader_in_fault })))
}

/// Put the primary of the link-cut volume back in dc-b (the cut must force a failover).
async fn home_primary(lab: &BenchLab, kind: Kind) -> anyhow::Result<()> {
    let vol = kind.volume();
    wait_ready(lab, vol, RECOVER_DEADLINE).await.map_err(anyhow::Error::msg)?;
    let (p, _) = primary_of(lab, vol)?;
    if lab.site_of(&p).as_deref() == Some(kind.home()) {
        return Ok(());
    }
    let v = lab.ctl.volume(vol)?;
    let target = v["replicas"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .find(|n| lab.site_of(n).as_deref() == Some(kind.home()))
        .context("no replica in the home site")?
        .to_string();
    lab.ctl.run(&["volume", "attach", vol, "--node", &target])?;
    let t = Instant::now();
    while t.elapsed() < RECOVER_DEADLINE {
        if primary_of(lab, vol).map(|(p, _)| p == target).unwrap_or(false) && lab.ctl.in_sync(vol)? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{vol} primary did not move back to {target}")
}

/// Percentiles of `xs` as (p50, p99, max).
fn summary(xs: &[f64]) -> (Option<f64>, Option<f64>, Option<f64>) {
    let max = xs.iter().cloned().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
    (percentile(xs, 50.0), percentile(xs, 99.0), max)
}

/// Run up to `trials` valid trials per kind (at most `2 × trials` attempts,
/// within `budget` for the whole section).
pub async fn run(spec: &LabSpec, kinds: &[Kind], trials: usize, budget: Duration) -> anyhow::Result<Section> {
    let start = Instant::now();
    let mut md = String::from(
        "| fault | valid trials | p50 s | p99 s | max s | failed failovers | invalid trials | leader in the fault: n, p50 s | leader outside: n, p50 s |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut json_rows = Vec::new();
    let mut targets = Vec::new();
    let mut notes = String::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let lab = BenchLab::up(spec).await?;
        let vol = kind.volume();
        lab.ctl.run(&["volume", "create", vol, "--size", "256MiB", "--site", kind.home()])?;
        lab.wait_in_sync(vol, Duration::from_secs(60)).await?;
        // Share what is left of the time budget among the remaining kinds.
        let kind_budget = budget.saturating_sub(start.elapsed()) / (kinds.len() - i) as u32;
        let kstart = Instant::now();
        let mut samples = Vec::new();
        let mut with_leader = Vec::new();
        let mut without_leader = Vec::new();
        let mut trial_rows = Vec::new();
        let mut failures = Vec::new();
        let mut invalid = Vec::new();
        let mut attempt = 0;
        while samples.len() + failures.len() < trials && attempt < 2 * trials {
            if attempt > 0 && kstart.elapsed() > kind_budget {
                eprintln!("rto: {}: time budget used after {attempt} attempts", kind.name());
                break;
            }
            attempt += 1;
            if kind == Kind::Link {
                if let Err(e) = home_primary(&lab, kind).await {
                    eprintln!("rto: {} attempt {attempt} invalid: {e:#}", kind.name());
                    invalid.push(format!("{e:#}"));
                    continue;
                }
            }
            match one_trial(&lab, kind).await {
                Ok(Ok(Ok(m))) => {
                    eprintln!(
                        "rto: {} trial {}: {:.2} s ({} -> {}, leader {}{})",
                        kind.name(),
                        samples.len(),
                        m.rto_s,
                        m.old,
                        m.new,
                        m.leader,
                        if m.leader_in_fault { ", lost with the fault" } else { "" }
                    );
                    samples.push(m.rto_s);
                    if m.leader_in_fault {
                        with_leader.push(m.rto_s);
                    } else {
                        without_leader.push(m.rto_s);
                    }
                    trial_rows.push(json!({"rto_s": m.rto_s, "old_primary": m.old, "new_primary": m.new,
                        "leader": m.leader, "leader_in_fault": m.leader_in_fault}));
                }
                Ok(Ok(Err(e))) => {
                    eprintln!("rto: {} attempt {attempt}: FAILED failover: {e}", kind.name());
                    failures.push(e);
                }
                Ok(Err(why)) => {
                    eprintln!("rto: {} attempt {attempt} invalid: {why}", kind.name());
                    invalid.push(why);
                }
                Err(e) => {
                    eprintln!("rto: {} attempt {attempt}: lab did not recover: {e:#}", kind.name());
                    invalid.push(format!("recovery: {e:#}"));
                    break;
                }
            }
        }
        let (p50, p99, max) = summary(&samples);
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {}, {} | {}, {} |\n",
            kind.name(),
            samples.len(),
            f(p50),
            f(p99),
            f(max),
            failures.len(),
            invalid.len(),
            with_leader.len(),
            f(percentile(&with_leader, 50.0)),
            without_leader.len(),
            f(percentile(&without_leader, 50.0)),
        );
        for why in &invalid {
            notes +=
                &format!("- {} invalid trial: {}\n", kind.name(), why.chars().take(300).collect::<String>());
        }
        for why in &failures {
            notes += &format!(
                "- {} FAILED failover: {}\n",
                kind.name(),
                why.chars().take(300).collect::<String>()
            );
        }
        json_rows.push(json!({"kind": kind.name(), "trials": trial_rows, "p50_s": p50, "p99_s": p99,
            "max_s": max, "failures": failures, "invalid": invalid,
            "leader_in_fault": {"n": with_leader.len(), "p50_s": percentile(&with_leader, 50.0), "max_s": summary(&with_leader).2},
            "leader_outside": {"n": without_leader.len(), "p50_s": percentile(&without_leader, 50.0), "max_s": summary(&without_leader).2}}));
        let enough = samples.len() >= trials && failures.is_empty();
        targets.push(Target::new(
            "rto",
            &format!("{} p50 ({} valid trials)", kind.name(), samples.len()),
            format!("≤ {TARGET_P50_S} s"),
            f(p50) + " s",
            p50.is_some_and(|v| v <= TARGET_P50_S) && enough,
        ));
        targets.push(Target::new(
            "rto",
            &format!("{} p99 ({} valid trials)", kind.name(), samples.len()),
            format!("≤ {TARGET_P99_S} s"),
            f(p99) + " s",
            p99.is_some_and(|v| v <= TARGET_P99_S) && enough,
        ));
    }
    if !notes.is_empty() {
        md += &format!("\n{notes}");
    }
    Ok(Section { json: json!({"kinds": json_rows, "requested_trials": trials}), markdown: md, targets })
}
