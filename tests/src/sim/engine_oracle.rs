//! The invariant oracle of the real-engine simulation ([`super::engine`]).
//!
//! Every host reports each 10 ms of simulated time: its raft status, its
//! applied state and until when it may serve each volume (its state names it
//! primary and it holds a lease for the current epoch, which is what the data
//! path asks `Quorum::lease_valid_until`). Checked on each report: at most one
//! leader per term, epochs never decrease on a member, a new primary comes
//! from the previous `in_sync`. Checked after every step
//! ([`EngineOracle::check_instant`]): at most one member may serve a volume.

use metro_quorum::state::ClusterState;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Keep failure reports readable.
const MAX_VIOLATIONS: usize = 20;

/// What each host last reported, and what went wrong.
#[derive(Default)]
pub struct EngineOracle {
    /// term → the member that led it.
    leaders: BTreeMap<u64, String>,
    /// member → its last applied state (this incarnation).
    states: BTreeMap<String, Arc<ClusterState>>,
    /// volume → member → simulated ms until which it may serve.
    serving_until: BTreeMap<String, BTreeMap<String, u64>>,
    /// The voter set the latest leader reported.
    pub voters: Vec<String>,
    pub statuses: BTreeMap<String, metro_quorum::QuorumStatus>,
    /// Distinct (volume, epoch) at which some member saw a new primary.
    pub promotions: std::collections::BTreeSet<(String, u64)>,
    pub violations: Vec<String>,
    pub now_ms: u64,
    /// A running digest of everything the hosts reported and when: two runs
    /// of one seed must end with the same digest (bit-reproducibility).
    pub trace: u64,
}

impl EngineOracle {
    fn violate(&mut self, v: String) {
        if self.violations.len() < MAX_VIOLATIONS {
            self.violations.push(format!("t={}ms {v}", self.now_ms));
        }
    }

    /// The state a member last reported.
    pub fn state_of(&self, id: &str) -> Option<Arc<ClusterState>> {
        self.states.get(id).cloned()
    }

    /// Members that may serve `vol` right now.
    pub fn serving(&self, vol: &str) -> Vec<String> {
        let now = self.now_ms;
        self.serving_until
            .get(vol)
            .map_or(Vec::new(), |m| m.iter().filter(|(_, u)| **u > now).map(|(n, _)| n.clone()).collect())
    }

    pub fn crashed(&mut self, id: &str) {
        self.states.remove(id);
        self.statuses.remove(id);
        for m in self.serving_until.values_mut() {
            m.remove(id);
        }
    }

    /// After every step.
    pub fn check_instant(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        let vols: Vec<String> = self.serving_until.keys().cloned().collect();
        for v in vols {
            let s = self.serving(&v);
            if s.len() > 1 {
                self.violate(format!("{v}: {} members may serve at once: {s:?}", s.len()));
            }
        }
    }

    pub(crate) fn report(
        &mut self,
        id: &str,
        status: &metro_quorum::QuorumStatus,
        state: Arc<ClusterState>,
        serving: BTreeMap<String, u64>,
    ) {
        let (term, leader) = (status.term, status.is_leader);
        self.trace = trace_step(self.trace, self.now_ms, id, status, &state, &serving);
        self.statuses.insert(id.into(), status.clone());
        if leader {
            self.voters = status.voters.clone();
            match self.leaders.get(&term) {
                Some(other) if other != id => {
                    let other = other.clone();
                    self.violate(format!("two leaders in term {term}: {other} and {id}"));
                }
                _ => {
                    self.leaders.insert(term, id.into());
                }
            }
        }
        if let Some(old) = self.states.get(id).cloned() {
            for (name, new) in &state.volumes {
                let Some(prev) = old.volumes.get(name) else { continue };
                if new.epoch < prev.epoch {
                    self.violate(format!("{id}: epoch of {name} went {} -> {}", prev.epoch, new.epoch));
                }
                if new.epoch > prev.epoch && new.primary != prev.primary {
                    self.promotions.insert((name.clone(), new.epoch));
                    if let Some(p) = &new.primary {
                        // Only checkable for a single step; larger jumps are covered by apply().
                        if new.epoch == prev.epoch + 1 && !prev.is_in_sync(p) {
                            self.violate(format!(
                                "{id}: {name} promoted {p} outside in_sync {:?}",
                                prev.in_sync
                            ));
                        }
                    }
                }
            }
        }
        self.states.insert(id.into(), state);
        for m in self.serving_until.values_mut() {
            m.remove(id);
        }
        for (v, until) in serving {
            self.serving_until.entry(v).or_default().insert(id.into(), until);
        }
    }
}

/// Fold one report into the trace digest. SipHash with fixed keys
/// (`DefaultHasher::new`) is stable across runs of one build.
fn trace_step(
    prev: u64,
    now_ms: u64,
    id: &str,
    status: &metro_quorum::QuorumStatus,
    state: &ClusterState,
    serving: &BTreeMap<String, u64>,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    (prev, now_ms, id, status.term, &status.leader, status.is_leader, status.last_applied).hash(&mut h);
    (&status.voters, &status.learners).hash(&mut h);
    for (name, v) in &state.volumes {
        (name, v.epoch, &v.primary, &v.in_sync).hash(&mut h);
    }
    serving.hash(&mut h);
    h.finish()
}
