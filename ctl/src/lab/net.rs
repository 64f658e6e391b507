//! The lab network: namespaces, veths and the bridge (netns mode), and
//! partitions with nftables (both modes). Shells out to `ip` and `nft`.
//!
//! Netns mode: `metro-sw` holds bridge `br0`; each daemon namespace
//! `metro-<id>` has `eth0` (its address, /16) whose peer `v-<id>` sits on the
//! bridge; the root namespace has `metro-host` (10.77.0.1/16) whose peer
//! `v-host` sits on the bridge too, so the host reaches every address.
//! Partitions: table `bridge metro_lab` in `metro-sw`, chain `forward`, two
//! drop rules per cut pair (silent drops, like a dead WAN link).
//!
//! Loopback mode: everything binds 127.77.S.H in the root namespace;
//! partitions live in table `inet metro_lab`, chain `input` (input, not
//! output, so drops are silent rather than EPERM).
//!
//! Invariant: teardown is idempotent and removes only names this module
//! creates (see [`super::topology`]).

use super::topology as topo;
use super::LabError;
use super::NetMode;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Run a command, returning stdout; a non-zero exit is an error carrying stderr.
pub fn run(argv: &[&str]) -> Result<String, LabError> {
    run_with_input(argv, None)
}

fn run_with_input(argv: &[&str], input: Option<&str>) -> Result<String, LabError> {
    let cmd = argv.join(" ");
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LabError::Command { cmd: cmd.clone(), detail: e.to_string() })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| LabError::Command { cmd: cmd.clone(), detail: e.to_string() })?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| LabError::Command { cmd: cmd.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(LabError::Command { cmd, detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Is any address of the lab's /16 already configured on the host?
fn host_has_lab_address() -> Option<String> {
    let out = run(&["ip", "-o", "-4", "addr", "show"]).ok()?;
    out.lines().find(|l| l.contains(" 10.77.")).map(|l| l.trim().to_string())
}

/// Refuse to build over a live lab network; reclaim a dead one.
///
/// A lab whose runner was killed (a test binary stopped by a timeout, a
/// machine reboot that kept /run, an operator's `kill -9`) leaves its
/// namespaces behind with no process inside. Nothing can still use such a
/// network, so it is torn down with a warning instead of blocking every later
/// `lab up` until someone cleans up by hand. A namespace with a live process
/// means another lab runs: that is refused, naming the pids.
pub fn check_netns_free() -> Result<(), LabError> {
    let leftover: Vec<String> = topo::all_netns().into_iter().filter(|n| netns_exists(n)).collect();
    if !leftover.is_empty() || link_exists(topo::HOST_VETH) {
        let live: Vec<(String, Vec<u32>)> =
            leftover.iter().map(|ns| (ns.clone(), netns_pids(ns))).filter(|(_, p)| !p.is_empty()).collect();
        if let Some((ns, pids)) = live.first() {
            return Err(LabError::Leftover {
                what: format!("namespace {ns} exists with live processes {pids:?}"),
            });
        }
        tracing::warn!(
            "lab: reclaiming a dead lab network (namespaces {leftover:?} with no process inside); its runner must have been killed"
        );
        teardown_netns()?;
    }
    if link_exists(topo::HOST_VETH) {
        return Err(LabError::Leftover { what: format!("interface {} exists", topo::HOST_VETH) });
    }
    if let Some(line) = host_has_lab_address() {
        return Err(LabError::Leftover {
            what: format!("the host already has a 10.77.0.0/16 address ({line})"),
        });
    }
    Ok(())
}

/// Can this machine create network namespaces? (Probe with a throwaway one.)
pub fn netns_supported() -> bool {
    let probe = format!("metro-probe-{}", std::process::id());
    let ok = run(&["ip", "netns", "add", &probe]).is_ok();
    let _ = run(&["ip", "netns", "del", &probe]);
    ok
}

/// Which lab directory built the namespaces now on this machine. Namespace
/// names are global, so a stale lab directory must not tear down a network
/// that a later lab has since reclaimed and rebuilt.
const OWNER_FILE: &str = "/run/metro-lab.owner";

/// The lab directory that built the current lab network, if recorded.
pub fn netns_owner() -> Option<PathBuf> {
    std::fs::read_to_string(OWNER_FILE).ok().map(|s| PathBuf::from(s.trim()))
}

/// Build the switch, every daemon namespace and the host link, and record
/// `owner` (the lab directory) as the network's owner.
pub fn setup_netns(owner: &Path) -> Result<(), LabError> {
    std::fs::write(OWNER_FILE, owner.display().to_string()).map_err(LabError::io(OWNER_FILE))?;
    let sw = topo::SWITCH_NS;
    run(&["ip", "netns", "add", sw])?;
    run(&["ip", "-n", sw, "link", "set", "lo", "up"])?;
    run(&["ip", "-n", sw, "link", "add", topo::BRIDGE, "type", "bridge"])?;
    run(&["ip", "-n", sw, "link", "set", topo::BRIDGE, "up"])?;
    for d in &topo::DAEMONS {
        let ns = topo::netns(d.id);
        let peer = format!("v-{}", d.id);
        let addr = format!("{}/{}", topo::address(topo::NETNS_BASE, d), topo::NET_PREFIX);
        run(&["ip", "netns", "add", &ns])?;
        run(&[
            "ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &peer, "netns", sw,
        ])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", sw, "link", "set", &peer, "master", topo::BRIDGE, "up"])?;
    }
    let host_addr = format!("{}/{}", topo::host_address(), topo::NET_PREFIX);
    run(&["ip", "link", "add", topo::HOST_VETH, "type", "veth", "peer", "name", "v-host", "netns", sw])?;
    run(&["ip", "-n", sw, "link", "set", "v-host", "master", topo::BRIDGE, "up"])?;
    run(&["ip", "addr", "add", &host_addr, "dev", topo::HOST_VETH])?;
    run(&["ip", "link", "set", topo::HOST_VETH, "up"])?;
    Ok(())
}

/// Pids of processes inside a namespace (any the lab did not record).
pub fn netns_pids(ns: &str) -> Vec<u32> {
    run(&["ip", "netns", "pids", ns])
        .map(|out| out.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Delete every lab namespace and the host link. Idempotent. Processes still
/// inside a namespace are SIGKILLed first (a namespace with a live process
/// would outlive `ip netns del`).
pub fn teardown_netns() -> Result<(), LabError> {
    let mut problems = Vec::new();
    for ns in topo::all_netns() {
        if !netns_exists(&ns) {
            continue;
        }
        for pid in netns_pids(&ns) {
            super::process::kill_now(pid, &[]);
        }
        if let Err(e) = run(&["ip", "netns", "del", &ns]) {
            problems.push(e.to_string());
        }
    }
    // Deleting metro-sw destroys its veth pair, metro-host included, but the
    // kernel does that asynchronously: the link may vanish between the check
    // and the delete, which is the outcome we want, not a failure.
    if link_exists(topo::HOST_VETH) {
        if let Err(e) = run(&["ip", "link", "del", topo::HOST_VETH]) {
            if link_exists(topo::HOST_VETH) {
                problems.push(e.to_string());
            }
        }
    }
    if problems.is_empty() {
        let _ = std::fs::remove_file(OWNER_FILE);
        Ok(())
    } else {
        Err(LabError::Cleanup(problems.join("; ")))
    }
}

/// `(family, hook chain, namespace to run nft in)` for a mode.
fn nft_target(mode: NetMode) -> (&'static str, &'static str, Option<&'static str>) {
    match mode {
        NetMode::Loopback => ("inet", "input", None),
        _ => ("bridge", "forward", Some(topo::SWITCH_NS)),
    }
}

fn nft(ns: Option<&str>, args: &[&str], input: Option<&str>) -> Result<String, LabError> {
    let mut argv: Vec<String> = Vec::new();
    if let Some(ns) = ns {
        argv.extend(["nsenter".into(), format!("--net=/run/netns/{ns}"), "--".into()]);
    }
    argv.push("nft".into());
    argv.extend(args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    run_with_input(&refs, input)
}

/// Drop all traffic between two site subnets, both directions.
pub fn partition(mode: NetMode, t: &str, subnet_a: &str, subnet_b: &str) -> Result<(), LabError> {
    let (family, chain, ns) = nft_target(mode);
    let hook = if chain == "input" { "input" } else { "forward" };
    let script = format!(
        "table {family} {t} {{\n  chain {chain} {{ type filter hook {hook} priority 0; policy accept; }}\n}}\n\
         add rule {family} {t} {chain} ip saddr {subnet_a} ip daddr {subnet_b} drop\n\
         add rule {family} {t} {chain} ip saddr {subnet_b} ip daddr {subnet_a} drop\n"
    );
    nft(ns, &["-f", "-"], Some(&script)).map(|_| ())
}

/// Does partition table `table` exist (in the switch ns, or the root ns in loopback mode)?
pub fn nft_table_exists(mode: NetMode, table: &str) -> bool {
    let (family, _, ns) = nft_target(mode);
    if ns.is_some_and(|n| !netns_exists(n)) {
        return false;
    }
    nft(ns, &["list", "table", family, table], None).is_ok()
}

/// Remove the partition table (idempotent).
pub fn heal(mode: NetMode, table: &str) -> Result<(), LabError> {
    if !nft_table_exists(mode, table) {
        return Ok(());
    }
    let (family, _, ns) = nft_target(mode);
    nft(ns, &["delete", "table", family, table], None).map(|_| ())
}
