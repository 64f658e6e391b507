//! Runs one seed: builds the turmoil world (five hosts in three sites), plays
//! the fault schedule, checks the oracle after every step, then (after a heal)
//! checks that the cluster recovers.
//!
//! Determinism: every random choice comes from the seed (turmoil's RNG, the
//! fault schedule, host clocks, election timeouts), all maps are ordered, and
//! hosts share nothing but the network and the oracle. The same seed replays
//! the same run: `METRO_SIM_SEED=<seed> cargo test -p metro-tests --test sim reproduce -- --nocapture`.

use super::clock::{DriftClock, MAX_DRIFT_PPM};
use super::disk::Disk;
use super::faults::{all_hosts, hosts_of, schedule, Fault, Scenario, SITES};
use super::msg::{LogEntry, Msg};
use super::node::{Bugs, Node, NodeConfig, SimTiming};
use super::oracle::{Oracle, Stats};
use metro_api::config::{Role, SiteKind};
use metro_quorum::state::{raft_id_of, Command, LeasePolicy, NodeId, NodeRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The port every simulated host listens on.
const PORT: u16 = 7700;
/// One turmoil step. 10 ms: 3.5x faster than 5 ms for the same coverage;
/// every protocol timer is a multiple of it.
const TICK_MS: u64 = 10;
/// Recovery is judged on the last part of the liveness phase.
const LIVENESS_WINDOW_MS: u64 = 4_000;
/// One datagram; the largest message is an append of `MAX_ENTRIES_PER_APPEND`.
const MAX_DATAGRAM: usize = 64 * 1024;

/// Volumes of the simulated cluster: (name, replicas, primary).
pub const VOLUMES: [(&str, [&str; 2], &str); 4] = [
    ("v1", ["a1", "b1"], "a1"),
    ("v2", ["a2", "b2"], "b2"),
    ("v3", ["a1", "b2"], "a1"),
    ("v4", ["a2", "b1"], "b1"),
];

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub seed: u64,
    pub scenario: Scenario,
    pub bugs: Bugs,
    pub timing: SimTiming,
    /// Faults are injected during `[0, safety_ms)`; a heal ends it.
    pub safety_ms: u64,
    /// Time after the heal in which the cluster must recover.
    pub liveness_ms: u64,
    pub check_liveness: bool,
    /// Bound on each host's clock-rate drift; beyond ~5.9 % the lease margin
    /// no longer covers it (see `clock`).
    pub max_drift_ppm: i64,
}

impl SimOptions {
    pub fn random(seed: u64) -> Self {
        SimOptions {
            seed,
            scenario: Scenario::Random,
            bugs: Bugs::default(),
            timing: SimTiming::default(),
            safety_ms: 20_000,
            liveness_ms: 14_000,
            check_liveness: true,
            max_drift_ppm: MAX_DRIFT_PPM,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u64,
    pub virtual_ms: u64,
    pub wall: Duration,
    pub stats: Stats,
    /// Safety violations (DESIGN.md 4); empty when the run was correct.
    pub violations: Vec<String>,
    /// Recovery failures after the heal.
    pub liveness: Vec<String>,
    pub trace: Vec<String>,
    pub faults: Vec<(u64, Fault)>,
}

impl SimReport {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty() && self.liveness.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "seed {}: {} ms simulated in {} steps, {}\n  reproduce: METRO_SIM_SEED={} cargo test -p metro-tests --test sim reproduce -- --nocapture   (or: --reproduce {})\n",
            self.seed,
            self.virtual_ms,
            self.steps,
            if self.is_clean() { "clean" } else { "FAILED" },
            self.seed,
            self.seed
        );
        for v in self.violations.iter().chain(&self.liveness) {
            s += &format!("  VIOLATION {v}\n");
        }
        s += &format!("  faults: {:?}\n  stats: {:?}\n  last events:\n", self.faults, self.stats);
        for t in &self.trace {
            s += &format!("    {t}\n");
        }
        s
    }
}

fn record(id: &str, site: &str, role: Role) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        raft_id: raft_id_of(id),
        site: site.into(),
        role,
        api: format!("{id}:7443"),
        nbd: None,
        replication: None,
        capacity_bytes: 1 << 40,
        timings: None,
    }
}

/// The log every host starts with (committed by construction, term 0).
fn bootstrap() -> Vec<LogEntry> {
    let mut cmds = vec![Command::InitSites {
        sites: vec![
            ("dc-a".into(), SiteKind::Data),
            ("dc-b".into(), SiteKind::Data),
            ("witness".into(), SiteKind::Witness),
        ],
        preferred_site: Some("dc-a".into()),
    }];
    for (site, hosts) in SITES {
        for h in hosts {
            let role = if site == "witness" { Role::Witness } else { Role::Storage };
            cmds.push(Command::RegisterNode(record(h, site, role)));
        }
    }
    for (name, replicas, primary) in VOLUMES {
        cmds.push(Command::CreateVolume {
            name: name.into(),
            size_bytes: 1 << 30,
            iops_limit: 0,
            bandwidth_limit: 0,
            lease_policy: LeasePolicy::Suspend,
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            primary: primary.into(),
            nonce: 1,
        });
    }
    cmds.into_iter().map(|c| LogEntry { term: 0, cmd: Some(c) }).collect()
}

/// Base latencies: a few ms inside and between data sites, tens of ms to the witness.
pub(crate) fn base_latency(sim: &turmoil::Sim<'_>) {
    for (i, a) in all_hosts().into_iter().enumerate() {
        for b in all_hosts().into_iter().skip(i + 1) {
            let witness = a == "w1" || b == "w1";
            let (min, max) = if witness { (20, 60) } else { (1, 4) };
            sim.set_link_latency(a, b, Duration::from_millis(min));
            sim.set_link_max_message_latency(a, b, Duration::from_millis(max));
        }
    }
}

fn cut(sim: &turmoil::Sim<'_>, a: &str, b: &str, oneway: bool) {
    for x in hosts_of(a) {
        for y in hosts_of(b) {
            if oneway {
                sim.partition_oneway(*x, *y);
            } else {
                sim.partition(*x, *y);
            }
        }
    }
}

/// Operator requests waiting for a host (planned moves asked of the leader).
pub(crate) type Operator = Rc<RefCell<u32>>;

async fn host_loop(
    cfg: NodeConfig,
    disk: Rc<RefCell<Disk>>,
    oracle: Rc<RefCell<Oracle>>,
    operator: Operator,
    seed: u64,
) -> turmoil::Result {
    let incarnation = {
        let mut d = disk.borrow_mut();
        d.incarnation += 1;
        d.incarnation
    };
    let clock = cfg.clock;
    let now = move || clock.local_ms(turmoil::sim_elapsed().unwrap_or_default().as_millis() as u64);
    let me = cfg.me.clone();
    let rng = StdRng::seed_from_u64(seed ^ raft_id_of(&me) ^ incarnation.wrapping_mul(0x9e37_79b9));
    let sock = turmoil::net::UdpSocket::bind(("0.0.0.0", PORT)).await?;
    let mut node = Node::new(cfg, disk, rng, now());
    let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let mut out = Vec::new();
        // `biased`: tokio seeds select!'s branch choice only under
        // `cfg(tokio_unstable)`; a fixed order keeps a seed reproducible.
        tokio::select! {
            biased;
            r = sock.recv_from(&mut buf) => {
                if let Some(msg) = r.ok().and_then(|(n, _)| Msg::decode(&buf[..n])) {
                    node.on_message(&mut oracle.borrow_mut(), msg, now(), &mut out);
                }
            }
            _ = tick.tick() => {
                if std::mem::take(&mut *operator.borrow_mut()) > 0 {
                    node.request_moves();
                }
                let mut o = oracle.borrow_mut();
                node.tick(&mut o, now(), &mut out);
                o.report_role(&me, node.is_leader());
            }
        }
        // Messages to self are handled at once; bounded by the protocol (no loops).
        while let Some((to, msg)) = out.pop() {
            if to == me {
                node.on_message(&mut oracle.borrow_mut(), msg, now(), &mut out);
            } else {
                // A full or partitioned link drops the datagram, like UDP.
                let _ = sock.send_to(&msg.encode(), (to.as_str(), PORT)).await;
            }
        }
    }
}

/// Run one seed to completion.
pub fn run(opts: &SimOptions) -> SimReport {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let voters: BTreeSet<NodeId> = ["a1", "b1", "w1"].iter().map(|s| s.to_string()).collect();
    let members: BTreeSet<NodeId> = all_hosts().iter().map(|s| s.to_string()).collect();
    let boot = bootstrap();
    let mut clocks = BTreeMap::new();
    let mut disks = BTreeMap::new();
    for h in all_hosts() {
        let clock = DriftClock {
            offset_ms: rng.gen_range(0..100_000),
            rate_ppm: rng.gen_range(-opts.max_drift_ppm..=opts.max_drift_ppm),
        };
        clocks.insert(h.to_string(), clock);
        disks.insert(h.to_string(), Rc::new(RefCell::new(Disk { log: boot.clone(), ..Disk::default() })));
    }
    let oracle = Rc::new(RefCell::new(Oracle::new(clocks.clone(), voters.clone(), disks.clone())));

    let end_ms = opts.safety_ms + opts.liveness_ms;
    let mut sim = turmoil::Builder::new()
        .rng_seed(opts.seed)
        .tick_duration(Duration::from_millis(TICK_MS))
        .simulation_duration(Duration::from_millis(end_ms + 10_000))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(4))
        .udp_capacity(4_096)
        .build();
    let mut operators: BTreeMap<String, Operator> = BTreeMap::new();
    for h in all_hosts() {
        let cfg = NodeConfig {
            me: h.to_string(),
            voters: voters.clone(),
            members: members.clone(),
            bootstrap_len: boot.len() as u64,
            timing: opts.timing,
            bugs: opts.bugs,
            clock: clocks[h],
        };
        let (disk, oracle, seed) = (disks[h].clone(), oracle.clone(), opts.seed);
        let operator = operators.entry(h.to_string()).or_default().clone();
        sim.host(h, move || host_loop(cfg.clone(), disk.clone(), oracle.clone(), operator.clone(), seed));
    }
    base_latency(&sim);

    let faults = schedule(opts.scenario, opts.seed, opts.safety_ms);
    let mut pending = faults.iter().cloned().peekable();
    let mut crashed: BTreeSet<&'static str> = BTreeSet::new();
    let mut steps = 0u64;
    let mut acked_at_window: BTreeMap<&str, usize> = BTreeMap::new();
    let mut host_error = None;
    loop {
        let now = sim.elapsed().as_millis() as u64;
        while let Some((_, f)) = pending.next_if(|(at, _)| *at <= now) {
            oracle.borrow_mut().note(format!("FAULT {f:?}"));
            let leader = oracle.borrow().current_leaders().into_iter().next();
            if f == Fault::PlannedMove {
                // Asked of every host that believes it leads; only a ready leader acts.
                for l in oracle.borrow().current_leaders() {
                    *operators[&l].borrow_mut() += 1;
                }
                continue;
            }
            apply_fault(&mut sim, leader, &mut |h| oracle.borrow_mut().crashed(h), &mut crashed, &f);
        }
        if now == end_ms.saturating_sub(LIVENESS_WINDOW_MS) {
            let o = oracle.borrow();
            acked_at_window = VOLUMES.iter().map(|(v, _, _)| (*v, o.acked_count(v))).collect();
        }
        if let Err(e) = sim.step() {
            host_error = Some(e.to_string());
            break;
        }
        steps += 1;
        let now = sim.elapsed().as_millis() as u64;
        let mut o = oracle.borrow_mut();
        o.check_instant(now);
        if !o.violations.is_empty() || now >= end_ms {
            break;
        }
    }

    let virtual_ms = sim.elapsed().as_millis() as u64;
    let o = oracle.borrow();
    let mut liveness = Vec::new();
    if let Some(e) = host_error {
        liveness.push(format!("a host failed: {e}"));
    }
    if opts.check_liveness && o.violations.is_empty() && virtual_ms >= end_ms {
        if o.current_leaders().len() != 1 {
            liveness.push(format!("no single leader after the heal: {:?}", o.current_leaders()));
        }
        let state = o.committed_state();
        for (v, replicas, _) in VOLUMES {
            let in_sync = state.volumes.get(v).map(|x| x.in_sync.len()).unwrap_or(0);
            if in_sync != replicas.len() {
                liveness
                    .push(format!("{v} has {in_sync} of {} replicas in sync after the heal", replicas.len()));
            }
            let before = acked_at_window.get(v).copied().unwrap_or(0);
            if o.acked_count(v) <= before {
                liveness.push(format!(
                    "{v} acknowledged no write in the last {LIVENESS_WINDOW_MS} ms after the heal"
                ));
            }
        }
    }
    SimReport {
        seed: opts.seed,
        steps,
        virtual_ms,
        wall: started.elapsed(),
        stats: o.stats.clone(),
        violations: o.violations.clone(),
        liveness,
        trace: o.trace(),
        faults,
    }
}

/// Apply one fault to the turmoil world. `leader` is the current leader (for
/// the leader-relative faults); `on_crash` tells the oracle a host lost its memory.
pub(crate) fn apply_fault(
    sim: &mut turmoil::Sim<'_>,
    leader: Option<String>,
    on_crash: &mut dyn FnMut(&str),
    crashed: &mut BTreeSet<&'static str>,
    f: &Fault,
) {
    match f {
        Fault::HealAll => {
            let hosts = all_hosts();
            for (i, a) in hosts.iter().enumerate() {
                for b in hosts.iter().skip(i + 1) {
                    sim.repair(*a, *b);
                }
            }
            base_latency(sim);
            for h in std::mem::take(crashed) {
                sim.bounce(h);
            }
        }
        Fault::Cut(a, b) => cut(sim, a, b, false),
        Fault::CutOneWay(a, b) => cut(sim, a, b, true),
        Fault::Isolate(s) => {
            for (other, _) in SITES.iter().filter(|(o, _)| o != s) {
                cut(sim, s, other, false);
            }
        }
        Fault::WitnessSeesOnly(seen) => {
            cut(sim, "dc-a", "dc-b", false);
            let unseen = if *seen == "dc-a" { "dc-b" } else { "dc-a" };
            cut(sim, "witness", unseen, false);
        }
        Fault::IsolateLeaderSite | Fault::IsolateFollowerSite => {
            let leader_site = match leader.as_deref().map(|l| &l[..1]) {
                Some("b") => "dc-b",
                _ => "dc-a",
            };
            let site = match (f, leader_site) {
                (Fault::IsolateLeaderSite, s) => s,
                (_, "dc-a") => "dc-b",
                _ => "dc-a",
            };
            for (other, _) in SITES.iter().filter(|(o, _)| *o != site) {
                cut(sim, site, other, false);
            }
        }
        Fault::Crash(h) => {
            if crashed.insert(h) {
                sim.crash(*h);
                on_crash(h);
            }
        }
        Fault::Restart(h) => {
            if crashed.remove(h) {
                sim.bounce(*h);
            }
        }
        Fault::PlannedMove => {}
        Fault::Slow(a, b, ms) => {
            for x in hosts_of(a) {
                for y in hosts_of(b) {
                    sim.set_link_latency(*x, *y, Duration::from_millis(*ms));
                }
            }
        }
    }
}
