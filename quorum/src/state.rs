//! The replicated cluster state and its pure transition function.
//!
//! Every change to who is primary, who is in sync, and which site is active is
//! a [`Command`] committed through raft and applied here, identically on
//! every node. `apply` is deterministic and does no I/O.
//!
//! Invariants enforced at apply time (DESIGN.md section 4):
//! - `in_sync ⊆ replicas`, `primary ∈ in_sync` (when set).
//! - Volume changes are compare-and-swap on the epoch, and every accepted
//!   change bumps the epoch by one (fencing, invariant 2).
//! - Only a replica in the latest `in_sync` may become primary (invariant 4).
//! - A replica may *join* `in_sync` only through an explicit rejoin after
//!   resync ([`Command::ChangeVolume`] with `rejoin`), never by promotion.

use crate::cluster_config::ClusterConfig;
use metro_api::config::SiteKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub type NodeId = String;

/// Operational state of a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteMode {
    /// Participates fully.
    Active,
    /// Cut off from the quorum; its replicas are out of `in_sync`, its primaries moved.
    Fenced,
    /// Taken out on purpose by an operator (maintenance).
    Deactivated,
}

impl SiteMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SiteMode::Active => "active",
            SiteMode::Fenced => "fenced",
            SiteMode::Deactivated => "deactivated",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub name: String,
    pub kind: SiteKind,
    pub mode: SiteMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// openraft node id (stable hash of `id`, see [`raft_id_of`]).
    pub raft_id: u64,
    pub site: String,
    pub role: metro_api::config::Role,
    /// gRPC endpoint `host:port`.
    pub api: String,
    /// NBD endpoint `host:port` (storage nodes).
    pub nbd: Option<String>,
    /// Replication endpoint `host:port` (storage nodes).
    pub replication: Option<String>,
    pub capacity_bytes: u64,
    /// The lease timings this member runs with (`[quorum] lease_ms`,
    /// `drift_margin_ms`); None from members older than the check.
    #[serde(default)]
    pub timings: Option<LeaseTimings>,
}

/// The timings lease safety depends on. They must agree on every member:
/// a holder's lease lasts the granting leader's `lease_ms`, and a new leader
/// waits its own `lease_ms + drift_margin_ms` before promoting anyone, so a
/// member with a longer lease than another's wait could still serve after
/// that other member, as leader, promoted a new primary. The first member
/// registered commits its timings (`ClusterState::lease_timings`); a member
/// with other values is refused at registration (`Command::RegisterNode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseTimings {
    pub lease_ms: u64,
    pub drift_margin_ms: u64,
}

impl LeaseTimings {
    /// The lease timings of a member's `[quorum]` configuration.
    pub fn of(q: &metro_api::config::QuorumConfig) -> LeaseTimings {
        LeaseTimings { lease_ms: q.lease_ms, drift_margin_ms: q.drift_margin_ms }
    }

    /// Refuse a member whose timings differ from the committed ones, naming
    /// both values and the config keys.
    pub fn check_member(committed: &LeaseTimings, node: &str, mine: &LeaseTimings) -> Result<(), String> {
        if committed == mine {
            return Ok(());
        }
        Err(format!(
            "node `{node}` runs with [quorum] lease_ms = {}, drift_margin_ms = {}, but the cluster committed lease_ms = {}, drift_margin_ms = {}; every member must use the same values (a longer lease than another member's wait lets two primaries serve): set [quorum] lease_ms = {} and drift_margin_ms = {} in this node's config",
            mine.lease_ms, mine.drift_margin_ms, committed.lease_ms, committed.drift_margin_ms, committed.lease_ms, committed.drift_margin_ms
        ))
    }
}

/// What a primary does when its lease is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LeasePolicy {
    /// Hold I/O until the lease returns or the volume moves.
    #[default]
    Suspend,
    /// Fail I/O at once.
    Error,
}

/// A volume's identity, unique within the cluster's history: `serial` is
/// allocated in order by `apply` (so a higher serial is a later volume), and
/// `nonce` is the random number the leader put into `CreateVolume`. Recorded
/// in every replica's superblock, so a replica directory left behind by a
/// deleted volume is never opened as a later volume of the same name.
/// [`VolumeId::LEGACY`] (all zero) marks a volume created before ids existed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VolumeId {
    pub serial: u64,
    pub nonce: u64,
}

impl VolumeId {
    /// Created before volume ids existed (old log entry or snapshot).
    pub const LEGACY: VolumeId = VolumeId { serial: 0, nonce: 0 };

    pub fn is_legacy(&self) -> bool {
        *self == Self::LEGACY
    }
}

/// A random non-zero nonce for a new volume's [`Command::CreateVolume`].
pub fn new_volume_nonce() -> u64 {
    loop {
        let n: u64 = rand::random();
        if n != 0 {
            return n;
        }
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_legacy() {
            f.write_str("legacy")
        } else {
            write!(f, "{}-{:016x}", self.serial, self.nonce)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// Unique id (see [`VolumeId`]); `LEGACY` for volumes from before ids.
    #[serde(default)]
    pub id: VolumeId,
    pub size_bytes: u64,
    pub iops_limit: u64,
    pub bandwidth_limit: u64,
    pub lease_policy: LeasePolicy,
    pub replicas: Vec<NodeId>,
    pub in_sync: Vec<NodeId>,
    pub primary: Option<NodeId>,
    pub epoch: u64,
    /// The epoch at which `primary` became primary: the start of the current
    /// primaryship (0 in records from before this field: unknown). A node
    /// that was primary, missed a stretch of the log in which others were
    /// primary, and is primary again sees the same `primary` but a newer
    /// `primary_since`: its old primaryship ended, and whatever it still
    /// held from then must not be carried into the new one.
    #[serde(default)]
    pub primary_since: u64,
    /// The primary of the primaryship before the current one (None for a
    /// new volume, after an operator's `ForceInSync`, or in old records).
    /// Its activity log covers every write of that primaryship that a copy
    /// may still lack: a new primary that lost its page cache before its
    /// first flush pulls those extents from it.
    #[serde(default)]
    pub previous_primary: Option<NodeId>,
}

impl VolumeRecord {
    pub fn is_in_sync(&self, node: &str) -> bool {
        self.in_sync.iter().any(|n| n == node)
    }
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub sites: BTreeMap<String, SiteRecord>,
    pub preferred_site: Option<String>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// The cluster config last reconciled from etcd (None until the first one).
    #[serde(default)]
    pub config: Option<ClusterConfig>,
    /// The lease timings every member must run with (set by the first
    /// registration that carries them; see [`LeaseTimings`]).
    #[serde(default)]
    pub lease_timings: Option<LeaseTimings>,
    /// Highest [`VolumeId::serial`] allocated so far (0: none yet).
    #[serde(default)]
    pub volume_serial: u64,
}

/// A state-machine command. Serialized into the raft log: only add variants,
/// never change the meaning of existing ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Define the sites once (idempotent when identical).
    InitSites {
        sites: Vec<(String, SiteKind)>,
        preferred_site: Option<String>,
    },
    /// Add or update a node (addresses may change across restarts).
    RegisterNode(NodeRecord),
    RemoveNode {
        id: NodeId,
    },
    CreateVolume {
        name: String,
        size_bytes: u64,
        iops_limit: u64,
        bandwidth_limit: u64,
        lease_policy: LeasePolicy,
        replicas: Vec<NodeId>,
        primary: NodeId,
        /// Random, non-zero, chosen by the proposer; with the serial that
        /// `apply` allocates it forms the volume's [`VolumeId`]. Zero (an
        /// entry from before ids) creates a `LEGACY` volume.
        #[serde(default)]
        nonce: u64,
    },
    DeleteVolume {
        name: String,
    },
    /// PacificA reconfiguration: CAS on `expected_epoch`, bumps the epoch.
    /// `in_sync` must be a subset of the current `in_sync`, unless `rejoin`
    /// names the one replica that is added after a completed resync.
    ChangeVolume {
        name: String,
        expected_epoch: u64,
        primary: Option<NodeId>,
        in_sync: Vec<NodeId>,
        rejoin: Option<NodeId>,
    },
    SetSiteMode {
        site: String,
        mode: SiteMode,
    },
    /// Operator override only (`site activate --force` without a quorum):
    /// reset `in_sync` to `in_sync` (replicas of the activated site, possibly
    /// outside the current `in_sync`), clear the primary and bump the epoch.
    /// Writes acknowledged only by the dropped replicas are lost; this is the
    /// one exception to invariant 4 and is never emitted by the leader.
    ForceInSync {
        name: String,
        expected_epoch: u64,
        in_sync: Vec<NodeId>,
    },
    SetPreferredSite {
        site: Option<String>,
    },
    /// Replace the cluster config (reconciled from etcd by the leader); also
    /// sets `preferred_site`. Only a newer generation is applied.
    SetClusterConfig(ClusterConfig),
    /// Several commands in one log entry (e.g. failing over 1000 volumes),
    /// applied in order, each on the state left by the previous one; one
    /// result per sub-command in [`CommandResult::Batch`]. Batches do not nest.
    Batch(Vec<Command>),
}

/// The outcome of applying a command; identical on every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Ok {
        epoch: u64,
    },
    Rejected {
        reason: Rejection,
        detail: String,
    },
    /// The results of a [`Command::Batch`], in order.
    Batch(Vec<CommandResult>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    NotFound,
    AlreadyExists,
    EpochMismatch,
    Invalid,
    StalePromotion,
}

impl CommandResult {
    /// True when the command (every sub-command of a batch) was applied.
    pub fn is_ok(&self) -> bool {
        match self {
            CommandResult::Ok { .. } => true,
            CommandResult::Rejected { .. } => false,
            CommandResult::Batch(rs) => rs.iter().all(CommandResult::is_ok),
        }
    }
}

fn reject(reason: Rejection, detail: impl Into<String>) -> CommandResult {
    CommandResult::Rejected { reason, detail: detail.into() }
}

/// Stable 64-bit raft id for a node name (FNV-1a; never 0).
pub fn raft_id_of(id: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h.max(1)
}

impl ClusterState {
    pub fn node_by_raft_id(&self, raft_id: u64) -> Option<&NodeRecord> {
        self.nodes.values().find(|n| n.raft_id == raft_id)
    }

    pub fn site_of(&self, node: &str) -> Option<&str> {
        self.nodes.get(node).map(|n| n.site.as_str())
    }

    pub fn data_sites(&self) -> impl Iterator<Item = &SiteRecord> {
        self.sites.values().filter(|s| s.kind == SiteKind::Data)
    }

    /// The volume a reconfiguration targets, if it exists and is still at
    /// `expected_epoch` (the compare-and-swap of every epoch change).
    fn volume_at(&mut self, name: &str, expected_epoch: u64) -> Result<&mut VolumeRecord, CommandResult> {
        let Some(v) = self.volumes.get_mut(name) else {
            return Err(reject(Rejection::NotFound, format!("no volume `{name}`")));
        };
        if v.epoch != expected_epoch {
            return Err(reject(
                Rejection::EpochMismatch,
                format!("volume `{name}` is at epoch {}, not {expected_epoch}", v.epoch),
            ));
        }
        Ok(v)
    }

    /// Apply one committed command. Deterministic; never panics on bad input.
    pub fn apply(&mut self, cmd: &Command) -> CommandResult {
        match cmd {
            Command::InitSites { sites, preferred_site } => {
                if !self.sites.is_empty() {
                    let same = sites.len() == self.sites.len()
                        && sites.iter().all(|(n, k)| self.sites.get(n).is_some_and(|s| s.kind == *k));
                    return if same {
                        CommandResult::Ok { epoch: 0 }
                    } else {
                        reject(Rejection::AlreadyExists, "sites are already defined differently")
                    };
                }
                let data = sites.iter().filter(|(_, k)| *k == SiteKind::Data).count();
                let witness = sites.iter().filter(|(_, k)| *k == SiteKind::Witness).count();
                if data != 2 || witness != 1 {
                    return reject(Rejection::Invalid, "need exactly 2 data sites and 1 witness site");
                }
                for (name, kind) in sites {
                    self.sites.insert(
                        name.clone(),
                        SiteRecord { name: name.clone(), kind: *kind, mode: SiteMode::Active },
                    );
                }
                self.preferred_site = preferred_site.clone();
                CommandResult::Ok { epoch: 0 }
            }
            Command::RegisterNode(rec) => {
                let Some(site) = self.sites.get(&rec.site) else {
                    return reject(Rejection::Invalid, format!("unknown site `{}`", rec.site));
                };
                let witness_role = rec.role == metro_api::config::Role::Witness;
                if witness_role != (site.kind == SiteKind::Witness) {
                    return reject(
                        Rejection::Invalid,
                        format!("role {:?} does not fit site `{}`", rec.role, rec.site),
                    );
                }
                if witness_role && self.nodes.values().any(|n| n.role == rec.role && n.id != rec.id) {
                    return reject(Rejection::AlreadyExists, "the cluster already has a witness");
                }
                if self.nodes.values().any(|n| n.raft_id == rec.raft_id && n.id != rec.id) {
                    return reject(Rejection::AlreadyExists, format!("raft id collision for `{}`", rec.id));
                }
                if let Some(mine) = &rec.timings {
                    match &self.lease_timings {
                        Some(committed) => {
                            if let Err(e) = LeaseTimings::check_member(committed, &rec.id, mine) {
                                return reject(Rejection::Invalid, e);
                            }
                        }
                        None => self.lease_timings = Some(*mine),
                    }
                }
                self.nodes.insert(rec.id.clone(), rec.clone());
                CommandResult::Ok { epoch: 0 }
            }
            Command::RemoveNode { id } => {
                if self.volumes.values().any(|v| v.replicas.contains(id)) {
                    return reject(Rejection::Invalid, format!("node `{id}` still holds replicas"));
                }
                match self.nodes.remove(id) {
                    Some(_) => CommandResult::Ok { epoch: 0 },
                    None => reject(Rejection::NotFound, format!("no node `{id}`")),
                }
            }
            Command::CreateVolume {
                name,
                size_bytes,
                iops_limit,
                bandwidth_limit,
                lease_policy,
                replicas,
                primary,
                nonce,
            } => {
                if self.volumes.contains_key(name) {
                    return reject(Rejection::AlreadyExists, format!("volume `{name}` exists"));
                }
                if *size_bytes == 0 || size_bytes % 4096 != 0 {
                    return reject(Rejection::Invalid, "size must be a non-zero multiple of 4096");
                }
                if !replicas.contains(primary) {
                    return reject(Rejection::Invalid, "primary must be one of the replicas");
                }
                let mut sites = Vec::new();
                for r in replicas {
                    match self.nodes.get(r) {
                        Some(n) if n.role == metro_api::config::Role::Storage => sites.push(n.site.clone()),
                        _ => return reject(Rejection::Invalid, format!("`{r}` is not a storage node")),
                    }
                }
                let mut dedup = replicas.clone();
                dedup.sort();
                dedup.dedup();
                if dedup.len() != replicas.len() {
                    return reject(Rejection::Invalid, "replicas listed twice");
                }
                for s in self.data_sites() {
                    if s.mode == SiteMode::Active && !sites.contains(&s.name) {
                        return reject(
                            Rejection::Invalid,
                            format!("no replica in active data site `{}`", s.name),
                        );
                    }
                }
                let id = if *nonce == 0 {
                    VolumeId::LEGACY
                } else {
                    self.volume_serial += 1;
                    VolumeId { serial: self.volume_serial, nonce: *nonce }
                };
                self.volumes.insert(
                    name.clone(),
                    VolumeRecord {
                        name: name.clone(),
                        id,
                        size_bytes: *size_bytes,
                        iops_limit: *iops_limit,
                        bandwidth_limit: *bandwidth_limit,
                        lease_policy: *lease_policy,
                        replicas: replicas.clone(),
                        in_sync: replicas.clone(),
                        primary: Some(primary.clone()),
                        epoch: 1,
                        primary_since: 1,
                        previous_primary: None,
                    },
                );
                CommandResult::Ok { epoch: 1 }
            }
            Command::DeleteVolume { name } => match self.volumes.remove(name) {
                Some(_) => CommandResult::Ok { epoch: 0 },
                None => reject(Rejection::NotFound, format!("no volume `{name}`")),
            },
            Command::ChangeVolume { name, expected_epoch, primary, in_sync, rejoin } => {
                let v = match self.volume_at(name, *expected_epoch) {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                for n in in_sync {
                    if !v.replicas.contains(n) {
                        return reject(Rejection::Invalid, format!("`{n}` is not a replica of `{name}`"));
                    }
                    let joining = rejoin.as_ref() == Some(n);
                    if !v.in_sync.contains(n) && !joining {
                        return reject(
                            Rejection::StalePromotion,
                            format!("`{n}` is not in sync; it can only rejoin after a resync"),
                        );
                    }
                }
                if let Some(j) = rejoin {
                    if !in_sync.contains(j) {
                        return reject(Rejection::Invalid, "rejoin names a replica missing from in_sync");
                    }
                }
                if let Some(p) = primary {
                    // Invariant 4: a primary must come from the latest in_sync.
                    if !v.in_sync.contains(p) || !in_sync.contains(p) {
                        return reject(
                            Rejection::StalePromotion,
                            format!("`{p}` is not in the latest in_sync"),
                        );
                    }
                }
                let mut dedup = in_sync.clone();
                dedup.sort();
                dedup.dedup();
                if dedup.len() != in_sync.len() {
                    return reject(Rejection::Invalid, "in_sync lists a replica twice");
                }
                v.in_sync = in_sync.clone();
                v.epoch += 1;
                if v.primary != *primary {
                    v.primary_since = v.epoch;
                    v.previous_primary = v.primary.take();
                }
                v.primary = primary.clone();
                CommandResult::Ok { epoch: v.epoch }
            }
            Command::ForceInSync { name, expected_epoch, in_sync } => {
                let v = match self.volume_at(name, *expected_epoch) {
                    Ok(v) => v,
                    Err(r) => return r,
                };
                if in_sync.is_empty() || in_sync.iter().any(|n| !v.replicas.contains(n)) {
                    return reject(Rejection::Invalid, "in_sync must be a non-empty set of replicas");
                }
                let mut dedup = in_sync.clone();
                dedup.sort();
                dedup.dedup();
                if dedup.len() != in_sync.len() {
                    return reject(Rejection::Invalid, "in_sync lists a replica twice");
                }
                v.in_sync = in_sync.clone();
                v.primary = None;
                v.epoch += 1;
                v.primary_since = v.epoch;
                v.previous_primary = None;
                CommandResult::Ok { epoch: v.epoch }
            }
            Command::SetSiteMode { site, mode } => match self.sites.get_mut(site) {
                Some(s) if s.kind == SiteKind::Data => {
                    s.mode = *mode;
                    CommandResult::Ok { epoch: 0 }
                }
                Some(_) => reject(Rejection::Invalid, "only data sites change mode"),
                None => reject(Rejection::NotFound, format!("no site `{site}`")),
            },
            Command::SetPreferredSite { site } => {
                if let Some(s) = site {
                    if !self.sites.get(s).is_some_and(|r| r.kind == SiteKind::Data) {
                        return reject(Rejection::Invalid, format!("`{s}` is not a data site"));
                    }
                }
                self.preferred_site = site.clone();
                CommandResult::Ok { epoch: 0 }
            }
            Command::SetClusterConfig(c) => {
                let data: Vec<&str> = self.data_sites().map(|s| s.name.as_str()).collect();
                if let Err(e) = c.validate(Some(&data)) {
                    return reject(Rejection::Invalid, e.to_string());
                }
                if let Some(cur) = &self.config {
                    if cur == c {
                        return CommandResult::Ok { epoch: 0 };
                    }
                    if c.generation <= cur.generation {
                        return reject(
                            Rejection::Invalid,
                            format!(
                                "cluster config generation {} is not newer than the applied {}",
                                c.generation, cur.generation
                            ),
                        );
                    }
                }
                self.preferred_site = c.preferred_site.clone();
                self.config = Some(c.clone());
                CommandResult::Ok { epoch: 0 }
            }
            Command::Batch(cmds) => CommandResult::Batch(
                cmds.iter()
                    .map(|c| match c {
                        Command::Batch(_) => reject(Rejection::Invalid, "batches do not nest"),
                        c => self.apply(c),
                    })
                    .collect(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metro_api::config::Role;

    fn node(id: &str, site: &str, role: Role) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            raft_id: raft_id_of(id),
            site: site.into(),
            role,
            api: format!("{id}:7443"),
            nbd: None,
            replication: None,
            capacity_bytes: 1 << 30,
            timings: None,
        }
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let sites = vec![
            ("dc-a".to_string(), SiteKind::Data),
            ("dc-b".to_string(), SiteKind::Data),
            ("witness".to_string(), SiteKind::Witness),
        ];
        assert!(s.apply(&Command::InitSites { sites, preferred_site: Some("dc-a".into()) }).is_ok());
        for (id, site) in [("a1", "dc-a"), ("a2", "dc-a"), ("b1", "dc-b"), ("b2", "dc-b")] {
            assert!(s.apply(&Command::RegisterNode(node(id, site, Role::Storage))).is_ok());
        }
        assert!(s.apply(&Command::RegisterNode(node("w1", "witness", Role::Witness))).is_ok());
        let r = s.apply(&Command::CreateVolume {
            name: "v".into(),
            size_bytes: 1 << 20,
            iops_limit: 0,
            bandwidth_limit: 0,
            lease_policy: LeasePolicy::Suspend,
            replicas: vec!["a1".into(), "b1".into()],
            primary: "a1".into(),
            nonce: 7,
        });
        assert_eq!(r, CommandResult::Ok { epoch: 1 });
        s
    }

    fn change(epoch: u64, primary: Option<&str>, in_sync: &[&str], rejoin: Option<&str>) -> Command {
        Command::ChangeVolume {
            name: "v".into(),
            expected_epoch: epoch,
            primary: primary.map(Into::into),
            in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
            rejoin: rejoin.map(Into::into),
        }
    }

    #[test]
    fn removing_a_replica_bumps_the_epoch() {
        let mut s = cluster();
        assert_eq!(s.apply(&change(1, Some("a1"), &["a1"], None)), CommandResult::Ok { epoch: 2 });
        assert_eq!(s.volumes["v"].in_sync, vec!["a1"]);
    }

    /// A primaryship starts where the primary changes; changes under the
    /// same primary keep it; a move away and back starts a new one.
    #[test]
    fn primary_since_marks_where_each_primaryship_began() {
        let mut s = cluster();
        assert_eq!(s.volumes["v"].primary_since, 1);
        assert!(s.apply(&change(1, Some("a1"), &["a1"], None)).is_ok());
        assert!(s.apply(&change(2, Some("a1"), &["a1", "b1"], Some("b1"))).is_ok());
        assert_eq!((s.volumes["v"].epoch, s.volumes["v"].primary_since), (3, 1));
        assert!(s.apply(&change(3, Some("b1"), &["a1", "b1"], None)).is_ok());
        assert_eq!(s.volumes["v"].primary_since, 4);
        assert_eq!(s.volumes["v"].previous_primary.as_deref(), Some("a1"));
        assert!(s.apply(&change(4, Some("a1"), &["a1", "b1"], None)).is_ok());
        assert_eq!((s.volumes["v"].primary.as_deref(), s.volumes["v"].primary_since), (Some("a1"), 5));
        assert_eq!(s.volumes["v"].previous_primary.as_deref(), Some("b1"));
        assert!(s
            .apply(&Command::ForceInSync { name: "v".into(), expected_epoch: 5, in_sync: vec!["a1".into()] })
            .is_ok());
        assert_eq!(s.volumes["v"].primary_since, 6);
        assert_eq!(s.volumes["v"].previous_primary, None, "an operator's override: no previous primary");
        assert!(s.apply(&change(6, Some("a1"), &["a1"], None)).is_ok());
        assert_eq!(s.volumes["v"].primary_since, 7);
    }

    #[test]
    fn a_stale_epoch_change_is_rejected_and_changes_nothing() {
        let mut s = cluster();
        let before = s.clone();
        let r = s.apply(&change(7, Some("a1"), &["a1"], None));
        assert!(matches!(r, CommandResult::Rejected { reason: Rejection::EpochMismatch, .. }));
        assert_eq!(s, before);
    }

    #[test]
    fn an_out_of_sync_replica_is_never_promoted() {
        let mut s = cluster();
        assert!(s.apply(&change(1, Some("a1"), &["a1"], None)).is_ok());
        let r = s.apply(&change(2, Some("b1"), &["b1"], None));
        assert!(matches!(r, CommandResult::Rejected { reason: Rejection::StalePromotion, .. }), "{r:?}");
        assert_eq!(s.volumes["v"].primary.as_deref(), Some("a1"));
    }

    #[test]
    fn a_replica_rejoins_only_explicitly() {
        let mut s = cluster();
        assert!(s.apply(&change(1, Some("a1"), &["a1"], None)).is_ok());
        let sneaky = s.apply(&change(2, Some("a1"), &["a1", "b1"], None));
        assert!(!sneaky.is_ok());
        assert_eq!(
            s.apply(&change(2, Some("a1"), &["a1", "b1"], Some("b1"))),
            CommandResult::Ok { epoch: 3 }
        );
    }

    #[test]
    fn promotion_to_an_in_sync_replica_in_the_other_site() {
        let mut s = cluster();
        assert_eq!(s.apply(&change(1, Some("b1"), &["b1"], None)), CommandResult::Ok { epoch: 2 });
        assert_eq!(s.volumes["v"].primary.as_deref(), Some("b1"));
    }

    #[test]
    fn placement_needs_a_replica_in_each_active_data_site() {
        let mut s = cluster();
        let r = s.apply(&Command::CreateVolume {
            name: "w".into(),
            size_bytes: 1 << 20,
            iops_limit: 0,
            bandwidth_limit: 0,
            lease_policy: LeasePolicy::Suspend,
            replicas: vec!["a1".into(), "a2".into()],
            primary: "a1".into(),
            nonce: 8,
        });
        assert!(!r.is_ok());
    }

    #[test]
    fn a_second_witness_and_an_unknown_site_are_refused() {
        let mut s = cluster();
        assert!(!s.apply(&Command::RegisterNode(node("w2", "witness", Role::Witness))).is_ok());
        assert!(!s.apply(&Command::RegisterNode(node("c1", "dc-c", Role::Storage))).is_ok());
    }

    #[test]
    fn a_batch_applies_in_order_with_one_result_each() {
        let mut s = cluster();
        let r = s.apply(&Command::Batch(vec![
            change(1, Some("b1"), &["b1"], None),
            change(1, Some("a1"), &["a1"], None),
            change(2, Some("b1"), &["b1"], None),
            Command::Batch(vec![]),
        ]));
        let CommandResult::Batch(rs) = &r else { panic!("{r:?}") };
        assert_eq!(rs[0], CommandResult::Ok { epoch: 2 });
        assert!(matches!(rs[1], CommandResult::Rejected { reason: Rejection::EpochMismatch, .. }));
        assert_eq!(rs[2], CommandResult::Ok { epoch: 3 });
        assert!(matches!(rs[3], CommandResult::Rejected { reason: Rejection::Invalid, .. }));
        assert!(!r.is_ok());
        assert_eq!(s.volumes["v"].epoch, 3);
    }

    #[test]
    fn a_cluster_config_applies_only_when_valid_and_newer() {
        let mut s = cluster();
        let mut c = ClusterConfig::seed(&metro_api::config::QuorumConfig::default());
        c.preferred_site = Some("dc-b".into());
        assert!(s.apply(&Command::SetClusterConfig(c.clone())).is_ok());
        assert_eq!(s.preferred_site.as_deref(), Some("dc-b"));
        assert_eq!(s.config.as_ref(), Some(&c));
        // Re-applying the same config is a no-op; an older or equal generation with
        // other content (a stale leader) is refused and changes nothing.
        assert!(s.apply(&Command::SetClusterConfig(c.clone())).is_ok());
        let stale = ClusterConfig { preferred_site: Some("dc-a".into()), ..c.clone() };
        let before = s.clone();
        assert!(!s.apply(&Command::SetClusterConfig(stale)).is_ok());
        assert_eq!(s, before);
        // The witness site is not a data site; invalid values are refused.
        let witness = ClusterConfig { generation: 2, preferred_site: Some("witness".into()), ..c.clone() };
        let r = s.apply(&Command::SetClusterConfig(witness));
        assert!(
            matches!(&r, CommandResult::Rejected { reason: Rejection::Invalid, detail } if detail.contains("preferred_site")),
            "{r:?}"
        );
        let next = ClusterConfig { generation: 2, preferred_site: None, voters_per_site: 2, ..c };
        assert!(s.apply(&Command::SetClusterConfig(next)).is_ok());
        assert_eq!(s.preferred_site, None);
    }

    #[test]
    fn a_state_without_a_cluster_config_still_deserializes() {
        let mut v = serde_json::to_value(cluster()).unwrap();
        v.as_object_mut().unwrap().remove("config");
        let back: ClusterState = serde_json::from_value(v).unwrap();
        assert_eq!(back.config, None);
    }

    fn create(name: &str, nonce: u64) -> Command {
        Command::CreateVolume {
            name: name.into(),
            size_bytes: 1 << 20,
            iops_limit: 0,
            bandwidth_limit: 0,
            lease_policy: LeasePolicy::Suspend,
            replicas: vec!["a1".into(), "b1".into()],
            primary: "a1".into(),
            nonce,
        }
    }

    #[test]
    fn a_recreated_volume_gets_a_new_higher_id() {
        let mut s = cluster();
        let first = s.volumes["v"].id;
        assert_eq!(first, VolumeId { serial: 1, nonce: 7 });
        assert!(s.apply(&Command::DeleteVolume { name: "v".into() }).is_ok());
        assert!(s.apply(&create("v", 7)).is_ok());
        let second = s.volumes["v"].id;
        assert!(second.serial > first.serial, "{first} then {second}");
        assert_ne!(first, second);
        assert_eq!(s.volume_serial, second.serial);
    }

    #[test]
    fn old_create_entries_and_snapshots_load_as_legacy_volumes() {
        // A CreateVolume logged before ids has no nonce: a legacy volume,
        // and no serial allocated (replaying it gives the state it gave).
        let mut json = serde_json::to_value(create("w", 0)).unwrap();
        json["CreateVolume"].as_object_mut().unwrap().remove("nonce");
        let old: Command = serde_json::from_value(json).unwrap();
        let mut s = cluster();
        assert!(s.apply(&old).is_ok());
        assert!(s.volumes["w"].id.is_legacy());
        assert_eq!(s.volume_serial, 1);
        // A snapshot from before ids: no id per volume, no serial.
        let mut v = serde_json::to_value(&s).unwrap();
        v.as_object_mut().unwrap().remove("volume_serial");
        v["volumes"]["v"].as_object_mut().unwrap().remove("id");
        let back: ClusterState = serde_json::from_value(v).unwrap();
        assert!(back.volumes["v"].id.is_legacy());
        assert_eq!(back.volume_serial, 0);
    }

    #[test]
    fn the_first_registered_lease_timings_bind_every_later_member() {
        let mut s = cluster();
        let t = LeaseTimings { lease_ms: 2000, drift_margin_ms: 500 };
        assert!(s
            .apply(&Command::RegisterNode(NodeRecord {
                timings: Some(t),
                ..node("a1", "dc-a", Role::Storage)
            }))
            .is_ok());
        assert_eq!(s.lease_timings, Some(t));
        assert!(s
            .apply(&Command::RegisterNode(NodeRecord {
                timings: Some(t),
                ..node("b1", "dc-b", Role::Storage)
            }))
            .is_ok());
        let longer = LeaseTimings { lease_ms: 5000, ..t };
        let before = s.clone();
        let r = s.apply(&Command::RegisterNode(NodeRecord {
            timings: Some(longer),
            ..node("b2", "dc-b", Role::Storage)
        }));
        let CommandResult::Rejected { reason: Rejection::Invalid, detail } = &r else { panic!("{r:?}") };
        assert!(
            detail.contains("lease_ms = 5000")
                && detail.contains("lease_ms = 2000")
                && detail.contains("[quorum]"),
            "{detail}"
        );
        assert_eq!(s, before);
    }

    #[test]
    fn apply_is_deterministic_across_serialization() {
        let s = cluster();
        let json = serde_json::to_string(&s).unwrap();
        let back: ClusterState = serde_json::from_str(&json).unwrap();
        assert_eq!(s, back);
    }
}
