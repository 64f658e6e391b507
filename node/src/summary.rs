//! What the leader tells outside observers: the witness RTT as the quorum
//! measures it, and the status summary published to etcd under
//! `/metro/<cluster>/status` (read it with
//! `etcdctl get /metro/<cluster>/status --print-value-only`).
//!
//! The summary is JSON with stable keys (only add keys):
//! `schema` (1), `cluster`, `published_by`, `published_at_unix_ms`, `leader`,
//! `term`, `voters`, `learners`, `preferred_site`, `config_generation`,
//! `sites` (name → mode), `nodes` (`total`, `reachable`), `witness`
//! (`id`, `reachable`, `rtt_us`, `rtt_last_us`; null without a witness),
//! `volumes` (`total` and a count per state: `serving`, `degraded`, `detached`).

use metro_api::config::{Role, SiteKind};
use metro_quorum::{ClusterState, Quorum, QuorumStatus, RttEstimate, VolumeRecord};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Summary format version.
pub const SUMMARY_SCHEMA: u32 = 1;

/// The state `volume show` reports while the primary holds client I/O
/// before it serves: waiting for its first lease, or copying the extents its
/// activity log (or a replica's) names to every in-sync replica. Until it is
/// done, in-sync copies may still differ in those extents.
pub const RECONCILING: &str = "reconciling";

/// A volume's state as shown by `metroctl` and counted in the summary.
pub fn volume_state(v: &VolumeRecord) -> &'static str {
    if v.primary.is_none() {
        "detached"
    } else if v.in_sync.len() < v.replicas.len() {
        "degraded"
    } else {
        "serving"
    }
}

/// The witness round trip, as the leader measures it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessRtt {
    pub smoothed_us: u64,
    pub last_us: u64,
    /// The member that measured it (the leader).
    pub measured_by: String,
}

/// The RTT between the witness and the data sites, from the leader's raft
/// heartbeats: leader → witness; when the witness itself leads, its largest
/// RTT to a data-site node (the slowest link it depends on). `None` off the
/// leader or without a fresh sample.
pub fn witness_rtt(quorum: &Quorum, state: &ClusterState) -> Option<WitnessRtt> {
    let w = state.nodes.values().find(|n| n.role == Role::Witness)?;
    let me = quorum.node_id().to_string();
    let est: Option<RttEstimate> = if w.id == me {
        state
            .nodes
            .values()
            .filter(|n| state.sites.get(&n.site).is_some_and(|s| s.kind == SiteKind::Data))
            .filter_map(|n| quorum.peer_rtt(&n.id))
            .max_by_key(|e| e.smoothed_us)
    } else {
        quorum.peer_rtt(&w.id)
    };
    est.map(|e| WitnessRtt { smoothed_us: e.smoothed_us, last_us: e.last_us, measured_by: me })
}

/// Everything the summary is built from (gathered by the caller; pure below).
pub struct SummaryInput<'a> {
    pub cluster: &'a str,
    pub published_by: &'a str,
    pub published_at_unix_ms: u64,
    pub status: &'a QuorumStatus,
    pub state: &'a ClusterState,
    /// The leader's heartbeat age per node, ms.
    pub ages_ms: &'a BTreeMap<String, u64>,
    pub node_loss_ms: u64,
    pub witness_rtt: Option<WitnessRtt>,
}

/// The status summary published to etcd.
pub fn summary(i: &SummaryInput<'_>) -> Value {
    let reachable = |id: &str| id == i.published_by || i.ages_ms.get(id).is_some_and(|a| *a < i.node_loss_ms);
    let mut by_state: BTreeMap<&str, u64> = ["serving", "degraded", "detached"].map(|s| (s, 0)).into();
    for v in i.state.volumes.values() {
        *by_state.entry(volume_state(v)).or_default() += 1;
    }
    let mut volumes = json!({ "total": i.state.volumes.len() });
    for (k, n) in by_state {
        volumes[k] = json!(n);
    }
    let witness = i.state.nodes.values().find(|n| n.role == Role::Witness).map(|w| {
        json!({
            "id": w.id,
            "reachable": reachable(&w.id),
            "rtt_us": i.witness_rtt.as_ref().map(|r| r.smoothed_us),
            "rtt_last_us": i.witness_rtt.as_ref().map(|r| r.last_us),
        })
    });
    json!({
        "schema": SUMMARY_SCHEMA,
        "cluster": i.cluster,
        "published_by": i.published_by,
        "published_at_unix_ms": i.published_at_unix_ms,
        "leader": i.status.leader,
        "term": i.status.term,
        "voters": i.status.voters,
        "learners": i.status.learners,
        "preferred_site": i.state.preferred_site,
        "config_generation": i.state.config.as_ref().map(|c| c.generation),
        "sites": i.state.sites.values().map(|s| (s.name.clone(), s.mode.as_str())).collect::<BTreeMap<_, _>>(),
        "nodes": {
            "total": i.state.nodes.len(),
            "reachable": i.state.nodes.keys().filter(|id| reachable(id)).count(),
        },
        "witness": witness,
        "volumes": volumes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use metro_quorum::state::raft_id_of;
    use metro_quorum::{Command, LeasePolicy, NodeRecord};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        let sites = vec![
            ("dc-a".to_string(), SiteKind::Data),
            ("dc-b".to_string(), SiteKind::Data),
            ("witness".to_string(), SiteKind::Witness),
        ];
        assert!(s.apply(&Command::InitSites { sites, preferred_site: Some("dc-a".into()) }).is_ok());
        for (id, site, role) in
            [("a1", "dc-a", Role::Storage), ("b1", "dc-b", Role::Storage), ("w1", "witness", Role::Witness)]
        {
            let rec = NodeRecord {
                id: id.into(),
                raft_id: raft_id_of(id),
                site: site.into(),
                role,
                api: format!("{id}:1"),
                nbd: None,
                replication: None,
                capacity_bytes: 1 << 30,
                timings: None,
            };
            assert!(s.apply(&Command::RegisterNode(rec)).is_ok());
        }
        for name in ["v1", "v2", "v3"] {
            let r = s.apply(&Command::CreateVolume {
                name: name.into(),
                size_bytes: 1 << 20,
                iops_limit: 0,
                bandwidth_limit: 0,
                lease_policy: LeasePolicy::Suspend,
                replicas: vec!["a1".into(), "b1".into()],
                primary: "a1".into(),
                nonce: 1,
            });
            assert!(r.is_ok());
        }
        let degrade = Command::ChangeVolume {
            name: "v2".into(),
            expected_epoch: 1,
            primary: Some("a1".into()),
            in_sync: vec!["a1".into()],
            rejoin: None,
        };
        assert!(s.apply(&degrade).is_ok());
        let detach = Command::ChangeVolume {
            name: "v3".into(),
            expected_epoch: 1,
            primary: None,
            in_sync: vec!["a1".into(), "b1".into()],
            rejoin: None,
        };
        assert!(s.apply(&detach).is_ok());
        s
    }

    #[test]
    fn the_summary_counts_volumes_by_state_and_carries_the_witness_rtt() {
        let state = state();
        let status = QuorumStatus {
            leader: Some("a1".into()),
            term: 7,
            voters: vec!["a1".into(), "b1".into(), "w1".into()],
            learners: vec![],
            last_applied: 9,
            is_leader: true,
            membership_changing: false,
        };
        let ages = BTreeMap::from([("b1".to_string(), 100), ("w1".to_string(), 5_000)]);
        let v = summary(&SummaryInput {
            cluster: "lab",
            published_by: "a1",
            published_at_unix_ms: 42,
            status: &status,
            state: &state,
            ages_ms: &ages,
            node_loss_ms: 2_000,
            witness_rtt: Some(WitnessRtt {
                smoothed_us: 200_000,
                last_us: 201_000,
                measured_by: "a1".into(),
            }),
        });
        assert_eq!(v["schema"], 1);
        assert_eq!(v["leader"], "a1");
        assert_eq!(v["term"], 7);
        assert_eq!(v["sites"]["dc-a"], "active");
        assert_eq!(v["volumes"], json!({"total": 3, "serving": 1, "degraded": 1, "detached": 1}));
        assert_eq!(v["nodes"], json!({"total": 3, "reachable": 2}));
        assert_eq!(
            v["witness"],
            json!({"id": "w1", "reachable": false, "rtt_us": 200_000, "rtt_last_us": 201_000})
        );
        assert_eq!(v["config_generation"], Value::Null);
    }

    #[test]
    fn an_unknown_witness_rtt_is_null_not_zero() {
        let state = state();
        let status = QuorumStatus {
            leader: None,
            term: 1,
            voters: vec![],
            learners: vec![],
            last_applied: 0,
            is_leader: true,
            membership_changing: false,
        };
        let v = summary(&SummaryInput {
            cluster: "lab",
            published_by: "a1",
            published_at_unix_ms: 0,
            status: &status,
            state: &state,
            ages_ms: &BTreeMap::new(),
            node_loss_ms: 2_000,
            witness_rtt: None,
        });
        assert_eq!(v["witness"]["rtt_us"], Value::Null);
        assert_eq!(v["volumes"]["total"], 3);
    }
}
