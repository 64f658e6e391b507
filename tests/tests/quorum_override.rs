//! The quorum-loss operator override with real processes (DESIGN.md §4.5,
//! §5 "witness lost, then dc-a lost"): `metroctl site activate dc-b` rebuilds
//! the quorum group on dc-b and resumes I/O there with RPO 0 and one primary
//! at a time; the returning dc-a nodes and witness rejoin on their own and the
//! replicas end identical. And the refusal: a volume whose latest in_sync has
//! no dc-b replica blocks the override unless `--force`.
//!
//! `cargo build --workspace --bins && METRO_LAB_OCTET=101 cargo test -p metro-tests --test quorum_override -- --test-threads=1`

use metro_tests::lab::{assert_single_primary, primary_of, strings, Ack, Lab};
use std::time::Duration;

const FAILOVER_DEADLINE: Duration = Duration::from_secs(60);
const REJOIN_DEADLINE: Duration = Duration::from_secs(150);

fn now_s() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn site_of(lab: &Lab, node: &str) -> String {
    lab.info.daemon(node).map(|d| d.site.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn site_activate_without_a_quorum_resumes_io_on_dc_b_and_the_old_members_rejoin() -> anyhow::Result<()>
{
    metro_tests::lab::init_tracing();
    let lab = Lab::up("ov-activate").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let writer = lab.writer("v", "follow", 0, 80.0, None);
    tokio::time::sleep(Duration::from_secs(3)).await;

    tracing::info!("--- witness lost, then dc-a lost: no quorum, I/O suspended");
    lab.kill_site("witness")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = now_s();
    lab.kill_site("dc-a")?;
    tokio::time::sleep(Duration::from_secs(8)).await;

    tracing::info!("--- site activate dc-b: the override");
    let activate_at = now_s();
    let out = lab.ctl(&["site", "activate", "dc-b"])?;
    tracing::info!(%out, "site activate dc-b");
    assert!(out.contains("site dc-b is active") && out.contains("rebuilt the quorum group"), "{out}");
    lab.wait_for("a dc-b primary serving v", FAILOVER_DEADLINE, |l| {
        let (p, _) = primary_of(l, "v")?;
        Ok(!p.is_empty() && site_of(l, &p) == "dc-b")
    })
    .await?;
    let s = lab.status()?;
    let dca = s["sites"].as_array().into_iter().flatten().find(|x| x["name"] == "dc-a").cloned();
    assert_eq!(dca.map(|x| x["state"].clone()), Some(serde_json::json!("fenced")), "{s}");
    let promoted_at = now_s();
    tracing::info!(rto_s = promoted_at - activate_at, "I/O resumed on dc-b after the override");
    tokio::time::sleep(Duration::from_secs(5)).await;

    tracing::info!("--- the witness and dc-a return: they rejoin the rebuilt group on their own");
    lab.start_site("witness").await?;
    lab.start_site("dc-a").await?;
    lab.wait_for("every node a member of the rebuilt group", REJOIN_DEADLINE, |l| {
        let s = l.status()?;
        let mut members = strings(&s["voters"]);
        members.extend(strings(&s["learners"]));
        Ok(members.len() == 5 && strings(&s["voters"]).contains(&"w1".to_string()))
    })
    .await?;
    lab.wait_for("every replica of v back in sync", REJOIN_DEADLINE, |l| {
        let v = l.volume("v")?;
        Ok(!v["primary"].is_null() && strings(&v["in_sync"]).len() == strings(&v["replicas"]).len())
    })
    .await?;

    let acks = writer.finish()?;
    let during: Vec<&Ack> = acks.iter().filter(|a| a.t > killed_at + 1.0 && a.t < activate_at).collect();
    assert!(
        during.is_empty(),
        "{} writes acknowledged without a quorum, first {:?}",
        during.len(),
        during.first()
    );
    let after = acks.iter().filter(|a| a.t > activate_at).count();
    assert!(after > 0, "I/O resumed after site activate");
    let (_, uri) = primary_of(&lab, "v")?;
    lab.verify(&uri, &[&lab.dir.join("acks-follow.jsonl")])?;
    assert_single_primary(&[&acks])?;
    assert!(lab.replicas_identical("v")?, "replicas differ after the rejoin");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn site_activate_is_refused_when_dc_b_may_lack_writes_and_accepted_with_force() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("ov-refuse").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let writer = lab.writer("v", "follow", 0, 40.0, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let v = lab.volume("v")?;
    let b_rep = strings(&v["replicas"])
        .into_iter()
        .find(|n| site_of(&lab, n) == "dc-b")
        .ok_or_else(|| anyhow::anyhow!("no dc-b replica: {v}"))?;

    tracing::info!(%b_rep, "--- the dc-b replica dies: the primary drops it from in_sync and goes on");
    lab.kill_node(&b_rep)?;
    lab.wait_for("v's in_sync without the dc-b replica, and a dc-b voter alive", FAILOVER_DEADLINE, |l| {
        let v = l.volume("v")?;
        let s = l.status()?;
        // Three voters, one of them in dc-b and not b_rep: the replacement is
        // done (a joint config lists the union, an intermediate one two).
        let voters = strings(&s["voters"]);
        let b_voter = voters.iter().any(|n| *n != b_rep && site_of(l, n) == "dc-b");
        Ok(!strings(&v["in_sync"]).contains(&b_rep)
            && b_voter
            && voters.len() == 3
            && !voters.contains(&b_rep))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    tracing::info!("--- witness lost, then dc-a lost: dc-b holds no in-sync replica of v");
    lab.kill_site("witness")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.kill_site("dc-a")?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let refused = lab.ctl(&["site", "activate", "dc-b"]).expect_err("must be refused without --force");
    let msg = refused.to_string();
    tracing::info!(%msg, "refused");
    assert!(msg.contains("MET-008"), "{msg}");
    assert!(msg.contains("volume v's last in-sync set {") && msg.contains("has no replica in dc-b"), "{msg}");
    assert!(msg.contains("dc-b may lack acknowledged writes") && msg.contains("--force"), "{msg}");
    let acks = writer.finish()?;

    tracing::info!("--- with --force: accepted, v restarts from its dc-b replica");
    let out = lab.ctl(&["site", "activate", "dc-b", "--force"])?;
    tracing::info!(%out, "forced");
    assert!(out.contains("--force: v lost the writes"), "{out}");
    lab.start_node(&b_rep).await?;
    lab.wait_for("v served by its dc-b replica", FAILOVER_DEADLINE, |l| Ok(primary_of(l, "v")?.0 == b_rep))
        .await?;
    let v = lab.volume("v")?;
    assert_eq!(strings(&v["in_sync"]), vec![b_rep.clone()], "{v}");
    let probe = lab.writer("v", "after", 1000, 5.0, None);
    let after = probe.finish()?;
    assert!(!after.is_empty(), "I/O resumed on the forced volume");
    assert_single_primary(&[&acks, &after])?;
    Ok(())
}
