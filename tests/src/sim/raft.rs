//! A small Raft (election, log replication, commit) standing in for the real
//! openraft engine inside the simulator. It is a model of the protocol, not
//! the product: it exists so the decisions in `metro_quorum::decide` and the
//! lease/fencing protocol can be checked under partitions, crashes and drift.
//!
//! Sans-IO: every handler takes `now_ms` (the host's local clock) and pushes
//! `(to, Msg)` into an outbox. The hard state lives in [`Disk`] and survives
//! crashes; everything here is volatile.
//!
//! Each heartbeat is a numbered *round*; a round is confirmed once a majority
//! of voters (the leader included) accepted it in the leader's term. Leases
//! are granted only against a round confirmed after the request arrived.
//!
//! Voters are fixed (one per data site plus the witness); voter rebalancing
//! (`decide::voters`) is unit-tested, not simulated.

use super::disk::Disk;
use super::msg::{LogEntry, Msg};
use super::oracle::Oracle;
use metro_quorum::state::NodeId;
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet};

/// DESIGN.md 7: heartbeat 250 ms.
pub const HEARTBEAT_MS: u64 = 250;
/// DESIGN.md 7: election timeout 1–2 s.
pub const ELECTION_MIN_MS: u64 = 1_000;
pub const ELECTION_MAX_MS: u64 = 2_000;
/// Bounds one datagram.
pub const MAX_ENTRIES_PER_APPEND: usize = 32;
/// Rounds remembered for lease confirmation (a few seconds of heartbeats).
const ROUNDS_KEPT: u64 = 16;

pub type Outbox = Vec<(NodeId, Msg)>;

#[derive(Debug)]
pub struct LeaderState {
    pub next: BTreeMap<NodeId, u64>,
    pub matched: BTreeMap<NodeId, u64>,
    pub round: u64,
    pub round_acks: BTreeMap<u64, BTreeSet<NodeId>>,
    pub confirmed_round: u64,
    pub last_heartbeat_ms: u64,
    /// When each member last answered (local ms); members start "heard" at election.
    pub last_heard_ms: BTreeMap<NodeId, u64>,
    pub since_ms: u64,
    pub noop_idx: u64,
}

#[derive(Debug)]
pub enum Role {
    Follower,
    Candidate { votes: BTreeSet<NodeId> },
    Leader(LeaderState),
}

pub struct Raft {
    pub me: NodeId,
    pub voters: BTreeSet<NodeId>,
    pub members: BTreeSet<NodeId>,
    pub role: Role,
    pub commit: u64,
    election_deadline_ms: u64,
    rng: StdRng,
}

impl Raft {
    /// `bootstrap_len` entries at the start of the log are committed by construction.
    pub fn new(
        me: NodeId,
        voters: BTreeSet<NodeId>,
        members: BTreeSet<NodeId>,
        bootstrap_len: u64,
        rng: StdRng,
        now_ms: u64,
    ) -> Self {
        let mut r = Raft {
            me,
            voters,
            members,
            role: Role::Follower,
            commit: bootstrap_len,
            election_deadline_ms: 0,
            rng,
        };
        r.reset_election(now_ms);
        r
    }

    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }

    pub fn leader(&self) -> Option<&LeaderState> {
        match &self.role {
            Role::Leader(l) => Some(l),
            _ => None,
        }
    }

    /// Leader whose own no-op is committed: its applied state is current.
    pub fn leader_ready(&self) -> bool {
        self.leader().is_some_and(|l| self.commit >= l.noop_idx)
    }

    fn reset_election(&mut self, now_ms: u64) {
        self.election_deadline_ms = now_ms + self.rng.gen_range(ELECTION_MIN_MS..=ELECTION_MAX_MS);
    }

    fn majority(&self, set: &BTreeSet<NodeId>) -> bool {
        set.intersection(&self.voters).count() * 2 > self.voters.len()
    }

    fn step_down(&mut self, disk: &mut Disk, term: u64, now_ms: u64) {
        if term > disk.term {
            disk.term = term;
            disk.voted_for = None;
        }
        if !matches!(self.role, Role::Follower) {
            self.role = Role::Follower;
            self.reset_election(now_ms);
        }
    }

    /// Propose a command (leader only). Returns its log index; call
    /// [`Raft::flush`] after a batch to replicate it at once.
    pub fn propose(&mut self, disk: &mut Disk, entry: LogEntry) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        disk.log.push(entry);
        Some(disk.last_idx())
    }

    /// Send a round now instead of waiting for the next heartbeat.
    pub fn flush(&mut self, disk: &Disk, now_ms: u64, out: &mut Outbox) {
        if self.is_leader() {
            self.broadcast(disk, now_ms, out);
        }
    }

    pub fn tick(&mut self, disk: &mut Disk, oracle: &mut Oracle, now_ms: u64, out: &mut Outbox) {
        match &self.role {
            Role::Leader(l) => {
                if now_ms >= l.last_heartbeat_ms + HEARTBEAT_MS {
                    self.broadcast(disk, now_ms, out);
                }
            }
            _ => {
                if self.voters.contains(&self.me) && now_ms >= self.election_deadline_ms {
                    disk.term += 1;
                    disk.voted_for = Some(self.me.clone());
                    self.role = Role::Candidate { votes: BTreeSet::from([self.me.clone()]) };
                    self.reset_election(now_ms);
                    for v in self.voters.iter().filter(|v| **v != self.me) {
                        out.push((
                            v.clone(),
                            Msg::Vote {
                                term: disk.term,
                                cand: self.me.clone(),
                                last_idx: disk.last_idx(),
                                last_term: disk.term_at(disk.last_idx()),
                            },
                        ));
                    }
                    self.maybe_win(disk, oracle, now_ms, out);
                }
            }
        }
    }

    fn maybe_win(&mut self, disk: &mut Disk, oracle: &mut Oracle, now_ms: u64, out: &mut Outbox) {
        let Role::Candidate { votes } = &self.role else { return };
        if !self.majority(votes) {
            return;
        }
        disk.log.push(LogEntry { term: disk.term, cmd: None });
        let last = disk.last_idx();
        oracle.became_leader(disk.term, &self.me, &disk.log);
        let peers = self.members.iter().filter(|m| **m != self.me);
        self.role = Role::Leader(LeaderState {
            next: peers.clone().map(|p| (p.clone(), last)).collect(),
            matched: peers.clone().map(|p| (p.clone(), 0)).collect(),
            round: 0,
            round_acks: BTreeMap::new(),
            confirmed_round: 0,
            last_heartbeat_ms: 0,
            last_heard_ms: peers.map(|p| (p.clone(), now_ms)).collect(),
            since_ms: now_ms,
            noop_idx: last,
        });
        self.broadcast(disk, now_ms, out);
    }

    /// One heartbeat round to every member.
    fn broadcast(&mut self, disk: &Disk, now_ms: u64, out: &mut Outbox) {
        let me = self.me.clone();
        let commit = self.commit;
        let Role::Leader(l) = &mut self.role else { return };
        l.round += 1;
        l.last_heartbeat_ms = now_ms;
        let round = l.round;
        l.round_acks.insert(round, BTreeSet::from([me.clone()]));
        l.round_acks.retain(|r, _| r + ROUNDS_KEPT > round);
        for (peer, next) in &l.next {
            let prev_idx = next - 1;
            let entries: Vec<LogEntry> =
                disk.log.iter().skip(prev_idx as usize).take(MAX_ENTRIES_PER_APPEND).cloned().collect();
            out.push((
                peer.clone(),
                Msg::Append {
                    term: disk.term,
                    leader: me.clone(),
                    prev_idx,
                    prev_term: disk.term_at(prev_idx),
                    entries,
                    commit,
                    round,
                },
            ));
        }
    }

    pub fn on_message(
        &mut self,
        disk: &mut Disk,
        oracle: &mut Oracle,
        msg: Msg,
        now_ms: u64,
        out: &mut Outbox,
    ) {
        match msg {
            Msg::Vote { term, cand, last_idx, last_term } => {
                if term > disk.term {
                    self.step_down(disk, term, now_ms);
                }
                let my_last = (disk.term_at(disk.last_idx()), disk.last_idx());
                let granted = term == disk.term
                    && disk.voted_for.as_ref().is_none_or(|v| *v == cand)
                    && (last_term, last_idx) >= my_last;
                if granted {
                    disk.voted_for = Some(cand.clone());
                    self.reset_election(now_ms);
                }
                out.push((cand, Msg::VoteResp { term: disk.term, from: self.me.clone(), granted }));
            }
            Msg::VoteResp { term, from, granted } => {
                if term > disk.term {
                    self.step_down(disk, term, now_ms);
                } else if term == disk.term && granted {
                    if let Role::Candidate { votes } = &mut self.role {
                        votes.insert(from);
                        self.maybe_win(disk, oracle, now_ms, out);
                    }
                }
            }
            Msg::Append { term, leader, prev_idx, prev_term, entries, commit, round } => {
                if term < disk.term {
                    let resp = Msg::AppendResp {
                        term: disk.term,
                        from: self.me.clone(),
                        ok: false,
                        match_idx: 0,
                        round,
                    };
                    out.push((leader, resp));
                    return;
                }
                if term > disk.term || !matches!(self.role, Role::Follower) {
                    self.step_down(disk, term, now_ms);
                }
                self.reset_election(now_ms);
                oracle.voter_ack(&leader, term, round, &self.me);
                let ok = prev_idx <= disk.last_idx() && disk.term_at(prev_idx) == prev_term;
                // On a mismatch, hint the leader where to retry from.
                let mut match_idx = prev_idx.saturating_sub(1).min(disk.last_idx());
                if ok {
                    for (k, e) in entries.iter().enumerate() {
                        let idx = prev_idx + 1 + k as u64;
                        if idx <= disk.last_idx() {
                            if disk.term_at(idx) == e.term {
                                continue;
                            }
                            oracle.truncating(&self.me, idx, &disk.log[idx as usize - 1]);
                            disk.log.truncate(idx as usize - 1);
                        }
                        disk.log.push(e.clone());
                    }
                    match_idx = prev_idx + entries.len() as u64;
                    self.commit = self.commit.max(commit.min(match_idx));
                }
                out.push((
                    leader,
                    Msg::AppendResp { term: disk.term, from: self.me.clone(), ok, match_idx, round },
                ));
            }
            Msg::AppendResp { term, from, ok, match_idx, round } => {
                if term > disk.term {
                    self.step_down(disk, term, now_ms);
                    return;
                }
                if term < disk.term {
                    return;
                }
                let voters = self.voters.clone();
                let Role::Leader(l) = &mut self.role else { return };
                l.last_heard_ms.insert(from.clone(), now_ms);
                if let Some(acks) = l.round_acks.get_mut(&round) {
                    acks.insert(from.clone());
                    if acks.intersection(&voters).count() * 2 > voters.len() {
                        l.confirmed_round = l.confirmed_round.max(round);
                    }
                }
                if ok {
                    let m = l.matched.entry(from.clone()).or_default();
                    *m = (*m).max(match_idx);
                    l.next.insert(from, *m + 1);
                } else {
                    let n = l.next.entry(from).or_insert(1);
                    *n = (*n - 1).min(match_idx + 1).max(1);
                }
                let before = self.commit;
                self.advance_commit(disk);
                if self.commit > before {
                    // Tell followers at once: they apply (and act) a heartbeat sooner.
                    self.broadcast(disk, now_ms, out);
                }
            }
            _ => {}
        }
    }

    fn advance_commit(&mut self, disk: &Disk) {
        let Role::Leader(l) = &self.role else { return };
        let mut n = disk.last_idx();
        while n > self.commit {
            if disk.term_at(n) == disk.term {
                let count = self
                    .voters
                    .iter()
                    .filter(|v| **v == self.me || l.matched.get(*v).is_some_and(|m| *m >= n))
                    .count();
                if count * 2 > self.voters.len() {
                    self.commit = n;
                    return;
                }
            }
            n -= 1;
        }
    }
}
