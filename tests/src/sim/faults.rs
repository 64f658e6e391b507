//! Fault schedules: what happens to the network and the hosts, and when.
//!
//! A schedule is a list of `(at_ms, Fault)` drawn from the seed, so the same
//! seed always produces the same run. The safety phase injects faults; the
//! schedule always ends with a [`Fault::HealAll`] so a liveness phase can
//! check that the cluster recovers.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const DATA_SITES: [&str; 2] = ["dc-a", "dc-b"];
pub const SITES: [(&str, &[&str]); 3] =
    [("dc-a", &["a1", "a2"]), ("dc-b", &["b1", "b2"]), ("witness", &["w1"])];

pub fn hosts_of(site: &str) -> &'static [&'static str] {
    SITES.iter().find(|(s, _)| *s == site).map_or(&[], |(_, h)| h)
}

pub fn all_hosts() -> Vec<&'static str> {
    SITES.iter().flat_map(|(_, h)| h.iter().copied()).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Repair every link, reset latencies, restart every crashed host.
    HealAll,
    /// Drop everything between two sites, both ways.
    Cut(&'static str, &'static str),
    /// Drop everything from one site to another; the reverse still flows.
    CutOneWay(&'static str, &'static str),
    /// Cut a site from both others.
    Isolate(&'static str),
    /// Cut dc-a from dc-b, and the witness from one of them: it sees one side.
    WitnessSeesOnly(&'static str),
    /// Isolate the data site of the current leader (the witness's leader: dc-a).
    IsolateLeaderSite,
    /// Isolate a data site that does not hold the leader: the leader stays
    /// and must fail that site's primaries over itself.
    IsolateFollowerSite,
    Crash(&'static str),
    Restart(&'static str),
    /// Fixed latency between two sites for a while (until the next heal).
    Slow(&'static str, &'static str, u64),
    /// An operator moves every primary to another in-sync replica (the
    /// leader plans it; the old primaries release their leases).
    PlannedMove,
}

/// Scripted or random schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Random faults drawn from the seed.
    Random,
    /// Lose a whole data site (crash every host of it) at 5 s.
    LoseSite(&'static str),
    /// Lose the witness at 4 s, then dc-a at 8 s; nothing heals before the end.
    WitnessThenDcA,
    /// Isolate the leader's data site at 5 s.
    IsolateLeaderSite,
    /// Isolate a data site without the leader at 5 s.
    IsolateFollowerSite,
    /// Planned moves every 1.5 s and nothing else: each must hand the lease
    /// over by release, without two primaries.
    PlannedMoves,
}

/// Faults start once the cluster had time to elect and hand out leases.
const FIRST_FAULT_MS: u64 = 4_000;

pub fn schedule(scenario: Scenario, seed: u64, safety_ms: u64) -> Vec<(u64, Fault)> {
    match scenario {
        Scenario::LoseSite(site) => {
            let mut s: Vec<_> = hosts_of(site).iter().map(|h| (5_000, Fault::Crash(h))).collect();
            s.push((safety_ms, Fault::HealAll));
            s
        }
        Scenario::WitnessThenDcA => {
            vec![(4_000, Fault::Crash("w1")), (8_000, Fault::Crash("a1")), (8_000, Fault::Crash("a2"))]
        }
        Scenario::IsolateLeaderSite => vec![(5_000, Fault::IsolateLeaderSite), (safety_ms, Fault::HealAll)],
        Scenario::IsolateFollowerSite => {
            vec![(5_000, Fault::IsolateFollowerSite), (safety_ms, Fault::HealAll)]
        }
        Scenario::PlannedMoves => {
            let mut s: Vec<_> = (0..)
                .map(|i| FIRST_FAULT_MS + i * 1_500)
                .take_while(|t| *t < safety_ms)
                .map(|t| (t, Fault::PlannedMove))
                .collect();
            s.push((safety_ms, Fault::HealAll));
            s
        }
        Scenario::Random => random(seed, safety_ms),
    }
}

fn random(seed: u64, safety_ms: u64) -> Vec<(u64, Fault)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_fa17);
    let hosts = all_hosts();
    let mut out = Vec::new();
    let mut t = FIRST_FAULT_MS;
    while t < safety_ms {
        let site = |rng: &mut StdRng| DATA_SITES[rng.gen_range(0..2)];
        let fault = match rng.gen_range(0..100) {
            0..=17 => Fault::HealAll,
            18..=31 => Fault::Cut("dc-a", "dc-b"),
            32..=41 => Fault::WitnessSeesOnly(site(&mut rng)),
            42..=53 => Fault::Isolate(["dc-a", "dc-b", "witness"][rng.gen_range(0..3)]),
            54..=61 => {
                let from = site(&mut rng);
                let to = if rng.gen_bool(0.5) {
                    "witness"
                } else if from == "dc-a" {
                    "dc-b"
                } else {
                    "dc-a"
                };
                Fault::CutOneWay(from, to)
            }
            62..=79 => Fault::Crash(hosts[rng.gen_range(0..hosts.len())]),
            80..=89 => Fault::Restart(hosts[rng.gen_range(0..hosts.len())]),
            90..=92 => Fault::IsolateLeaderSite,
            93..=94 => Fault::IsolateFollowerSite,
            95..=96 => Fault::PlannedMove,
            _ => Fault::Slow(site(&mut rng), "witness", rng.gen_range(50..400)),
        };
        out.push((t, fault));
        t += rng.gen_range(500..3_000);
    }
    out.push((safety_ms, Fault::HealAll));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_schedule_and_ends_healed() {
        let a = schedule(Scenario::Random, 7, 20_000);
        assert_eq!(a, schedule(Scenario::Random, 7, 20_000));
        assert_ne!(a, schedule(Scenario::Random, 8, 20_000));
        assert_eq!(a.last(), Some(&(20_000, Fault::HealAll)));
        assert!(a.windows(2).all(|w| w[0].0 <= w[1].0));
    }
}
