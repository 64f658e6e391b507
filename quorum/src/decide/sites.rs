//! Site health: fencing lost sites, re-activating them with hysteresis, and
//! arbitrating a cut between the two data sites.
//!
//! ```text
//!            all nodes of the site lost
//!   Active ─────────────────────────────► Fenced
//!     ▲                                      │ reachable again
//!     └──── continuously reachable for ◄─────┘ (timer restarts on every loss)
//!           site_stable_ms
//!   Deactivated: operator-owned, never changed here.
//! ```
//!
//! Invariants:
//! - A Deactivated site is never flipped by [`SiteTracker::observe`].
//! - A Fenced site returns to Active only after `site_stable_ms` of
//!   uninterrupted reachability (DESIGN.md 5, "flapping link": no storm).
//! - A site with no registered node is never judged (nothing to observe).
//! - [`arbitrate`] names at most one winner, and only a site that can form a
//!   majority with the witness (the witness must see it).

use crate::state::{ClusterState, Command, NodeId, SiteMode};
use metro_api::config::SiteKind;
use std::collections::{BTreeMap, BTreeSet};

/// Default hysteresis: 10 s, five lease periods, long enough that a link
/// flapping at the node-loss detection rate (2 s) never re-activates.
pub const DEFAULT_SITE_STABLE_MS: u64 = 10_000;

/// The leader's per-site reachability memory.
#[derive(Debug, Clone)]
pub struct SiteTracker {
    site_stable_ms: u64,
    /// Since when each data site has been continuously reachable.
    reachable_since_ms: BTreeMap<String, u64>,
}

impl SiteTracker {
    pub fn new(site_stable_ms: u64) -> Self {
        SiteTracker { site_stable_ms, reachable_since_ms: BTreeMap::new() }
    }

    /// Change the hysteresis (cluster config); a site already reachable keeps
    /// its start time, so a longer value only delays its re-activation.
    pub fn set_stable_ms(&mut self, site_stable_ms: u64) {
        self.site_stable_ms = site_stable_ms;
    }

    /// Since when `site` has been continuously reachable, if it is.
    pub fn reachable_since_ms(&self, site: &str) -> Option<u64> {
        self.reachable_since_ms.get(site).copied()
    }

    /// Is a fenced data site on its way back (reachable, its stability
    /// window running)? Only this leader knows since when; a new leader
    /// starts the window from zero, so leadership stays put meanwhile.
    pub fn timing_a_return(&self, state: &ClusterState) -> bool {
        state
            .data_sites()
            .any(|s| s.mode == SiteMode::Fenced && self.reachable_since_ms.contains_key(&s.name))
    }

    /// Feed the current alive set; returns the `SetSiteMode` commands to commit.
    pub fn observe(&mut self, state: &ClusterState, alive: &BTreeSet<NodeId>, now_ms: u64) -> Vec<Command> {
        let mut out = Vec::new();
        for site in state.data_sites() {
            let mut members = state.nodes.values().filter(|n| n.site == site.name).peekable();
            if members.peek().is_none() {
                continue;
            }
            let reachable = members.any(|n| alive.contains(&n.id));
            if !reachable {
                self.reachable_since_ms.remove(&site.name);
                if site.mode == SiteMode::Active {
                    out.push(Command::SetSiteMode { site: site.name.clone(), mode: SiteMode::Fenced });
                }
                continue;
            }
            let since = *self.reachable_since_ms.entry(site.name.clone()).or_insert(now_ms);
            if site.mode == SiteMode::Fenced && now_ms.saturating_sub(since) >= self.site_stable_ms {
                out.push(Command::SetSiteMode { site: site.name.clone(), mode: SiteMode::Active });
            }
        }
        out
    }
}

/// Which data site keeps the quorum when dc-a and dc-b cannot see each other.
///
/// `witness_reaches` holds the data sites the witness can still talk to;
/// `leader_site` is the site of the current leader, if any.
/// - witness sees both: the preferred site (if active), else the leader's site,
///   else the first active data site by name (deterministic);
/// - witness sees one: that site (the other cannot reach a majority);
/// - witness sees none (or is down): no site, everyone suspends.
pub fn arbitrate(
    state: &ClusterState,
    leader_site: Option<&str>,
    witness_reaches: &BTreeSet<String>,
) -> Option<String> {
    let active = |name: &str| {
        state.sites.get(name).is_some_and(|s| s.kind == SiteKind::Data && s.mode == SiteMode::Active)
    };
    let seen: Vec<&String> = witness_reaches.iter().filter(|s| active(s)).collect();
    match seen.as_slice() {
        [] => None,
        [only] => Some((*only).clone()),
        _ => {
            let usable = |s: &&str| active(s) && witness_reaches.contains(*s);
            let preferred = state.preferred_site.as_deref().filter(usable);
            preferred
                .or(leader_site.filter(usable))
                .map(str::to_string)
                .or_else(|| seen.first().map(|s| (*s).clone()))
        }
    }
}

/// Whether the leader (in `leader_site`) should hand leadership to a voter
/// of `requester_site` that asks by heartbeat. Leadership belongs in the
/// preferred site when that is active; a witness leader (an election the
/// witness happened to win, e.g. during a site loss) hands over to any
/// active data site when the preferred one has no voter ready to lead
/// (`preferred_ready`), because the witness is the small, far-away member:
/// leading puts every heartbeat and lease renewal on its WAN link.
pub fn hand_over_wanted(
    state: &ClusterState,
    leader_site: &str,
    requester_site: &str,
    preferred_ready: bool,
) -> bool {
    let active_data = |name: &str| {
        state.sites.get(name).is_some_and(|s| s.kind == SiteKind::Data && s.mode == SiteMode::Active)
    };
    let leader_is_witness = state.sites.get(leader_site).is_some_and(|s| s.kind == SiteKind::Witness);
    if requester_site == leader_site || !active_data(requester_site) {
        return false;
    }
    match state.preferred_site.as_deref().filter(|p| active_data(p)) {
        Some(p) if leader_site == p => false,
        Some(p) if requester_site == p => true,
        Some(_) => leader_is_witness && !preferred_ready,
        None => leader_is_witness,
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixture::*;
    use super::*;

    fn sites(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn fence(site: &str) -> Command {
        Command::SetSiteMode { site: site.into(), mode: SiteMode::Fenced }
    }

    fn activate(site: &str) -> Command {
        Command::SetSiteMode { site: site.into(), mode: SiteMode::Active }
    }

    #[test]
    fn leadership_goes_to_the_preferred_site_from_anywhere_else() {
        let mut s = lab();
        s.preferred_site = Some("dc-a".into());
        assert!(hand_over_wanted(&s, "dc-b", "dc-a", true));
        assert!(hand_over_wanted(&s, "witness", "dc-a", true));
        assert!(!hand_over_wanted(&s, "dc-a", "dc-b", true), "already in the preferred site");
        assert!(!hand_over_wanted(&s, "dc-b", "dc-b", true), "same site");
        assert!(!hand_over_wanted(&s, "dc-a", "witness", true), "never to the witness");
    }

    #[test]
    fn a_witness_leader_hands_over_to_any_active_data_site_when_the_preferred_cannot_lead() {
        let mut s = lab();
        s.preferred_site = Some("dc-a".into());
        assert!(!hand_over_wanted(&s, "witness", "dc-b", true), "wait for the preferred site's voter");
        assert!(hand_over_wanted(&s, "witness", "dc-b", false), "the preferred site has no ready voter");
        assert!(!hand_over_wanted(&s, "dc-b", "dc-b", false));
        // dc-a lost: fenced, so not a target; dc-b takes over from the witness.
        ok(&mut s, fence("dc-a"));
        assert!(hand_over_wanted(&s, "witness", "dc-b", true));
        assert!(!hand_over_wanted(&s, "witness", "dc-a", true), "a fenced site never leads");
        assert!(!hand_over_wanted(&s, "dc-b", "dc-a", true));
        // No preferred site: only the witness gives leadership away.
        let mut s = lab();
        s.preferred_site = None;
        assert!(hand_over_wanted(&s, "witness", "dc-a", false));
        assert!(hand_over_wanted(&s, "witness", "dc-b", false));
        assert!(!hand_over_wanted(&s, "dc-a", "dc-b", false), "no ping-pong between data sites");
    }

    #[test]
    fn a_fenced_site_that_is_reachable_again_is_a_return_being_timed() {
        let mut s = lab();
        let mut t = SiteTracker::new(10_000);
        assert!(!t.timing_a_return(&s));
        ok(&mut s, fence("dc-a"));
        let none_of_a = all_but(&s, &["a1", "a2"]);
        assert!(t.observe(&s, &none_of_a, 0).is_empty());
        assert!(!t.timing_a_return(&s), "unreachable: nothing to time");
        assert!(t.observe(&s, &all_but(&s, &[]), 1_000).is_empty());
        assert!(t.timing_a_return(&s));
        assert_eq!(t.observe(&s, &all_but(&s, &[]), 11_000), vec![activate("dc-a")]);
        ok(&mut s, activate("dc-a"));
        assert!(!t.timing_a_return(&s), "active again");
    }

    #[test]
    fn a_healthy_cluster_produces_no_commands() {
        let s = lab();
        let mut t = SiteTracker::new(10_000);
        assert!(t.observe(&s, &all_but(&s, &[]), 0).is_empty());
        assert!(t.observe(&s, &all_but(&s, &[]), 50_000).is_empty());
    }

    #[test]
    fn losing_one_node_of_a_site_does_not_fence_it() {
        let s = lab();
        let mut t = SiteTracker::new(10_000);
        assert!(t.observe(&s, &all_but(&s, &["a1"]), 0).is_empty());
    }

    #[test]
    fn losing_every_node_of_a_site_fences_it_once() {
        let mut s = lab();
        let mut t = SiteTracker::new(10_000);
        let cmds = t.observe(&s, &all_but(&s, &["a1", "a2"]), 0);
        assert_eq!(cmds, vec![fence("dc-a")]);
        ok(&mut s, cmds[0].clone());
        assert!(t.observe(&s, &all_but(&s, &["a1", "a2"]), 100).is_empty());
    }

    #[test]
    fn a_fenced_site_returns_only_after_being_stable_for_the_whole_period() {
        let mut s = lab();
        ok(&mut s, fence("dc-a"));
        let mut t = SiteTracker::new(10_000);
        let alive = all_but(&s, &[]);
        assert!(t.observe(&s, &alive, 1_000).is_empty());
        assert!(t.observe(&s, &alive, 10_999).is_empty());
        assert_eq!(t.observe(&s, &alive, 11_000), vec![activate("dc-a")]);
    }

    #[test]
    fn a_loss_restarts_the_stability_timer() {
        let mut s = lab();
        ok(&mut s, fence("dc-a"));
        let mut t = SiteTracker::new(10_000);
        let alive = all_but(&s, &[]);
        let gone = all_but(&s, &["a1", "a2"]);
        t.observe(&s, &alive, 0);
        t.observe(&s, &gone, 9_000);
        assert_eq!(t.reachable_since_ms("dc-a"), None);
        assert!(t.observe(&s, &alive, 9_500).is_empty());
        assert!(t.observe(&s, &alive, 19_000).is_empty());
        assert_eq!(t.observe(&s, &alive, 19_500), vec![activate("dc-a")]);
    }

    #[test]
    fn a_deactivated_site_is_never_touched() {
        let mut s = lab();
        ok(&mut s, Command::SetSiteMode { site: "dc-b".into(), mode: SiteMode::Deactivated });
        let mut t = SiteTracker::new(0);
        assert!(t.observe(&s, &all_but(&s, &["b1", "b2"]), 0).is_empty());
        assert!(t.observe(&s, &all_but(&s, &[]), 100_000).is_empty());
    }

    #[test]
    fn the_witness_site_is_never_fenced() {
        let s = lab();
        let mut t = SiteTracker::new(0);
        assert!(t.observe(&s, &all_but(&s, &["w1"]), 0).is_empty());
    }

    #[test]
    fn arbitration_with_the_witness_seeing_both_picks_the_preferred_site() {
        let s = lab();
        assert_eq!(arbitrate(&s, Some("dc-b"), &sites(&["dc-a", "dc-b"])).as_deref(), Some("dc-a"));
    }

    #[test]
    fn arbitration_without_a_preferred_site_keeps_the_leader_site() {
        let mut s = lab();
        ok(&mut s, Command::SetPreferredSite { site: None });
        assert_eq!(arbitrate(&s, Some("dc-b"), &sites(&["dc-a", "dc-b"])).as_deref(), Some("dc-b"));
        assert_eq!(arbitrate(&s, Some("witness"), &sites(&["dc-a", "dc-b"])).as_deref(), Some("dc-a"));
        assert_eq!(arbitrate(&s, None, &sites(&["dc-a", "dc-b"])).as_deref(), Some("dc-a"));
    }

    #[test]
    fn arbitration_with_the_witness_seeing_one_side_picks_that_side_even_if_not_preferred() {
        let s = lab();
        assert_eq!(arbitrate(&s, Some("dc-a"), &sites(&["dc-b"])).as_deref(), Some("dc-b"));
        assert_eq!(arbitrate(&s, Some("dc-b"), &sites(&["dc-a"])).as_deref(), Some("dc-a"));
    }

    #[test]
    fn arbitration_without_the_witness_has_no_winner() {
        let s = lab();
        assert_eq!(arbitrate(&s, Some("dc-a"), &sites(&[])), None);
    }

    #[test]
    fn a_fenced_preferred_site_does_not_win() {
        let mut s = lab();
        ok(&mut s, fence("dc-a"));
        assert_eq!(arbitrate(&s, Some("dc-a"), &sites(&["dc-a", "dc-b"])).as_deref(), Some("dc-b"));
    }
}
