//! The operator-facing gRPC `Control` service, served by every daemon
//! (storage nodes and the witness) over mutual TLS.
//!
//! Reads are answered from the local replica of the cluster state; liveness
//! is only known to the leader, so a follower forwards `GetStatus` to it
//! (one hop, marked with a header so it never loops). Changes go to etcd
//! (desired state) or through the quorum (site modes, attach, drain).
//! Every error goes through [`ApiError`] with a stable code and a next step.

use crate::registry::{Registry, RegistryError, VolumeSpec};
use crate::volume::manager::VolumeManager;
use metro_api::config::{DaemonConfig, Role, SiteKind};
use metro_api::error::{ApiError, Code};
use metro_api::identity::{authorize, Access};
use metro_api::pb::control as pb;
use metro_api::pb::control::control_client::ControlClient;
use metro_api::tls::TlsFiles;
use metro_quorum::state::Rejection;
use metro_quorum::{
    ClusterConfig, ClusterState, Command, CommandResult, LeasePolicy, Quorum, QuorumError, SiteMode,
    VolumeRecord,
};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Header marking a request forwarded by another node.
const FORWARDED: &str = "x-metro-forwarded";
/// Deadline for a forwarded call to the leader or a primary.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a read waits for a quorum to confirm this node still leads.
const LEADER_CONFIRM: Duration = Duration::from_secs(1);
/// How long create/delete wait for the leader to reconcile the spec.
const RECONCILE_WAIT: Duration = Duration::from_secs(20);
/// Largest volume metro creates (64 TiB).
const MAX_VOLUME_BYTES: u64 = 64 << 40;

pub struct ControlService {
    pub cfg: Arc<DaemonConfig>,
    pub quorum: Quorum,
    pub registry: Arc<dyn Registry>,
    pub manager: Option<Arc<VolumeManager>>,
    pub tls: TlsFiles,
}

/// Quorum errors map through the quorum crate's one `From<QuorumError> for
/// ApiError`, except that an empty hint gets the generic next step.
/// `site activate`: how long a leader may take to commit the site change
/// before the daemon concludes the quorum is lost and tries the override
/// (a few election timeouts; the override probes the other voters anyway).
const ACTIVATE_QUORUM_WAIT: Duration = Duration::from_secs(6);

fn quorum_err(e: QuorumError) -> ApiError {
    let mut a = ApiError::from(e);
    if a.hint.is_empty() {
        a.hint = "check `metroctl status` and the daemon log".into();
    }
    a
}

fn registry_err(e: RegistryError) -> ApiError {
    match e {
        RegistryError::Unavailable(_) => ApiError::new(
            Code::EtcdUnavailable,
            e.to_string(),
            "bring etcd back (`metroctl status` shows each member); I/O on attached volumes is not affected",
        ),
        RegistryError::AlreadyExists(n) => {
            ApiError::new(Code::AlreadyExists, format!("volume `{n}` already exists"), "pick another name")
        }
        RegistryError::Corrupt { .. } => {
            ApiError::new(Code::Internal, e.to_string(), "inspect the key in etcd")
        }
        RegistryError::Conflict(_) => ApiError::new(Code::Conflict, e.to_string(), "re-read it and retry"),
    }
}

fn committed(r: Result<CommandResult, QuorumError>) -> Result<u64, ApiError> {
    match r.map_err(quorum_err)? {
        CommandResult::Ok { epoch } => Ok(epoch),
        CommandResult::Rejected { reason, detail } => {
            let (code, hint) = match reason {
                Rejection::NotFound => (Code::NotFound, "check the name with `metroctl status`"),
                Rejection::AlreadyExists => (Code::AlreadyExists, "it is already done, or pick another name"),
                Rejection::Invalid => {
                    (Code::InvalidArgument, "check the arguments against `metroctl status`")
                }
                Rejection::EpochMismatch => {
                    (Code::Conflict, "the volume changed meanwhile; re-read it and retry")
                }
                Rejection::StalePromotion => {
                    (Code::Unsafe, "only an in-sync replica may become primary; see `metroctl volume show`")
                }
            };
            Err(ApiError::new(code, format!("refused: {reason:?}: {detail}"), hint))
        }
        CommandResult::Batch(_) => Err(ApiError::new(
            Code::Internal,
            "unexpected batch result for a single command",
            "see the daemon log and report a bug",
        )),
    }
}

fn volume_not_found(name: &str) -> ApiError {
    ApiError::new(Code::NotFound, format!("no volume `{name}`"), "list volumes with `metroctl volume list`")
}

/// How many location updates a watch holds for a slow client, how long it
/// waits for one to drain, and how often it repeats itself when nothing
/// changes (so that a client notices a dead stream).
const WATCH_QUEUE: usize = 16;
const WATCH_SEND_TIMEOUT: Duration = Duration::from_secs(10);
const WATCH_KEEPALIVE: Duration = Duration::from_secs(2);

fn location_of(state: &ClusterState, v: &VolumeRecord, stale: bool, me: &str) -> pb::VolumeLocation {
    pb::VolumeLocation {
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        primary: v.primary.clone().unwrap_or_default(),
        primary_nbd: v
            .primary
            .as_ref()
            .and_then(|p| state.nodes.get(p))
            .and_then(|n| n.nbd.clone())
            .unwrap_or_default(),
        epoch: v.epoch,
        state: crate::summary::volume_state(v).into(),
        stale,
        answered_by: me.to_string(),
    }
}

impl ControlService {
    fn state(&self) -> Arc<ClusterState> {
        self.quorum.state().borrow().clone()
    }

    async fn client_for(&self, api: &str) -> Result<ControlClient<tonic::transport::Channel>, Status> {
        let ep = tonic::transport::Endpoint::from_shared(format!("https://{api}"))
            .map_err(|e| {
                ApiError::new(Code::Internal, format!("bad peer address {api}: {e}"), "see the daemon log")
            })?
            .tls_config(self.tls.tonic_client())
            .map_err(|e| {
                ApiError::new(Code::Internal, format!("TLS for {api}: {e}"), "check the node certificates")
            })?
            .connect_timeout(Duration::from_secs(1))
            .timeout(FORWARD_TIMEOUT)
            .local_address(Some(self.cfg.listen.api.ip()));
        let ch = ep.connect().await.map_err(|e| {
            ApiError::new(Code::NoQuorum, format!("cannot reach {api}: {e}"), "check `metroctl status`")
        })?;
        Ok(ControlClient::new(ch))
    }

    fn volume_status(&self, state: &ClusterState, v: &VolumeRecord) -> pb::VolumeStatus {
        let primary_nbd = v
            .primary
            .as_ref()
            .and_then(|p| state.nodes.get(p))
            .and_then(|n| n.nbd.clone())
            .unwrap_or_default();
        let replica_status = v
            .replicas
            .iter()
            .map(|r| {
                let (dirty, left, rate, full) = match &self.manager {
                    Some(m) if m.is_primary_here(&v.name) && !v.in_sync.contains(r) => {
                        let p = m.progress(&v.name, r);
                        let dirty = m.storage().dirty_bytes(&v.name, r);
                        (dirty, p.bytes_left, p.rate_bps, m.storage().full_resyncs(&v.name))
                    }
                    _ => (0, 0, 0, 0),
                };
                pb::ReplicaStatus {
                    node: r.clone(),
                    in_sync: v.in_sync.contains(r),
                    dirty_bytes: dirty,
                    resync_bytes_left: left,
                    resync_rate_bps: rate,
                    full_resyncs: full,
                }
            })
            .collect();
        let state_str = match self.manager.as_ref().and_then(|m| m.primary_ready(&v.name)) {
            Some(false) => crate::summary::RECONCILING,
            _ => crate::summary::volume_state(v),
        };
        pb::VolumeStatus {
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            primary: v.primary.clone().unwrap_or_default(),
            replicas: v.replicas.clone(),
            in_sync: v.in_sync.clone(),
            epoch: v.epoch,
            replica_status,
            lease_policy: match v.lease_policy {
                LeasePolicy::Suspend => "suspend".into(),
                LeasePolicy::Error => "error".into(),
            },
            state: state_str.into(),
            primary_nbd,
            stale: false,
            answered_by: self.cfg.node_id.clone(),
        }
    }

    fn volume_location(&self, name: &str) -> Result<pb::VolumeLocation, Status> {
        let state = self.state();
        let v = state.volumes.get(name).ok_or_else(|| Status::from(volume_not_found(name)))?;
        Ok(location_of(&state, v, self.quorum.status().leader.is_none(), &self.cfg.node_id))
    }

    /// Whether reads answered here are authoritative: this node leads and a
    /// quorum confirmed it just now (see [`metro_quorum::Quorum::confirm_leader`]).
    async fn confirmed_leader(&self) -> bool {
        self.quorum.confirm_leader(LEADER_CONFIRM).await
    }

    /// Volume status as the leader knows it, with resync figures from the
    /// primary. `hop` says how far the request has been forwarded: none,
    /// `leader`, or `final`. An answer nobody could confirm with the leader
    /// (no leader known, or it is unreachable) comes from this node's own view
    /// and says so with `stale`.
    async fn volume_status_full(&self, name: &str, hop: Option<&str>) -> Result<pb::VolumeStatus, Status> {
        let leading = hop != Some("final") && self.confirmed_leader().await;
        if hop.is_none() && !leading {
            let leader = self.quorum.status().leader;
            if let Some(r) = self.forward_volume(leader.as_deref(), name, "leader").await {
                return Ok(r);
            }
        }
        let state = self.state();
        let v = state.volumes.get(name).ok_or_else(|| Status::from(volume_not_found(name)))?;
        let mut mine = self.volume_status(&state, v);
        // `final`: the leader asked us, its primary, for the resync figures.
        mine.stale = hop != Some("final") && !leading;
        if leading && v.primary.as_deref().is_some_and(|p| p != self.cfg.node_id) {
            if let Some(r) = self.forward_volume(v.primary.as_deref(), name, "final").await {
                // The leader's record wins; the primary adds what only it
                // knows: resync figures, and whether it still reconciles.
                if r.state == crate::summary::RECONCILING {
                    mine.state = r.state.clone();
                }
                for rs in &mut mine.replica_status {
                    if let Some(theirs) = r.replica_status.iter().find(|x| x.node == rs.node) {
                        rs.dirty_bytes = theirs.dirty_bytes;
                        rs.resync_bytes_left = theirs.resync_bytes_left;
                        rs.resync_rate_bps = theirs.resync_rate_bps;
                        rs.full_resyncs = theirs.full_resyncs;
                    }
                }
            }
        }
        Ok(mine)
    }

    async fn forward_volume(&self, to: Option<&str>, name: &str, hop: &str) -> Option<pb::VolumeStatus> {
        let api = self.state().nodes.get(to?)?.api.clone();
        let mut c = self.client_for(&api).await.ok()?;
        let mut req = Request::new(pb::VolumeRef { name: name.to_string() });
        req.metadata_mut().insert(FORWARDED, hop.parse().ok()?);
        c.get_volume(req).await.ok().map(|r| r.into_inner())
    }

    /// A client for the leader as this node knows it (None: unknown or unreachable).
    async fn leader_client(&self) -> Option<ControlClient<tonic::transport::Channel>> {
        let leader = self.quorum.status().leader?;
        let api = self.state().nodes.get(&leader)?.api.clone();
        self.client_for(&api).await.ok()
    }

    async fn wait_for<F: Fn(&ClusterState) -> bool>(&self, what: &str, f: F) -> Result<(), ApiError> {
        let mut rx = self.quorum.state();
        let deadline = tokio::time::Instant::now() + RECONCILE_WAIT;
        loop {
            if f(&rx.borrow_and_update()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                let leader = self.quorum.status().leader;
                return Err(ApiError::new(
                    Code::Timeout,
                    format!("{what}: not reconciled within {RECONCILE_WAIT:?} (leader: {})", leader.as_deref().unwrap_or("none")),
                    "the request is stored in etcd and will complete when the leader can place it; check `metroctl status`",
                ));
            }
        }
    }

    async fn build_status(&self) -> pb::ClusterStatus {
        let st = self.quorum.status();
        let state = self.state();
        let ages = self.quorum.heartbeat_ages_ms();
        let loss = self.quorum.node_loss_ms();
        let reachable = |id: &str| {
            id == self.cfg.node_id || ages.as_ref().and_then(|a| a.get(id)).is_some_and(|age| *age < loss)
        };
        let nodes: Vec<pb::NodeStatus> = state
            .nodes
            .values()
            .map(|n| pb::NodeStatus {
                id: n.id.clone(),
                site: n.site.clone(),
                role: format!("{:?}", n.role).to_lowercase(),
                voter: st.voters.contains(&n.id),
                reachable: reachable(&n.id),
                api: n.api.clone(),
                nbd: n.nbd.clone().unwrap_or_default(),
                capacity_bytes: n.capacity_bytes,
                rtt_us: self.quorum.peer_rtt(&n.id).map_or(0, |r| r.smoothed_us),
                used_bytes: state
                    .volumes
                    .values()
                    .filter(|v| v.replicas.contains(&n.id))
                    .map(|v| v.size_bytes)
                    .sum(),
            })
            .collect();
        let rtt = crate::summary::witness_rtt(&self.quorum, &state);
        let witness = state.nodes.values().find(|n| n.role == Role::Witness).map(|w| pb::WitnessStatus {
            id: w.id.clone(),
            reachable: reachable(&w.id),
            rtt_us: rtt.as_ref().map_or(0, |r| r.smoothed_us),
            rtt_last_us: rtt.as_ref().map_or(0, |r| r.last_us),
            rtt_measured_by: rtt.map(|r| r.measured_by).unwrap_or_default(),
        });
        let etcd: Vec<pb::EtcdStatus> = self
            .registry
            .health()
            .await
            .into_iter()
            .map(|(ep, healthy)| pb::EtcdStatus { name: ep.clone(), healthy, endpoint: ep })
            .collect();
        let mut alerts = Vec::new();
        if st.leader.is_none() {
            alerts.push("no quorum leader: I/O is suspended; see `metroctl site activate`".to_string());
        }
        if let Some(w) = &witness {
            if !w.reachable && ages.is_some() {
                alerts.push(format!("witness {} unreachable: one more site failure would stop I/O", w.id));
            }
        }
        for e in etcd.iter().filter(|e| !e.healthy) {
            alerts.push(format!("etcd member {} unhealthy", e.endpoint));
        }
        for s in state.sites.values().filter(|s| s.mode != SiteMode::Active) {
            alerts.push(format!("site {} is {}", s.name, s.mode.as_str()));
        }
        for n in nodes.iter().filter(|n| !n.reachable && ages.is_some() && n.role != "witness") {
            alerts.push(format!("node {} unreachable", n.id));
        }
        let degraded = state.volumes.values().filter(|v| v.in_sync.len() < v.replicas.len()).count();
        if degraded > 0 {
            alerts.push(format!("{degraded} volume(s) running with fewer in-sync replicas than placed"));
        }
        pb::ClusterStatus {
            cluster: self.cfg.cluster.clone(),
            leader: st.leader.clone().unwrap_or_default(),
            term: st.term,
            voters: st.voters.clone(),
            learners: st.learners.clone(),
            sites: state
                .sites
                .values()
                .map(|s| pb::SiteStatus {
                    name: s.name.clone(),
                    kind: match s.kind {
                        SiteKind::Data => "data".into(),
                        SiteKind::Witness => "witness".into(),
                    },
                    state: s.mode.as_str().into(),
                    note: String::new(),
                })
                .collect(),
            nodes,
            witness,
            etcd,
            alerts,
            answered_by: self.cfg.node_id.clone(),
            preferred_site: state.preferred_site.clone().unwrap_or_default(),
            stale: false,
        }
    }

    fn config_reply(&self, stored: Option<&ClusterConfig>, source: &str) -> pb::ClusterConfigReply {
        let state = self.state();
        let applied = state.config.as_ref();
        let shown = stored.or(applied);
        pb::ClusterConfigReply {
            entries: shown
                .map(|c| {
                    c.pairs()
                        .into_iter()
                        .map(|(k, v)| pb::ConfigEntry { key: k.to_string(), value: v })
                        .collect()
                })
                .unwrap_or_default(),
            generation: shown.map_or(0, |c| c.generation),
            applied_generation: applied.map_or(0, |c| c.generation),
            source: source.to_string(),
        }
    }

    /// The stored config and its revision; seeded from this daemon's
    /// `[quorum]` when the leader has not stored one yet.
    async fn stored_config(&self) -> Result<(ClusterConfig, Option<i64>), ApiError> {
        match self.registry.config().await.map_err(registry_err)? {
            Some((c, rev)) => Ok((c, Some(rev))),
            None => Ok((ClusterConfig::initial(self.state().config.as_ref(), &self.cfg.quorum), None)),
        }
    }

    fn find_volume(&self, name: &str) -> Result<VolumeRecord, ApiError> {
        self.state().volumes.get(name).cloned().ok_or_else(|| volume_not_found(name))
    }

    async fn move_primary(&self, v: &VolumeRecord, to: &str) -> Result<u64, ApiError> {
        if !v.in_sync.iter().any(|n| n == to) {
            return Err(ApiError::new(
                Code::Unsafe,
                format!("`{to}` is not in sync for `{}` (in sync: {})", v.name, v.in_sync.join(", ")),
                "wait until its resync finishes (`metroctl volume show`), or pick an in-sync node",
            ));
        }
        // The old primary leaves in_sync (see `decide::moves`): it is resynced
        // from its hot extents and rejoins on its own.
        let cmd = metro_quorum::decide::planned_move(v, to);
        committed(self.quorum.propose(cmd).await)
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    type WatchVolumeStream = tokio_stream::wrappers::ReceiverStream<Result<pb::VolumeLocation, Status>>;

    async fn watch_volume(
        &self,
        req: Request<pb::VolumeRef>,
    ) -> Result<Response<Self::WatchVolumeStream>, Status> {
        authorize(&req, Access::Read)?;
        let name = req.into_inner().name;
        let first = self.volume_location(&name)?;
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_QUEUE);
        let mut state = self.quorum.state();
        let quorum = self.quorum.clone();
        let me = self.cfg.node_id.clone();
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            let mut keepalive = tokio::time::interval(WATCH_KEEPALIVE);
            keepalive.tick().await;
            loop {
                let changed = tokio::select! {
                    r = state.changed() => {
                        if r.is_err() {
                            return;
                        }
                        true
                    }
                    _ = keepalive.tick() => false,
                    _ = tx.closed() => return,
                };
                let s = state.borrow_and_update().clone();
                let Some(v) = s.volumes.get(&name) else {
                    let _ = tx.send(Err(Status::not_found(format!("volume `{name}` was deleted")))).await;
                    return;
                };
                let now = location_of(&s, v, quorum.status().leader.is_none(), &me);
                if now != last || !changed {
                    last = now;
                    // A bounded queue: a client that stops reading is dropped.
                    if tokio::time::timeout(WATCH_SEND_TIMEOUT, tx.send(Ok(last.clone()))).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn get_cluster_config(
        &self,
        req: Request<pb::GetClusterConfigRequest>,
    ) -> Result<Response<pb::ClusterConfigReply>, Status> {
        authorize(&req, Access::Read)?;
        match self.registry.config().await {
            Ok(stored) => Ok(Response::new(self.config_reply(stored.as_ref().map(|(c, _)| c), "etcd"))),
            Err(RegistryError::Unavailable(_)) => {
                Ok(Response::new(self.config_reply(None, "replicated state (etcd unreachable)")))
            }
            Err(e) => Err(registry_err(e).into()),
        }
    }

    async fn set_cluster_config(
        &self,
        req: Request<pb::SetClusterConfigRequest>,
    ) -> Result<Response<pb::ClusterConfigReply>, Status> {
        authorize(&req, Access::Write)?;
        let r = req.into_inner();
        if r.set.is_empty() {
            return Err(ApiError::new(
                Code::InvalidArgument,
                "nothing to set",
                format!("give KEY=VALUE pairs; keys: {}", metro_quorum::cluster_config::KEYS.join(", ")),
            )
            .into());
        }
        let (mut c, rev) = self.stored_config().await?;
        let before = c.clone();
        let invalid = |e: metro_quorum::ClusterConfigError| {
            Status::from(ApiError::new(
                Code::InvalidArgument,
                e.to_string(),
                "see `metroctl cluster config show` for the keys and current values; nothing was changed",
            ))
        };
        for e in &r.set {
            c.set(&e.key, &e.value).map_err(invalid)?;
        }
        let state = self.state();
        let data: Vec<&str> = state.data_sites().map(|s| s.name.as_str()).collect();
        c.validate(Some(&data)).map_err(invalid)?;
        c.validate_timings(self.cfg.quorum.heartbeat_ms).map_err(invalid)?;
        if c == before && rev.is_some() {
            return Ok(Response::new(self.config_reply(Some(&c), "etcd")));
        }
        if rev.is_some() {
            // Past the applied generation too: a store restored from an old
            // backup must not hold the change below what the cluster runs.
            let applied = state.config.as_ref().map_or(0, |a| a.generation);
            c.generation = before.generation.max(applied) + 1;
        }
        self.registry.put_config(&c, rev).await.map_err(registry_err)?;
        let generation = c.generation;
        self.wait_for(&format!("cluster config generation {generation}"), |s| {
            s.config.as_ref().is_some_and(|a| a.generation >= generation)
        })
        .await?;
        Ok(Response::new(self.config_reply(Some(&c), "etcd")))
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ClusterStatus>, Status> {
        authorize(&req, Access::Read)?;
        let forwarded = req.metadata().get(FORWARDED).is_some();
        let leading = self.confirmed_leader().await;
        if !forwarded && !leading {
            if let Some(mut c) = self.leader_client().await {
                let mut r = Request::new(pb::GetStatusRequest {});
                r.metadata_mut().insert(FORWARDED, "1".parse().expect("static"));
                if let Ok(resp) = c.get_status(r).await {
                    return Ok(resp);
                }
            }
        }
        let mut status = self.build_status().await;
        status.stale = !leading;
        Ok(Response::new(status))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        authorize(&req, Access::Read)?;
        let leading = self.confirmed_leader().await;
        if req.metadata().get(FORWARDED).is_none() && !leading {
            if let Some(mut c) = self.leader_client().await {
                let mut r = Request::new(pb::ListVolumesRequest {});
                r.metadata_mut().insert(FORWARDED, "final".parse().expect("static"));
                if let Ok(resp) = c.list_volumes(r).await {
                    return Ok(resp);
                }
            }
        }
        let state = self.state();
        let volumes = state
            .volumes
            .values()
            .map(|v| pb::VolumeStatus { stale: !leading, ..self.volume_status(&state, v) })
            .collect();
        Ok(Response::new(pb::ListVolumesResponse {
            volumes,
            stale: !leading,
            answered_by: self.cfg.node_id.clone(),
        }))
    }

    async fn get_volume(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::VolumeStatus>, Status> {
        authorize(&req, Access::Read)?;
        let hop = req.metadata().get(FORWARDED).and_then(|v| v.to_str().ok()).map(str::to_string);
        Ok(Response::new(self.volume_status_full(&req.get_ref().name, hop.as_deref()).await?))
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::VolumeStatus>, Status> {
        authorize(&req, Access::Write)?;
        let r = req.into_inner();
        if !metro_api::config::valid_name(&r.name) {
            return Err(ApiError::new(
                Code::InvalidArgument,
                format!("`{}` is not a valid volume name", r.name),
                "use 1-63 lowercase letters, digits and dashes",
            )
            .into());
        }
        if r.size_bytes == 0 || !r.size_bytes.is_multiple_of(4096) || r.size_bytes > MAX_VOLUME_BYTES {
            return Err(ApiError::new(
                Code::InvalidArgument,
                format!("size {} is invalid", r.size_bytes),
                "give a non-zero multiple of 4 KiB up to 64 TiB (e.g. --size 1GiB)",
            )
            .into());
        }
        let lease_policy = match r.lease_policy.as_str() {
            "" => self.state().config.as_ref().map_or(LeasePolicy::Suspend, |c| c.default_lease_policy),
            "suspend" => LeasePolicy::Suspend,
            "error" => LeasePolicy::Error,
            other => {
                return Err(ApiError::new(
                    Code::InvalidArgument,
                    format!("unknown lease policy `{other}`"),
                    "use `suspend` or `error`",
                )
                .into())
            }
        };
        if !r.primary_site.is_empty()
            && !self.state().sites.get(&r.primary_site).is_some_and(|s| s.kind == SiteKind::Data)
        {
            return Err(ApiError::new(
                Code::InvalidArgument,
                format!("`{}` is not a data site of this cluster", r.primary_site),
                "pick a data site from `metroctl site list`, or leave out --site",
            )
            .into());
        }
        let spec = VolumeSpec {
            name: r.name.clone(),
            size_bytes: r.size_bytes,
            iops_limit: r.iops_limit,
            bandwidth_limit: r.bandwidth_limit,
            lease_policy,
            primary_site: (!r.primary_site.is_empty()).then_some(r.primary_site),
            deleted: false,
        };
        self.registry.put_spec(&spec, true).await.map_err(registry_err)?;
        let name = r.name.clone();
        self.wait_for(&format!("create `{name}`"), |s| s.volumes.contains_key(&name)).await?;
        Ok(Response::new(self.volume_status_full(&name, None).await?))
    }

    async fn delete_volume(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::Empty>, Status> {
        authorize(&req, Access::Write)?;
        let name = req.into_inner().name;
        let v = self.find_volume(&name)?;
        let spec = VolumeSpec {
            name: name.clone(),
            size_bytes: v.size_bytes,
            iops_limit: v.iops_limit,
            bandwidth_limit: v.bandwidth_limit,
            lease_policy: v.lease_policy,
            primary_site: None,
            deleted: true,
        };
        self.registry.put_spec(&spec, false).await.map_err(registry_err)?;
        self.wait_for(&format!("delete `{name}`"), |s| !s.volumes.contains_key(&name)).await?;
        Ok(Response::new(pb::Empty {}))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::VolumeStatus>, Status> {
        authorize(&req, Access::Write)?;
        let r = req.into_inner();
        // Desired-state changes need etcd, even when the quorum could commit.
        self.registry.specs().await.map_err(registry_err)?;
        let v = self.find_volume(&r.name)?;
        if r.node.is_empty() {
            return Err(ApiError::new(Code::InvalidArgument, "attach needs a node", "add --node <id>").into());
        }
        if v.primary.as_deref() != Some(r.node.as_str()) {
            self.move_primary(&v, &r.node).await?;
        }
        Ok(Response::new(self.volume_status_full(&r.name, None).await?))
    }

    async fn detach_volume(&self, req: Request<pb::VolumeRef>) -> Result<Response<pb::VolumeStatus>, Status> {
        authorize(&req, Access::Write)?;
        let name = req.into_inner().name;
        self.registry.specs().await.map_err(registry_err)?;
        let v = self.find_volume(&name)?;
        if v.primary.is_some() {
            let cmd = Command::ChangeVolume {
                name: name.clone(),
                expected_epoch: v.epoch,
                primary: None,
                in_sync: v.in_sync.clone(),
                rejoin: None,
            };
            committed(self.quorum.propose(cmd).await)?;
        }
        Ok(Response::new(self.volume_status_full(&name, None).await?))
    }

    async fn site_activate(&self, req: Request<pb::SiteRequest>) -> Result<Response<pb::SiteStatus>, Status> {
        authorize(&req, Access::Write)?;
        let r = req.into_inner();
        // Refuse when the site may lack acknowledged writes (some volume's
        // latest in_sync has no replica in it), unless --force; the override
        // checks again on the state its log would commit.
        metro_quorum::decide::check_activate(&self.state(), &r.name, r.force)
            .map_err(|e| quorum_err(QuorumError::from(e)))?;
        let cmd = Command::SetSiteMode { site: r.name.clone(), mode: SiteMode::Active };
        match self.quorum.propose_within(cmd, ACTIVATE_QUORUM_WAIT).await {
            Ok(res) => {
                committed(Ok(res))?;
                return Ok(Response::new(pb::SiteStatus {
                    name: r.name,
                    kind: "data".into(),
                    state: "active".into(),
                    note: String::new(),
                }));
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(site = %r.name, error = %e, "no quorum leader answered; trying the quorum-loss override");
            }
            Err(e) => return Err(quorum_err(e).into()),
        }
        // No quorum: the operator override (DESIGN.md §4.5), run by a voter of the site.
        let rep = self.quorum.force_new_group(&r.name, r.force).await.map_err(quorum_err)?;
        let mut note = format!(
            "quorum lost: rebuilt the quorum group around {} (incarnation {}), fenced {}; I/O resumes on {} once the old leases have expired (lease + drift margin); the other nodes rejoin on their own when they return",
            rep.voter,
            rep.incarnation,
            rep.fenced.join(", "),
            r.name
        );
        if !rep.forced.is_empty() {
            note.push_str(&format!(
                "; --force: {} lost the writes acknowledged only outside {}",
                rep.forced.join(", "),
                r.name
            ));
        }
        Ok(Response::new(pb::SiteStatus { name: r.name, kind: "data".into(), state: "active".into(), note }))
    }

    async fn site_deactivate(
        &self,
        req: Request<pb::SiteRequest>,
    ) -> Result<Response<pb::SiteStatus>, Status> {
        authorize(&req, Access::Write)?;
        let r = req.into_inner();
        committed(
            self.quorum
                .propose(Command::SetSiteMode { site: r.name.clone(), mode: SiteMode::Deactivated })
                .await,
        )?;
        Ok(Response::new(pb::SiteStatus {
            name: r.name,
            kind: "data".into(),
            state: "deactivated".into(),
            note: String::new(),
        }))
    }

    async fn node_drain(&self, req: Request<pb::NodeRef>) -> Result<Response<pb::Empty>, Status> {
        authorize(&req, Access::Write)?;
        let node = req.into_inner().id;
        let state = self.state();
        if state.site_of(&node).is_none() {
            return Err(ApiError::new(
                Code::NotFound,
                format!("no node `{node}`"),
                "see `metroctl node list`",
            )
            .into());
        }
        for v in metro_quorum::decide::primaries_of(&state, &node) {
            let Some(to) = metro_quorum::decide::move_target(&state, v, &node) else {
                return Err(ApiError::new(
                    Code::Unsafe,
                    format!("volume `{}` has no other in-sync replica", v.name),
                    "wait for its resync to finish, then drain again",
                )
                .into());
            };
            self.move_primary(v, &to).await?;
        }
        Ok(Response::new(pb::Empty {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(reason: Rejection) -> Status {
        committed(Ok(CommandResult::Rejected { reason, detail: "d".into() })).unwrap_err().into()
    }

    #[test]
    fn refused_commands_map_to_stable_codes_with_a_next_step() {
        for (reason, grpc, code) in [
            (Rejection::NotFound, tonic::Code::NotFound, "MET-002"),
            (Rejection::AlreadyExists, tonic::Code::AlreadyExists, "MET-003"),
            (Rejection::Invalid, tonic::Code::InvalidArgument, "MET-001"),
            (Rejection::EpochMismatch, tonic::Code::Aborted, "MET-007"),
            (Rejection::StalePromotion, tonic::Code::FailedPrecondition, "MET-008"),
        ] {
            let s = rejected(reason);
            assert_eq!(s.code(), grpc, "{s:?}");
            assert!(s.message().starts_with(&format!("[{code}]")), "{s:?}");
            assert!(s.message().contains("next step"), "{s:?}");
        }
    }

    #[test]
    fn quorum_errors_always_carry_a_next_step() {
        for e in [
            QuorumError::NoLeader("x".into()),
            QuorumError::Invalid("x".into()),
            QuorumError::Timeout { what: "x".into(), ms: 1 },
            QuorumError::Stopped("x".into()),
        ] {
            let s: Status = quorum_err(e).into();
            assert!(s.message().contains("next step"), "{s:?}");
        }
        let s: Status = quorum_err(QuorumError::NoLeader("x".into())).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().starts_with("[MET-005]"));
    }

    #[test]
    fn etcd_being_down_is_met_006_and_says_io_continues() {
        let s: Status = registry_err(RegistryError::Unavailable("refused".into())).into();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.message().starts_with("[MET-006]") && s.message().contains("bring etcd back"), "{s:?}");
    }
}
