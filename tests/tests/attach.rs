//! Issue 13: applications keep running across failovers through the attach
//! agent (`metro-attach`), with real processes and a real NBD client
//! (libnbd, through the oracle writer) that connects only to the agent's
//! unix socket and never reconnects on its own: a request that fails or
//! takes longer than the hold counts as an error, and there must be none.
//!
//! Every phase ends with the oracle: every acknowledged write is readable
//! through the agent and from the primary directly, and once I/O stops the
//! in-sync replicas are identical.

use anyhow::Context;
use metro_tests::lab::{max_gap, primary_of, wait_rejoined_identical, Attach, Lab, WriterOpts};
use std::path::PathBuf;
use std::time::Duration;

const FAILOVER_DEADLINE: Duration = Duration::from_secs(45);
const REJOIN_DEADLINE: Duration = Duration::from_secs(90);
/// Longer than any failover: the writer's own timeout must never fire; the
/// agent's hold (120 s) is what bounds a request.
const APP_TIMEOUT: f64 = 100.0;

/// A writer through the agent only, that never gives up on a request.
fn app<'a>(uri: &'a str, first_block: u64, seconds: f64) -> WriterOpts<'a> {
    WriterOpts { first_block, blocks: 1024, seconds, pin: Some(uri), flush_every: 16, timeout: APP_TIMEOUT }
}

/// Run a writer through the agent for `seconds`, apply `fault` after
/// `after`, and require zero errors and writes acknowledged after the fault.
async fn phase<F>(lab: &Lab, agent: &Attach, tag: &str, first_block: u64, fault: F) -> anyhow::Result<PathBuf>
where
    F: AsyncFnOnce(&Lab) -> anyhow::Result<()>,
{
    let uri = agent.uri("v");
    let w = lab.writer_with("v", tag, app(&uri, first_block, 12.0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    tracing::info!(tag, "--- fault");
    fault(lab).await?;
    let (acks, errors) = w.finish_counting_errors()?;
    let after = acks.iter().filter(|a| a.t > at + 0.5).count();
    tracing::info!(tag, acks = acks.len(), after, errors, longest_stall = ?max_gap(&acks), "application writes through the agent");
    anyhow::ensure!(
        errors == 0,
        "{tag}: the application saw {errors} failed or timed-out requests through the agent\n{}",
        agent.log_text()
    );
    anyhow::ensure!(
        after > 50,
        "{tag}: only {after} writes were acknowledged after the fault\n{}",
        agent.log_text()
    );
    Ok(lab.dir.join(format!("acks-{tag}.jsonl")))
}

fn daemon_pid(lab: &Lab, id: &str) -> anyhow::Result<u32> {
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(lab.dir.join("lab.json"))?)?;
    info["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == id)
        .and_then(|n| n["pid"].as_u64())
        .map(|p| p as u32)
        .with_context(|| format!("no running {id} in lab.json"))
}

async fn wait_primary(lab: &Lab, what: &str, f: impl Fn(&str) -> bool) -> anyhow::Result<String> {
    lab.wait_for(what, FAILOVER_DEADLINE, |l| Ok(f(&primary_of(l, "v")?.0))).await?;
    Ok(primary_of(lab, "v")?.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_writing_through_the_agent_sees_no_error_across_every_kind_of_failover(
) -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("attach").await?;
    lab.ctl(&["volume", "create", "v", "--size", "64MiB", "--site", "dc-a"])?;
    let agent = lab.attach("v").await?;
    let mut logs = Vec::new();

    logs.push(
        phase(&lab, &agent, "site-kill", 0, async |l: &Lab| {
            l.kill_site("dc-a")?;
            let p = wait_primary(l, "a dc-b primary", |p| p.starts_with('b')).await?;
            tracing::info!(primary = p, "failed over");
            Ok(())
        })
        .await?,
    );

    tracing::info!("--- dc-a returns and rejoins");
    lab.start_site("dc-a").await?;
    wait_rejoined_identical(&lab, "v", REJOIN_DEADLINE).await?;

    logs.push(
        phase(&lab, &agent, "move-back", 1024, async |l: &Lab| {
            l.ctl(&["volume", "attach", "v", "--node", "a1"])?;
            wait_primary(l, "a1 primary", |p| p == "a1").await?;
            Ok(())
        })
        .await?,
    );

    logs.push(
        phase(&lab, &agent, "drain", 2048, async |l: &Lab| {
            l.ctl(&["node", "drain", "a1"])?;
            let p = wait_primary(l, "a primary other than a1", |p| !p.is_empty() && p != "a1").await?;
            tracing::info!(primary = p, "drained");
            Ok(())
        })
        .await?,
    );

    let before_term = primary_of(&lab, "v")?.0;
    logs.push(
        phase(&lab, &agent, "sigterm", 3072, async |l: &Lab| {
            let pid = daemon_pid(l, &before_term)?;
            tracing::info!(node = before_term, pid, "SIGTERM the primary's daemon");
            let st = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
            anyhow::ensure!(st.success(), "kill -TERM {pid}");
            wait_primary(l, "a new primary after the hand-off", |p| !p.is_empty() && p != before_term)
                .await?;
            Ok(())
        })
        .await?,
    );
    lab.start_node(&before_term).await?;

    tracing::info!("--- the oracle, through the agent and directly");
    let logs: Vec<&std::path::Path> = logs.iter().map(PathBuf::as_path).collect();
    let report = lab.verify(&agent.uri("v"), &logs)?;
    tracing::info!(%report, "every acknowledged write reads back through the agent");
    let (_, direct) = primary_of(&lab, "v")?;
    lab.verify(&direct, &logs)?;
    wait_rejoined_identical(&lab, "v", REJOIN_DEADLINE).await?;
    Ok(())
}

/// fio with `--verify` through the agent, not time-based (so the verify
/// phase really runs), across the loss of the primary's site; then bad
/// input; then the agent itself is killed: its clients see errors, nothing
/// acknowledged is lost, and a restarted agent serves again.
#[tokio::test(flavor = "multi_thread")]
async fn fio_verifies_through_the_agent_across_a_site_loss_and_the_agent_refuses_bad_input(
) -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("attach-fio").await?;
    lab.ctl(&["volume", "create", "v", "--size", "128MiB", "--site", "dc-a"])?;

    tracing::info!("--- bad input: an unknown volume, a socket path that is a file");
    let e = match lab.attach("nope").await {
        Ok(_) => anyhow::bail!("an agent attached a volume that does not exist"),
        Err(e) => format!("{e:#}"),
    };
    anyhow::ensure!(e.contains("no volume `nope`"), "unclear error for an unknown volume: {e}");
    let file = lab.dir.join("attach").join("v.sock");
    std::fs::write(&file, b"not a socket")?;
    let e = match lab.attach("v").await {
        Ok(_) => anyhow::bail!("an agent replaced a regular file with its socket"),
        Err(e) => format!("{e:#}"),
    };
    anyhow::ensure!(e.contains("not a socket"), "unclear error for a socket path that is a file: {e}");
    anyhow::ensure!(std::fs::read(&file)? == b"not a socket", "the file was touched");
    std::fs::remove_file(&file)?;

    let mut agent = lab.attach("v").await?;
    tracing::info!("--- fio --verify through the agent; dc-a is killed during the write phase");
    let fio = std::process::Command::new("fio")
        .args(["--name=attach", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=96M", "--iodepth=8"])
        .arg(format!("--uri={}", agent.uri("v")))
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("fio is installed (scripts/install-deps)")?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    lab.kill_site("dc-a")?;
    let rto = lab
        .wait_for("a dc-b primary", FAILOVER_DEADLINE, |l| Ok(primary_of(l, "v")?.0.starts_with('b')))
        .await?;
    let out = tokio::task::spawn_blocking(move || fio.wait_with_output()).await??;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "fio failed through the agent: {}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    let report: serde_json::Value =
        serde_json::from_str(&text[text.find('{').context("fio printed no JSON")?..])?;
    let job = &report["jobs"][0];
    let (written, read, errors) =
        (job["write"]["io_bytes"].as_u64(), job["read"]["io_bytes"].as_u64(), job["error"].as_u64());
    tracing::info!(?rto, ?written, ?read, ?errors, "fio through the agent across the site loss");
    anyhow::ensure!(errors == Some(0), "fio reported errors: {job}");
    anyhow::ensure!(written == Some(96 << 20), "fio wrote {written:?} bytes, not 96 MiB");
    anyhow::ensure!(read == Some(96 << 20), "fio's verify phase read {read:?} bytes, not 96 MiB");
    anyhow::ensure!(
        agent.log_text().contains("following the primary again"),
        "the agent never switched primaries"
    );

    tracing::info!("--- the agent is killed under writes: errors, and nothing acknowledged lost");
    let uri = agent.uri("v");
    let w = lab.writer_with(
        "v",
        "agent-kill",
        WriterOpts {
            first_block: 0,
            blocks: 1024,
            seconds: 8.0,
            pin: Some(&uri),
            flush_every: 16,
            timeout: 3.0,
        },
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _agent = lab.attach("v").await?;
    let (acks, errors) = w.finish_counting_errors()?;
    tracing::info!(acks = acks.len(), errors, "writer across the agent's restart");
    anyhow::ensure!(errors > 0, "the writer saw no error although its agent was killed");
    anyhow::ensure!(
        acks.iter().any(|a| a.t > acks[0].t + 4.0),
        "no write was acknowledged after the agent restarted"
    );
    let (_, direct) = primary_of(&lab, "v")?;
    lab.verify(&direct, &[&lab.dir.join("acks-agent-kill.jsonl")])?;
    Ok(())
}
