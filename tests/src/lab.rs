//! A real lab (processes, namespaces, etcd) per test, fault
//! injection through the lab's own commands, and the write oracle (a libnbd
//! client in `tests/tools/oracle_writer.py`) with its checks.
//!
//! Lab tests share global names (network namespaces), so [`Lab::up`] holds a
//! process-wide lock for the lab's lifetime; test binaries run one at a time.

use anyhow::{bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

static LAB_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Workspace root (for binaries and tools).
/// `text` without ANSI colour escapes.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Directory holding metro-node, metro-witness and metroctl of this build.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("METRO_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target =
        std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace().join("target"));
    target.join("debug")
}

/// Tear down labs left by a test process that no longer exists (a run
/// stopped by a timeout or a signal never ran its `Drop`): their daemons
/// would hold ports and namespaces and fail every later lab test. A lab's
/// directory is `metro-test-<name>-<pid of the test process>`.
fn reap_orphaned_labs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("metro-test-") else { continue };
        let Some(pid) = rest.rsplit('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        tracing::warn!(dir = %e.path().display(), pid, "reaping a lab whose test process is gone");
        if let Err(err) = metroctl::lab::down(&e.path(), true) {
            tracing::warn!(dir = %e.path().display(), "could not reap: {err}");
        }
    }
}

pub struct Lab {
    pub dir: PathBuf,
    pub info: metroctl::lab::LabInfo,
    _guard: tokio::sync::MutexGuard<'static, ()>,
}

/// One acknowledged write as logged by the oracle writer.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Ack {
    pub seq: u64,
    pub block: u64,
    pub t: f64,
    pub uri: String,
}

impl Lab {
    /// Start a whole lab in a fresh directory; torn down (purged) on drop.
    pub async fn up(name: &str) -> anyhow::Result<Lab> {
        Self::start(name, None, false, false).await
    }

    /// A lab in power-cut mode (`lab up --power-cut-mode`): storage nodes
    /// keep unflushed volume writes in their own memory, so a kill
    /// ([`Lab::power_cut`]) loses them as a power cut would.
    pub async fn up_power_cut(name: &str) -> anyhow::Result<Lab> {
        Self::start(name, None, false, true).await
    }

    /// A lab whose witness site (w1, etcd-w) is not started: something else
    /// is to serve it (the witness VM; here a test may start the lab's own).
    pub async fn up_external_witness(name: &str) -> anyhow::Result<Lab> {
        Self::start(name, None, true, false).await
    }

    /// A lab in loopback mode (127.N.x.y in the root namespace), for tests
    /// that bind or filter addresses from the host itself. Uses
    /// METRO_LAB_OCTET when set, else 94.
    pub async fn up_loopback(name: &str) -> anyhow::Result<Lab> {
        let octet = std::env::var("METRO_LAB_OCTET").ok().and_then(|v| v.parse().ok()).unwrap_or(94);
        Self::start(name, Some(octet), false, false).await
    }

    async fn start(
        name: &str,
        loopback: Option<u8>,
        external_witness: bool,
        power_cut_mode: bool,
    ) -> anyhow::Result<Lab> {
        let guard = LAB_LOCK.lock().await;
        let bins = bin_dir();
        for b in ["metro-node", "metro-witness", "metroctl", "metro-attach"] {
            if !bins.join(b).exists() {
                bail!("{} missing: run `cargo build --workspace --bins` first", bins.join(b).display());
            }
        }
        reap_orphaned_labs();
        let dir = std::env::temp_dir().join(format!("metro-test-{name}-{}", std::process::id()));
        let _ = metroctl::lab::down(&dir, true);
        let mut opts = metroctl::lab::LabOptions::new(&dir);
        opts.bin_dir = bins;
        opts.health_deadline = Duration::from_secs(90);
        opts.external_witness = external_witness;
        opts.power_cut_mode = power_cut_mode;
        // METRO_LAB_MODE=loopback runs the suite without network namespaces;
        // METRO_LAB_OCTET=N (implies loopback) uses 127.N.x.y so several
        // suites can run side by side on one machine.
        let octet = std::env::var("METRO_LAB_OCTET").ok().and_then(|v| v.parse::<u8>().ok());
        if std::env::var("METRO_LAB_MODE").as_deref() == Ok("loopback") || octet.is_some() {
            opts.mode = metroctl::lab::NetMode::Loopback;
        }
        if let Some(o) = octet {
            opts.loopback_octet = o;
        }
        if let Some(o) = loopback {
            opts.mode = metroctl::lab::NetMode::Loopback;
            opts.loopback_octet = o;
        }
        let info = metroctl::lab::up(opts).await.context("lab up")?;
        tracing::info!(dir = %dir.display(), mode = ?info.mode, "lab is up");
        Ok(Lab { dir, info, _guard: guard })
    }

    /// Run metroctl against this lab; returns stdout, fails with stderr.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        Ok(metroctl::lab::LabCli::new(&bin_dir(), &self.dir).run(args)?)
    }

    pub fn ctl_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        Ok(metroctl::lab::LabCli::new(&bin_dir(), &self.dir).json(args)?)
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        self.ctl_json(&["status"])
    }

    pub fn volume(&self, name: &str) -> anyhow::Result<Value> {
        self.ctl_json(&["volume", "show", name])
    }

    /// Poll `f` every 200 ms until it holds or `timeout` passes.
    pub async fn wait_for<F>(&self, what: &str, timeout: Duration, mut f: F) -> anyhow::Result<Duration>
    where
        F: FnMut(&Lab) -> anyhow::Result<bool>,
    {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match f(self) {
                Ok(true) => return Ok(start.elapsed()),
                Ok(false) => {}
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("timed out after {timeout:?} waiting for {what} (last error: {last})\n{}", self.diagnostics())
    }

    /// What a failed wait prints: the cluster as metroctl sees it, and the
    /// last warnings of every daemon (the whole logs are kept in
    /// `target/lab-logs/`, see `Drop`).
    pub fn diagnostics(&self) -> String {
        let mut out = String::from("--- diagnostics\n");
        match self.ctl(&["status"]) {
            Ok(s) => out.push_str(&s),
            Err(e) => out.push_str(&format!("metroctl status: {e}\n")),
        }
        for d in self.info.nodes.iter().chain(std::iter::once(&self.info.witness)) {
            let text = std::fs::read_to_string(&d.proc.log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
                .collect();
            out.push_str(&format!("--- {} ({}), last warnings:\n", d.id, d.proc.log.display()));
            for l in &lines[lines.len().saturating_sub(12)..] {
                let l: String = strip_ansi(l).chars().take(240).collect();
                out.push_str(&l);
                out.push('\n');
            }
        }
        out
    }

    pub fn kill_site(&self, site: &str) -> anyhow::Result<()> {
        metroctl::lab::kill_site(&self.dir, site)?;
        Ok(())
    }

    pub async fn start_site(&self, site: &str) -> anyhow::Result<()> {
        metroctl::lab::start_site(&self.dir, site).await?;
        Ok(())
    }

    pub fn kill_node(&self, id: &str) -> anyhow::Result<()> {
        metroctl::lab::kill_node(&self.dir, id)?;
        Ok(())
    }

    pub async fn start_node(&self, id: &str) -> anyhow::Result<()> {
        metroctl::lab::start_node(&self.dir, id).await?;
        Ok(())
    }

    pub async fn start_nodes(&self, ids: &[&str]) -> anyhow::Result<()> {
        metroctl::lab::start_nodes(&self.dir, ids).await?;
        Ok(())
    }

    /// `metroctl lab power-cut SITE|NODE` (needs [`Lab::up_power_cut`]).
    pub fn power_cut(&self, target: &str) -> anyhow::Result<Vec<String>> {
        Ok(metroctl::lab::power_cut(&self.dir, target)?)
    }

    pub fn partition(&self, a: &str, b: &str) -> anyhow::Result<()> {
        metroctl::lab::partition(&self.dir, a, b)?;
        Ok(())
    }

    pub fn heal(&self) -> anyhow::Result<()> {
        metroctl::lab::heal(&self.dir)?;
        Ok(())
    }

    /// Start an oracle writer. With `pin`, it never leaves that URI.
    pub fn writer(
        &self,
        volume: &str,
        tag: &str,
        first_block: u64,
        seconds: f64,
        pin: Option<&str>,
    ) -> Writer {
        self.writer_with(volume, tag, WriterOpts { first_block, seconds, pin, ..WriterOpts::default() })
    }

    /// Start an oracle writer with every knob (see [`WriterOpts`]).
    pub fn writer_with(&self, volume: &str, tag: &str, o: WriterOpts<'_>) -> Writer {
        let WriterOpts { first_block, blocks, seconds, pin, flush_every, timeout } = o;
        let out = self.dir.join(format!("acks-{tag}.jsonl"));
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(workspace().join("tests/tools/oracle_writer.py"))
            .args(["write", "--volume", volume, "--lab"])
            .arg(&self.dir)
            .arg("--metroctl")
            .arg(bin_dir().join("metroctl"))
            .arg("--out")
            .arg(&out)
            .args(["--seconds", &seconds.to_string(), "--first-block", &first_block.to_string()])
            .args(["--blocks", &blocks.to_string(), "--seq-base", &(first_block * 1_000_000).to_string()])
            .args(["--flush-every", &flush_every.to_string()])
            .args(["--timeout", &timeout.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(p) = pin {
            cmd.args(["--pin", p]);
        }
        let child = cmd.spawn().expect("python3-libnbd is installed (scripts/install-deps)");
        Writer { child: Some(child), out }
    }

    /// Check with the oracle that every acknowledged write is readable from `uri`.
    pub fn verify(&self, uri: &str, logs: &[&Path]) -> anyhow::Result<Value> {
        let out = Command::new("/usr/bin/python3")
            .arg(workspace().join("tests/tools/oracle_writer.py"))
            .args(["verify", "--uri", uri])
            .args(logs)
            .output()?;
        let report: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("verify output: {}", String::from_utf8_lossy(&out.stderr)))?;
        if !out.status.success() {
            bail!("acknowledged writes missing on {uri}: {report} {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(report)
    }

    /// How many of the acknowledged writes in `logs` a volume's data file
    /// on disk lacks: `(blocks checked, blocks missing or older)`. Does not
    /// fail on missing blocks (e.g. counting what a power cut lost).
    pub fn missing_in_file(&self, file: &Path, logs: &[&Path]) -> anyhow::Result<(u64, u64)> {
        let out = Command::new("/usr/bin/python3")
            .arg(workspace().join("tests/tools/oracle_writer.py"))
            .arg("verify")
            .arg("--file")
            .arg(file)
            .args(logs)
            .output()?;
        let report: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("verify --file output: {}", String::from_utf8_lossy(&out.stderr)))?;
        let n = |k: &str| report[k].as_u64().with_context(|| format!("verify --file: no {k} in {report}"));
        Ok((n("blocks_checked")?, n("missing_or_wrong")?))
    }

    /// Where node `id` keeps the data file of `volume`.
    pub fn data_file(&self, id: &str, volume: &str) -> anyhow::Result<PathBuf> {
        let d = self.info.daemon(id).with_context(|| format!("no daemon {id}"))?;
        Ok(d.data_dir.join("volumes").join(volume).join("data"))
    }

    /// Compare every in-sync replica's data file byte for byte.
    pub fn replicas_identical(&self, volume: &str) -> anyhow::Result<bool> {
        let v = self.volume(volume)?;
        let in_sync: Vec<String> = v["in_sync"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        let files: Vec<PathBuf> = in_sync
            .iter()
            .filter_map(|n| self.info.daemon(n).map(|d| d.data_dir.join("volumes").join(volume).join("data")))
            .collect();
        if files.len() < 2 {
            bail!("only {} in-sync replica files for {volume}: {v}\n{}", files.len(), self.diagnostics());
        }
        let first = std::fs::read(&files[0])?;
        for f in &files[1..] {
            if std::fs::read(f)? != first {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// A running `metro-attach` for one volume of a lab, on the host (the
/// lab's application host), with the lab's `client:lab` identity. Killed on
/// drop.
pub struct Attach {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Attach {
    /// The libnbd URI of the agent's local endpoint.
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.socket.display())
    }

    /// SIGKILL the agent (its clients lose their connection).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Lab {
    /// Start `metro-attach` for `volume` (hold 120 s, policy `error`) and
    /// wait until its socket serves.
    pub async fn attach(&self, volume: &str) -> anyhow::Result<Attach> {
        self.attach_as(volume, &self.info.client_cert, &self.info.client_key).await
    }

    /// [`Lab::attach`] with another identity.
    pub async fn attach_as(&self, volume: &str, cert: &Path, key: &Path) -> anyhow::Result<Attach> {
        let dir = self.dir.join("attach");
        std::fs::create_dir_all(&dir)?;
        // In logs/, which a finished lab keeps (target/lab-logs/<name>).
        let log = self.dir.join("logs").join(format!("agent-{volume}.log"));
        let child = metroctl::lab::attach_command(&self.info, &bin_dir(), volume, &dir, cert, key)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("metro-attach (cargo build --workspace --bins)")?;
        let mut a = Attach { child: Some(child), socket: dir.join(format!("{volume}.sock")), log };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if metroctl::lab::attachment_listed(&dir, volume) {
                return Ok(a);
            }
            if let Some(Ok(Some(st))) = a.child.as_mut().map(|c| c.try_wait()) {
                bail!("metro-attach exited ({st}) before serving: {}", a.log_text());
            }
            if std::time::Instant::now() > deadline {
                bail!("metro-attach did not serve {volume} in 30 s: {}", a.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // METRO_KEEP_LAB=1 keeps a failed test's lab (a panic); =always keeps
        // every lab (a test that returned an error does not panic).
        let keep = std::env::var("METRO_KEEP_LAB").ok();
        if keep.as_deref() == Some("always") || (keep.is_some() && std::thread::panicking()) {
            eprintln!("keeping lab in {}", self.dir.display());
            return;
        }
        // Keep the daemons' logs of the last lab of each name for a post-mortem.
        let name = self.dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let name = name.rsplit_once('-').map_or(name.as_str(), |(n, _pid)| n).to_string();
        let keep = bin_dir().parent().map(|t| t.join("lab-logs").join(name));
        if let Some(keep) = keep {
            let _ = std::fs::remove_dir_all(&keep);
            if std::fs::create_dir_all(&keep).is_ok() {
                for e in std::fs::read_dir(self.dir.join("logs")).into_iter().flatten().flatten() {
                    let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                }
            }
        }
        if let Err(e) = metroctl::lab::down(&self.dir, true) {
            eprintln!("lab down {}: {e}", self.dir.display());
        }
    }
}

/// What an oracle writer does: `blocks` 4 KiB blocks from `first_block`,
/// for `seconds`, a FLUSH every `flush_every` writes (0: never, so plain
/// writes stay in a volatile cache), following the primary or `pin`ned.
#[derive(Debug, Clone, Copy)]
pub struct WriterOpts<'a> {
    pub first_block: u64,
    pub blocks: u64,
    pub seconds: f64,
    pub pin: Option<&'a str>,
    pub flush_every: u64,
    /// Seconds a request may take before the writer counts an error and
    /// reconnects.
    pub timeout: f64,
}

impl Default for WriterOpts<'_> {
    fn default() -> Self {
        WriterOpts { first_block: 0, blocks: 512, seconds: 10.0, pin: None, flush_every: 16, timeout: 3.0 }
    }
}

pub struct Writer {
    child: Option<Child>,
    pub out: PathBuf,
}

impl Writer {
    /// Wait for the writer to finish and return its acknowledged writes.
    pub fn finish(self) -> anyhow::Result<Vec<Ack>> {
        self.finish_counting_errors().map(|(acks, _)| acks)
    }

    /// Wait for the writer; its acknowledged writes and how many requests
    /// failed or timed out (each made it reconnect).
    pub fn finish_counting_errors(mut self) -> anyhow::Result<(Vec<Ack>, u64)> {
        let child = self.child.take().expect("running");
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!("writer failed: {stdout}");
        }
        let report: Value = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str(l).ok())
            .with_context(|| format!("the writer printed no report: {stdout}"))?;
        let errors = report["errors"].as_u64().context("the writer's report has no error count")?;
        Ok((read_acks(&self.out)?, errors))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn read_acks(path: &Path) -> anyhow::Result<Vec<Ack>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
}

/// Split-brain check: no URI acknowledged a write after another URI started
/// acknowledging (a primary change), across all writers.
pub fn assert_single_primary(acks: &[&[Ack]]) -> anyhow::Result<()> {
    let mut all: Vec<&Ack> = acks.iter().flat_map(|a| a.iter()).collect();
    all.sort_by(|a, b| a.t.total_cmp(&b.t));
    let mut seen_after: Vec<String> = Vec::new();
    for a in &all {
        if seen_after.last() != Some(&a.uri) {
            if seen_after.contains(&a.uri) {
                bail!(
                    "split brain: {} acknowledged a write at {:.3} after another primary took over",
                    a.uri,
                    a.t
                );
            }
            seen_after.push(a.uri.clone());
        }
    }
    Ok(())
}

/// Largest gap between consecutive acknowledged writes.
pub fn max_gap(acks: &[Ack]) -> Duration {
    acks.windows(2).map(|w| Duration::from_secs_f64((w[1].t - w[0].t).max(0.0))).max().unwrap_or_default()
}

pub fn init_tracing() {
    let _ = tracing_subscriber_init();
}

fn tracing_subscriber_init() -> Result<(), ()> {
    metro_api::telemetry::init_tracing();
    Ok(())
}

/// Strings of a JSON array.
/// The primary of `vol` and its NBD URI, as `metroctl volume show` says
/// (empty strings while it has none).
pub fn primary_of(lab: &Lab, vol: &str) -> anyhow::Result<(String, String)> {
    let v = lab.volume(vol)?;
    Ok((v["primary"].as_str().unwrap_or("").to_string(), v["nbd"].as_str().unwrap_or("").to_string()))
}

/// Wait until `vol` has a primary and every replica is in sync.
pub async fn wait_fully_in_sync(lab: &Lab, vol: &str, deadline: Duration) -> anyhow::Result<Duration> {
    lab.wait_for("every replica back in sync", deadline, |l| {
        let v = l.volume(vol)?;
        // A primary that still reconciles its activity log with the
        // replicas reports "reconciling": the copies may differ until then.
        Ok(!v["primary"].is_null()
            && strings(&v["in_sync"]).len() == strings(&v["replicas"]).len()
            && v["state"].as_str() == Some("serving"))
    })
    .await
}

/// After a heal: wait until every replica of `vol` is back in sync, then
/// check their data files are byte-identical.
pub async fn wait_rejoined_identical(lab: &Lab, vol: &str, deadline: Duration) -> anyhow::Result<Duration> {
    let took = wait_fully_in_sync(lab, vol, deadline).await?;
    if !lab.replicas_identical(vol)? {
        bail!("the replicas of {vol} differ after rejoining\n{}", lab.diagnostics());
    }
    Ok(took)
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|x| x.as_str().map(String::from)).collect()
}
