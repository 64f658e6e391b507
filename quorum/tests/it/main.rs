//! Integration tests of the quorum engine: real members, real tonic, 127.0.0.1.
//! One binary for the crate (`cargo test -p metro-quorum --test it`).

mod override_group;
mod support;

use metro_api::config::QuorumConfig;
use metro_quorum::{Command, CommandResult, LeasePolicy};
use std::time::Duration;
use support::*;

fn create_volume(name: &str, replicas: &[&str], primary: &str) -> Command {
    Command::CreateVolume {
        name: name.into(),
        size_bytes: 1 << 20,
        iops_limit: 0,
        bandwidth_limit: 0,
        lease_policy: LeasePolicy::Suspend,
        replicas: replicas.iter().map(|s| s.to_string()).collect(),
        primary: primary.into(),
        nonce: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_initialize_join_and_replicate_state_to_voters_and_learners() {
    tracing::info!("--- a1 initializes, b1 and w1 join, a2 joins as a learner");
    let c = Cluster::start(&["a1", "b1", "w1", "a2"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let st = c.get("a1").q.status();
    assert_eq!(st.learners, vec!["a2".to_string()]);
    assert_eq!(st.leader.as_deref(), Some("a1"));

    tracing::info!("--- a proposal through a follower (forwarded) is applied everywhere");
    let r = c.get("w1").q.propose(create_volume("v1", &["a2", "b1"], "a2")).await.unwrap();
    assert_eq!(r, CommandResult::Ok { epoch: 1 });
    for m in &c.members {
        wait_until(Duration::from_secs(5), &format!("{} sees v1", m.id), || {
            let has = m.state().volumes.contains_key("v1");
            async move { has }
        })
        .await;
    }
    let a2 = c.get("a2").state();
    assert_eq!(a2.volumes["v1"].primary.as_deref(), Some("a2"));
    assert_eq!(a2.nodes.len(), 4);
    assert_eq!(a2.sites.len(), 3);

    tracing::info!("--- a rejected command reports the state machine's reason");
    let r = c.get("b1").q.propose(create_volume("v1", &["a2", "b1"], "a2")).await.unwrap();
    assert!(matches!(r, CommandResult::Rejected { .. }), "{r:?}");

    tracing::info!("--- initialize is idempotent");
    let a1 = c.get("a1");
    a1.q.initialize(lab_sites(), Some("dc-a".into()), a1.record()).await.unwrap();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_is_elected_when_the_leader_dies_and_proposals_work_again() {
    let mut c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let old = c.leader().expect("a leader");
    let term = c.get(&old).q.status().term;

    tracing::info!("--- kill the leader {old}");
    c.get_mut(&old).kill().await;
    let survivors: Vec<String> = c.members.iter().map(|m| m.id.clone()).filter(|id| *id != old).collect();
    let killed_at = std::time::Instant::now();
    wait_until(Duration::from_secs(10), "a survivor leads", || {
        let led = survivors.iter().any(|id| c.get(id).q.status().is_leader);
        async move { led }
    })
    .await;
    let new = c.leader().unwrap();
    assert_ne!(new, old);
    let st = c.get(&new).q.status();
    assert!(st.term > term, "term {} after {}", st.term, term);
    tracing::info!(elapsed_ms = killed_at.elapsed().as_millis() as u64, "new leader {new}");

    tracing::info!("--- proposals through either survivor commit");
    for id in &survivors {
        let name = format!("after-{id}");
        let r = c.get(id).q.propose(Command::SetPreferredSite { site: Some("dc-b".into()) }).await.unwrap();
        assert!(r.is_ok(), "{name}: {r:?}");
    }
    for id in &survivors {
        let m = c.get(id);
        wait_until(Duration::from_secs(5), "preferred site replicated", || {
            let p = m.state().preferred_site.clone();
            async move { p.as_deref() == Some("dc-b") }
        })
        .await;
    }
    c.shutdown().await;
}

/// A member restarted after it led believes for a moment that it still
/// leads its old term (openraft restores its own committed vote as
/// leadership). Reads that need the leader's view must not trust that:
/// `confirm_leader` holds only once a quorum follows it, and then its state
/// includes everything committed while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_former_leader_confirms_no_leadership_until_a_quorum_follows_it() {
    let mut c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let old = c.leader().expect("a leader");
    assert!(c.get(&old).q.confirm_leader(Duration::from_secs(2)).await, "a live leader confirms");

    tracing::info!("--- kill the leader {old}; the survivors commit a volume without it");
    c.get_mut(&old).kill().await;
    let survivors: Vec<String> = c.members.iter().map(|m| m.id.clone()).filter(|id| *id != old).collect();
    wait_until(Duration::from_secs(10), "a survivor leads", || {
        let led = survivors.iter().any(|id| c.get(id).q.status().is_leader);
        async move { led }
    })
    .await;
    let r = c.get(&survivors[0]).q.propose(create_volume("while-down", &["a1", "b1"], "b1")).await.unwrap();
    assert!(r.is_ok(), "{r:?}");

    tracing::info!("--- restart {old}: its own view is stale until it catches up");
    restart(&mut c, &old).await;
    let m = c.get(&old);
    assert!(!m.state().volumes.contains_key("while-down"), "restarted with its old state");
    let (mut believed, mut confirmed) = (0, 0);
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < until {
        let thinks = m.q.status().is_leader;
        believed += thinks as u32;
        if m.q.confirm_leader(Duration::from_millis(500)).await {
            confirmed += 1;
            assert!(
                m.state().volumes.contains_key("while-down"),
                "{old} confirmed its leadership while its state lacked a committed volume"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tracing::info!(believed, confirmed, "samples where {old} thought it led / confirmed it");
    assert!(
        c.get(&survivors[0]).q.confirm_leader(Duration::from_secs(2)).await
            || c.get(&survivors[1]).q.confirm_leader(Duration::from_secs(2)).await
            || m.q.confirm_leader(Duration::from_secs(2)).await,
        "someone leads"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_primary_fails_over_to_the_in_sync_replica_in_the_other_site_after_its_lease() {
    let mut c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let r = c.get("w1").q.propose(create_volume("v", &["a1", "b1"], "b1")).await.unwrap();
    assert_eq!(r, CommandResult::Ok { epoch: 1 });

    tracing::info!("--- b1 holds the lease for v at epoch 1");
    let b1 = c.get("b1");
    wait_until(Duration::from_secs(5), "b1 holds a lease", || {
        let l = b1.q.lease_valid_until("v", 1);
        async move { l.is_some() }
    })
    .await;
    assert!(b1.q.lease_valid_until("v", 2).is_none(), "a lease is for one epoch only");
    assert!(c.get("a1").q.lease_valid_until("v", 1).is_none(), "only the primary holds a lease");

    tracing::info!("--- b1 dies; its last lease must end before anyone is promoted");
    let last_lease = {
        let rx = c.get("b1").q.lease_watch();
        let l = rx.borrow().get("v").copied().unwrap();
        l.valid_until
    };
    c.get_mut("b1").kill().await;
    let killed_at = tokio::time::Instant::now();
    let a1 = c.get("a1");
    let mut rx = a1.q.state();
    let promoted = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.volumes["v"].primary.as_deref() == Some("a1")),
    )
    .await
    .expect("failover within 10 s")
    .unwrap()
    .clone();
    let promoted_at = tokio::time::Instant::now();
    let v = &promoted.volumes["v"];
    assert_eq!(v.epoch, 2, "promotion bumps the epoch");
    assert_eq!(v.in_sync, vec!["a1".to_string()], "the dead node leaves in_sync");
    assert!(promoted_at > last_lease, "promoted before the old lease ended");
    tracing::info!(rto_ms = (promoted_at - killed_at).as_millis() as u64, "failover done");

    tracing::info!("--- the new primary gets a lease at the new epoch");
    wait_until(Duration::from_secs(5), "a1 holds a lease at epoch 2", || {
        let l = a1.q.lease_valid_until("v", 2);
        async move { l.is_some() }
    })
    .await;
    c.shutdown().await;
}

fn move_primary(name: &str, expected_epoch: u64, to: &str, in_sync: &[&str]) -> Command {
    Command::ChangeVolume {
        name: name.into(),
        expected_epoch,
        primary: Some(to.into()),
        in_sync: in_sync.iter().map(|s| s.to_string()).collect(),
        rejoin: None,
    }
}

/// The lease `m` holds for `vol` at `epoch`, waited for.
async fn lease_of(m: &Member, vol: &str, epoch: u64) -> tokio::time::Instant {
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(l) = m.q.lease_valid_until(vol, epoch) {
            return l;
        }
        assert!(tokio::time::Instant::now() < until, "{} holds no lease on {vol} at epoch {epoch}", m.id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A planned move: the old primary, once it stopped serving, releases its
/// lease and the new primary is granted at once, long before the old lease
/// would have run out. Only the holder's own release counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_released_lease_lets_the_next_primary_serve_before_the_old_lease_would_end() {
    let c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    for id in ["a1", "b1", "w1"] {
        c.get(id).heartbeat_as_primary();
    }
    let (a1, b1, w1) = (c.get("a1"), c.get("b1"), c.get("w1"));
    w1.q.propose(create_volume("v", &["a1", "b1"], "a1")).await.unwrap();
    lease_of(a1, "v", 1).await;

    tracing::info!("--- a move without a release: b1 waits until a1's last lease has ended");
    let a1_last = a1.q.lease_watch().borrow()["v"].valid_until;
    let r = w1.q.propose(move_primary("v", 1, "b1", &["a1", "b1"])).await.unwrap();
    assert_eq!(r, CommandResult::Ok { epoch: 2 });
    lease_of(b1, "v", 2).await;
    assert!(tokio::time::Instant::now() >= a1_last, "b1 was granted while a1's lease could still be valid");

    tracing::info!("--- a release by a node that does not hold the lease changes nothing");
    let b1_last = b1.q.lease_watch().borrow()["v"].valid_until;
    let r = w1.q.propose(move_primary("v", 2, "a1", &["a1", "b1"])).await.unwrap();
    assert_eq!(r, CommandResult::Ok { epoch: 3 });
    w1.q.release_lease("v", 2);
    a1.q.release_lease("v", 2);
    let t = tokio::time::Instant::now();
    lease_of(a1, "v", 3).await;
    assert!(tokio::time::Instant::now() >= b1_last, "a1 was granted on someone else's release");
    println!("MEASURE move without the holder's release: granted after {} ms", t.elapsed().as_millis());

    tracing::info!("--- the holder releases: the next primary is granted at once");
    let a1_last = a1.q.lease_watch().borrow()["v"].valid_until;
    let r = w1.q.propose(move_primary("v", 3, "b1", &["a1", "b1"])).await.unwrap();
    assert_eq!(r, CommandResult::Ok { epoch: 4 });
    let t = tokio::time::Instant::now();
    a1.q.release_lease("v", 3);
    assert!(a1.q.lease_valid_until("v", 3).is_none(), "the releasing node stops counting on its lease");
    lease_of(b1, "v", 4).await;
    let got = tokio::time::Instant::now();
    assert!(got < a1_last, "b1 waited for the released lease to run out anyway");
    println!("MEASURE move with the holder's release: granted after {} ms", (got - t).as_millis());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_recovers_its_log_and_state_from_its_data_dir() {
    let mut c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    for i in 0..5 {
        let r = c.get("a1").q.propose(create_volume(&format!("v{i}"), &["a1", "b1"], "a1")).await.unwrap();
        assert!(r.is_ok());
    }
    let b1 = c.get("b1");
    wait_until(Duration::from_secs(5), "b1 has 5 volumes", || {
        let n = b1.state().volumes.len();
        async move { n == 5 }
    })
    .await;
    let before = b1.state();
    let (dir, port) = (b1.dir.clone(), b1.addr.rsplit(':').next().unwrap().parse::<u16>().unwrap());

    tracing::info!("--- b1 stops; restart it from its data dir, isolated (no server yet)");
    c.get_mut("b1").kill().await;
    let cfg_only = metro_quorum::Quorum::start(metro_quorum::EngineConfig {
        node_id: "b1".into(),
        site: "dc-b".into(),
        role: metro_api::config::Role::Storage,
        api_addr: format!("127.0.0.1:{port}"),
        data_dir: dir.clone(),
        timings: timings(),
        tls: None,
        declared_timings: None,
    })
    .await
    .unwrap();
    let mut rx = cfg_only.state();
    let recovered = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.volumes.len() == 5))
        .await
        .expect("state recovered from the local log")
        .unwrap()
        .clone();
    assert_eq!(*recovered, *before);
    cfg_only.shutdown().await;

    tracing::info!("--- b1 restarts for real and catches up with new commands");
    let m = start_member("b1", &dir, port, None).await;
    m.heartbeat_as_primary();
    *c.get_mut("b1") = m;
    let r = c.get("a1").q.propose(create_volume("after", &["a1", "b1"], "a1")).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    let b1 = c.get("b1");
    wait_until(Duration::from_secs(10), "restarted b1 sees the new volume", || {
        let has = b1.state().volumes.contains_key("after");
        async move { has }
    })
    .await;
    c.shutdown().await;
}

/// A member of a future release: answers every call in protocol version 99.
struct FutureVersionPeer;

#[tonic::async_trait]
impl metro_api::pb::internal::internal_server::Internal for FutureVersionPeer {
    async fn raft_append(
        &self,
        r: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, tonic::Status> {
        Self::answer(r)
    }
    async fn raft_vote(&self, r: tonic::Request<Payload>) -> Result<tonic::Response<Payload>, tonic::Status> {
        Self::answer(r)
    }
    async fn raft_snapshot(
        &self,
        r: tonic::Request<Payload>,
    ) -> Result<tonic::Response<Payload>, tonic::Status> {
        Self::answer(r)
    }
    async fn propose(&self, r: tonic::Request<Payload>) -> Result<tonic::Response<Payload>, tonic::Status> {
        Self::answer(r)
    }
    async fn heartbeat(&self, r: tonic::Request<Payload>) -> Result<tonic::Response<Payload>, tonic::Status> {
        Self::answer(r)
    }
}

type Payload = metro_api::pb::internal::RaftPayload;

impl FutureVersionPeer {
    fn answer(_: tonic::Request<Payload>) -> Result<tonic::Response<Payload>, tonic::Status> {
        Ok(tonic::Response::new(Payload {
            proto_version: 99,
            from: "x9".into(),
            data: b"{}".to_vec(),
            incarnation: 0,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_speaking_another_protocol_version_is_refused_with_both_versions_named() {
    let c = Cluster::start(&["a1"]).await;

    tracing::info!("--- an old/new caller is refused by our server with FAILED_PRECONDITION");
    let mut client = metro_api::pb::internal::internal_client::InternalClient::connect(format!(
        "http://{}",
        c.get("a1").addr
    ))
    .await
    .unwrap();
    let status = client
        .propose(Payload { proto_version: 99, from: "x9".into(), data: b"{}".to_vec(), incarnation: 0 })
        .await
        .expect_err("must be refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let msg = status.message();
    let ours = format!("v{}", metro_api::PROTOCOL_VERSION);
    assert!(msg.contains("v99") && msg.contains(&ours) && msg.contains("x9"), "{msg}");

    tracing::info!("--- our client reports a peer answering in another version, and does not retry");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(metro_api::pb::internal::internal_server::InternalServer::new(FutureVersionPeer))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut b1 = start_member("b1", dir.path(), 0, None).await;
    let err = b1.q.join(b1.record(), vec![addr.clone()]).await.expect_err("join must fail");
    assert!(!err.is_retryable(), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("v99") && msg.contains(&ours) && msg.contains(&addr), "{msg}");
    assert!(matches!(err, metro_quorum::QuorumError::VersionMismatch(_)), "{err:?}");
    server.abort();
    b1.kill().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_talk_over_mutual_tls_and_a_viewer_certificate_is_refused() {
    let ca = TestCa::new();
    let cn = |id: &str| if id.starts_with('w') { "witness".to_string() } else { format!("node:{id}") };
    let c = Cluster::start_with(&["a1", "b1", "w1"], |id| Some(ca.issue(&cn(id)))).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let r = c.get("w1").q.propose(create_volume("v", &["a1", "b1"], "a1")).await.unwrap();
    assert!(r.is_ok(), "{r:?}");

    tracing::info!("--- a viewer certificate may not call the internal service");
    let viewer = ca.issue("viewer:grafana");
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", c.get("a1").addr))
        .unwrap()
        .tls_config(viewer.tonic_client())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = metro_api::pb::internal::internal_client::InternalClient::new(ch);
    let status = client
        .propose(Payload {
            proto_version: metro_api::PROTOCOL_VERSION,
            from: "grafana".into(),
            data: serde_json::to_vec(&Command::SetPreferredSite { site: None }).unwrap(),
            incarnation: 0,
        })
        .await
        .expect_err("viewer refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(c.get("a1").state().preferred_site.as_deref(), Some("dc-a"), "nothing changed");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_voter_is_replaced_by_a_live_learner_of_the_same_site() {
    let mut c = Cluster::start(&["a1", "b1", "w1", "a2"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    tracing::info!("--- a1 (voter, leader) dies; a2 must take its voter seat");
    c.get_mut("a1").kill().await;
    let b1 = c.get("b1");
    wait_until(Duration::from_secs(15), "voters are a2, b1, w1", || {
        let st = b1.q.status();
        async move { st.voters == ["a2", "b1", "w1"] }
    })
    .await;
    let st = b1.q.status();
    assert!(st.learners.contains(&"a1".to_string()), "the dead voter is kept as a learner: {st:?}");
    assert_eq!(b1.state().sites["dc-a"].mode, metro_quorum::SiteMode::Active, "dc-a still has a live node");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_volumes_fail_over_in_one_batch_entry() {
    let mut c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let create: Vec<Command> =
        (0..1000).map(|i| create_volume(&format!("v{i:04}"), &["a1", "b1"], "b1")).collect();
    let r = c.get("a1").q.propose(Command::Batch(create)).await.unwrap();
    assert!(r.is_ok());
    let before = c.get("a1").q.status().last_applied;
    c.get_mut("b1").kill().await;
    let a1 = c.get("a1");
    let mut rx = a1.q.state();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.volumes.values().all(|v| v.primary.as_deref() == Some("a1") && v.epoch == 2)),
    )
    .await
    .expect("all 1000 volumes fail over")
    .unwrap();
    let entries = a1.q.status().last_applied - before;
    // One batch for the volumes; the rest is the site fencing and the voter change.
    assert!(entries <= 6, "{entries} log entries for the failover");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_moves_to_a_voter_in_the_preferred_site() {
    tracing::info!("--- b1 (dc-b) bootstraps the group; dc-a is preferred");
    let c = Cluster::start(&["b1", "a1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    wait_until(Duration::from_secs(15), "a1 leads", || {
        let l = c.leader();
        async move { l.as_deref() == Some("a1") }
    })
    .await;
    let r = c.get("w1").q.propose(Command::SetPreferredSite { site: Some("dc-a".into()) }).await.unwrap();
    assert!(r.is_ok());
    c.shutdown().await;
}

/// The witness is the small, far-away member: when it wins leadership (here
/// it bootstraps the group, and no site is preferred) it hands leadership to
/// a data-site voter, so heartbeats and lease renewals stay off its WAN link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_witness_leader_hands_leadership_to_a_data_site_without_a_preferred_site() {
    let c = Cluster::start_opts(&["w1", "a1", "b1"], None, |_| None).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    assert_eq!(c.get("w1").state().preferred_site, None);
    wait_until(Duration::from_secs(15), "a data-site voter leads", || {
        let l = c.leader();
        async move { l.as_deref().is_some_and(|l| l.starts_with('a') || l.starts_with('b')) }
    })
    .await;
    let leader = c.leader().unwrap();
    tracing::info!(%leader, "--- leadership left the witness; it stays in the data site");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.leader().as_deref(), Some(leader.as_str()), "no ping-pong between data sites");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_on_a_new_address_is_reached_there_after_it_rejoins() {
    let mut c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let dir = c.get("b1").dir.clone();
    c.get_mut("b1").kill().await;

    tracing::info!("--- b1 comes back on another port and re-registers");
    let m = start_member("b1", &dir, 0, None).await;
    m.q.join(m.record(), vec![c.get("a1").addr.clone()]).await.unwrap();
    m.heartbeat_as_primary();
    let new_addr = m.addr.clone();
    *c.get_mut("b1") = m;
    let r = c.get("a1").q.propose(create_volume("moved", &["a1", "b1"], "a1")).await.unwrap();
    assert!(r.is_ok());
    let b1 = c.get("b1");
    wait_until(Duration::from_secs(10), "b1 at its new address sees new commands", || {
        let has = b1.state().volumes.contains_key("moved");
        async move { has }
    })
    .await;
    assert_eq!(b1.state().nodes["b1"].api, new_addr);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joining_after_log_compaction_catches_up_from_a_snapshot() {
    let mut c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    for i in 0..20 {
        let r = c.get("a1").q.propose(create_volume(&format!("v{i}"), &["a1", "b1"], "a1")).await.unwrap();
        assert!(r.is_ok());
    }
    tracing::info!("--- the leader compacts its log; a2 joins and must get a snapshot");
    c.get("a1").q.compact_log().await.unwrap();
    let m = start_member("a2", &c._root.path().join("a2"), 0, None).await;
    m.q.join(m.record(), vec![c.get("b1").addr.clone()]).await.unwrap();
    m.heartbeat_as_primary();
    let a2_state = m.state();
    assert_eq!(a2_state.volumes.len(), 20);
    assert!(m.dir.join("raft/snapshot").exists(), "a2 installed a snapshot rather than replaying the log");
    assert_eq!(*a2_state, *c.get("a1").state());
    c.members.push(m);
    let r = c.get("a2").q.propose(create_volume("after", &["a2", "b1"], "a2")).await.unwrap();
    assert!(r.is_ok());
    c.shutdown().await;
}

/// A node that registers long after the leader took over (its etcd came up
/// late, or it is added to a running cluster) is judged from when the leader
/// first saw it, not from the start of the leadership: its site is not
/// fenced before it could send a heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_whose_first_node_registers_late_is_not_fenced_on_arrival() {
    let mut c = Cluster::start(&["a1", "w1"]).await;
    c.wait_voters(&["a1", "w1"]).await;
    let wait = Duration::from_millis(timings().node_loss_ms * 3);
    tracing::info!(?wait, "--- the leader runs alone with the witness for a while");
    tokio::time::sleep(wait).await;

    tracing::info!("--- b1, the first node of dc-b, registers");
    let m = start_member("b1", &c._root.path().join("b1"), 0, None).await;
    m.q.join(m.record(), vec![c.get("a1").addr.clone()]).await.expect("join");
    let a1 = c.get("a1");
    wait_until(Duration::from_secs(10), "a1 knows b1", || {
        let known = a1.state().nodes.contains_key("b1");
        async move { known }
    })
    .await;
    // Its first heartbeat comes late (here: not before half the loss window).
    let fenced = |a1: &Member| a1.state().sites["dc-b"].mode != metro_quorum::SiteMode::Active;
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(timings().node_loss_ms / 2);
    while tokio::time::Instant::now() < quiet_until {
        assert!(!fenced(a1), "dc-b fenced before its node could heartbeat");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    m.heartbeat_as_primary();
    c.members.push(m);
    let a1 = c.get("a1");
    let until = tokio::time::Instant::now() + Duration::from_millis(timings().node_loss_ms * 3);
    while tokio::time::Instant::now() < until {
        assert!(!fenced(a1), "dc-b fenced although b1 heartbeats");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.wait_voters(&["a1", "b1", "w1"]).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_site_is_fenced_and_returns_to_active_only_after_it_stayed_reachable() {
    let mut c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let (dir, port) = {
        let b1 = c.get("b1");
        (b1.dir.clone(), b1.addr.rsplit(':').next().unwrap().parse::<u16>().unwrap())
    };
    tracing::info!("--- dc-b is lost: fenced, and the voters shrink to a1 + w1");
    c.get_mut("b1").kill().await;
    let a1 = c.get("a1");
    let mut rx = a1.q.state();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.sites["dc-b"].mode == metro_quorum::SiteMode::Fenced),
    )
    .await
    .expect("dc-b fenced")
    .unwrap();
    wait_until(Duration::from_secs(10), "voters shrink to a1, w1", || {
        let v = a1.q.status().voters;
        async move { v == ["a1", "w1"] }
    })
    .await;

    tracing::info!(
        "--- dc-b returns; it stays fenced for site_stable_ms, then is active with its voter back"
    );
    let m = start_member("b1", &dir, port, None).await;
    m.heartbeat_as_primary();
    let back_at = tokio::time::Instant::now();
    *c.get_mut("b1") = m;
    let a1 = c.get("a1");
    tokio::time::sleep(Duration::from_millis(timings().site_stable_ms / 2)).await;
    assert_eq!(a1.state().sites["dc-b"].mode, metro_quorum::SiteMode::Fenced, "hysteresis");
    let mut rx = a1.q.state();
    tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.sites["dc-b"].mode == metro_quorum::SiteMode::Active),
    )
    .await
    .expect("dc-b active again")
    .unwrap();
    assert!(back_at.elapsed() >= Duration::from_millis(timings().site_stable_ms));
    c.wait_voters(&["a1", "b1", "w1"]).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_measures_a_round_trip_to_every_member_and_followers_report_none() {
    let c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let leader = c.leader().expect("a leader");
    let l = c.get(&leader);
    for peer in ["a1", "b1", "w1"].into_iter().filter(|p| *p != leader) {
        wait_until(Duration::from_secs(10), &format!("an RTT sample for {peer}"), || {
            let r = l.q.peer_rtt(peer);
            async move { r.is_some() }
        })
        .await;
        let r = l.q.peer_rtt(peer).expect("sampled");
        assert!(r.smoothed_us > 0 && r.last_us > 0 && r.samples >= 1, "{peer}: {r:?}");
    }
    assert!(l.q.peer_rtt(&leader).is_none(), "no RTT to itself");
    assert!(l.q.peer_rtt("nobody").is_none(), "no RTT to an unknown node");
    let follower = ["a1", "b1", "w1"].into_iter().find(|p| *p != leader).expect("a follower");
    assert!(c.get(follower).q.peer_rtt("w1").is_none(), "only the leader measures");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_cluster_config_sets_the_preferred_site_and_the_node_loss_threshold() {
    let c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let mut cfg = metro_quorum::ClusterConfig::seed(&timings());
    cfg.generation = 2;
    cfg.preferred_site = Some("dc-b".into());
    cfg.node_loss_ms = 4_000;
    let r = c.get("w1").q.propose(Command::SetClusterConfig(cfg.clone())).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    for m in &c.members {
        wait_until(Duration::from_secs(5), &format!("{} applied the config", m.id), || {
            let s = m.state();
            async move { s.config.as_ref().is_some_and(|c| c.generation == 2) }
        })
        .await;
        assert_eq!(m.state().preferred_site.as_deref(), Some("dc-b"));
        assert_eq!(m.q.node_loss_ms(), 4_000, "{}: the committed threshold wins over [quorum]", m.id);
    }
    tracing::info!("--- an older generation is refused");
    cfg.generation = 1;
    let r = c.get("a1").q.propose(Command::SetClusterConfig(cfg)).await.unwrap();
    assert!(!r.is_ok(), "{r:?}");
    wait_until(Duration::from_secs(30), "the leadership moves to dc-b", || {
        let l = c.leader();
        async move { l.as_deref() == Some("b1") }
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_another_lease_period_is_refused_naming_both_values() {
    let c = Cluster::start(&["a1", "b1", "w1"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    let committed = c.get("a1").state().lease_timings.expect("the first member committed its timings");
    assert_eq!(
        (committed.lease_ms, committed.drift_margin_ms),
        (timings().lease_ms, timings().drift_margin_ms)
    );

    tracing::info!("--- b2 runs with a longer lease than the cluster's leaders wait for");
    let dir = tempfile::tempdir().unwrap();
    let longer = QuorumConfig { lease_ms: timings().lease_ms * 3, ..timings() };
    let b2 = start_member_with("b2", dir.path(), 0, None, longer).await;
    let err = b2.q.join(b2.record(), vec![c.get("a1").addr.clone()]).await.expect_err("join must be refused");
    assert!(!err.is_retryable(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("lease_ms = 3000") && msg.contains("lease_ms = 1000") && msg.contains("[quorum]"),
        "{msg}"
    );
    assert!(!c.get("a1").state().nodes.contains_key("b2"), "the refused member was registered");
    c.shutdown().await;
}
