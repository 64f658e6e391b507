//! Desired state and registration, kept in etcd (never on the I/O path).
//!
//! Keys, under `/metro/<cluster>/`:
//! - `nodes/<id>`: a [`NodeRecord`] on a lease (deleted when the node dies);
//! - `bootstrap`: id of the node that initialized the raft group (CAS once);
//! - `volumes/<name>`: a [`VolumeSpec`] (desired state; the leader reconciles);
//! - `config`: the [`ClusterConfig`] (JSON; desired state, the leader reconciles);
//! - `status`: a JSON summary for outside observers, written by the leader.
//!
//! [`Registry`] is the trait; [`etcd::EtcdRegistry`] and
//! [`memory::MemoryRegistry`] implement it and run one conformance suite.

pub mod etcd;
pub mod memory;

use async_trait::async_trait;
use metro_quorum::{ClusterConfig, LeasePolicy, NodeRecord};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error(
        "etcd is unreachable ({0}); attached volumes keep working, but create/attach/delete need etcd back"
    )]
    Unavailable(String),
    #[error("`{0}` already exists")]
    AlreadyExists(String),
    #[error("corrupt registry entry {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// A compare-and-swap lost: `key` changed since it was read.
    #[error("`{0}` was changed by someone else meanwhile")]
    Conflict(String),
}

/// Desired state of a volume, as written by `metroctl volume create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub iops_limit: u64,
    #[serde(default)]
    pub bandwidth_limit: u64,
    #[serde(default)]
    pub lease_policy: LeasePolicy,
    #[serde(default)]
    pub primary_site: Option<String>,
    /// Tombstone: the leader deletes the volume, then the key.
    #[serde(default)]
    pub deleted: bool,
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Register (or refresh) this node on a lease kept alive in the background.
    async fn register(&self, rec: &NodeRecord) -> Result<(), RegistryError>;
    async fn nodes(&self) -> Result<Vec<NodeRecord>, RegistryError>;
    /// Claim the right to initialize the cluster; returns the winner's id.
    async fn claim_bootstrap(&self, node: &str) -> Result<String, RegistryError>;
    /// Store a spec; with `create_only`, fail if the name exists.
    async fn put_spec(&self, spec: &VolumeSpec, create_only: bool) -> Result<(), RegistryError>;
    async fn remove_spec(&self, name: &str) -> Result<(), RegistryError>;
    async fn specs(&self) -> Result<Vec<VolumeSpec>, RegistryError>;
    /// A cheap token that changes whenever a spec is put or removed, so the
    /// leader can poll it often and list every spec only when it changed.
    async fn specs_version(&self) -> Result<(i64, i64), RegistryError>;
    async fn put_status(&self, json: &str) -> Result<(), RegistryError>;
    /// The status summary last published (None before the first).
    async fn status(&self) -> Result<Option<String>, RegistryError>;
    /// The stored cluster config and its store revision (None before it is
    /// seeded). A stored value that does not parse or validate is `Corrupt`,
    /// naming the key.
    async fn config(&self) -> Result<Option<(ClusterConfig, i64)>, RegistryError>;
    /// Store `new` if the stored config is still at revision `expected`
    /// (None: absent), else `Conflict`.
    async fn put_config(&self, new: &ClusterConfig, expected: Option<i64>) -> Result<(), RegistryError>;
    /// Health of each endpoint: `(endpoint, healthy)`.
    async fn health(&self) -> Vec<(String, bool)>;
}

/// Conformance suite: every implementation must pass it.
pub async fn conformance(reg: &dyn Registry) {
    use metro_api::config::Role;
    let rec = |id: &str| NodeRecord {
        id: id.into(),
        raft_id: metro_quorum::state::raft_id_of(id),
        site: "dc-a".into(),
        role: Role::Storage,
        api: format!("{id}:7443"),
        nbd: Some(format!("{id}:10809")),
        replication: None,
        capacity_bytes: 1 << 30,
        timings: None,
    };
    reg.register(&rec("a1")).await.expect("register a1");
    reg.register(&rec("a2")).await.expect("register a2");
    let mut ids: Vec<String> = reg.nodes().await.expect("nodes").into_iter().map(|n| n.id).collect();
    ids.sort();
    assert_eq!(ids, vec!["a1", "a2"]);

    assert_eq!(reg.claim_bootstrap("a2").await.unwrap(), "a2", "first claim wins");
    assert_eq!(reg.claim_bootstrap("a1").await.unwrap(), "a2", "later claims see the winner");

    let spec = VolumeSpec {
        name: "v1".into(),
        size_bytes: 1 << 20,
        iops_limit: 0,
        bandwidth_limit: 0,
        lease_policy: LeasePolicy::Suspend,
        primary_site: None,
        deleted: false,
    };
    let v0 = reg.specs_version().await.expect("specs version");
    reg.put_spec(&spec, true).await.expect("create spec");
    let v1 = reg.specs_version().await.unwrap();
    assert_ne!(v1, v0, "a new spec changes the version");
    assert_eq!(reg.put_spec(&spec, true).await, Err(RegistryError::AlreadyExists("v1".into())));
    assert_eq!(reg.specs_version().await.unwrap(), v1, "a refused create changes nothing");
    let tomb = VolumeSpec { deleted: true, ..spec.clone() };
    reg.put_spec(&tomb, false).await.expect("overwrite spec");
    let v2 = reg.specs_version().await.unwrap();
    assert_ne!(v2, v1, "an overwrite changes the version");
    assert_eq!(reg.specs().await.unwrap(), vec![tomb]);
    reg.remove_spec("v1").await.unwrap();
    assert_ne!(reg.specs_version().await.unwrap(), v2, "a removal changes the version");
    assert!(reg.specs().await.unwrap().is_empty());
    assert_eq!(reg.status().await.unwrap(), None);
    reg.put_status("{\"ok\":true}").await.unwrap();
    assert_eq!(reg.status().await.unwrap().as_deref(), Some("{\"ok\":true}"));
    assert!(reg.health().await.iter().all(|(_, ok)| *ok));

    // Cluster config: create once, then compare-and-swap on the stored value.
    assert_eq!(reg.config().await.unwrap(), None);
    let c1 = ClusterConfig::seed(&metro_api::config::QuorumConfig::default());
    reg.put_config(&c1, None).await.expect("seed the config");
    assert_eq!(reg.put_config(&c1, None).await, Err(RegistryError::Conflict("config".into())));
    let (got, rev1) = reg.config().await.unwrap().expect("seeded");
    assert_eq!(got, c1);
    let c2 = ClusterConfig { generation: 2, site_stable_ms: 20_000, ..c1.clone() };
    reg.put_config(&c2, Some(rev1)).await.expect("CAS from the seed's revision");
    let c3 = ClusterConfig { generation: 3, ..c1.clone() };
    assert_eq!(reg.put_config(&c3, Some(rev1)).await, Err(RegistryError::Conflict("config".into())));
    let (got, rev2) = reg.config().await.unwrap().expect("stored");
    assert_eq!(got, c2);
    assert_ne!(rev1, rev2);
}
