//! Site operations with real processes in the lab (DESIGN.md §4.5, §5 flapping
//! link, planned moves, voter replacement): every scenario runs the libnbd
//! oracle writer and checks RPO 0 (`Lab::verify`), one primary at a time
//! (`assert_single_primary`) and identical replicas after the heal.
//!
//! Measurements (leader election, voter replacement, RTO) are `#[ignore]`d:
//! `METRO_LAB_OCTET=92 cargo test -p metro-tests --test site_ops -- --ignored --nocapture measure`
//! prints one `MEASURE` line per run and a summary (median, max).

use metro_tests::lab::{
    assert_single_primary, max_gap, primary_of, read_acks, strings, wait_fully_in_sync,
    wait_rejoined_identical, Ack, Lab,
};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FAILOVER_DEADLINE: Duration = Duration::from_secs(45);
const REJOIN_DEADLINE: Duration = Duration::from_secs(120);
/// Issue 3: a dead voter is replaced by a learner of its site within this.
const VOTER_REPLACEMENT_DEADLINE: Duration = Duration::from_secs(30);
/// Flapping link: at most this many primary changes over the whole run.
const MAX_FLAP_FAILOVERS: usize = 2;

fn now_s() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// A libnbd client that stays on `uri` and writes (logging each ack like the
/// oracle writer) until the server fails a request; prints the errno.
const PROBE: &str = r#"
import json, struct, hashlib, sys, time, nbd
uri, out, first, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
BS = 4096
def pattern(seq, block):
    head = struct.pack(">QQ", seq, block)
    body = hashlib.sha256(head).digest() * ((BS - 16) // 32 + 1)
    return head + body[: BS - 16]
h = nbd.NBD(); h.connect_uri(uri)
f = open(out, "a", buffering=1)
seq, end, res = first * 1000000, time.time() + seconds, {"errno": None}
while time.time() < end:
    seq += 1
    block = first + seq % 256
    try:
        h.pwrite(pattern(seq, block), block * BS)
    except nbd.Error as e:
        res = {"errno": e.errno, "error": e.string}
        break
    f.write(json.dumps({"seq": seq, "block": block, "t": time.time(), "uri": uri}) + "\n")
# After ESHUTDOWN the server closes the connection: a further request fails.
if res["errno"] is not None:
    try:
        h.pwrite(pattern(seq + 1, first), first * BS)
        res["after"] = "accepted"
    except nbd.Error as e:
        res["after"] = e.string
print(json.dumps(res))
"#;

struct Probe {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl Probe {
    fn start(lab: &Lab, uri: &str, tag: &str, first_block: u64, seconds: u64) -> anyhow::Result<Probe> {
        let out = lab.dir.join(format!("acks-{tag}.jsonl"));
        let child = Command::new("/usr/bin/python3")
            .args(["-c", PROBE, uri])
            .arg(&out)
            .args([first_block.to_string(), seconds.to_string()])
            .stdout(Stdio::piped())
            .spawn()?;
        Ok(Probe { child, out })
    }

    fn finish(self) -> anyhow::Result<(serde_json::Value, Vec<Ack>)> {
        let o = self.child.wait_with_output()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        Ok((v, read_acks(&self.out)?))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn attach_moves_the_primary_and_the_old_client_gets_eshutdown_without_losing_a_write(
) -> anyhow::Result<()> {
    attach_scenario(false).await
}

/// Regression (found by this scenario): a write the old primary had already
/// written locally when the move committed is refused by the new primary
/// (stale epoch) and answered ESHUTDOWN (never acknowledged), but stayed on
/// the old primary's disk. A planned move now takes the old primary out of
/// `in_sync`; it is resynced from its hot extents and rejoins by itself.
#[tokio::test(flavor = "multi_thread")]
async fn a_planned_move_leaves_identical_replicas() -> anyhow::Result<()> {
    attach_scenario(true).await
}

async fn attach_scenario(check_identical: bool) -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("so-attach").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let (old, old_uri) = primary_of(&lab, "v")?;
    let target =
        strings(&lab.volume("v")?["in_sync"]).into_iter().find(|n| *n != old).expect("a second replica");
    let follower = lab.writer("v", "follow", 0, 12.0, None);
    let probe = Probe::start(&lab, &old_uri, "probe", 12_000, 20)?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    tracing::info!(%old, %target, "--- volume attach v --node target");
    let t0 = Instant::now();
    lab.ctl(&["volume", "attach", "v", "--node", &target])?;
    let attach_ms = t0.elapsed().as_millis();
    assert_eq!(primary_of(&lab, "v")?.0, target);
    let (res, probe_acks) = probe.finish()?;
    tracing::info!(%res, attach_ms, probe_acks = probe_acks.len(), "old client");
    // libnbd names the errno ("ESHUTDOWN"); older bindings give the number.
    assert!(
        res["errno"] == "ESHUTDOWN" || res["errno"] == 108,
        "the old primary's client gets ESHUTDOWN: {res}"
    );
    assert_ne!(res["after"], "accepted", "the old primary disconnects after ESHUTDOWN: {res}");
    assert!(!probe_acks.is_empty(), "the old client wrote before the move");
    let acks = follower.finish()?;
    let (_, new_uri) = primary_of(&lab, "v")?;
    assert!(acks.iter().any(|a| a.uri == new_uri), "the follower reconnected to {target}");
    let gap = max_gap(&acks);
    tracing::info!(?gap, "largest pause of the follower during the move");

    tracing::info!("--- RPO 0, one primary, identical replicas");
    lab.verify(&new_uri, &[&lab.dir.join("acks-follow.jsonl"), &probe_acks_path(&lab)])?;
    assert_single_primary(&[&acks, &probe_acks])?;
    wait_fully_in_sync(&lab, "v", REJOIN_DEADLINE).await?;
    if check_identical {
        assert!(lab.replicas_identical("v")?, "replicas differ after a planned move");
    }
    Ok(())
}

fn probe_acks_path(lab: &Lab) -> std::path::PathBuf {
    lab.dir.join("acks-probe.jsonl")
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_moves_every_primary_off_the_node_without_losing_a_write() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("so-drain").await?;
    lab.ctl(&["volume", "create", "v1", "--size", "64MiB", "--site", "dc-a"])?;
    let (node, _) = primary_of(&lab, "v1")?;
    lab.ctl(&["volume", "create", "v2", "--size", "64MiB", "--site", "dc-a"])?;
    // Put v2's primary on the same node when it holds a replica of v2.
    if strings(&lab.volume("v2")?["in_sync"]).contains(&node) {
        lab.ctl(&["volume", "attach", "v2", "--node", &node])?;
    }
    let w1 = lab.writer("v1", "w1", 0, 12.0, None);
    let w2 = lab.writer("v2", "w2", 0, 12.0, None);
    tokio::time::sleep(Duration::from_secs(3)).await;

    tracing::info!(%node, "--- node drain");
    lab.ctl(&["node", "drain", &node])?;
    for v in ["v1", "v2"] {
        let (p, _) = primary_of(&lab, v)?;
        assert!(!p.is_empty() && p != node, "{v} still has primary {p} after draining {node}");
    }
    let a1 = w1.finish()?;
    let a2 = w2.finish()?;
    for (v, acks, tag) in [("v1", &a1, "w1"), ("v2", &a2, "w2")] {
        let (_, uri) = primary_of(&lab, v)?;
        assert!(acks.iter().any(|a| a.uri == uri), "{v}: the writer continued on the new primary");
        lab.verify(&uri, &[&lab.dir.join(format!("acks-{tag}.jsonl"))])?;
        assert_single_primary(&[acks])?;
        wait_rejoined_identical(&lab, v, REJOIN_DEADLINE).await?;
    }
    Ok(())
}

/// Issue 7: SIGTERM on a primary's daemon hands its primaries to in-sync
/// replicas (the `node drain` move) before it exits, so a client sees a
/// pause, not a failover, and no acknowledged write is lost.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_primaries_off_and_a_client_sees_only_a_pause() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("so-sigterm").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let (node, _) = primary_of(&lab, "v")?;
    let d = lab.info.daemon(&node).expect("the primary is a lab daemon").clone();
    let pid = d.proc.pid.expect("running");
    let w = lab.writer("v", "w", 0, 15.0, None);
    lab.wait_for("the writer's first acknowledgements", Duration::from_secs(30), |_| {
        Ok(read_acks(&lab.dir.join("acks-w.jsonl"))?.len() >= 20)
    })
    .await?;

    tracing::info!(%node, pid, "--- SIGTERM the primary");
    let t0 = Instant::now();
    let st = Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    assert!(st.success(), "kill -TERM {pid}");
    lab.wait_for("the daemon to exit", Duration::from_secs(30), |_| {
        Ok(!std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))?.split_whitespace().nth(2) == Some("Z"))
    })
    .await?;
    let stop_ms = t0.elapsed().as_millis();
    let log = std::fs::read_to_string(&d.proc.log)?;
    assert!(
        log.contains("primary handed off"),
        "{node} handed off v before exiting (log {})",
        d.proc.log.display()
    );
    let (new, new_uri) = primary_of(&lab, "v")?;
    assert!(!new.is_empty() && new != node, "v moved off {node}, primary now `{new}`");

    let acks = w.finish()?;
    assert!(acks.iter().any(|a| a.uri == new_uri), "the writer continued on {new}");
    let gap = max_gap(&acks);
    println!("MEASURE sigterm hand-off: {node} -> {new}, daemon exited after {stop_ms} ms, writer's largest pause {} ms", gap.as_millis());
    lab.verify(&new_uri, &[&lab.dir.join("acks-w.jsonl")])?;
    assert_single_primary(&[&acks])?;

    tracing::info!(%node, "--- restart it: it resyncs and rejoins");
    lab.start_node(&node).await?;
    wait_rejoined_identical(&lab, "v", REJOIN_DEADLINE).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flapping_link_causes_a_bounded_number_of_failovers_and_loses_nothing() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("so-flap").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-b"])?;
    let (first, old_uri) = primary_of(&lab, "v")?;
    let cycles = 6;
    let phase = Duration::from_secs(3);
    let seconds = (cycles * 2 * 3 + 6) as f64;
    let follower = lab.writer("v", "follow", 0, seconds, None);
    let pinned = lab.writer("v", "pinned", 8192, seconds, Some(&old_uri));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut history = vec![first.clone()];
    let observe = |lab: &Lab, history: &mut Vec<String>| {
        if let Ok((p, _)) = primary_of(lab, "v") {
            if !p.is_empty() && history.last() != Some(&p) {
                history.push(p);
            }
        }
    };
    for i in 0..cycles {
        tracing::info!(cycle = i, "--- cut dc-a from dc-b");
        lab.partition("dc-a", "dc-b")?;
        let end = Instant::now() + phase;
        while Instant::now() < end {
            observe(&lab, &mut history);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::info!(cycle = i, "--- heal");
        lab.heal()?;
        let end = Instant::now() + phase;
        while Instant::now() < end {
            observe(&lab, &mut history);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let follow_acks = follower.finish()?;
    let pinned_acks = pinned.finish()?;
    observe(&lab, &mut history);
    let failovers = history.len() - 1;
    tracing::info!(?history, failovers, "primary history over the flapping period");
    assert!(failovers <= MAX_FLAP_FAILOVERS, "failover storm: {history:?}");

    tracing::info!("--- after the final heal: RPO 0, one primary, back in sync");
    wait_fully_in_sync(&lab, "v", REJOIN_DEADLINE).await?;
    let (_, uri) = primary_of(&lab, "v")?;
    lab.verify(&uri, &[&lab.dir.join("acks-follow.jsonl"), &lab.dir.join("acks-pinned.jsonl")])?;
    assert_single_primary(&[&follow_acks, &pinned_acks])?;
    assert!(lab.replicas_identical("v")?);
    lab.wait_for("every site active again (after site_stable_ms)", REJOIN_DEADLINE, |l| {
        Ok(l.status()?["sites"].as_array().into_iter().flatten().all(|s| s["state"] == "active"))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_quorum_no_site_acknowledges_writes() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("so-noquorum").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let writer = lab.writer("v", "follow", 0, 40.0, None);
    tokio::time::sleep(Duration::from_secs(3)).await;

    tracing::info!("--- witness lost, then dc-a lost");
    lab.kill_site("witness")?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let killed_at = now_s();
    lab.kill_site("dc-a")?;
    tokio::time::sleep(Duration::from_secs(12)).await;

    tracing::info!("--- no leader, no promotion (the operator override is tests/tests/quorum_override.rs)");
    let v = lab.volume("v")?;
    assert!(v["primary"].as_str().unwrap_or("").starts_with('a'), "nobody was promoted: {v}");

    tracing::info!("--- the witness and dc-a return: the quorum is back, I/O resumes");
    let restart_at = now_s();
    lab.start_site("witness").await?;
    lab.start_site("dc-a").await?;
    lab.wait_for("a primary serving again", FAILOVER_DEADLINE, |l| Ok(!primary_of(l, "v")?.0.is_empty()))
        .await?;
    let acks = writer.finish()?;
    // An ack logged up to 1 s after the kill may be the reply to a request
    // the killed primary answered just before dying.
    let during: Vec<&Ack> = acks.iter().filter(|a| a.t > killed_at + 1.0 && a.t < restart_at).collect();
    assert!(
        during.is_empty(),
        "{} writes acknowledged without a quorum, first {:?}",
        during.len(),
        during.first()
    );
    assert!(acks.iter().any(|a| a.t > restart_at), "I/O resumed once the quorum was back");
    wait_fully_in_sync(&lab, "v", REJOIN_DEADLINE).await?;
    let (_, uri) = primary_of(&lab, "v")?;
    lab.verify(&uri, &[&lab.dir.join("acks-follow.jsonl")])?;
    assert_single_primary(&[&acks])?;
    assert!(lab.replicas_identical("v")?);
    Ok(())
}

fn voters(s: &serde_json::Value) -> Vec<String> {
    strings(&s["voters"])
}

fn site_of(lab: &Lab, node: &str) -> String {
    lab.info.daemon(node).map(|d| d.site.clone()).unwrap_or_default()
}

/// Kill a data-site voter that is not the leader; returns how long until a
/// learner of the same site was a voter in its place.
async fn replace_a_voter(lab: &Lab) -> anyhow::Result<Duration> {
    let s = lab.status()?;
    let victim = voters(&s)
        .into_iter()
        .find(|v| site_of(lab, v).starts_with("dc-") && s["leader"].as_str() != Some(v.as_str()))
        .ok_or_else(|| anyhow::anyhow!("no data-site voter that is not the leader: {s}"))?;
    let site = site_of(lab, &victim);
    tracing::info!(%victim, %site, "--- kill one voter node");
    lab.kill_node(&victim)?;
    let took = lab
        .wait_for("a same-site learner promoted to voter", VOTER_REPLACEMENT_DEADLINE, |l| {
            let v = voters(&l.status()?);
            Ok(!v.contains(&victim) && v.iter().any(|n| site_of(l, n) == site))
        })
        .await?;
    lab.start_node(&victim).await?;
    Ok(took)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_voter_is_replaced_by_a_learner_of_its_site_within_30s() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("so-voter").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-b"])?;
    let writer = lab.writer("v", "follow", 0, 10.0, None);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let took = replace_a_voter(&lab).await?;
    tracing::info!(?took, "voter replaced");
    assert!(took <= VOTER_REPLACEMENT_DEADLINE);
    let s = lab.status()?;
    assert_eq!(voters(&s).len(), 3, "back to one voter per data site plus the witness: {s}");
    let acks = writer.finish()?;
    wait_fully_in_sync(&lab, "v", REJOIN_DEADLINE).await?;
    let (_, uri) = primary_of(&lab, "v")?;
    lab.verify(&uri, &[&lab.dir.join("acks-follow.jsonl")])?;
    assert_single_primary(&[&acks])?;
    assert!(lab.replicas_identical("v")?);
    Ok(())
}

fn runs() -> usize {
    std::env::var("METRO_MEASURE_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

fn summary(what: &str, mut ms: Vec<u128>) {
    ms.sort_unstable();
    let median = ms.get(ms.len() / 2).copied().unwrap_or(0);
    let max = ms.last().copied().unwrap_or(0);
    println!("MEASURE {what}: runs={} median_ms={median} max_ms={max} all={ms:?}", ms.len());
}

/// Wait until the cluster is back to its healthy shape: a dc-a leader, three
/// voters, every node reachable.
async fn wait_healthy(lab: &Lab) -> anyhow::Result<()> {
    lab.wait_for("a healthy cluster led from dc-a", Duration::from_secs(90), |l| {
        let s = l.status()?;
        let all_up = s["nodes"].as_array().into_iter().flatten().all(|n| n["reachable"] == true);
        let leader = s["leader"].as_str().unwrap_or("");
        if all_up && voters(&s).len() == 3 && site_of(l, leader) == "dc-a" {
            return Ok(true);
        }
        anyhow::bail!("not yet: leader {leader}, voters {:?}, nodes {}", voters(&s), s["nodes"])
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_leader_election_and_voter_replacement() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("so-measure-raft").await?;
    let (mut election, mut replacement) = (Vec::new(), Vec::new());
    for i in 0..runs() {
        wait_healthy(&lab).await?;
        let leader = lab.status()?["leader"].as_str().unwrap_or("").to_string();
        lab.kill_node(&leader)?;
        let took = lab
            .wait_for("a new leader", Duration::from_secs(30), |l| {
                let s = l.status()?;
                Ok(s["leader"].as_str().is_some_and(|n| n != leader))
            })
            .await?;
        println!("MEASURE run {i}: leader {leader} killed, new leader after {} ms", took.as_millis());
        election.push(took.as_millis());
        lab.start_node(&leader).await?;
        wait_healthy(&lab).await?;
        let took = replace_a_voter(&lab).await?;
        println!("MEASURE run {i}: voter replaced after {} ms", took.as_millis());
        replacement.push(took.as_millis());
    }
    summary("leader_election", election);
    summary("voter_replacement", replacement);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement: run with --ignored --nocapture"]
async fn measure_rto_of_losing_the_site_with_the_leader_and_the_primary() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("so-measure-rto").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let (mut state_rto, mut io_rto) = (Vec::new(), Vec::new());
    for i in 0..runs().min(5) {
        wait_healthy(&lab).await?;
        wait_fully_in_sync(&lab, "v", REJOIN_DEADLINE).await?;
        let (p, _) = primary_of(&lab, "v")?;
        if !p.starts_with('a') {
            let a = strings(&lab.volume("v")?["in_sync"]).into_iter().find(|n| n.starts_with('a'));
            lab.ctl(&["volume", "attach", "v", "--node", &a.expect("a dc-a replica")])?;
        }
        let tag = format!("rto{i}");
        let writer = lab.writer("v", &tag, 0, 14.0, None);
        tokio::time::sleep(Duration::from_secs(3)).await;
        lab.kill_site("dc-a")?;
        let took = lab
            .wait_for("a dc-b primary", FAILOVER_DEADLINE, |l| Ok(primary_of(l, "v")?.0.starts_with('b')))
            .await?;
        let acks = writer.finish()?;
        let gap = max_gap(&acks);
        println!(
            "MEASURE run {i}: primary in dc-b after {} ms; writer paused {} ms",
            took.as_millis(),
            gap.as_millis()
        );
        state_rto.push(took.as_millis());
        io_rto.push(gap.as_millis());
        let (_, uri) = primary_of(&lab, "v")?;
        lab.verify(&uri, &[&lab.dir.join(format!("acks-{tag}.jsonl"))])?;
        assert_single_primary(&[&acks])?;
        lab.start_site("dc-a").await?;
    }
    summary("rto_state", state_rto);
    summary("rto_io_pause", io_rto);
    Ok(())
}
