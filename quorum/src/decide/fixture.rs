//! Cluster builders for tests: the decision tests, and other crates' tests through the `test-support` feature.

use crate::state::{raft_id_of, ClusterState, Command, LeasePolicy, NodeId, NodeRecord};
use metro_api::config::{Role, SiteKind};
use std::collections::BTreeSet;

pub const GIB: u64 = 1 << 30;

pub fn node(id: &str, site: &str, role: Role) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        raft_id: raft_id_of(id),
        site: site.into(),
        role,
        api: format!("{id}:7443"),
        nbd: None,
        replication: None,
        capacity_bytes: 10 * GIB,
        timings: None,
    }
}

/// The lab topology: dc-a {a1,a2}, dc-b {b1,b2}, witness {w1}; dc-a preferred.
pub fn lab() -> ClusterState {
    let mut s = ClusterState::default();
    let sites = vec![
        ("dc-a".to_string(), SiteKind::Data),
        ("dc-b".to_string(), SiteKind::Data),
        ("witness".to_string(), SiteKind::Witness),
    ];
    ok(&mut s, Command::InitSites { sites, preferred_site: Some("dc-a".into()) });
    for (id, site) in [("a1", "dc-a"), ("a2", "dc-a"), ("b1", "dc-b"), ("b2", "dc-b")] {
        ok(&mut s, Command::RegisterNode(node(id, site, Role::Storage)));
    }
    ok(&mut s, Command::RegisterNode(node("w1", "witness", Role::Witness)));
    s
}

/// `lab()` plus one volume per (name, replicas, primary).
pub fn with_volumes(vols: &[(&str, &[&str], &str)]) -> ClusterState {
    let mut s = lab();
    for (name, replicas, primary) in vols {
        ok(
            &mut s,
            Command::CreateVolume {
                name: (*name).into(),
                size_bytes: 1 << 20,
                iops_limit: 0,
                bandwidth_limit: 0,
                lease_policy: LeasePolicy::Suspend,
                replicas: replicas.iter().map(|r| r.to_string()).collect(),
                primary: (*primary).into(),
                nonce: 1,
            },
        );
    }
    s
}

pub fn ok(s: &mut ClusterState, cmd: Command) {
    let r = s.apply(&cmd);
    assert!(r.is_ok(), "{cmd:?} -> {r:?}");
}

pub fn set(ids: &[&str]) -> BTreeSet<NodeId> {
    ids.iter().map(|s| s.to_string()).collect()
}

pub fn all_but(s: &ClusterState, dead: &[&str]) -> BTreeSet<NodeId> {
    s.nodes.keys().filter(|n| !dead.contains(&n.as_str())).cloned().collect()
}
