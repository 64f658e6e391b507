//! Voter balance: the same number of voters in each active data site, plus
//! the witness (DESIGN.md 1).
//!
//! [`desired_voters`] computes the target set; [`membership_steps`] turns the
//! current set into a sequence of single-node changes.
//!
//! Invariants:
//! - Per active data site, at most `voters_per_site` voters, all storage nodes
//!   of that site. Alive current voters are kept (no churn); a dead voter is
//!   replaced by an alive learner of the same site; a dead voter with no
//!   replacement is kept (shrinking a live site would unbalance it).
//! - A Fenced or Deactivated site has no voters: the group shrinks to the
//!   survivors plus the witness, so one more failure is survivable. When the
//!   site is Active again its voters come back.
//! - The witness (every `Role::Witness` node) is always a voter.
//! - A returning site gets its voters back *before* it is Active again
//!   ([`gate_activations`]): "every site active" then also means "the loss of
//!   either data site is survivable". Activating first left a window where
//!   the voters were still {survivor, witness}, and losing the survivor then
//!   lost the quorum and every failover with it.
//! - Each step of [`membership_steps`] adds or removes exactly one node;
//!   additions come first (they are alive), then removals of dead nodes, then
//!   removals of alive ones, so no step removes more than needed.

use crate::state::{ClusterState, Command, NodeId, SiteMode};
use metro_api::config::Role;
use std::collections::BTreeSet;

/// Default voters per data site (DESIGN.md 1: 1 or 2).
pub const DEFAULT_VOTERS_PER_SITE: usize = 1;

/// The voter set the group should converge to.
pub fn desired_voters(
    state: &ClusterState,
    current_voters: &BTreeSet<NodeId>,
    alive: &BTreeSet<NodeId>,
    voters_per_site: usize,
) -> BTreeSet<NodeId> {
    desired_voters_returning(state, current_voters, alive, voters_per_site, &BTreeSet::new())
}

/// As [`desired_voters`], counting the sites in `returning` (fenced sites
/// about to be re-activated, see [`gate_activations`]) as Active.
pub fn desired_voters_returning(
    state: &ClusterState,
    current_voters: &BTreeSet<NodeId>,
    alive: &BTreeSet<NodeId>,
    voters_per_site: usize,
    returning: &BTreeSet<String>,
) -> BTreeSet<NodeId> {
    let mut out: BTreeSet<NodeId> =
        state.nodes.values().filter(|n| n.role == Role::Witness).map(|n| n.id.clone()).collect();
    for site in state.data_sites().filter(|s| s.mode == SiteMode::Active || returning.contains(&s.name)) {
        let storage: Vec<&NodeId> = state
            .nodes
            .values()
            .filter(|n| n.site == site.name && n.role == Role::Storage)
            .map(|n| &n.id)
            .collect();
        let is_voter = |n: &&&NodeId| current_voters.contains(**n);
        let is_alive = |n: &&&NodeId| alive.contains(**n);
        let kept = storage.iter().filter(|n| is_voter(n) && is_alive(n));
        let fill = storage.iter().filter(|n| !is_voter(n) && is_alive(n));
        let dead = storage.iter().filter(|n| is_voter(n) && !is_alive(n));
        out.extend(kept.chain(fill).chain(dead).take(voters_per_site).map(|n| (*n).clone()));
    }
    out
}

/// Hold back every `SetSiteMode(Active)` in `cmds` whose site does not yet
/// have its voters back among `current_voters` (`None`: the voter set is not
/// known, e.g. a joint change is in flight, so every activation waits).
/// Returns the commands to commit now and every site with an activation in
/// `cmds`, held or not: feed them to [`desired_voters_returning`] so that a
/// membership decision taken from a state that still shows them Fenced
/// neither skips nor undoes their voters.
pub fn gate_activations(
    cmds: Vec<Command>,
    state: &ClusterState,
    current_voters: Option<&BTreeSet<NodeId>>,
    alive: &BTreeSet<NodeId>,
    voters_per_site: usize,
) -> (Vec<Command>, BTreeSet<String>) {
    let mut now = Vec::with_capacity(cmds.len());
    let mut returning = BTreeSet::new();
    for cmd in cmds {
        let Command::SetSiteMode { site, mode: SiteMode::Active } = &cmd else {
            now.push(cmd);
            continue;
        };
        let restored = current_voters.is_some_and(|cur| {
            let one = BTreeSet::from([site.clone()]);
            let want = desired_voters_returning(state, cur, alive, voters_per_site, &one);
            want.iter().filter(|n| state.site_of(n) == Some(site.as_str())).all(|n| cur.contains(n))
        });
        returning.insert(site.clone());
        if restored {
            now.push(cmd);
        }
    }
    (now, returning)
}

/// True when the alive members of `voters` form a strict majority.
pub fn has_quorum(voters: &BTreeSet<NodeId>, alive: &BTreeSet<NodeId>) -> bool {
    let up = voters.iter().filter(|v| alive.contains(*v)).count();
    !voters.is_empty() && up * 2 > voters.len()
}

/// The intermediate voter sets from `current` to `desired`, one node changed
/// per step (the first element is one step away from `current`; the last is
/// `desired`). Empty when nothing changes.
pub fn membership_steps(
    current: &BTreeSet<NodeId>,
    desired: &BTreeSet<NodeId>,
    alive: &BTreeSet<NodeId>,
) -> Vec<BTreeSet<NodeId>> {
    let mut adds: Vec<&NodeId> = desired.difference(current).collect();
    adds.sort_by_key(|n| (!alive.contains(*n), (*n).clone()));
    let mut removes: Vec<&NodeId> = current.difference(desired).collect();
    removes.sort_by_key(|n| (alive.contains(*n), (*n).clone()));
    let mut steps = Vec::with_capacity(adds.len() + removes.len());
    let mut cur = current.clone();
    for n in adds {
        cur.insert(n.clone());
        steps.push(cur.clone());
    }
    for n in removes {
        cur.remove(n);
        steps.push(cur.clone());
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::super::fixture::*;
    use super::*;
    use crate::state::Command;

    #[test]
    fn a_healthy_cluster_keeps_its_voters() {
        let s = lab();
        let cur = set(&["a2", "b1", "w1"]);
        assert_eq!(desired_voters(&s, &cur, &all_but(&s, &[]), 1), cur);
    }

    #[test]
    fn an_empty_group_gets_the_lowest_alive_nodes_per_site() {
        let s = lab();
        assert_eq!(desired_voters(&s, &set(&[]), &all_but(&s, &[]), 1), set(&["a1", "b1", "w1"]));
        assert_eq!(desired_voters(&s, &set(&[]), &all_but(&s, &[]), 2), set(&["a1", "a2", "b1", "b2", "w1"]));
    }

    #[test]
    fn a_dead_voter_is_replaced_by_a_learner_of_the_same_site() {
        let s = lab();
        let d = desired_voters(&s, &set(&["a1", "b1", "w1"]), &all_but(&s, &["a1"]), 1);
        assert_eq!(d, set(&["a2", "b1", "w1"]));
    }

    #[test]
    fn a_dead_voter_without_replacement_is_kept_while_the_site_is_active() {
        let s = lab();
        let d = desired_voters(&s, &set(&["a1", "b1", "w1"]), &all_but(&s, &["a1", "a2"]), 1);
        assert_eq!(d, set(&["a1", "b1", "w1"]));
    }

    #[test]
    fn a_fenced_site_loses_its_voters_and_gets_them_back_when_active() {
        let mut s = lab();
        let cur = set(&["a1", "a2", "b1", "b2", "w1"]);
        ok(&mut s, Command::SetSiteMode { site: "dc-a".into(), mode: SiteMode::Fenced });
        let shrunk = desired_voters(&s, &cur, &all_but(&s, &["a1", "a2"]), 2);
        assert_eq!(shrunk, set(&["b1", "b2", "w1"]));
        ok(&mut s, Command::SetSiteMode { site: "dc-a".into(), mode: SiteMode::Active });
        assert_eq!(desired_voters(&s, &shrunk, &all_but(&s, &[]), 2), cur);
    }

    fn activate(site: &str) -> Command {
        Command::SetSiteMode { site: site.into(), mode: SiteMode::Active }
    }

    /// The state that blocked promotion in the lab (bench rto, repeated site
    /// kills): dc-a returned and was about to be Active while the voters were
    /// still {b1, w1}; killing dc-b then left w1 alone, no quorum, no failover.
    #[test]
    fn a_returning_site_gets_its_voter_back_before_it_is_activated() {
        let mut s = lab();
        ok(&mut s, Command::SetSiteMode { site: "dc-a".into(), mode: SiteMode::Fenced });
        let shrunk = set(&["b1", "w1"]);
        let alive = all_but(&s, &[]);
        let (now, returning) = gate_activations(vec![activate("dc-a")], &s, Some(&shrunk), &alive, 1);
        assert!(now.is_empty(), "no activation while dc-a has no voter");
        assert_eq!(returning, BTreeSet::from(["dc-a".to_string()]));
        assert_eq!(desired_voters(&s, &shrunk, &alive, 1), shrunk, "a fenced site gets no voter...");
        let want = desired_voters_returning(&s, &shrunk, &alive, 1, &returning);
        assert_eq!(want, set(&["a1", "b1", "w1"]), "...unless it is returning");
        // Once a1 votes, the activation goes through, and losing dc-b next keeps a quorum.
        let (now, returning) = gate_activations(vec![activate("dc-a")], &s, Some(&want), &alive, 1);
        assert_eq!(now, vec![activate("dc-a")]);
        assert_eq!(
            desired_voters_returning(&s, &want, &alive, 1, &returning),
            want,
            "deciding from the pre-activation state keeps a1"
        );
        assert!(has_quorum(&want, &all_but(&s, &["b1", "b2"])));
        assert!(!has_quorum(&shrunk, &all_but(&s, &["b1", "b2"])), "the blocked state");
    }

    #[test]
    fn activations_wait_while_the_voter_set_is_unknown_and_other_commands_pass() {
        let mut s = lab();
        ok(&mut s, Command::SetSiteMode { site: "dc-a".into(), mode: SiteMode::Fenced });
        let fence = Command::SetSiteMode { site: "dc-b".into(), mode: SiteMode::Fenced };
        let (now, returning) =
            gate_activations(vec![fence.clone(), activate("dc-a")], &s, None, &all_but(&s, &[]), 1);
        assert_eq!(now, vec![fence]);
        assert_eq!(returning.len(), 1);
    }

    #[test]
    fn a_returning_site_without_an_alive_storage_node_needs_no_voter() {
        let mut s = lab();
        ok(&mut s, Command::SetSiteMode { site: "dc-a".into(), mode: SiteMode::Fenced });
        let cur = set(&["b1", "w1"]);
        let (now, _) =
            gate_activations(vec![activate("dc-a")], &s, Some(&cur), &all_but(&s, &["a1", "a2"]), 1);
        assert_eq!(
            now,
            vec![activate("dc-a")],
            "nothing to wait for (the tracker only asks for reachable sites)"
        );
    }

    #[test]
    fn a_deactivated_site_has_no_voters() {
        let mut s = lab();
        ok(&mut s, Command::SetSiteMode { site: "dc-b".into(), mode: SiteMode::Deactivated });
        assert_eq!(desired_voters(&s, &set(&["a1", "b1", "w1"]), &all_but(&s, &[]), 1), set(&["a1", "w1"]));
    }

    #[test]
    fn the_witness_stays_a_voter_even_when_dead() {
        let s = lab();
        let d = desired_voters(&s, &set(&["a1", "b1", "w1"]), &all_but(&s, &["w1"]), 1);
        assert_eq!(d, set(&["a1", "b1", "w1"]));
    }

    #[test]
    fn quorum_needs_a_strict_majority() {
        let v = set(&["a1", "b1", "w1"]);
        assert!(has_quorum(&v, &set(&["a1", "w1"])));
        assert!(!has_quorum(&v, &set(&["a1"])));
        assert!(!has_quorum(&set(&["a1", "b1"]), &set(&["a1"])));
        assert!(!has_quorum(&set(&[]), &set(&["a1"])));
    }

    #[test]
    fn steps_change_one_node_at_a_time_adding_before_removing() {
        let cur = set(&["a1", "b1", "w1"]);
        let want = set(&["a2", "b2", "w1"]);
        let alive = set(&["a2", "b1", "b2", "w1"]);
        let steps = membership_steps(&cur, &want, &alive);
        assert_eq!(
            steps,
            vec![
                set(&["a1", "a2", "b1", "w1"]),
                set(&["a1", "a2", "b1", "b2", "w1"]),
                set(&["a2", "b1", "b2", "w1"]),
                set(&["a2", "b2", "w1"]),
            ]
        );
        assert!(steps.iter().all(|s| has_quorum(s, &alive)), "every step keeps a quorum");
        assert!(membership_steps(&want, &want, &alive).is_empty());
    }

    #[test]
    fn shrinking_after_a_site_loss_keeps_a_quorum_at_every_step() {
        let cur = set(&["a1", "a2", "b1", "b2", "w1"]);
        let alive = set(&["b1", "b2", "w1"]);
        let steps = membership_steps(&cur, &set(&["b1", "b2", "w1"]), &alive);
        assert_eq!(steps.len(), 2);
        assert!(steps.iter().all(|s| has_quorum(s, &alive)));
        // After shrinking, one more failure is survivable.
        assert!(has_quorum(steps.last().unwrap(), &set(&["b1", "w1"])));
    }

    #[test]
    fn dead_nodes_are_removed_before_alive_ones() {
        let steps = membership_steps(&set(&["a1", "a2", "w1"]), &set(&["w1"]), &set(&["a1", "w1"]));
        assert_eq!(steps, vec![set(&["a1", "w1"]), set(&["w1"])]);
    }
}
