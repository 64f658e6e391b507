//! The witness may be far away (DESIGN.md: 100-200 ms): with 200 ms RTT
//! between the witness site and both data sites, ~30 s of writes must see no
//! false failover (same primary, epoch unchanged) and keep making progress.
//!
//! The delay is the bench's NFQUEUE delayer (`metro_bench::delay`), which
//! works on the root namespace, so this test runs its lab in loopback mode.

use metro_bench::delay::{measure_rtt_ms, Delay};
use metro_tests::lab::{bin_dir, max_gap, Lab};
use std::net::Ipv4Addr;
use std::time::Duration;

const WITNESS_RTT_MS: f64 = 200.0;
const WRITE_SECONDS: f64 = 30.0;
/// NFQUEUE number (distinct from the bench's 9000 + octet range).
const QUEUE: u16 = 9400;

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

    let net = |s: u8| format!("{}.0/24", site_addr(&lab, s, 0).to_string().trim_end_matches(".0"));
    let delay = Delay::install(&bin_dir(), QUEUE, &[&net(3)], &[&net(1), &net(2)], WITNESS_RTT_MS)?;
    let rtt_a = measure_rtt_ms(site_addr(&lab, 3, 200), site_addr(&lab, 1, 200))?;
    let rtt_b = measure_rtt_ms(site_addr(&lab, 3, 200), site_addr(&lab, 2, 200))?;
    let rtt_ab = measure_rtt_ms(site_addr(&lab, 1, 200), site_addr(&lab, 2, 200))?;
    tracing::info!(rtt_a, rtt_b, rtt_ab, "measured RTTs with the witness delay in place");
    assert!(
        rtt_a >= WITNESS_RTT_MS * 0.95 && rtt_b >= WITNESS_RTT_MS * 0.95,
        "delay active: {rtt_a} {rtt_b}"
    );
    assert!(rtt_ab < 20.0, "data sites stay close: {rtt_ab} ms");

    let writer = lab.writer("v", "slow-witness", 0, WRITE_SECONDS, None);
    let acks = writer.finish()?;
    let after = lab.volume("v")?;
    delay.remove()?;

    assert!(acks.len() > 100, "writes kept flowing: only {} acknowledged", acks.len());
    assert!(acks.iter().all(|a| a.uri == acks[0].uri), "every write went to one primary");
    assert!(max_gap(&acks) < Duration::from_secs(2), "no stall: longest gap {:?}", max_gap(&acks));
    assert_eq!(after["primary"], primary, "no failover");
    assert_eq!(after["epoch"], epoch, "epoch unchanged (no replica dropped, no promotion)");
    Ok(())
}
