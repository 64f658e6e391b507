//! The REAL write path and the REAL quorum engine under random faults
//! (issue 12): power cuts that lose unflushed writes on primaries and
//! replicas, kills with quick restarts, one-way and full partitions, the
//! witness seeing one side, the leader isolated, slow links, drains, drifting
//! clocks. See `tests/src/sim/datapath.rs` for what runs and what is checked.
//!
//! - CI: `METRO_DATAPATH_SEEDS` (default 200) random seeds on two threads, a
//!   fixed regression set, and one sweep per injected bug.
//! - Soak: `METRO_SOAK=1` runs `METRO_SOAK_SEEDS` (default 2000) more.
//! - Reproduce: `cargo test -p metro-tests --test sim_reproduce -- --datapath --reproduce <seed> [--bug Name]`.

use metro_node::rt::Bug;
use metro_tests::sim::datapath::{run_datapath, DataPathOptions, DataPathReport};
use std::time::Instant;

const CI_SEEDS: u64 = 200;
const SOAK_SEEDS: u64 = 2_000;
/// Seeds per injected bug.
const BUG_SEEDS: u64 = 24;
const SWEEP_THREADS: u64 = 2;
/// Seeds that once failed (kept as a regression set).
const REGRESSION: &[u64] = &[];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Run the seeds over threads; print throughput and what they exercised.
fn sweep(seeds: Vec<u64>, bugs: &[Bug]) -> Vec<DataPathReport> {
    let started = Instant::now();
    let count = seeds.len();
    let reports = std::thread::scope(|s| {
        let handles: Vec<_> = (0..SWEEP_THREADS)
            .map(|t| {
                let seeds = seeds.clone();
                s.spawn(move || {
                    seeds
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i as u64 % SWEEP_THREADS == t)
                        .map(|(_, seed)| {
                            run_datapath(&DataPathOptions {
                                bugs: bugs.to_vec(),
                                ..DataPathOptions::new(*seed)
                            })
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("sweep thread")).collect::<Vec<_>>()
    });
    let secs = started.elapsed().as_secs_f64();
    let sum = |f: fn(&DataPathReport) -> u64| reports.iter().map(f).sum::<u64>();
    println!(
        "datapath{}: {count} seeds in {secs:.1} s ({:.0} seeds/min, {SWEEP_THREADS} threads): {} acked writes, {} acked flushes, \
         {} reads checked, {} power cuts ({} MiB of unflushed writes lost), {} promotions; {} failed, {} did not converge",
        if bugs.is_empty() { String::new() } else { format!(" with {bugs:?}") },
        count as f64 * 60.0 / secs,
        sum(|r| r.acked_writes),
        sum(|r| r.acked_flushes),
        sum(|r| r.reads_checked),
        sum(|r| r.power_cuts),
        sum(|r| r.discarded_bytes) >> 20,
        sum(|r| r.promotions as u64),
        reports.iter().filter(|r| !r.violations.is_empty()).count(),
        reports.iter().filter(|r| r.violations.is_empty() && r.not_converged.is_some()).count(),
    );
    reports
}

fn assert_clean(reports: &[DataPathReport]) {
    let failed: Vec<&DataPathReport> = reports.iter().filter(|r| r.failed()).collect();
    for r in &failed {
        println!(
            "seed {}: {:?} {:?}\n  reproduce: {}",
            r.seed,
            r.violations,
            r.not_converged,
            r.reproduce_command(&[])
        );
    }
    if let Some(first) = failed.first() {
        panic!(
            "{} of {} seeds failed: {:?}\nfirst: {:#?}\nreproduce: {}",
            failed.len(),
            reports.len(),
            failed.iter().map(|r| r.seed).collect::<Vec<_>>(),
            first,
            first.reproduce_command(&[])
        );
    }
}

/// Random seeds each run (printed), on top of the fixed regression set.
#[test]
fn random_seeds_keep_every_acknowledged_write_and_identical_copies() {
    let count = env_u64("METRO_DATAPATH_SEEDS").unwrap_or(CI_SEEDS);
    let first = env_u64("METRO_DATAPATH_FIRST").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() % 1_000_000)
            * 1_000
    });
    println!("random seeds {first}..{}", first + count);
    let mut seeds: Vec<u64> = (first..first + count).collect();
    seeds.extend(REGRESSION);
    let reports = sweep(seeds, &[]);
    assert_clean(&reports);
    let acked: u64 = reports.iter().map(|r| r.acked_writes).sum();
    let cuts: u64 = reports.iter().map(|r| r.power_cuts).sum();
    assert!(
        acked > count * 1_000 && cuts > count,
        "the seeds exercised too little: {acked} writes, {cuts} power cuts"
    );
}

#[test]
fn soak_when_metro_soak_is_set() {
    if std::env::var("METRO_SOAK").is_err() {
        println!("METRO_SOAK is not set: the soak runs only on request");
        return;
    }
    let count = env_u64("METRO_SOAK_SEEDS").unwrap_or(SOAK_SEEDS);
    assert_clean(&sweep((1_000_000..1_000_000 + count).collect(), &[]));
}
