//! Cluster config in etcd and the leader's status summary (issue 6): the
//! leader seeds `/metro/<cluster>/config` from its `[quorum]`, `metroctl
//! cluster config set` refuses invalid values naming the key (and viewers),
//! applied changes take effect (default lease policy; a new preferred site
//! moves the leadership there), and `/metro/<cluster>/status` is readable
//! with plain etcdctl.
//!
//! Honours `METRO_LAB_OCTET` (loopback labs side by side).

use metro_tests::lab::{bin_dir, Lab};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

/// Generous bounds for a loaded 2-core machine.
const APPLY_WITHIN: Duration = Duration::from_secs(30);
const HANDOVER_WITHIN: Duration = Duration::from_secs(120);

fn config(lab: &Lab) -> anyhow::Result<Value> {
    lab.ctl_json(&["cluster", "config", "show"])
}

/// `metroctl cluster config set` that must fail; returns its stderr.
fn refused(lab: &Lab, args: &[&str]) -> String {
    let out = Command::new(bin_dir().join("metroctl"))
        .arg("--lab")
        .arg(&lab.dir)
        .args(["cluster", "config", "set"])
        .args(args)
        .output()
        .expect("metroctl runs");
    assert!(!out.status.success(), "`cluster config set {}` must be refused", args.join(" "));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The status summary as an outside observer reads it: plain etcdctl.
fn summary_via_etcdctl(lab: &Lab) -> anyhow::Result<Value> {
    let key = format!("/metro/{}/status", lab.info.cluster);
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", lab.info.etcd_endpoints.join(",")))
        .args(["--command-timeout=5s", "get", &key, "--print-value-only"])
        .output()?;
    anyhow::ensure!(out.status.success(), "etcdctl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(!text.trim().is_empty(), "no summary published yet");
    Ok(serde_json::from_str(text.trim())?)
}

fn site_of<'a>(status: &'a Value, node: &str) -> Option<&'a str> {
    status["nodes"].as_array()?.iter().find(|n| n["id"] == node)?["site"].as_str()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_config_lives_in_etcd_and_the_leader_applies_it_and_publishes_a_summary(
) -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("cluster-config").await?;

    tracing::info!("--- the leader seeds the config from [quorum]");
    lab.wait_for("the seeded config to be applied", APPLY_WITHIN, |l| {
        Ok(config(l)?["applied_generation"].as_u64().unwrap_or(0) >= 1)
    })
    .await?;
    let c = config(&lab)?;
    assert_eq!(c["source"], "etcd", "{c}");
    assert_eq!(c["config"]["preferred_site"], "dc-a", "the lab's [quorum] preferred_site: {c}");
    assert_eq!(c["config"]["default_lease_policy"], "suspend", "{c}");
    assert_eq!(c["config"]["site_stable_ms"], "10000", "{c}");
    let generation = c["generation"].as_u64().expect("generation");

    tracing::info!("--- invalid values are refused, naming the key; nothing changes");
    for (kv, key) in [
        ("voters_per_site=3", "voters_per_site"),
        ("preferred_site=witness", "preferred_site"),
        ("node_loss_ms=100", "node_loss_ms"),
        ("lease_ms=500", "lease_ms"),
        ("colour=red", "colour"),
    ] {
        let e = refused(&lab, &[kv]);
        assert!(e.contains(&format!("cluster config key `{key}`")), "{kv}: {e}");
        assert!(e.contains("next step"), "{kv}: {e}");
    }
    let e = refused(&lab, &["site_stable_ms=20000", "--viewer"]);
    assert!(e.contains("MET-004"), "a viewer may not change the config: {e}");
    assert_eq!(config(&lab)?["generation"].as_u64(), Some(generation), "refusals changed nothing");

    tracing::info!("--- a new default lease policy applies to volumes created without --policy");
    let set =
        lab.ctl_json(&["cluster", "config", "set", "default_lease_policy=error", "site_stable_ms=15000"])?;
    assert_eq!(set["generation"].as_u64(), Some(generation + 1), "{set}");
    assert!(set["applied_generation"].as_u64() >= Some(generation + 1), "set waits until applied: {set}");
    lab.ctl(&["volume", "create", "v", "--size", "16MiB"])?;
    assert_eq!(lab.volume("v")?["lease_policy"], "error");

    tracing::info!("--- the leader publishes the summary to etcd");
    lab.wait_for("a summary with the new config and the volume", APPLY_WITHIN, |l| {
        let s = summary_via_etcdctl(l)?;
        // The summary is rewritten every few seconds; the first one may come
        // before the leader's first RTT sample of the witness.
        Ok(s["config_generation"].as_u64() == Some(generation + 1)
            && s["volumes"]["total"] == 1
            && s["witness"]["rtt_us"].as_u64().is_some_and(|us| us > 0))
    })
    .await?;
    let s = summary_via_etcdctl(&lab)?;
    let status = lab.status()?;
    assert_eq!(s["schema"], 1, "{s}");
    assert_eq!(s["cluster"], lab.info.cluster.as_str());
    assert_eq!(s["leader"], status["leader"], "{s}");
    assert_eq!(s["published_by"], status["leader"], "only the leader publishes: {s}");
    assert_eq!(s["preferred_site"], "dc-a");
    assert_eq!(s["sites"]["dc-b"], "active", "{s}");
    assert_eq!(
        s["volumes"]["serving"].as_u64().unwrap_or(0) + s["volumes"]["degraded"].as_u64().unwrap_or(0),
        1
    );
    assert_eq!(s["nodes"]["total"], 5, "{s}");
    assert!(s["witness"]["rtt_us"].as_u64().is_some_and(|us| us > 0), "the witness RTT is measured: {s}");

    tracing::info!("--- a new preferred site takes the leadership");
    let before = status["leader"].as_str().unwrap_or_default().to_string();
    assert_eq!(site_of(&status, &before), Some("dc-a"), "the lab's leader starts in dc-a: {status}");
    lab.ctl(&["cluster", "config", "set", "preferred_site=dc-b"])?;
    let took = lab
        .wait_for("the leadership to move to dc-b", HANDOVER_WITHIN, |l| {
            let st = l.status()?;
            let leader = st["leader"].as_str().unwrap_or_default();
            Ok(st["preferred_site"] == "dc-b" && site_of(&st, leader) == Some("dc-b"))
        })
        .await?;
    tracing::info!(?took, "leadership moved to the new preferred site");
    lab.wait_for("the summary to name the new preferred site", APPLY_WITHIN, |l| {
        let s = summary_via_etcdctl(l)?;
        Ok(s["preferred_site"] == "dc-b" && s["published_by"] == l.status()?["leader"])
    })
    .await?;
    let v = lab.volume("v")?;
    assert!(v["primary"].is_string(), "the volume kept a primary through the hand-over: {v}");
    Ok(())
}
