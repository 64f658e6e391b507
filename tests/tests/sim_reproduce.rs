//! Replays simulator seeds from the command line (no libtest harness, so it
//! accepts its own flags):
//!
//! ```text
//! cargo test -p metro-tests --test sim_reproduce -- --reproduce <seed> [--bug] [--scenario NAME]
//! cargo test -p metro-tests --test sim_reproduce -- --seeds <count> [--first <seed>]
//! cargo test -p metro-tests --test sim_reproduce -- --engine --reproduce <seed>
//! cargo test -p metro-tests --test sim_reproduce -- --datapath --reproduce <seed> [--scenario Name] [--bug Name,Name]   (RUST_LOG=info for the hosts' logs)
//! ```
//!
//! `--engine` replays a random-fault run of the real quorum engine on turmoil
//! hosts (`tests/src/sim/engine.rs`) instead of the model; it is as
//! reproducible as the model (the run's trace digest is printed).
//!
//! Without flags it replays seed 0. Exits non-zero when a run breaks an invariant.

use metro_tests::sim::{run, Bugs, Scenario, SimOptions};
use std::process::ExitCode;
use std::time::Instant;

fn scenario(name: &str) -> Option<Scenario> {
    Some(match name {
        "random" => Scenario::Random,
        "lose-dc-a" => Scenario::LoseSite("dc-a"),
        "lose-dc-b" => Scenario::LoseSite("dc-b"),
        "witness-then-dc-a" => Scenario::WitnessThenDcA,
        "isolate-leader-site" => Scenario::IsolateLeaderSite,
        "isolate-follower-site" => Scenario::IsolateFollowerSite,
        "planned-moves" => Scenario::PlannedMoves,
        _ => return None,
    })
}

/// Log lines stamped with simulated time (turmoil's clock).
struct SimTime;

impl tracing_subscriber::fmt::time::FormatTime for SimTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let ms = turmoil::sim_elapsed().map(|d| d.as_millis()).unwrap_or(0);
        write!(w, "{ms:>6}ms")
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let number = |flag: &str| {
        value(flag).map(|v| v.parse::<u64>().unwrap_or_else(|_| panic!("{flag} needs a number")))
    };
    let bugs = Bugs {
        promote_without_lease_wait: args.iter().any(|a| a == "--bug"),
        release_while_serving: args.iter().any(|a| a == "--bug-release"),
    };
    let datapath = args.iter().any(|a| a == "--datapath");
    let scen = match value("--scenario").filter(|_| !datapath) {
        Some(n) => match scenario(&n) {
            Some(s) => s,
            None => {
                eprintln!("unknown scenario `{n}`; use random, lose-dc-a, lose-dc-b, witness-then-dc-a, isolate-leader-site, isolate-follower-site, planned-moves");
                return ExitCode::FAILURE;
            }
        },
        None => Scenario::Random,
    };
    let opts = |seed| SimOptions { scenario: scen, bugs, ..SimOptions::random(seed) };
    if args.iter().any(|a| a == "--datapath") {
        let Some(seed) = number("--reproduce") else {
            eprintln!("--datapath needs --reproduce <seed>");
            return ExitCode::FAILURE;
        };
        let mut bugs = Vec::new();
        for name in value("--bug").unwrap_or_default().split(',').filter(|n| !n.is_empty()) {
            match metro_node::rt::Bug::ALL.iter().find(|b| format!("{b:?}") == name) {
                Some(b) => bugs.push(*b),
                None => {
                    eprintln!("unknown bug `{name}`; use one of {:?}", metro_node::rt::Bug::ALL);
                    return ExitCode::FAILURE;
                }
            }
        }
        if std::env::var("RUST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_timer(SimTime)
                .try_init();
        }
        use metro_tests::sim::datapath::DScenario;
        let scenario = match value("--scenario") {
            None => DScenario::Random,
            Some(n) => match DScenario::ALL.iter().find(|s| format!("{s:?}") == n) {
                Some(s) => *s,
                None => {
                    eprintln!("unknown data-path scenario `{n}`; use one of {:?}", DScenario::ALL);
                    return ExitCode::FAILURE;
                }
            },
        };
        let opts = metro_tests::sim::datapath::DataPathOptions {
            bugs,
            scenario,
            ..metro_tests::sim::datapath::DataPathOptions::new(seed)
        };
        let r = metro_tests::sim::datapath::run_datapath(&opts);
        println!("{r:#?}");
        return if r.failed() { ExitCode::FAILURE } else { ExitCode::SUCCESS };
    }
    if args.iter().any(|a| a == "--engine") {
        let Some(seed) = number("--reproduce") else {
            eprintln!("--engine needs --reproduce <seed>");
            return ExitCode::FAILURE;
        };
        let started = Instant::now();
        let r = metro_tests::sim::engine::run_engine_random(seed, 20_000, 15_000);
        println!("{r:#?}");
        println!("trace {:#x}, wall {:?}", r.trace, started.elapsed());
        return if r.violations.is_empty() && r.unserved.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if let Some(seed) =
        number("--reproduce").or(std::env::var("METRO_SIM_SEED").ok().and_then(|s| s.parse().ok()))
    {
        let r = run(&opts(seed));
        println!("{}", r.describe());
        println!("wall {:?}", r.wall);
        return if r.is_clean() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let first = number("--first").unwrap_or(0);
    let count = number("--seeds").unwrap_or(1);
    let started = Instant::now();
    let mut failed = Vec::new();
    for seed in first..first + count {
        let r = run(&opts(seed));
        if !r.is_clean() {
            println!("{}", r.describe());
            failed.push(seed);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds in {secs:.1} s ({:.1} seeds/s, one thread); failed: {failed:?}",
        count as f64 / secs
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
