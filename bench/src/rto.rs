//! Failover RTO (issue 5.7): the clock starts at fault injection and stops at
//! the first write acknowledged on the new primary, by a client that polls
//! `volume show` every 100 ms and reconnects as soon as it names a new primary.
//!
//! Kinds: `site` (kill -9 every process of the primary's site), `link` (cut
//! dc-a<->dc-b with the primary in the non-preferred dc-b), `node` (kill the
//! primary node alone). Between trials the fault is undone and the volume is
//! back fully in sync before the next one starts.

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

/// Outer error: the lab could not be recovered; inner error: this trial saw no failover.
async fn one_trial(lab: &BenchLab, kind: Kind) -> anyhow::Result<Result<(f64, String, String), String>> {
    let vol = kind.volume();
    let (old, _) = primary_of(lab, vol)?;
    let old_site = lab.site_of(&old).context("primary's site")?;
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
        let sites = lab.ctl.json(&["site", "list"]).map(|v| v.to_string()).unwrap_or_else(|e| e.to_string());
        outcome = Err(format!(
            "no write acknowledged on a new primary within {TRIAL_DEADLINE:?} after killing/cutting {old_site} (old primary {old}); volume: {vol_now}; sites: {sites}"
        ));
        let keep = std::env::temp_dir()
            .join("metro-bench-failures")
            .join(format!("{vol}-{}", std::process::id()))
            .join(t0.elapsed().as_millis().to_string());
        let _ = std::fs::create_dir_all(&keep);
        for d in lab.info.nodes.iter().chain(std::iter::once(&lab.info.witness)) {
            let _ = std::fs::copy(&d.proc.log, keep.join(format!("{}.log", d.id)));
        }
    }
    // Undo the fault and wait for full in-sync.
    match kind {
        Kind::Site => {
            metroctl::lab::start_site(lab.dir(), &old_site).await?;
        }
        Kind::Link => metroctl::lab::heal(lab.dir())?,
        Kind::Node => {
            metroctl::lab::start_node(lab.dir(), &old).await?;
        }
    }
    lab.wait_in_sync(vol, RECOVER_DEADLINE).await?;
    wait_sites_active(lab).await?;
    match outcome {
        Ok((rto, new)) => Ok(Ok((rto, old, new))),
        Err(e) => Ok(Err(e)),
    }
}

/// Wait until every site is `active` again: a returning site stays fenced for
/// `site_stable_ms` (hysteresis) even after its replicas are back in sync, and
/// a trial started before then loses the quorum with the other site.
async fn wait_sites_active(lab: &BenchLab) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < RECOVER_DEADLINE {
        if let Ok(v) = lab.ctl.json(&["site", "list"]) {
            if v.as_array().is_some_and(|a| a.iter().all(|s| s["state"] == "active")) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("sites not all active after {RECOVER_DEADLINE:?}")
}

/// Put the primary of the link-cut volume back in dc-b (the cut must force a failover).
async fn home_primary(lab: &BenchLab, kind: Kind) -> anyhow::Result<()> {
    let vol = kind.volume();
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

pub async fn run(spec: &LabSpec, kinds: &[Kind], trials: usize, budget: Duration) -> anyhow::Result<Section> {
    let start = Instant::now();
    let mut md = String::from(
        "| fault | trials | p50 s | p99 s | max s | failed trials |\n|---|---|---|---|---|---|\n",
    );
    let mut json_rows = Vec::new();
    let mut targets = Vec::new();
    for (i, &kind) in kinds.iter().enumerate() {
        let lab = BenchLab::up(spec).await?;
        let vol = kind.volume();
        lab.ctl.run(&["volume", "create", vol, "--size", "256MiB", "--site", kind.home()])?;
        lab.wait_in_sync(vol, Duration::from_secs(60)).await?;
        // Share what is left of the time budget among the remaining kinds.
        let kind_budget = budget.saturating_sub(start.elapsed()) / (kinds.len() - i) as u32;
        let kstart = Instant::now();
        let mut samples = Vec::new();
        let mut trial_rows = Vec::new();
        let mut failures = Vec::new();
        for t in 0..trials {
            if t > 0 && kstart.elapsed() > kind_budget {
                eprintln!("rto: {}: time budget used after {t} trials", kind.name());
                break;
            }
            if kind == Kind::Link {
                home_primary(&lab, kind).await?;
            }
            match one_trial(&lab, kind).await {
                Ok(Ok((rto, old, new))) => {
                    eprintln!("rto: {} trial {t}: {rto:.2} s ({old} -> {new})", kind.name());
                    samples.push(rto);
                    trial_rows.push(json!({"rto_s": rto, "old_primary": old, "new_primary": new}));
                }
                Ok(Err(e)) => {
                    eprintln!("rto: {} trial {t} failed: {e}", kind.name());
                    failures.push(e);
                }
                Err(e) => {
                    eprintln!("rto: {} trial {t}: lab did not recover: {e:#}", kind.name());
                    failures.push(format!("recovery: {e:#}"));
                    break;
                }
            }
        }
        let p50 = percentile(&samples, 50.0);
        let p99 = percentile(&samples, 99.0);
        let max = samples.iter().cloned().fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        md += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            kind.name(),
            samples.len(),
            f(p50),
            f(p99),
            f(max),
            failures.len()
        );
        json_rows.push(json!({"kind": kind.name(), "trials": trial_rows, "p50_s": p50, "p99_s": p99,
            "max_s": max, "failures": failures}));
        targets.push(Target::new(
            "rto",
            &format!("{} p50 ({} trials)", kind.name(), samples.len()),
            format!("≤ {TARGET_P50_S} s"),
            f(p50) + " s",
            p50.is_some_and(|v| v <= TARGET_P50_S) && failures.is_empty(),
        ));
        targets.push(Target::new(
            "rto",
            &format!("{} p99 ({} trials)", kind.name(), samples.len()),
            format!("≤ {TARGET_P99_S} s"),
            f(p99) + " s",
            p99.is_some_and(|v| v <= TARGET_P99_S) && failures.is_empty(),
        ));
    }
    Ok(Section { json: json!({"kinds": json_rows, "requested_trials": trials}), markdown: md, targets })
}
