//! The failure matrix of DESIGN.md §5, with real processes in the lab
//! topology. Every scenario runs oracle writers (libnbd) and checks after the
//! fault: no acknowledged write is missing on the survivors (RPO 0), no two
//! primaries acknowledged writes for the volume (split brain), and after
//! healing every in-sync replica holds identical data.

use metro_tests::lab::{assert_single_primary, max_gap, primary_of, wait_rejoined_identical, Lab};
use std::time::Duration;

const FAILOVER_DEADLINE: Duration = Duration::from_secs(45);
const REJOIN_DEADLINE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn acked_writes_survive_the_loss_of_the_primary_site() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("site-loss").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let (primary, old_uri) = primary_of(&lab, "v")?;
    assert!(primary.starts_with('a'), "primary placed in dc-a, got {primary}");

    tracing::info!("--- writers: one follows the primary, one is pinned to the old primary");
    let follower = lab.writer("v", "follow", 0, 14.0, None);
    let pinned = lab.writer("v", "pinned", 8192, 14.0, Some(&old_uri));
    tokio::time::sleep(Duration::from_secs(3)).await;

    tracing::info!("--- kill -9 every process of dc-a");
    lab.kill_site("dc-a")?;
    let rto = lab
        .wait_for("a dc-b primary", FAILOVER_DEADLINE, |l| Ok(primary_of(l, "v")?.0.starts_with('b')))
        .await?;
    tracing::info!(?rto, "failed over");
    let follow_acks = follower.finish()?;
    let pinned_acks = pinned.finish()?;
    let (new_primary, new_uri) = primary_of(&lab, "v")?;
    assert!(
        follow_acks.iter().any(|a| a.uri == new_uri),
        "the follower wrote on the new primary {new_primary}"
    );

    tracing::info!("--- RPO 0 and one primary at a time");
    lab.verify(&new_uri, &[&lab.dir.join("acks-follow.jsonl"), &lab.dir.join("acks-pinned.jsonl")])?;
    assert_single_primary(&[&follow_acks, &pinned_acks])?;

    tracing::info!("--- dc-a returns: automatic resync and rejoin, identical replicas");
    lab.start_site("dc-a").await?;
    wait_rejoined_identical(&lab, "v", REJOIN_DEADLINE).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_one_storage_node_fails_its_volumes_over() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("node-loss").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let (primary, _) = primary_of(&lab, "v")?;
    let writer = lab.writer("v", "follow", 0, 12.0, None);
    tokio::time::sleep(Duration::from_secs(2)).await;

    tracing::info!("--- kill -9 the primary node only");
    lab.kill_node(&primary)?;
    lab.wait_for("a new primary", FAILOVER_DEADLINE, |l| Ok(primary_of(l, "v")?.0 != primary)).await?;
    let acks = writer.finish()?;
    let (_, uri) = primary_of(&lab, "v")?;
    lab.verify(&uri, &[&lab.dir.join("acks-follow.jsonl")])?;
    assert_single_primary(&[&acks])?;

    tracing::info!("--- the node restarts and rejoins by itself");
    lab.start_node(&primary).await?;
    wait_rejoined_identical(&lab, "v", REJOIN_DEADLINE).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_the_witness_does_not_interrupt_io_and_raises_an_alert() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("witness-loss").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB"])?;
    let (primary, _) = primary_of(&lab, "v")?;
    let writer = lab.writer("v", "follow", 0, 8.0, None);
    tokio::time::sleep(Duration::from_secs(2)).await;

    tracing::info!("--- kill the witness site");
    lab.kill_site("witness")?;
    lab.wait_for("a witness alert", Duration::from_secs(20), |l| {
        let s = l.status()?;
        Ok(s["alerts"].to_string().contains("witness") && s["witness"]["reachable"] == false)
    })
    .await?;
    let acks = writer.finish()?;
    let gap = max_gap(&acks);
    assert_eq!(primary_of(&lab, "v")?.0, primary, "no failover on witness loss");
    assert!(gap < Duration::from_secs(2), "I/O paused for {gap:?} on witness loss");
    assert!(acks.iter().all(|a| a.uri == acks[0].uri), "no reconnects were needed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cut_between_the_data_sites_keeps_the_preferred_site_and_fences_the_other() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("dc-cut").await?;
    // Primary in the non-preferred site, so the cut forces a failover.
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-b"])?;
    let (primary, old_uri) = primary_of(&lab, "v")?;
    assert!(primary.starts_with('b'));
    let follower = lab.writer("v", "follow", 0, 16.0, None);
    let pinned = lab.writer("v", "pinned", 8192, 16.0, Some(&old_uri));
    tokio::time::sleep(Duration::from_secs(2)).await;

    tracing::info!("--- cut dc-a from dc-b; the witness sees both");
    lab.partition("dc-a", "dc-b")?;
    lab.wait_for("the primary in dc-a", FAILOVER_DEADLINE, |l| Ok(primary_of(l, "v")?.0.starts_with('a')))
        .await?;
    let follow_acks = follower.finish()?;
    let pinned_acks = pinned.finish()?;
    let (_, new_uri) = primary_of(&lab, "v")?;
    lab.verify(&new_uri, &[&lab.dir.join("acks-follow.jsonl"), &lab.dir.join("acks-pinned.jsonl")])?;
    assert_single_primary(&[&follow_acks, &pinned_acks])?;

    tracing::info!("--- heal: dc-b resyncs and rejoins");
    lab.heal()?;
    wait_rejoined_identical(&lab, "v", REJOIN_DEADLINE).await?;
    Ok(())
}
