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
use metro_tests::lab::{
    max_gap, primary_of, wait_fully_in_sync, wait_rejoined_identical, Attach, Lab, WriterOpts,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Wait until a SIGTERMed daemon has exited (its hand-off and drain take a
/// few seconds), so that restarting it starts a new process.
async fn wait_exited(pid: u32) -> anyhow::Result<()> {
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "pid {pid} still runs 60 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
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
    // The dc-a replica (placement picks one of a1, a2): where the volume moves back to.
    let (home, _) = primary_of(&lab, "v")?;
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
            l.ctl(&["volume", "attach", "v", "--node", &home])?;
            wait_primary(l, "the dc-a replica primary again", |p| p == home).await?;
            Ok(())
        })
        .await?,
    );

    logs.push(
        phase(&lab, &agent, "drain", 2048, async |l: &Lab| {
            l.ctl(&["node", "drain", &home])?;
            let p = wait_primary(l, "another primary", |p| !p.is_empty() && p != home).await?;
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
    wait_exited(daemon_pid(&lab, &before_term)?).await?;
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
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
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

/// MariaDB on ext4 on nbdfuse plus a loop device, all through the agent.
/// Unmounted and stopped on drop, before the lab goes.
struct MariaDb {
    dir: PathBuf,
    fuse: Option<std::process::Child>,
    loopdev: Option<String>,
    mounted: bool,
    server: Option<std::process::Child>,
    socket: PathBuf,
}

fn run(cmd: &mut std::process::Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl MariaDb {
    async fn start(dir: PathBuf, uri: &str) -> anyhow::Result<MariaDb> {
        let (fuse_dir, mnt, run_dir) = (dir.join("fuse"), dir.join("mnt"), dir.join("run"));
        for d in [&fuse_dir, &mnt, &run_dir] {
            std::fs::create_dir_all(d)?;
        }
        let mut db = MariaDb {
            dir,
            fuse: None,
            loopdev: None,
            mounted: false,
            server: None,
            socket: run_dir.join("m.sock"),
        };
        let file = fuse_dir.join("vol");
        db.fuse = Some(
            std::process::Command::new("nbdfuse")
                .arg(&file)
                .arg(uri)
                .stderr(std::fs::File::create(db.dir.join("nbdfuse.log"))?)
                .spawn()
                .context("nbdfuse (libnbd-bin, fuse3)")?,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "nbdfuse did not expose {}",
                file.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let dev = run(std::process::Command::new("losetup").args(["-f", "--show"]).arg(&file))?;
        db.loopdev = Some(dev.clone());
        run(std::process::Command::new("mkfs.ext4").args(["-q", "-F", &dev]))?;
        run(std::process::Command::new("mount").arg(&dev).arg(&mnt))?;
        db.mounted = true;
        let data = mnt.join("data");
        std::fs::create_dir_all(&data)?;
        run(std::process::Command::new("chown").args(["mysql:mysql"]).arg(&data).arg(&run_dir))?;
        tracing::info!("--- mariadb-install-db on the volume");
        run(std::process::Command::new("mariadb-install-db")
            .args(["--no-defaults", "--user=mysql", "--skip-test-db"])
            .arg(format!("--datadir={}", data.display())))?;
        db.server = Some(
            std::process::Command::new("mariadbd")
                .args(["--no-defaults", "--user=mysql", "--skip-networking", "--innodb-buffer-pool-size=32M"])
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--socket={}", db.socket.display()))
                .arg(format!("--log-error={}", db.dir.join("mariadb.err").display()))
                .spawn()
                .context("mariadbd (mariadb-server)")?,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while db.sql("SELECT 1").is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "mariadbd did not start: {}",
                db.error_log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        db.sql(
            "CREATE DATABASE app; CREATE TABLE app.rows (id BIGINT PRIMARY KEY, at DOUBLE) ENGINE=InnoDB",
        )?;
        Ok(db)
    }

    fn sql(&self, q: &str) -> anyhow::Result<String> {
        run(std::process::Command::new("mariadb")
            .args(["--no-defaults", "--batch", "--skip-column-names", "-uroot"])
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-e", q]))
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mariadb.err")).unwrap_or_default()
    }

    /// mariadbd has not exited (crashed or restarted) since it started.
    fn still_running(&mut self) -> bool {
        self.server.as_mut().is_some_and(|s| matches!(s.try_wait(), Ok(None)))
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = std::process::Command::new("kill").args(["-TERM", &s.id().to_string()]).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while matches!(s.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = s.kill();
            let _ = s.wait();
        }
        if self.mounted {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.join("mnt")).status();
        }
        if let Some(d) = self.loopdev.take() {
            let _ = std::process::Command::new("losetup").args(["-d", &d]).status();
        }
        if let Some(mut f) = self.fuse.take() {
            let _ = std::process::Command::new("fusermount3").arg("-uz").arg(self.dir.join("fuse")).status();
            let _ = f.kill();
            let _ = f.wait();
        }
    }
}

/// One committed row at a time, from another thread, until stopped.
struct InsertLoop {
    stop: Arc<AtomicBool>,
    committed: Arc<Mutex<Vec<(u64, Instant)>>>,
    errors: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InsertLoop {
    fn start(socket: PathBuf) -> InsertLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let committed: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let (s, c, e) = (stop.clone(), committed.clone(), errors.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let out = std::process::Command::new("mariadb")
                    .args(["--no-defaults", "--batch", "-uroot"])
                    .arg(format!("--socket={}", socket.display()))
                    .args(["-e", &format!("INSERT INTO app.rows VALUES ({n}, UNIX_TIMESTAMP(NOW(6)))")])
                    .output();
                match out {
                    Ok(o) if o.status.success() => c.lock().unwrap().push((n, Instant::now())),
                    Ok(o) => e
                        .lock()
                        .unwrap()
                        .push(format!("row {n}: {}", String::from_utf8_lossy(&o.stderr).trim())),
                    Err(err) => e.lock().unwrap().push(format!("row {n}: {err}")),
                }
            }
        });
        InsertLoop { stop, committed, errors, thread: Some(thread) }
    }

    fn count(&self) -> usize {
        self.committed.lock().unwrap().len()
    }

    /// The longest gap between two commits since `since`.
    fn longest_stall_since(&self, since: Instant) -> Duration {
        let c = self.committed.lock().unwrap();
        let mut last = since;
        let mut worst = Duration::ZERO;
        for (_, t) in c.iter().filter(|(_, t)| *t >= since) {
            worst = worst.max(t.duration_since(last));
            last = *t;
        }
        worst.max(last.elapsed())
    }

    fn finish(mut self) -> (Vec<u64>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let rows = self.committed.lock().unwrap().iter().map(|(n, _)| *n).collect();
        (rows, self.errors.lock().unwrap().clone())
    }
}

/// Wait until `n` more rows commit after a fault (the database is writing
/// again), then report that fault's longest insert stall.
async fn recovered(
    app: &InsertLoop,
    fault: &str,
    since: Instant,
    stalls: &mut Vec<(String, Duration)>,
) -> anyhow::Result<()> {
    let start = app.count();
    let deadline = Instant::now() + Duration::from_secs(90);
    while app.count() < start + 30 {
        anyhow::ensure!(Instant::now() < deadline, "{fault}: inserts did not resume in 90 s");
        anyhow::ensure!(
            app.errors.lock().unwrap().is_empty(),
            "{fault}: inserts failed: {:?}",
            app.errors.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = app.longest_stall_since(since);
    tracing::info!(fault, longest_insert_stall = ?s, "database writing again");
    stalls.push((fault.to_string(), s));
    Ok(())
}

async fn in_sync(lab: &Lab) -> anyhow::Result<()> {
    match wait_fully_in_sync(lab, "v", REJOIN_DEADLINE).await {
        Ok(_) => Ok(()),
        Err(e) => anyhow::bail!("{e}\n{}", lab.diagnostics()),
    }
}

/// Issue 13's acceptance scenario: MariaDB keeps committing, with zero
/// errors and without a restart, through every kind of failover, and every
/// committed row is there at the end.
#[tokio::test(flavor = "multi_thread")]
async fn mariadb_through_the_agent_commits_through_every_failover_without_an_error() -> anyhow::Result<()> {
    metro_tests::lab::init_tracing();
    let lab = Lab::up("attach-mariadb").await?;
    lab.ctl(&["volume", "create", "v", "--size", "512MiB", "--site", "dc-a"])?;
    let (home, _) = primary_of(&lab, "v")?;
    let agent = lab.attach("v").await?;
    let mut db = MariaDb::start(lab.dir.join("app"), &agent.uri("v")).await?;
    let app = InsertLoop::start(db.socket.clone());
    let mut stalls = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;
    anyhow::ensure!(app.count() > 10, "the insert loop does not commit: {:?}", app.errors.lock().unwrap());

    let t = Instant::now();
    tracing::info!("--- kill -9 the primary's site (dc-a)");
    lab.kill_site("dc-a")?;
    wait_primary(&lab, "a dc-b primary", |p| p.starts_with('b')).await?;
    recovered(&app, "site kill", t, &mut stalls).await?;

    tracing::info!("--- dc-a returns, rejoins, and the volume moves back");
    lab.start_site("dc-a").await?;
    in_sync(&lab).await?;
    let t = Instant::now();
    lab.ctl(&["volume", "attach", "v", "--node", &home])?;
    wait_primary(&lab, "the dc-a replica primary again", |x| x == home).await?;
    recovered(&app, "return and move back", t, &mut stalls).await?;
    in_sync(&lab).await?;

    let t = Instant::now();
    tracing::info!("--- node drain of the primary");
    let p = primary_of(&lab, "v")?.0;
    lab.ctl(&["node", "drain", &p])?;
    wait_primary(&lab, "another primary", |x| !x.is_empty() && x != p).await?;
    recovered(&app, "node drain", t, &mut stalls).await?;
    in_sync(&lab).await?;

    let t = Instant::now();
    let p = primary_of(&lab, "v")?.0;
    tracing::info!(primary = p, "--- SIGTERM the primary's daemon");
    let pid = daemon_pid(&lab, &p)?;
    run(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]))?;
    wait_primary(&lab, "a primary after the hand-off", |x| !x.is_empty() && x != p).await?;
    recovered(&app, "SIGTERM hand-off", t, &mut stalls).await?;
    wait_exited(pid).await?;
    lab.start_node(&p).await?;
    in_sync(&lab).await?;

    let t = Instant::now();
    tracing::info!("--- cut dc-a from dc-b");
    lab.partition("dc-a", "dc-b")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    recovered(&app, "dc-a|dc-b cut", t, &mut stalls).await?;
    lab.heal()?;
    in_sync(&lab).await?;

    let (rows, errors) = app.finish();
    tracing::info!(committed = rows.len(), ?stalls, "insert loop done");
    anyhow::ensure!(errors.is_empty(), "the application saw errors: {errors:?}\n{}", agent.log_text());
    anyhow::ensure!(db.still_running(), "mariadbd exited: {}", db.error_log());
    let present: std::collections::HashSet<u64> =
        db.sql("SELECT id FROM app.rows")?.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let missing: Vec<u64> = rows.iter().filter(|n| !present.contains(n)).copied().collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{} committed rows are missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    tracing::info!(rows = rows.len(), "every committed row is there");
    drop(db);
    tracing::info!("--- I/O stopped: the in-sync replicas must be identical");
    wait_rejoined_identical(&lab, "v", REJOIN_DEADLINE).await?;
    Ok(())
}
