//! Deterministic simulation suite (see `metro_tests::sim`).
//!
//! - CI: `cargo test -p metro-tests --test sim` runs `METRO_SIM_SEEDS` (default
//!   200) random seeds on two threads, plus scripted scenarios.
//! - Soak: `METRO_SOAK=1` runs `METRO_SOAK_SEEDS` (default 5000) more.
//! - Reproduce: `METRO_SIM_SEED=<seed> cargo test -p metro-tests --test sim reproduce -- --nocapture`
//!   or `cargo test -p metro-tests --test sim_reproduce -- --reproduce <seed>`.

use metro_tests::sim::{run, Bugs, Scenario, SimOptions, SimReport};
use std::time::Instant;

/// Seeds in CI: enough to hit every fault kind many times, about a minute on two cores.
const CI_SEEDS: u64 = 200;
const SOAK_SEEDS: u64 = 5_000;
/// Seeds for the injected-bug test; each isolates a site holding primaries.
const BUG_SEEDS: u64 = 20;
/// Threads for seed sweeps (the CI machines have two cores).
const SWEEP_THREADS: u64 = 2;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Run `count` seeds from `first`, spread over threads; returns the failures
/// and prints throughput and what the seeds exercised.
fn sweep(first: u64, count: u64, opts: impl Fn(u64) -> SimOptions + Sync) -> Vec<SimReport> {
    let started = Instant::now();
    let reports = std::thread::scope(|s| {
        let handles: Vec<_> = (0..SWEEP_THREADS)
            .map(|t| {
                let opts = &opts;
                s.spawn(move || {
                    (first..first + count)
                        .filter(|seed| seed % SWEEP_THREADS == t)
                        .map(|seed| run(&opts(seed)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("sweep thread")).collect::<Vec<_>>()
    });
    let secs = started.elapsed().as_secs_f64();
    let sum = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    println!(
        "simulated {count} seeds from {first} in {secs:.1} s ({:.1} seeds/s, {SWEEP_THREADS} threads): \
         {} elections, {} promotions, {} rejoins, {} site mode changes, {} lease grants, {} acknowledged writes; {} failed",
        count as f64 / secs,
        sum(|r| r.stats.elections),
        sum(|r| r.stats.promotions),
        sum(|r| r.stats.rejoins),
        sum(|r| r.stats.fences),
        sum(|r| r.stats.grants),
        sum(|r| r.stats.acked_writes),
        reports.iter().filter(|r| !r.is_clean()).count()
    );
    reports.into_iter().filter(|r| !r.is_clean()).collect()
}

fn assert_clean(failures: &[SimReport]) {
    if let Some(first) = failures.first() {
        let seeds: Vec<u64> = failures.iter().map(|r| r.seed).collect();
        panic!("{} seeds failed: {seeds:?}\n{}", failures.len(), first.describe());
    }
}

#[test]
fn random_seeds_keep_every_invariant_and_recover_after_the_heal() {
    let first = env_u64("METRO_SIM_FIRST_SEED").unwrap_or(0);
    let count = env_u64("METRO_SIM_SEEDS").unwrap_or(CI_SEEDS);
    assert_clean(&sweep(first, count, SimOptions::random));
}

#[test]
fn soak_thousands_of_seeds_when_metro_soak_is_set() {
    if std::env::var("METRO_SOAK").as_deref() != Ok("1") {
        println!("METRO_SOAK!=1: soak skipped");
        return;
    }
    let count = env_u64("METRO_SOAK_SEEDS").unwrap_or(SOAK_SEEDS);
    assert_clean(&sweep(1_000_000, count, SimOptions::random));
}

#[test]
fn reproduce() {
    let seed = env_u64("METRO_SIM_SEED").unwrap_or(0);
    let r = run(&SimOptions::random(seed));
    println!("{}", r.describe());
    println!("faults: {:?}\nstats: {:?}\nwall: {:?}", r.faults, r.stats, r.wall);
    assert!(r.is_clean(), "{}", r.describe());
    assert!(r.stats.acked_writes > 0 && r.stats.grants > 0);
}

#[test]
fn a_seed_replays_identically() {
    for seed in [3, 11] {
        let (a, b) = (run(&SimOptions::random(seed)), run(&SimOptions::random(seed)));
        assert_eq!(format!("{:?}", a.stats), format!("{:?}", b.stats), "seed {seed}");
        assert_eq!(a.trace, b.trace, "seed {seed}");
        assert_eq!((a.steps, a.violations), (b.steps, b.violations), "seed {seed}");
    }
}

#[test]
fn loss_of_dc_a_fails_over_to_dc_b_and_its_replicas_rejoin_after_it_returns() {
    for seed in 0..8 {
        let mut o = SimOptions::random(seed);
        o.scenario = Scenario::LoseSite("dc-a");
        let r = run(&o);
        assert!(r.is_clean(), "{}", r.describe());
        // v1 and v3 had their primary on a1; v2 on b2 stays; v4 on b1 stays.
        assert!(r.stats.promotions >= 2, "seed {seed}: {:?}", r.stats);
        assert!(r.stats.fences >= 1, "dc-a fenced: {:?}", r.stats);
        // dc-a returns at the heal: its replicas resync and rejoin in_sync with
        // no manual step (checked by the liveness phase: every volume fully in sync).
        assert!(r.stats.rejoins >= 3, "seed {seed}: {:?}", r.stats);
    }
}

#[test]
fn loss_of_the_witness_then_of_dc_a_suspends_io_and_grants_no_lease() {
    for seed in 0..8 {
        let mut o = SimOptions::random(seed);
        o.scenario = Scenario::WitnessThenDcA;
        o.check_liveness = false;
        let r = run(&o);
        assert!(r.is_clean(), "{}", r.describe());
        // dc-a dies at 8 s: no quorum from then on (b1 alone of a1, b1, w1).
        assert!(r.stats.last_grant_ms < 8_000, "seed {seed}: lease granted without quorum: {:?}", r.stats);
        let last_valid_lease_ms = 8_000 + 2_000 + 2 * 250;
        assert!(
            r.stats.last_ack_ms <= last_valid_lease_ms,
            "seed {seed}: acked without quorum: {:?}",
            r.stats
        );
        assert!(r.stats.acked_writes > 0);
    }
}

#[test]
fn isolating_the_leader_site_fails_over_cleanly() {
    for seed in 0..8 {
        let mut o = SimOptions::random(seed);
        o.scenario = Scenario::IsolateLeaderSite;
        let r = run(&o);
        assert!(r.is_clean(), "{}", r.describe());
    }
}

#[test]
fn isolating_a_site_without_the_leader_fails_over_cleanly() {
    for seed in 0..10 {
        let mut o = SimOptions::random(seed);
        o.scenario = Scenario::IsolateFollowerSite;
        let r = run(&o);
        assert!(r.is_clean(), "{}", r.describe());
        assert!(r.stats.promotions >= 1, "seed {seed}: {:?}", r.stats);
    }
}

/// Runs `BUG_SEEDS` seeds that isolate a site holding primaries, with `bugs`
/// injected; asserts the oracle saw two valid primary leases in at least a
/// quarter of them (`what` names the bug) and returns those runs.
fn two_primaries_caught_with(bugs: Bugs, what: &str) -> Vec<SimReport> {
    let caught = runs_with_two_primaries(bugs);
    println!("the injected {what} was caught in {} of {BUG_SEEDS} seeds", caught.len());
    assert!(
        caught.len() >= BUG_SEEDS as usize / 4,
        "the injected {what} was caught in only {} of {BUG_SEEDS} seeds",
        caught.len()
    );
    caught
}

fn runs_with_two_primaries(bugs: Bugs) -> Vec<SimReport> {
    (0..BUG_SEEDS)
        .map(|seed| {
            let mut o = SimOptions::random(seed);
            o.scenario = Scenario::IsolateFollowerSite;
            o.bugs = bugs;
            run(&o)
        })
        .filter(|r| r.violations.iter().any(|v| v.contains("valid primary leases at once")))
        .collect()
}

#[test]
fn the_simulator_catches_promotion_without_waiting_out_the_lease() {
    let caught =
        two_primaries_caught_with(Bugs { promote_without_lease_wait: true, ..Bugs::default() }, "bug");
    println!("caught, e.g.:\n{}", caught[0].describe());
}

#[test]
fn planned_moves_hand_the_lease_over_by_release_without_two_primaries() {
    let mut releases = 0;
    for seed in 0..10 {
        let mut o = SimOptions::random(seed);
        o.scenario = Scenario::PlannedMoves;
        let r = run(&o);
        assert!(r.is_clean(), "{}", r.describe());
        assert!(r.stats.promotions >= 4, "seed {seed}: the moves happened: {:?}", r.stats);
        releases += r.stats.releases;
    }
    println!("{releases} leases ended early by release over 10 seeds");
    assert!(
        releases >= 10,
        "releases were honoured only {releases} times: the release path is not exercised"
    );
}

#[test]
fn the_simulator_catches_a_primary_that_releases_its_lease_and_keeps_serving() {
    two_primaries_caught_with(Bugs { release_while_serving: true, ..Bugs::default() }, "release bug");
}

#[test]
fn clock_drift_beyond_the_lease_margin_is_caught_as_two_primaries() {
    // 30 %: a slow old holder keeps serving after a fast leader thinks its lease is over.
    let caught = (0..BUG_SEEDS)
        .map(|seed| {
            let mut o = SimOptions::random(seed);
            o.scenario = Scenario::IsolateFollowerSite;
            o.max_drift_ppm = 300_000;
            run(&o)
        })
        .filter(|r| r.violations.iter().any(|v| v.contains("valid primary leases at once")))
        .count();
    println!("drift beyond the margin caught in {caught} of {BUG_SEEDS} seeds");
    assert!(caught >= 1, "30 % drift never produced two primaries: the drift model is not exercised");
}

/// Upper bound for a failover of the real engine with default timings when
/// the leader's site is lost: openraft's leader lease and election (2 x 2 s),
/// the new leader's lease wait (2 s + 0.5 s), a control round and a
/// heartbeat (0.25 s each), plus slack. DESIGN.md's 5 s target holds only
/// when the leader survives; the report names the gap.
const ENGINE_RTO_BOUND_MS: u64 = 8_000;

#[test]
fn the_real_quorum_engine_fails_over_a_lost_site_under_turmoil() {
    for (seed, site) in [(1, "dc-a"), (2, "dc-a"), (3, "dc-b"), (4, "dc-b")] {
        let started = Instant::now();
        let r = metro_tests::sim::engine::run_engine_site_loss(seed, site);
        println!("real engine, seed {seed}, lose {site}: {r:?}, wall {:?}", started.elapsed());
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        let rto = r.rto_ms.expect("every volume served again after the site was lost");
        assert!(rto <= ENGINE_RTO_BOUND_MS, "seed {seed}: failover took {rto} ms");
        let lost_prefix = if site == "dc-a" { 'a' } else { 'b' };
        for (v, p) in &r.primaries {
            assert!(p.as_deref().is_some_and(|p| !p.starts_with(lost_prefix)), "{v} still on {p:?}");
        }
    }
}

#[test]
fn the_real_quorum_engine_serves_through_a_witness_loss_and_stops_without_quorum() {
    for seed in [1, 2] {
        let r = metro_tests::sim::engine::run_engine_witness_then_dc_a(seed);
        println!("real engine, seed {seed}, witness then dc-a: {r:?}");
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        assert!(r.served_without_witness, "seed {seed}: losing only the witness interrupted I/O");
        assert!(
            r.served_without_quorum.is_empty(),
            "seed {seed}: served without quorum: {:?}",
            r.served_without_quorum
        );
    }
}

/// Seeds of random faults against the real engine in CI (each ~1 s).
const ENGINE_SEEDS: u64 = 10;

#[test]
fn the_real_quorum_engine_keeps_its_invariants_under_random_faults() {
    let count = env_u64("METRO_ENGINE_SEEDS").unwrap_or(ENGINE_SEEDS);
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut promotions = 0;
    for seed in 0..count {
        let r = metro_tests::sim::engine::run_engine_random(seed, 20_000, 15_000);
        promotions += r.promotions;
        if !r.violations.is_empty() || !r.unserved.is_empty() {
            println!("real engine seed {seed}: {r:?}");
            println!(
                "reproduce with: cargo test -p metro-tests --test sim_reproduce -- --engine --reproduce {seed}"
            );
            failed.push(seed);
        }
    }
    println!(
        "real engine: {count} seeds in {:?}, {promotions} promotions, failed {failed:?}",
        started.elapsed()
    );
    assert!(failed.is_empty(), "real engine seeds failed: {failed:?}");
}

/// The printed seed is enough to replay a real-engine run exactly: two runs
/// of one seed report the same things at the same simulated instants.
#[test]
fn a_real_engine_run_is_reproducible_from_its_seed() {
    let seeds: Vec<u64> = match env_u64("METRO_REPRO_SEEDS") {
        Some(n) => (0..n).collect(),
        None => vec![3, 11],
    };
    for seed in seeds {
        let a = metro_tests::sim::engine::run_engine_random(seed, 20_000, 15_000);
        let b = metro_tests::sim::engine::run_engine_random(seed, 20_000, 15_000);
        println!(
            "seed {seed}: traces {:#x} / {:#x}, promotions {} / {}",
            a.trace, b.trace, a.promotions, b.promotions
        );
        assert_eq!(a.violations, b.violations, "seed {seed}");
        assert_eq!(a.promotions, b.promotions, "seed {seed}");
        assert_eq!(a.trace, b.trace, "seed {seed}: the runs diverged");
    }
}
