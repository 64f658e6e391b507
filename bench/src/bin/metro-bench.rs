//! `metro-bench`: run the benchmark sections against fresh labs on this
//! machine and write `bench/results/<date>-<host>.{json,md,png}`.

use anyhow::Context;
use clap::Parser;
use metro_bench::lab::{BenchLab, LabSpec};
use metro_bench::report::{self, Section, Target};
use metro_bench::rto::Kind;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Short runs: 3 s fio jobs, 3 RTO trials per kind, 128 MiB resync, 100 volumes.
    #[arg(long)]
    quick: bool,
    /// Run only these sections (comma-separated, e.g. `io,resync`); the other
    /// sections of today's results file are kept.
    #[arg(long, value_delimiter = ',', value_parser = ["io", "rto", "resync", "witness", "scale", "attach"])]
    only: Vec<String>,
    /// Directory with metro-node, metro-witness, metroctl and metro-delay.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Lab directory (recreated per section).
    #[arg(long, default_value = "/tmp/metro-bench-lab")]
    lab_dir: PathBuf,
    /// Loopback octet (127.N.x.y) of the bench labs.
    #[arg(long, default_value_t = 90)]
    loopback_net: u8,
    /// Results directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Valid RTO trials wanted per fault kind (at most twice as many attempts).
    #[arg(long)]
    rto_trials: Option<usize>,
    /// RTO fault kinds to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "site,link,node", value_parser = ["site", "link", "node"])]
    rto_kinds: Vec<String>,
    /// Wall-clock budget for the whole rto section, in seconds.
    #[arg(long, default_value_t = 3600)]
    rto_budget_s: u64,
    /// Volumes for the witness/scale sections.
    #[arg(long)]
    volumes: Option<usize>,
    /// Appended to the results file name (`<date>-<host>-<tag>`), e.g. to
    /// keep an earlier run of the same day for comparison.
    #[arg(long)]
    tag: Option<String>,
    /// Seconds per fio job.
    #[arg(long)]
    fio_seconds: Option<u64>,
}

/// Order of sections in the results.
const SECTIONS: [&str; 6] = ["io", "resync", "witness", "scale", "attach", "rto"];

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

fn today() -> String {
    let out = std::process::Command::new("date").args(["-u", "+%Y-%m-%d"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_else(|_| "date".into())
}

/// Write `<stem>.json`, `.md` and (with io points) `.png`; returns the markdown.
fn write_results(
    a: &Args,
    stem: &std::path::Path,
    started: Instant,
    sections: &[(&str, Section)],
    points: &[report::LatencyPoint],
) -> anyhow::Result<String> {
    let mut targets: Vec<Target> = sections.iter().flat_map(|(_, s)| s.targets.clone()).collect();
    let mut md_of: serde_json::Map<String, serde_json::Value> =
        sections.iter().map(|(n, s)| (n.to_string(), json!(s.markdown))).collect();
    let mut json_of: serde_json::Map<String, serde_json::Value> =
        sections.iter().map(|(n, s)| (n.to_string(), s.json.clone())).collect();
    // `--only X` keeps the other sections of today's results file.
    if !a.only.is_empty() {
        if let Ok(old) = std::fs::read_to_string(stem.with_extension("json")) {
            let old: serde_json::Value = serde_json::from_str(&old)?;
            for (name, md) in old["markdown"].as_object().into_iter().flatten() {
                if !md_of.contains_key(name) {
                    md_of.insert(name.clone(), md.clone());
                    json_of.insert(name.clone(), old[name].clone());
                    for t in old["targets"].as_array().into_iter().flatten() {
                        if t["section"] == name.as_str() {
                            targets.push(serde_json::from_value(t.clone())?);
                        }
                    }
                }
            }
        }
    }
    let mode = "loopback (127.N.x.y in the root namespace; delays via iptables NFQUEUE + metro-delay)";
    let machine = json!({"host": hostname(), "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "loadavg_at_end": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()});
    let ran: Vec<&str> = sections.iter().map(|(n, _)| *n).collect();
    let mut doc = json!({"date": today(), "quick": a.quick, "lab_mode": mode, "machine": machine,
        "elapsed_s": started.elapsed().as_secs_f64(), "sections_run": ran, "targets": targets});
    for (name, j) in &json_of {
        doc[name] = j.clone();
    }
    doc["markdown"] = json!(md_of);
    std::fs::write(stem.with_extension("json"), serde_json::to_string_pretty(&doc)? + "\n")?;

    let mut md = format!(
        "# metro benchmark results {}\n\nhost `{}` ({} CPUs, load at end {}), lab mode: {mode}, {}run took {:.0} s, sections run: {}{}.\n\n## Targets\n\n{}\n",
        today(),
        hostname(),
        doc["machine"]["cpus"],
        doc["machine"]["loadavg_at_end"].as_str().unwrap_or(""),
        if a.quick { "--quick, " } else { "" },
        started.elapsed().as_secs_f64(),
        ran.join(", "),
        if md_of.len() > ran.len() { " (other sections kept from an earlier run of the day)" } else { "" },
        report::targets_markdown(&targets)
    );
    for name in SECTIONS {
        if let Some(m) = md_of.get(name).and_then(|m| m.as_str()) {
            md += &format!("## {name}\n\n{m}\n");
        }
    }
    let png = stem.with_extension("png");
    if !points.is_empty() {
        report::plot(points, &png)?;
    }
    if png.exists() {
        md +=
            &format!("![write latency vs RTT]({})\n", png.file_name().unwrap_or_default().to_string_lossy());
    }
    std::fs::write(stem.with_extension("md"), &md)?;
    Ok(md)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let spec = LabSpec {
        dir: a.lab_dir.clone(),
        bin_dir: a.bin_dir.canonicalize().context("bin dir")?,
        netns: false,
        octet: a.loopback_net,
    };
    let fio_s = Duration::from_secs(a.fio_seconds.unwrap_or(if a.quick { 3 } else { 10 }));
    let trials = a.rto_trials.unwrap_or(if a.quick { 3 } else { 20 });
    let volumes = a.volumes.unwrap_or(if a.quick { 100 } else { 1000 });
    let resync_bytes: u64 = if a.quick { 128 << 20 } else { 1 << 30 };
    let window = Duration::from_secs(if a.quick { 5 } else { 10 });
    let started = Instant::now();
    std::fs::create_dir_all(&a.out)?;
    let stem = a.out.join(match &a.tag {
        Some(t) => format!("{}-{}-{t}", today(), hostname()),
        None => format!("{}-{}", today(), hostname()),
    });

    let mut sections: Vec<(&str, Section)> = Vec::new();
    let mut points = Vec::new();
    if want("io") || want("resync") {
        let lab = BenchLab::up(&spec).await?;
        if want("io") {
            let (s, p) = metro_bench::io::run(&lab, &[0.0, 1.0, 5.0], fio_s).await?;
            points = p;
            sections.push(("io", s));
        }
        if want("resync") {
            sections.push(("resync", metro_bench::resync::run(&lab, resync_bytes, resync_bytes).await?));
        }
    }
    if want("witness") || want("scale") {
        let lab = BenchLab::up(&spec).await?;
        let (w, s) = metro_bench::scale::run(&lab, volumes, window).await?;
        sections.push(("witness", w));
        sections.push(("scale", s));
    }
    if want("attach") {
        let lab = BenchLab::up(&spec).await?;
        let (rounds, stall_trials) = if a.quick { (1, 3) } else { (3, 10) };
        sections.push(("attach", metro_bench::attach::run(&lab, fio_s, rounds, stall_trials).await?));
    }
    // Results so far are written before the long rto section, so they survive it.
    write_results(&a, &stem, started, &sections, &points)?;
    if want("rto") {
        let kinds: Vec<Kind> = a
            .rto_kinds
            .iter()
            .map(|k| match k.as_str() {
                "site" => Kind::Site,
                "link" => Kind::Link,
                _ => Kind::Node,
            })
            .collect();
        let s = metro_bench::rto::run(&spec, &kinds, trials, Duration::from_secs(a.rto_budget_s)).await?;
        sections.push(("rto", s));
    }

    let md = write_results(&a, &stem, started, &sections, &points)?;
    println!("{md}");
    eprintln!("results: {}.{{json,md,png}}", stem.display());
    Ok(())
}
