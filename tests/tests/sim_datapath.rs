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
use metro_tests::sim::datapath::{run_datapath, DScenario, DataPathOptions, DataPathReport};
use std::time::Instant;

/// Seeds 0..200 are clean at stop 21 (128 and 134, once open, are also in
/// [`REGRESSION`]).
const CI_SEEDS: u64 = 200;
/// Seeds drawn from the clock in every CI run, on top of the fixed ones.
const CI_CLOCK_SEEDS: u64 = 24;
const SOAK_SEEDS: u64 = 2_000;
/// Seeds per injected bug.
const BUG_SEEDS: u64 = 16;
const SWEEP_THREADS: u64 = 2;
/// Random-fault seeds that once failed, with what they found (kept as a
/// regression set, run with `DScenario::Random` on every run):
/// - 15: a primary dropped its replica from `in_sync` with acknowledged
///   writes only in its cache, then lost power (degrade now flushes first);
/// - 5: a primary that lost its page cache pushed its copy over an in-sync
///   replica that was down for a second (it now waits to hand over);
/// - 33: the same after a second restart, which forgot the first one's
///   power cut (the `cache-lost` marker now persists until reconciled);
/// - 29, 8, 16: a resync's final flush waited forever on a connection whose
///   segments a partition dropped (the link's `LINK_STALL` check);
/// - 10: a planned move looked like two primaries to the engine oracle for
///   one sampling period (hosts now report when a lease changes);
/// - 22: an oracle defect (a flush after a power cut counted as covering
///   the writes the cut had already lost);
/// - 638032196: a primary that lost its cache retried handing over to a
///   replica that had since left `in_sync` forever (it now re-reads the set);
/// - 635865114: a replica that lost power was promoted while the isolated
///   primary held the acknowledged write (it now leaves `in_sync` itself);
/// - 635865007 (a drain under load): the new primary's resync of the old
///   one ran before its reconciliation marked the old primary's writes;
/// - 134: an isolated primary's degrade, held while others were primary
///   and back, was taken as done when a later epoch looked like its result,
///   and acknowledged writes at its stale epoch (resolve now wants exactly
///   the next epoch; a primaryship carries `primary_since`);
/// - 128, 639325102: a leadership hand-over in the middle of a fenced
///   site's stability window restarted it, stranding a volume for twice
///   `site_stable_ms` after the heal (a leader timing a return keeps leading);
/// - 639325170, 639325046: a failover's new primary, the only in-sync copy,
///   lost power before its first flush and resynced the old primary (which
///   still held the acknowledged writes) from its own copy (it now pulls the
///   old primary's hot extents first; `switching_off_the_previous_primary_pull_*`).
const REGRESSION: &[(u64, DScenario)] = &[
    (15, DScenario::Random),
    (5, DScenario::Random),
    (33, DScenario::Random),
    (29, DScenario::Random),
    (8, DScenario::Random),
    (16, DScenario::Random),
    (10, DScenario::Random),
    (22, DScenario::Random),
    (638_032_196, DScenario::Random),
    (635_865_114, DScenario::Random),
    (635_865_007, DScenario::DrainUnderLoad),
    (134, DScenario::Random),
    (128, DScenario::Random),
    (639_325_102, DScenario::Random),
    (639_325_170, DScenario::Random),
    (639_325_046, DScenario::Random),
];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Run the seeds over threads; print throughput and what they exercised.
fn sweep(seeds: Vec<u64>, bugs: &[Bug], scenario: impl Fn(u64) -> DScenario + Sync) -> Vec<DataPathReport> {
    let started = Instant::now();
    let count = seeds.len();
    let reports = std::thread::scope(|s| {
        let handles: Vec<_> = (0..SWEEP_THREADS)
            .map(|t| {
                let (seeds, scenario) = (seeds.clone(), &scenario);
                s.spawn(move || {
                    seeds
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i as u64 % SWEEP_THREADS == t)
                        .map(|(_, seed)| {
                            run_datapath(&DataPathOptions {
                                bugs: bugs.to_vec(),
                                scenario: scenario(*seed),
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

/// Half the seeds random faults, half the focused scenarios in turn.
fn mixed(seed: u64) -> DScenario {
    if seed.is_multiple_of(2) {
        DScenario::Random
    } else {
        DScenario::ALL[1 + (seed / 2) as usize % (DScenario::ALL.len() - 1)]
    }
}

/// Every CI run: a fixed seed range, the regression set, and
/// [`CI_CLOCK_SEEDS`] seeds drawn from the clock (printed; a failure prints
/// the command that replays it, and its seed joins [`REGRESSION`] once
/// fixed). `METRO_DATAPATH_FIRST`/`METRO_DATAPATH_SEEDS` replace the fixed
/// range; `METRO_DATAPATH_RANDOM=1` draws the whole range from the clock;
/// `METRO_DATAPATH_CLOCK_SEEDS=0` leaves the clock seeds out.
#[test]
fn random_seeds_keep_every_acknowledged_write_and_identical_copies() {
    let count = env_u64("METRO_DATAPATH_SEEDS").unwrap_or(CI_SEEDS);
    let clock_base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() % 1_000_000)
        * 1_000;
    let first = env_u64("METRO_DATAPATH_FIRST").unwrap_or_else(|| {
        if std::env::var("METRO_DATAPATH_RANDOM").is_ok() {
            clock_base
        } else {
            0
        }
    });
    println!("fixed seeds {first}..{}", first + count);
    let mut seeds: Vec<u64> = (first..first + count).collect();
    let clock = env_u64("METRO_DATAPATH_CLOCK_SEEDS").unwrap_or(CI_CLOCK_SEEDS);
    if clock > 0 && first != clock_base {
        // Far from the fixed range and from each other run's (per second).
        let from = 10_000_000 + clock_base;
        println!("seeds drawn from the clock this run: {from}..{}", from + clock);
        seeds.extend(from..from + clock);
    }
    let mut reports = sweep(seeds, &[], mixed);
    reports.extend(sweep(REGRESSION.iter().map(|(s, _)| *s).collect(), &[], |seed| {
        REGRESSION.iter().find(|(s, _)| *s == seed).map_or(DScenario::Random, |(_, sc)| *sc)
    }));
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
    assert_clean(&sweep((1_000_000..1_000_000 + count).collect(), &[], mixed));
}

/// Each injected bug must be caught, in most seeds, by the run over the
/// real code (the checker counts only once it has caught a real breakage).
#[test]
fn every_injected_bug_is_caught_by_the_real_code_simulation() {
    let count = env_u64("METRO_DATAPATH_BUG_SEEDS").unwrap_or(BUG_SEEDS);
    let mut missed = Vec::new();
    for bug in Bug::SWEPT {
        let reports = sweep((0..count).collect(), &[bug], |_| DScenario::exposing(bug));
        let caught: Vec<&DataPathReport> = reports.iter().filter(|r| !r.violations.is_empty()).collect();
        println!("{bug:?}: caught in {} of {count} seeds", caught.len());
        if let Some(r) = caught.first() {
            println!(
                "  e.g. seed {}: {}\n  reproduce: {}",
                r.seed,
                r.violations[0],
                r.reproduce_command(&[bug])
            );
        }
        if caught.len() * 2 <= count as usize {
            missed.push((bug, caught.len()));
        }
    }
    assert!(missed.is_empty(), "injected bugs caught in too few of {count} seeds: {missed:?}");
}

/// The printed seed is enough to replay a run exactly, the way its
/// reproduce command replays it: in a fresh process. (Two runs in one
/// process differ slightly: some process-wide state, not yet found, carries
/// over; a fresh process starts from the same state every time.)
#[test]
fn a_datapath_run_is_reproducible_from_its_seed() {
    for (seed, scenario) in [(3, DScenario::Random), (8, DScenario::PrimaryPowerCut)] {
        let (a, b) = (replay_in_child(seed, scenario, &[]), replay_in_child(seed, scenario, &[]));
        println!("seed {seed}: {a} / {b}");
        assert!(!a.contains("acked_writes=0 "), "seed {seed} acknowledged nothing: {a}");
        assert_eq!(a, b, "seed {seed}: the runs diverged");
    }
}

/// Run `seed` once in a fresh process of this test binary (the way a
/// printed seed replays exactly), with `bugs` on; its printed digest.
fn replay_in_child(seed: u64, scenario: DScenario, bugs: &[Bug]) -> String {
    let mut spec = format!("{seed}:{scenario:?}");
    for b in bugs {
        spec.push_str(&format!(":{b:?}"));
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "replay_one_seed_when_asked", "--nocapture", "--test-threads=1"])
        .env("METRO_DP_REPLAY", spec)
        .output()
        .expect("run the replay");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines().find_map(|l| l.find("REPLAY ").map(|i| l[i..].to_string())).unwrap_or_else(|| {
        panic!("seed {seed}: the replay printed no digest:\n{text}\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

/// The child half of [`replay_in_child`]: with
/// `METRO_DP_REPLAY=<seed>:<scenario>[:<bug>...]`, run that seed once and
/// print its digest; without it, there is nothing to do.
#[test]
fn replay_one_seed_when_asked() {
    let Ok(spec) = std::env::var("METRO_DP_REPLAY") else {
        println!("METRO_DP_REPLAY is not set: this test only runs as a child of the reproducibility test");
        return;
    };
    // seed:scenario[:bug]
    let mut parts = spec.split(':');
    let (seed, name) = (parts.next().expect("a seed"), parts.next().expect("seed:scenario"));
    let scenario = *DScenario::ALL.iter().find(|s| format!("{s:?}") == name).expect("a known scenario");
    let bugs: Vec<Bug> =
        parts.map(|b| *Bug::ALL.iter().find(|x| format!("{x:?}") == b).expect("a known bug")).collect();
    let r = run_datapath(&DataPathOptions {
        scenario,
        bugs,
        ..DataPathOptions::new(seed.parse().expect("a seed"))
    });
    println!(
        "REPLAY trace={:#x} acked_writes={} acked_flushes={} reads={} sim_ms={} violations={:?}",
        r.trace, r.acked_writes, r.acked_flushes, r.reads_checked, r.sim_ms, r.violations
    );
}

/// Seeds that lose acknowledged writes once the previous-primary pull is
/// switched off: the oracle catches that breakage, so the passing runs mean
/// something. 639325046 is a regression seed; 639325013 replaced 639325170
/// (which found the bug) when the rejoin started clearing a replica's hot
/// extents before committing, which changed that seed's course. Others that
/// catch it today: 639325103, 639325127 (`/tmp`-free search: run
/// `sim_reproduce --datapath --reproduce SEED --bug SkipPullFromPreviousPrimary`).
#[test]
fn switching_off_the_previous_primary_pull_loses_writes_in_its_seeds() {
    for seed in [639_325_046, 639_325_013] {
        let digest = replay_in_child(seed, DScenario::Random, &[Bug::SkipPullFromPreviousPrimary]);
        println!("seed {seed} with SkipPullFromPreviousPrimary: {digest}");
        assert!(
            digest.contains("an acknowledged write was lost"),
            "seed {seed}: the oracle did not catch the missing pull: {digest}"
        );
    }
}
