//! The lab verbs: `up`, `down`, `kill-site`, `start-site`, `kill-node`,
//! `start-node`, `power-cut`, `partition`, `heal`.
//!
//! Every verb reads `DIR/lab.json`, acts, and rewrites it when a pid or a
//! partition changes. `up` writes lab.json before it builds anything, so
//! `down` can clean up after any failed or interrupted `up`; without lab.json
//! `down` touches nothing.

use super::info::LabInfo;
use super::topology as topo;
use super::{health, net, plan, process, LabError, LabOptions, NetMode};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// SIGTERM grace for metro daemons in `down` before SIGKILL (time to flush
/// and deregister from etcd).
pub const DOWN_GRACE: Duration = Duration::from_secs(3);
/// SIGTERM grace for etcd members, stopped after the daemons. A leader whose
/// followers are also stopping tries a leadership transfer for several seconds
/// (7 s measured); the lab is going away and etcd's WAL is crash-safe, so it
/// gets SIGKILL after this.
pub const ETCD_DOWN_GRACE: Duration = Duration::from_secs(1);
/// Bound on restarted processes becoming healthy in `start-site`/`start-node`.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn require_tool(tool: &str, package: &str) -> Result<(), LabError> {
    if in_path(tool) {
        Ok(())
    } else {
        Err(LabError::MissingTool { tool: tool.into(), package: package.into() })
    }
}

fn resolve_mode(mode: NetMode) -> Result<NetMode, LabError> {
    match mode {
        NetMode::Netns if !is_root() => Err(LabError::NotRoot { what: "netns mode".into() }),
        NetMode::Netns | NetMode::Loopback => Ok(mode),
        NetMode::Auto => {
            if is_root() && in_path("ip") && net::netns_supported() {
                Ok(NetMode::Netns)
            } else {
                tracing::info!(
                    "lab: network namespaces are not available here; using loopback mode (127.77.x.y)"
                );
                Ok(NetMode::Loopback)
            }
        }
    }
}

fn preflight(opts: &LabOptions, mode: NetMode) -> Result<(), LabError> {
    require_tool("etcd", "etcd-server")?;
    require_tool("setsid", "util-linux")?;
    require_tool("nft", "nftables")?;
    if mode == NetMode::Netns {
        require_tool("ip", "iproute2")?;
        require_tool("nsenter", "util-linux")?;
        net::check_netns_free()?;
    }
    if opts.daemon_override.is_none() {
        for bin in ["metro-node", "metro-witness"] {
            let path = opts.bin_dir.join(bin);
            if !path.is_file() {
                return Err(LabError::MissingBinary { path });
            }
        }
    }
    Ok(())
}

/// In loopback mode every port must be free before anything starts.
fn check_ports(info: &LabInfo) -> Result<(), LabError> {
    let mut addrs: Vec<String> = Vec::new();
    for e in &info.etcd {
        addrs.push(format!("{}:{}", e.address, topo::PORT_ETCD_CLIENT));
        addrs.push(format!("{}:{}", e.address, topo::PORT_ETCD_PEER));
    }
    for d in info.nodes.iter().chain(std::iter::once(&info.witness)) {
        for port in [topo::PORT_API, topo::PORT_NBD, topo::PORT_REPL, topo::PORT_METRICS] {
            addrs.push(format!("{}:{port}", d.address));
        }
    }
    for a in addrs {
        if let Err(e) = std::net::TcpListener::bind(&a) {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                return Err(LabError::PortInUse { addr: a });
            }
        }
    }
    Ok(())
}

fn running_pids(info: &mut LabInfo) -> Vec<u32> {
    info.procs_mut()
        .iter()
        .filter_map(|p| p.proc.pid.filter(|pid| process::alive(*pid, &p.proc.command)))
        .collect()
}

fn absolute_dir(dir: &Path) -> Result<PathBuf, LabError> {
    std::fs::create_dir_all(dir).map_err(LabError::io(dir))?;
    std::fs::canonicalize(dir).map_err(LabError::io(dir))
}

/// Build and start the whole lab; returns once it is healthy (lab.json then
/// has `ready: true`). On failure after anything started, tears it down again
/// (data kept) and returns the first error.
pub async fn up(opts: LabOptions) -> Result<LabInfo, LabError> {
    let started = Instant::now();
    let dir = absolute_dir(&opts.dir)?;
    if let Some(mut old) = LabInfo::load(&dir)? {
        let pids = running_pids(&mut old);
        if !pids.is_empty() {
            return Err(LabError::AlreadyRunning { dir, pids });
        }
    }
    let mode = resolve_mode(opts.mode)?;
    preflight(&opts, mode)?;
    let mut info = plan::build(&opts, &dir, mode);
    if mode == NetMode::Loopback {
        check_ports(&info)?;
    }
    plan::issue_certs(&info)?;
    plan::write_configs(&info)?;
    tracing::info!("lab: {mode:?} mode in {}", dir.display());
    match start_everything(&mut info, opts.health_deadline, opts.external_witness).await {
        Ok(()) => {
            info.ready = true;
            info.save()?;
            tracing::info!("lab: healthy after {} ms", started.elapsed().as_millis());
            Ok(info)
        }
        Err(e) => {
            tracing::warn!("lab: up failed ({e}); tearing down");
            if let Err(c) = down(&dir, false) {
                tracing::warn!("lab: cleanup after the failed up: {c}");
            }
            Err(e)
        }
    }
}

async fn start_everything(
    info: &mut LabInfo,
    deadline: Duration,
    external_witness: bool,
) -> Result<(), LabError> {
    // Saved before anything is built, so `down` can always clean up.
    info.network = true;
    info.save()?;
    if info.mode == NetMode::Netns {
        let t = Instant::now();
        net::setup_netns(&info.dir)?;
        tracing::info!("lab: network built in {} ms", t.elapsed().as_millis());
    }
    // etcd first, so daemons find it; the order within each group is fixed.
    let ids: Vec<String> = info
        .procs_mut()
        .iter()
        .filter(|p| !(external_witness && p.site == "witness"))
        .map(|p| p.id.to_string())
        .collect();
    for id in &ids {
        start_one(info, id)?;
    }
    tracing::info!(
        "lab: {} processes started; waiting for health (deadline {} s)",
        ids.len(),
        deadline.as_secs()
    );
    let t = Instant::now();
    health::wait_healthy_subset(info, Some(&ids), deadline).await?;
    if health::runs_metro_daemons(info) {
        let witness = if external_witness { health::Witness::External } else { health::Witness::Lab };
        health::wait_cluster(info, deadline.saturating_sub(t.elapsed()), witness).await?;
    }
    Ok(())
}

/// Start one process (must not be running) and record its pid in lab.json.
fn start_one(info: &mut LabInfo, id: &str) -> Result<u32, LabError> {
    let mut procs = info.procs_mut();
    let p = procs.iter_mut().find(|p| p.id == id).ok_or_else(|| LabError::UnknownDaemon(id.into()))?;
    if let Some(ns) = p.netns {
        if !net::netns_exists(ns) {
            return Err(LabError::Leftover {
                what: format!("namespace {ns} is missing; run `metroctl lab down` then `lab up`"),
            });
        }
    }
    let pid = process::spawn(p.netns, &p.proc.command, &p.proc.log, &p.proc.cwd)?;
    p.proc.pid = Some(pid);
    tracing::info!("lab: started {id} (pid {pid})");
    drop(procs);
    info.save()?;
    Ok(pid)
}

/// Stop every process the lab started, remove its namespaces and nft tables.
/// With `purge`, delete `dir` too. A no-op success when nothing runs.
pub fn down(dir: &Path, purge: bool) -> Result<(), LabError> {
    let info = match LabInfo::load(dir) {
        Ok(i) => i,
        Err(LabError::BadLabJson { .. }) if purge => None,
        Err(e) => return Err(e),
    };
    // No lab.json: nothing of ours runs here. Touch nothing (the namespaces
    // may belong to a lab in another directory).
    let Some(mut info) = info else {
        if purge && dir.exists() {
            std::fs::remove_dir_all(dir).map_err(LabError::io(dir))?;
        }
        return Ok(());
    };
    let mut problems = Vec::new();
    let etcd_names: Vec<String> = info.etcd.iter().map(|e| e.name.clone()).collect();
    let group = |info: &mut LabInfo, etcd: bool| -> Vec<(u32, Vec<String>)> {
        info.procs_mut()
            .iter()
            .filter(|p| etcd_names.iter().any(|n| n == p.id) == etcd)
            .filter_map(|p| p.proc.pid.map(|pid| (pid, p.proc.command.clone())))
            .collect()
    };
    // Daemons first (they may still talk to etcd while stopping), then etcd.
    let mut survivors = process::stop_all(&group(&mut info, false), DOWN_GRACE);
    survivors.extend(process::stop_all(&group(&mut info, true), ETCD_DOWN_GRACE));
    if !survivors.is_empty() {
        problems.push(format!("pids {survivors:?} survived SIGKILL"));
    }
    for p in info.procs_mut() {
        p.proc.pid = None;
    }
    // Only the network this lab built is torn down (never another lab's).
    if info.network {
        let res = match info.mode {
            NetMode::Netns => match net::netns_owner() {
                // A later lab reclaimed this (dead) lab's network and built
                // its own: that one is not ours to remove.
                Some(owner) if !same_dir(&owner, dir) => {
                    tracing::warn!(
                        "lab: the lab network now belongs to the lab in {}; leaving it up",
                        owner.display()
                    );
                    Ok(())
                }
                _ => net::teardown_netns(),
            },
            _ => net::heal(NetMode::Loopback, &info.nft_table),
        };
        match res {
            Ok(()) => info.network = false,
            Err(e) => problems.push(e.to_string()),
        }
    }
    info.ready = false;
    info.partitions.clear();
    if !purge {
        info.save()?;
    }
    if purge && dir.exists() {
        std::fs::remove_dir_all(dir).map_err(LabError::io(dir))?;
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(LabError::Cleanup(problems.join("; ")))
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

fn check_site(site: &str) -> Result<(), LabError> {
    topo::site(site).map(|_| ()).ok_or_else(|| LabError::UnknownSite(site.into()))
}

/// SIGKILL the matching processes and record them as stopped. Returns their ids.
fn kill_where(dir: &Path, pred: impl Fn(&str, &str) -> bool) -> Result<Vec<String>, LabError> {
    let mut info = LabInfo::require(dir)?;
    let mut killed = Vec::new();
    let mut stuck = Vec::new();
    for p in info.procs_mut() {
        if !pred(p.id, p.site) {
            continue;
        }
        if let Some(pid) = p.proc.pid {
            if !process::kill_now(pid, &p.proc.command) {
                stuck.push(pid);
                continue;
            }
            killed.push(p.id.to_string());
        }
        p.proc.pid = None;
    }
    info.save()?;
    if !stuck.is_empty() {
        return Err(LabError::Cleanup(format!("pids {stuck:?} survived SIGKILL")));
    }
    Ok(killed)
}

/// `kill -9` every process of `site` (metro daemons and its etcd member).
pub fn kill_site(dir: &Path, site: &str) -> Result<Vec<String>, LabError> {
    check_site(site)?;
    kill_where(dir, |_, s| s == site)
}

/// `kill -9` one daemon (`a1`, `w1`, `etcd-a`, …).
pub fn kill_node(dir: &Path, id: &str) -> Result<Vec<String>, LabError> {
    topo::daemon(id).ok_or_else(|| LabError::UnknownDaemon(id.into()))?;
    kill_where(dir, |i, _| i == id)
}

/// A power cut of a site (every process of it, like `kill_site`) or of one
/// daemon (like `kill_node`): SIGKILL, which in power-cut mode also loses
/// every write its storage nodes had not flushed (their volatile write
/// cache). Refused unless the lab was started in power-cut mode.
pub fn power_cut(dir: &Path, target: &str) -> Result<Vec<String>, LabError> {
    let info = LabInfo::require(dir)?;
    if !info.power_cut_mode {
        return Err(LabError::NotPowerCutMode { dir: dir.to_path_buf() });
    }
    if topo::site(target).is_some() {
        kill_site(dir, target)
    } else if topo::daemon(target).is_some() {
        kill_node(dir, target)
    } else {
        Err(LabError::UnknownTarget(target.into()))
    }
}

async fn start_where(dir: &Path, pred: impl Fn(&str, &str) -> bool) -> Result<Vec<String>, LabError> {
    let mut info = LabInfo::require(dir)?;
    let to_start: Vec<String> = info
        .procs_mut()
        .iter()
        .filter(|p| pred(p.id, p.site))
        .filter(|p| !p.proc.pid.is_some_and(|pid| process::alive(pid, &p.proc.command)))
        .map(|p| p.id.to_string())
        .collect();
    for id in &to_start {
        start_one(&mut info, id)?;
    }
    health::wait_healthy_subset(&info, Some(&to_start), START_DEADLINE).await?;
    Ok(to_start)
}

/// Restart every stopped process of `site` with its existing data; waits
/// until they are healthy. Returns the ids started (running ones are left alone).
pub async fn start_site(dir: &Path, site: &str) -> Result<Vec<String>, LabError> {
    check_site(site)?;
    start_where(dir, |_, s| s == site).await
}

/// Restart one stopped daemon; waits until it is healthy.
pub async fn start_node(dir: &Path, id: &str) -> Result<Vec<String>, LabError> {
    topo::daemon(id).ok_or_else(|| LabError::UnknownDaemon(id.into()))?;
    start_where(dir, |i, _| i == id).await
}

/// Restart several stopped daemons at once (e.g. every etcd member, which
/// are only healthy together); waits until all are healthy.
pub async fn start_nodes(dir: &Path, ids: &[&str]) -> Result<Vec<String>, LabError> {
    for id in ids {
        topo::daemon(id).ok_or_else(|| LabError::UnknownDaemon((*id).into()))?;
    }
    start_where(dir, |i, _| ids.contains(&i)).await
}

/// The /24 of a site, from its etcd member's address (`10.77.1.10` -> `10.77.1.0/24`).
fn site_subnet(info: &LabInfo, site: &str) -> String {
    let e = info.etcd.iter().find(|e| e.site == site).expect("every site has an etcd member");
    let (net, _) = e.address.rsplit_once('.').expect("an IPv4 address");
    format!("{net}.0/24")
}

/// Silently drop all traffic between two sites (both directions).
pub fn partition(dir: &Path, site_a: &str, site_b: &str) -> Result<(), LabError> {
    check_site(site_a)?;
    check_site(site_b)?;
    if site_a == site_b {
        return Err(LabError::SameSite(site_a.into()));
    }
    let mut info = LabInfo::require(dir)?;
    if !is_root() {
        return Err(LabError::NotRoot { what: "lab partition".into() });
    }
    let (a, b) = (topo::site(site_a).expect("checked"), topo::site(site_b).expect("checked"));
    net::partition(info.mode, &info.nft_table, &site_subnet(&info, a.name), &site_subnet(&info, b.name))?;
    let mut pair = [site_a.to_string(), site_b.to_string()];
    pair.sort();
    if !info.partitions.contains(&pair) {
        info.partitions.push(pair);
    }
    info.save()
}

/// Remove every partition.
pub fn heal(dir: &Path) -> Result<(), LabError> {
    let mut info = LabInfo::require(dir)?;
    if !is_root() {
        return Err(LabError::NotRoot { what: "lab heal".into() });
    }
    net::heal(info.mode, &info.nft_table)?;
    info.partitions.clear();
    info.save()
}
