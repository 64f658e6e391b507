//! The quorum-loss override (`Quorum::force_new_group`) and the group
//! incarnation: a dc-b voter rebuilds the group from its own log, the old
//! members are refused, and rejoin as learners once they discard their state.

use crate::support::*;
use metro_quorum::decide::ActivateRefusal;
use metro_quorum::{Command, QuorumError, Restart, SiteMode};
use std::time::Duration;

async fn wait_restart(m: &Member, what: &str) -> Restart {
    let mut rx = m.q.restart_requested();
    let r = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|r| r.is_some()))
        .await
        .unwrap_or_else(|_| panic!("{what}: no restart requested within 30 s"))
        .unwrap()
        .clone();
    r.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_a_dc_b_voter_rebuilds_the_group_and_the_old_voters_rejoin_as_learners() {
    let mut c = Cluster::start(&["a1", "b1", "w1", "b2"]).await;
    c.wait_voters(&["a1", "b1", "w1"]).await;
    for (name, replicas) in [("v", ["a1", "b2"]), ("u", ["a1", "b1"])] {
        let cmd = Command::CreateVolume {
            name: name.into(),
            size_bytes: 1 << 20,
            iops_limit: 0,
            bandwidth_limit: 0,
            lease_policy: metro_quorum::LeasePolicy::Suspend,
            replicas: replicas.iter().map(|r| r.to_string()).collect(),
            primary: "a1".into(),
            nonce: 1,
        };
        assert!(c.get("a1").q.propose(cmd).await.unwrap().is_ok());
    }
    for id in ["b1", "b2"] {
        let m = c.get(id);
        wait_until(Duration::from_secs(20), &format!("{id} sees both volumes"), || {
            let n = m.state().volumes.len();
            async move { n == 2 }
        })
        .await;
    }

    tracing::info!("--- the witness is lost: a1 still answers, so the override is refused");
    c.get_mut("w1").kill().await;
    let err = c.get("b1").q.force_new_group("dc-b", true).await.unwrap_err();
    assert!(
        matches!(&err, QuorumError::Activate(ActivateRefusal::VotersReachable(v)) if v == &vec!["a1".to_string()]),
        "{err:?}"
    );
    assert_eq!(c.get("b1").q.incarnation(), 0, "a refusal changes nothing");

    tracing::info!("--- then dc-a is lost: no leader");
    c.get_mut("a1").kill().await;
    let b1 = c.get("b1");
    wait_until(Duration::from_secs(30), "b1 knows no leader", || {
        let l = b1.q.status().leader;
        async move { l.is_none() }
    })
    .await;

    tracing::info!("--- a learner of dc-b may not rebuild the group: its log may lag");
    let err = c.get("b2").q.force_new_group("dc-b", false).await.unwrap_err();
    assert!(matches!(err, QuorumError::Activate(ActivateRefusal::NotAVoter { .. })), "{err:?}");
    assert!(c.get("b2").q.restart_requested().borrow().is_none(), "a refusal changes nothing");

    tracing::info!("--- b1 (a voter of dc-b) rebuilds the group from its own log");
    let report = c.get("b1").q.force_new_group("dc-b", false).await.unwrap();
    assert_eq!(report.incarnation, 1);
    assert_eq!(report.fenced, vec!["dc-a".to_string()]);
    assert_eq!(report.learners, vec!["b2".to_string()]);
    assert!(report.forced.is_empty());
    assert_eq!(wait_restart(c.get("b1"), "b1").await, Restart::Rebuilt { incarnation: 1 });
    c.get_mut("b1").kill().await;
    restart(&mut c, "b1").await;
    let b1 = c.get("b1");
    assert_eq!(b1.q.incarnation(), 1, "the incarnation is durable");
    wait_until(Duration::from_secs(30), "b1 leads the rebuilt group with dc-a fenced", || {
        let (st, state) = (b1.q.status(), b1.state());
        async move {
            st.is_leader
                && st.voters == vec!["b1".to_string()]
                && state.sites["dc-a"].mode == SiteMode::Fenced
        }
    })
    .await;

    tracing::info!("--- dc-b's in-sync replicas are promoted, epochs bumped; the learner b2 follows");
    wait_until(Duration::from_secs(30), "v on b2 and u on b1", || {
        let s = b1.state();
        let ok = s.volumes["v"].primary.as_deref() == Some("b2")
            && s.volumes["u"].primary.as_deref() == Some("b1")
            && s.volumes["v"].epoch == 2
            && s.volumes["u"].epoch == 2;
        async move { ok }
    })
    .await;
    let b2 = c.get("b2");
    wait_until(Duration::from_secs(20), "b2 adopted incarnation 1 and has the new state", || {
        let ok = b2.q.incarnation() == 1 && b2.state().volumes["v"].primary.as_deref() == Some("b2");
        async move { ok }
    })
    .await;
    assert!(b2.q.restart_requested().borrow().is_none(), "a learner keeps its log");

    tracing::info!("--- a1 and the witness return with the old group's state: refused, they rejoin");
    restart(&mut c, "w1").await;
    restart(&mut c, "a1").await;
    for id in ["a1", "w1"] {
        assert_eq!(wait_restart(c.get(id), id).await, Restart::Rejoin { incarnation: 1 });
    }
    // Whatever the old members did meanwhile, the rebuilt group did not move back.
    let s = c.get("b1").state();
    assert_eq!(s.volumes["v"].primary.as_deref(), Some("b2"));
    assert_eq!(s.volumes["v"].epoch, 2);
    for id in ["a1", "w1"] {
        c.get_mut(id).kill().await;
        let peers = vec![c.get("b1").addr.clone()];
        metro_quorum::discard_raft_state(&c.get(id).dir, 1, &peers).unwrap();
        restart(&mut c, id).await;
        let m = c.get(id);
        assert_eq!(m.q.incarnation(), 1);
        assert_eq!(m.q.rejoin_peers(), peers);
        m.q.join(m.record(), m.q.rejoin_peers()).await.expect("rejoin through b1");
    }
    for id in ["a1", "w1"] {
        let m = c.get(id);
        wait_until(Duration::from_secs(30), &format!("{id} caught up with the rebuilt group"), || {
            let s = m.state();
            let ok = s.volumes.get("v").is_some_and(|v| v.primary.as_deref() == Some("b2") && v.epoch == 2);
            async move { ok }
        })
        .await;
    }
    let b1 = c.get("b1");
    wait_until(Duration::from_secs(20), "the witness is a voter of the rebuilt group again", || {
        let st = b1.q.status();
        async move { st.voters.contains(&"w1".to_string()) && st.leader.as_deref() == Some("b1") }
    })
    .await;
    c.shutdown().await;
}
