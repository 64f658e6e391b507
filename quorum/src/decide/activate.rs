//! `site activate` decisions (DESIGN.md §4.1, §4.5): may a data site be put
//! (back) into service, and, when the quorum is lost, may this member rebuild
//! the group from its own state (the operator override)?
//!
//! Pure: the caller passes the state its member would commit (the committed
//! state plus its log's uncommitted tail, see `Quorum::force_new_group`) and
//! the voters of its latest membership.
//!
//! Rules:
//! - Only a data site of the cluster can be activated.
//! - A site may lack acknowledged writes when some volume's latest `in_sync`
//!   holds no replica in that site: refused unless `force` (then that volume's
//!   `in_sync` is reset to its replicas in the site, with a bumped epoch:
//!   [`Command::ForceInSync`]; writes acknowledged only elsewhere are lost).
//! - The override runs only on a node of the site that is a voter of the
//!   latest membership: with the quorum lost, every entry that committed after
//!   the other voters were lost needed its acknowledgement, so its log holds
//!   every committed change. A learner's log may lag.
//! - The override fences every other data site (`SetSiteMode Fenced`); the new
//!   leader's normal failover then promotes in-sync replicas of the activated
//!   site after one full lease period (`decide::lease`).

use crate::state::{ClusterState, Command, NodeId, SiteMode};
use metro_api::config::SiteKind;
use std::collections::{BTreeMap, BTreeSet};

/// Why a `site activate` is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivateRefusal {
    #[error("no site `{0}`")]
    UnknownSite(String),
    #[error("`{0}` is a witness site; only data sites can be activated")]
    NotADataSite(String),
    /// Volumes whose latest in_sync has no replica in the site: (name, in_sync).
    #[error("{}", lacking_message(.site, .volumes))]
    MayLackWrites { site: String, volumes: Vec<(String, Vec<NodeId>)> },
    #[error(
        "node `{node}` is in site `{node_site}`, not `{site}`; the override must run on a voter of `{site}`"
    )]
    WrongSite { node: NodeId, node_site: String, site: String },
    #[error("node `{node}` is not a voter (voters: {}); its state may lag the lost leader's, so it cannot rebuild the group", .voters.iter().cloned().collect::<Vec<_>>().join(", "))]
    NotAVoter { node: NodeId, voters: BTreeSet<NodeId> },
    #[error("voter(s) {} still answer: the quorum may not be lost (a leader may be elected without this site)", .0.join(", "))]
    VotersReachable(Vec<NodeId>),
    #[error("node `{node}` has a more recent raft log than `{me}`: `{me}` may have missed committed changes (it was down or cut off), so its state cannot seed the rebuilt group")]
    LogBehind { me: NodeId, node: NodeId },
}

fn lacking_message(site: &str, volumes: &[(String, Vec<NodeId>)]) -> String {
    let shown: Vec<String> = volumes
        .iter()
        .take(5)
        .map(|(v, in_sync)| format!("volume {v}'s last in-sync set {{{}}}", in_sync.join(",")))
        .collect();
    let more = if volumes.len() > 5 { format!(" and {} more", volumes.len() - 5) } else { String::new() };
    format!("{}{more} has no replica in {site}; {site} may lack acknowledged writes", shown.join(", "))
}

/// Check that `site` may be activated on `state`: a data site, and (unless
/// `force`) in the latest `in_sync` of every volume. Returns the volumes that
/// would lose writes (empty unless `force`).
pub fn check_activate(
    state: &ClusterState,
    site: &str,
    force: bool,
) -> Result<Vec<(String, Vec<NodeId>)>, ActivateRefusal> {
    let rec = state.sites.get(site).ok_or_else(|| ActivateRefusal::UnknownSite(site.to_string()))?;
    if rec.kind != SiteKind::Data {
        return Err(ActivateRefusal::NotADataSite(site.to_string()));
    }
    let lacking: Vec<(String, Vec<NodeId>)> = state
        .volumes
        .values()
        .filter(|v| !v.in_sync.iter().any(|n| state.site_of(n) == Some(site)))
        .map(|v| (v.name.clone(), v.in_sync.clone()))
        .collect();
    if !lacking.is_empty() && !force {
        return Err(ActivateRefusal::MayLackWrites { site: site.to_string(), volumes: lacking });
    }
    Ok(lacking)
}

/// What the override commits in the rebuilt group (one batch entry after the
/// new membership).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverridePlan {
    /// `SetSiteMode(site, Active)`, `SetSiteMode(other data sites, Fenced)`,
    /// then one `ForceInSync` per volume accepted with `--force`.
    pub commands: Vec<Command>,
    /// Data sites fenced by the override.
    pub fenced: Vec<String>,
    /// Volumes that lose the writes acknowledged only outside the site (`--force`).
    pub forced: Vec<String>,
}

/// May `me` (a member without a leader) rebuild the group around itself to
/// activate `site`? `voters`: the voters of its latest membership, by node id;
/// `reachable`: the other members that answered a probe just now, with their
/// last log id `(term, index)`; `my_last`: this member's. A voter that answers
/// may still form a quorum with the rest: refused (the operator must stop it
/// first). A member whose log is more recent than ours (raft's up-to-date
/// order) means ours may lack committed entries: refused.
pub fn plan_override(
    state: &ClusterState,
    site: &str,
    me: &str,
    voters: &BTreeSet<NodeId>,
    reachable: &BTreeMap<NodeId, Option<(u64, u64)>>,
    my_last: Option<(u64, u64)>,
    force: bool,
) -> Result<OverridePlan, ActivateRefusal> {
    let lacking = check_activate(state, site, force)?;
    let my_site = state.site_of(me).unwrap_or("");
    if my_site != site {
        return Err(ActivateRefusal::WrongSite {
            node: me.to_string(),
            node_site: my_site.to_string(),
            site: site.to_string(),
        });
    }
    if !voters.contains(me) {
        return Err(ActivateRefusal::NotAVoter { node: me.to_string(), voters: voters.clone() });
    }
    let answering: Vec<NodeId> =
        voters.iter().filter(|v| *v != me && reachable.contains_key(*v)).cloned().collect();
    if !answering.is_empty() {
        return Err(ActivateRefusal::VotersReachable(answering));
    }
    if let Some((node, _)) = reachable.iter().find(|(_, last)| **last > my_last) {
        return Err(ActivateRefusal::LogBehind { me: me.to_string(), node: node.clone() });
    }
    let mut commands = vec![Command::SetSiteMode { site: site.to_string(), mode: SiteMode::Active }];
    let fenced: Vec<String> = state.data_sites().filter(|s| s.name != site).map(|s| s.name.clone()).collect();
    for f in &fenced {
        commands.push(Command::SetSiteMode { site: f.clone(), mode: SiteMode::Fenced });
    }
    let mut forced = Vec::new();
    for (name, _) in &lacking {
        let Some(v) = state.volumes.get(name) else { continue };
        let in_sync: Vec<NodeId> =
            v.replicas.iter().filter(|n| state.site_of(n) == Some(site)).cloned().collect();
        commands.push(Command::ForceInSync { name: name.clone(), expected_epoch: v.epoch, in_sync });
        forced.push(name.clone());
    }
    Ok(OverridePlan { commands, fenced, forced })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::fixture::{ok, set, with_volumes};

    fn none() -> BTreeMap<NodeId, Option<(u64, u64)>> {
        BTreeMap::new()
    }

    /// Members that answered, all at term 3, with their last log index.
    fn answers(a: &[(&str, u64)]) -> BTreeMap<NodeId, Option<(u64, u64)>> {
        a.iter().map(|(n, i)| (n.to_string(), Some((3, *i)))).collect()
    }

    fn drop_replica(s: &mut ClusterState, vol: &str, keep: &[&str]) {
        let epoch = s.volumes[vol].epoch;
        ok(
            s,
            Command::ChangeVolume {
                name: vol.into(),
                expected_epoch: epoch,
                primary: s.volumes[vol].primary.clone(),
                in_sync: keep.iter().map(|k| k.to_string()).collect(),
                rejoin: None,
            },
        );
    }

    #[test]
    fn a_voter_of_a_site_in_every_in_sync_set_may_override_and_fences_the_other_site() {
        let s = with_volumes(&[("v1", &["a1", "b1"], "a1"), ("v2", &["a2", "b2"], "b2")]);
        let plan = plan_override(&s, "dc-b", "b1", &set(&["a1", "b1", "w1"]), &none(), Some((3, 10)), false)
            .unwrap();
        assert_eq!(plan.fenced, vec!["dc-a".to_string()]);
        assert!(plan.forced.is_empty());
        assert_eq!(
            plan.commands,
            vec![
                Command::SetSiteMode { site: "dc-b".into(), mode: SiteMode::Active },
                Command::SetSiteMode { site: "dc-a".into(), mode: SiteMode::Fenced },
            ]
        );
    }

    #[test]
    fn a_volume_whose_in_sync_lacks_the_site_refuses_the_override_naming_it() {
        let mut s = with_volumes(&[("v1", &["a1", "b1"], "a1"), ("v2", &["a2", "b2"], "a2")]);
        drop_replica(&mut s, "v1", &["a1"]);
        let err = plan_override(&s, "dc-b", "b1", &set(&["a1", "b1", "w1"]), &none(), Some((3, 10)), false)
            .unwrap_err();
        assert_eq!(
            err,
            ActivateRefusal::MayLackWrites {
                site: "dc-b".into(),
                volumes: vec![("v1".into(), vec!["a1".into()])]
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("volume v1's last in-sync set {a1} has no replica in dc-b"), "{msg}");
        assert!(msg.contains("dc-b may lack acknowledged writes"), "{msg}");
        // The same refusal without the override (the quorum is there).
        assert_eq!(check_activate(&s, "dc-b", false).unwrap_err(), err);
    }

    #[test]
    fn force_resets_the_lacking_volumes_to_the_site_and_the_result_applies() {
        let mut s = with_volumes(&[("v1", &["a1", "b1"], "a1"), ("v2", &["a2", "b2"], "a2")]);
        drop_replica(&mut s, "v1", &["a1"]);
        let epoch = s.volumes["v1"].epoch;
        let plan =
            plan_override(&s, "dc-b", "b1", &set(&["a1", "b1", "w1"]), &none(), Some((3, 10)), true).unwrap();
        assert_eq!(plan.forced, vec!["v1".to_string()]);
        assert!(plan.commands.contains(&Command::ForceInSync {
            name: "v1".into(),
            expected_epoch: epoch,
            in_sync: vec!["b1".into()]
        }));
        let r = s.apply(&Command::Batch(plan.commands));
        assert!(r.is_ok(), "{r:?}");
        let v1 = &s.volumes["v1"];
        assert_eq!(
            (v1.in_sync.clone(), v1.primary.clone(), v1.epoch),
            (vec!["b1".to_string()], None, epoch + 1)
        );
        assert_eq!(s.sites["dc-a"].mode, SiteMode::Fenced);
        // v2 is left to the normal failover (b2 is in its in_sync).
        assert_eq!(s.volumes["v2"].primary.as_deref(), Some("a2"));
    }

    #[test]
    fn a_learner_or_a_node_of_another_site_may_not_override() {
        let s = with_volumes(&[("v1", &["a1", "b1"], "a1")]);
        let voters = set(&["a1", "b1", "w1"]);
        assert!(matches!(
            plan_override(&s, "dc-b", "b2", &voters, &none(), Some((3, 10)), false),
            Err(ActivateRefusal::NotAVoter { .. })
        ));
        assert!(matches!(
            plan_override(&s, "dc-b", "a1", &voters, &none(), Some((3, 10)), false),
            Err(ActivateRefusal::WrongSite { .. })
        ));
    }

    #[test]
    fn a_voter_that_still_answers_refuses_the_override() {
        let s = with_volumes(&[("v1", &["a1", "b1"], "a1")]);
        let voters = set(&["a1", "b1", "w1"]);
        // The witness answers: dc-a + witness may still have a quorum.
        assert_eq!(
            plan_override(
                &s,
                "dc-b",
                "b1",
                &voters,
                &answers(&[("w1", 10), ("b2", 10)]),
                Some((3, 10)),
                true
            ),
            Err(ActivateRefusal::VotersReachable(vec!["w1".into()]))
        );
        // A learner answering (b2) does not matter.
        assert!(
            plan_override(&s, "dc-b", "b1", &voters, &answers(&[("b2", 10)]), Some((3, 10)), false).is_ok()
        );
    }

    #[test]
    fn a_reachable_member_with_a_more_recent_log_refuses_the_override() {
        // b1 was down while dc-a + the witness committed more; b2 (a learner) got it.
        let s = with_volumes(&[("v1", &["a1", "b1"], "a1")]);
        let voters = set(&["a1", "b1", "w1"]);
        assert_eq!(
            plan_override(&s, "dc-b", "b1", &voters, &answers(&[("b2", 12)]), Some((3, 10)), false),
            Err(ActivateRefusal::LogBehind { me: "b1".into(), node: "b2".into() })
        );
        // A later term wins over a longer log (raft's up-to-date order).
        let r = plan_override(&s, "dc-b", "b1", &voters, &answers(&[("b2", 12)]), Some((4, 9)), false);
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn only_a_known_data_site_can_be_activated() {
        let s = with_volumes(&[]);
        assert_eq!(check_activate(&s, "dc-z", false), Err(ActivateRefusal::UnknownSite("dc-z".into())));
        assert_eq!(check_activate(&s, "witness", true), Err(ActivateRefusal::NotADataSite("witness".into())));
    }
}
