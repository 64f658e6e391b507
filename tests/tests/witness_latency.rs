//! The witness may be far away (DESIGN.md: 100-200 ms): with 200 ms RTT
//! between the witness site and both data sites, ~30 s of writes must see no
//! false failover (same primary, epoch unchanged) and keep making progress.
//!
//! The delay is the bench's NFQUEUE delayer (`metro_bench::delay`), which
//! works on the root namespace, so this test runs its lab in loopback mode.
//!
//! It also checks the witness RTT the leader measures on its raft heartbeats
//! (`metroctl witness status`, `metro_witness_rtt_seconds`): small and nonzero
//! without the delay, at least 150 ms with it.

use metro_bench::delay::{measure_rtt, Delay};
use metro_tests::lab::{bin_dir, max_gap, Lab};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::Duration;

const WITNESS_RTT_MS: f64 = 200.0;
const WRITE_SECONDS: f64 = 30.0;
/// NFQUEUE number (distinct from the bench's 9000 + octet range).
const QUEUE: u16 = 9400;
/// The reported witness RTT must reflect the injected delay at least this much.
const DELAYED_RTT_US: u64 = 150_000;
/// Without the delay, loopback plus TLS on a loaded 2-core machine stays
/// well below this (it only has to be clearly apart from the delayed case).
const UNDELAYED_RTT_US: u64 = 100_000;

fn witness(lab: &Lab) -> anyhow::Result<Value> {
    lab.ctl_json(&["witness", "status"])
}

/// `metro_witness_rtt_seconds` from the leader's /metrics (plain HTTP).
fn scraped_witness_rtt_s(lab: &Lab) -> anyhow::Result<Option<f64>> {
    let leader = lab.status()?["leader"].as_str().unwrap_or_default().to_string();
    let node = lab.info.nodes.iter().chain(std::iter::once(&lab.info.witness)).find(|n| n.id == leader);
    let Some(node) = node else { anyhow::bail!("no leader in {leader:?}") };
    // lab.json names it as a URL: http://HOST:PORT/metrics
    let hostport = node.metrics.trim_start_matches("http://").split('/').next().unwrap_or_default();
    let mut conn = std::net::TcpStream::connect(hostport)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    conn.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .find_map(|l| l.strip_prefix("metro_witness_rtt_seconds "))
        .and_then(|v| v.trim().parse().ok()))
}

fn site_addr(lab: &Lab, site_octet: u8, host: u8) -> Ipv4Addr {
    let o: Vec<u8> = lab.info.witness.address.split('.').filter_map(|x| x.parse().ok()).collect();
    Ipv4Addr::new(o[0], o[1], site_octet, host)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_200ms_witness_causes_no_false_failover_during_30s_of_writes() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    if std::env::var_os("METRO_LAB_OCTET").is_none() {
        // SAFETY (edition 2021: safe): set before any lab thread reads it.
        std::env::set_var("METRO_LAB_MODE", "loopback");
    }
    let lab = Lab::up("witness-latency").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let before = lab.volume("v")?;
    let (primary, epoch) = (before["primary"].clone(), before["epoch"].clone());
    assert!(primary.as_str().is_some_and(|p| p.starts_with('a')), "primary in dc-a: {primary}");

    // Without the delay: measured, small and nonzero.
    lab.wait_for("a measured witness RTT", Duration::from_secs(30), |l| {
        Ok(witness(l)?["rtt_us"].as_u64().is_some_and(|us| us > 0))
    })
    .await?;
    let w = witness(&lab)?;
    let rtt0 = w["rtt_us"].as_u64().unwrap_or(0);
    tracing::info!(rtt_us = rtt0, last_us = %w["rtt_last_us"], "witness RTT without delay");
    assert!(rtt0 > 0 && rtt0 < UNDELAYED_RTT_US, "small without the delay: {w}");
    assert_eq!(w["rtt_measured_by"], lab.status()?["leader"], "the leader measures it: {w}");

    let net = |s: u8| format!("{}.0/24", site_addr(&lab, s, 0).to_string().trim_end_matches(".0"));
    let delay = Delay::install(&bin_dir(), QUEUE, &[&net(3)], &[&net(1), &net(2)], WITNESS_RTT_MS)?;
    // Checked on the fastest handshake: a busy machine only ever adds time.
    let rtt_a = measure_rtt(site_addr(&lab, 3, 200), site_addr(&lab, 1, 200))?.min_ms;
    let rtt_b = measure_rtt(site_addr(&lab, 3, 200), site_addr(&lab, 2, 200))?.min_ms;
    let rtt_ab = measure_rtt(site_addr(&lab, 1, 200), site_addr(&lab, 2, 200))?.min_ms;
    tracing::info!(rtt_a, rtt_b, rtt_ab, "fastest RTTs with the witness delay in place");
    assert!(
        rtt_a >= WITNESS_RTT_MS * 0.95 && rtt_b >= WITNESS_RTT_MS * 0.95,
        "delay active: {rtt_a} {rtt_b}"
    );
    assert!(rtt_ab < 20.0, "data sites stay close: {rtt_ab} ms");

    let writer = lab.writer("v", "slow-witness", 0, WRITE_SECONDS, None);
    let acks = writer.finish()?;
    let after = lab.volume("v")?;
    // 30 s of 200 ms heartbeats: the smoothed value has long converged.
    let reflected = lab
        .wait_for("the witness RTT to reflect the delay", Duration::from_secs(30), |l| {
            let w = witness(l)?;
            let ok = |k: &str| w[k].as_u64().is_some_and(|us| us >= DELAYED_RTT_US);
            Ok(ok("rtt_us") && ok("rtt_last_us"))
        })
        .await;
    let w = witness(&lab)?;
    let scraped = scraped_witness_rtt_s(&lab);
    tracing::info!(rtt_us = %w["rtt_us"], last_us = %w["rtt_last_us"], ?scraped, "witness RTT with the delay");
    delay.remove()?;
    reflected?;
    let scraped =
        scraped?.ok_or_else(|| anyhow::anyhow!("the leader exports no metro_witness_rtt_seconds"))?;
    assert!(scraped >= DELAYED_RTT_US as f64 / 1e6, "the metric reflects the delay too: {scraped} s");

    assert!(acks.len() > 100, "writes kept flowing: only {} acknowledged", acks.len());
    assert!(acks.iter().all(|a| a.uri == acks[0].uri), "every write went to one primary");
    assert!(max_gap(&acks) < Duration::from_secs(2), "no stall: longest gap {:?}", max_gap(&acks));
    assert_eq!(after["primary"], primary, "no failover");
    assert_eq!(after["epoch"], epoch, "epoch unchanged (no replica dropped, no promotion)");
    Ok(())
}
