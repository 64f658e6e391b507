//! The data path end to end with real clients: fio (nbd engine, crc32c
//! verify) keeps running across the loss of the secondary replica; the
//! primary drops it from `in_sync` with an epoch bump and tracks what it
//! misses; when it returns, a resync moves only the dirty bytes and the
//! replica is back in sync; the replica then serves every verified block.

use metro_tests::lab::{strings, Lab};
use std::process::Command;
use std::time::Duration;

fn fio(uri: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("timeout")
        .args(["120", "fio", "--name=dp", "--ioengine=nbd", &format!("--uri={uri}")])
        .args(["--bs=4k", "--size=16m", "--randrepeat=1", "--randseed=42", "--verify=crc32c"])
        .args(["--output-format=json", "--verify_state_save=0"])
        .args(args)
        .output()?;
    anyhow::ensure!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find('{').unwrap_or(0)..];
    Ok(serde_json::from_str(json)?)
}

fn primary_log_resync_line(lab: &Lab, node: &str) -> Option<String> {
    let log = lab.info.daemon(node)?.proc.log.clone();
    let text = String::from_utf8_lossy(&std::fs::read(log).ok()?).into_owned();
    text.lines().rev().find(|l| l.contains("resync pass")).map(str::to_string)
}

fn field(line: &str, key: &str) -> Option<u64> {
    // Strip ANSI colour sequences (ESC [ ... m) from the daemon's log line.
    let mut clean = String::new();
    let mut in_escape = false;
    for c in line.chars() {
        match (in_escape, c) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => clean.push(c),
        }
    }
    let i = clean.find(&format!("{key}="))?;
    clean[i + key.len() + 1..]
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn fio_verify_survives_a_replica_loss_and_resync_moves_only_dirty_bytes() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("data-path").await?;
    lab.ctl(&["volume", "create", "v", "--size", "256MiB", "--site", "dc-a"])?;
    let v = lab.volume("v")?;
    let uri = v["nbd"].as_str().unwrap_or_default().to_string();
    let primary = v["primary"].as_str().unwrap_or_default().to_string();
    let replica = strings(&v["replicas"]).into_iter().find(|r| *r != primary).expect("a second replica");
    let epoch0 = v["epoch"].as_u64().unwrap_or(0);

    tracing::info!("--- fio writes 16 MiB and verifies while the replica {replica} is killed");
    let fio_uri = uri.clone();
    let job = tokio::task::spawn_blocking(move || {
        fio(&fio_uri, &["--rw=randwrite", "--iodepth=8", "--rate_iops=600"])
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    lab.kill_node(&replica)?;
    let report = job.await??;
    let errors = report["jobs"][0]["error"].as_i64().unwrap_or(-1);
    assert_eq!(errors, 0, "fio saw an error across the replica loss: {report}");
    let v = lab.volume("v")?;
    assert_eq!(strings(&v["in_sync"]), vec![primary.clone()], "the lost replica left in_sync");
    assert!(v["epoch"].as_u64().unwrap_or(0) > epoch0, "leaving in_sync bumped the epoch");
    let dirty = v["replica_status"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["node"] == replica.as_str())
        .and_then(|r| r["dirty_bytes"].as_u64())
        .unwrap_or(0);
    tracing::info!(dirty, "bytes the replica missed");
    assert!(
        dirty > 0 && dirty <= 32 << 20,
        "dirty bytes {dirty} should cover the written range, not the volume"
    );

    tracing::info!("--- the replica returns and is resynced with only the dirty bytes");
    lab.start_node(&replica).await?;
    lab.wait_for("the replica back in sync", Duration::from_secs(60), |l| {
        Ok(strings(&l.volume("v")?["in_sync"]).len() == 2)
    })
    .await?;
    // The primary logs the pass right after the rejoin commits.
    lab.wait_for("the primary's resync log line", Duration::from_secs(10), |l| {
        Ok(primary_log_resync_line(l, &primary).is_some())
    })
    .await?;
    let line = primary_log_resync_line(&lab, &primary).expect("the primary logged its resync");
    let moved = field(&line, "data_bytes_sent").expect("data_bytes_sent in the resync line");
    let dirty_pass = field(&line, "dirty_bytes").expect("dirty_bytes in the resync line");
    println!("resync: dirty {dirty} B before restart, pass covered {dirty_pass} B, moved {moved} B of a 256 MiB volume");
    assert!(
        moved <= dirty_pass && dirty_pass <= dirty + (8 << 20),
        "resync moved more than the dirty regions: {line}"
    );
    assert!(lab.replicas_identical("v")?, "replicas identical after resync");

    tracing::info!("--- the old primary dies; fio verifies every block on the former replica");
    lab.kill_node(&primary)?;
    lab.wait_for("the replica promoted", Duration::from_secs(45), |l| {
        Ok(l.volume("v")?["primary"] == replica.as_str())
    })
    .await?;
    let new_uri = lab.volume("v")?["nbd"].as_str().unwrap_or_default().to_string();
    let report =
        tokio::task::spawn_blocking(move || fio(&new_uri, &["--rw=randwrite", "--verify_only"])).await??;
    assert_eq!(report["jobs"][0]["error"].as_i64(), Some(0), "verify on the promoted replica: {report}");
    Ok(())
}
