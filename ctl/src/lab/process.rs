//! Detached lab processes: start in a namespace, check, signal, stop.
//!
//! A process is started through `sh -c 'setsid CMD >>LOG 2>&1 </dev/null & echo $!'`
//! (optionally `nsenter --net=/run/netns/NS` first). The shell exits at once,
//! so the daemon is orphaned: it outlives `metroctl`, has its own session and
//! process group (pid = pgid), and its pid is printed by the shell. `setsid`
//! and `nsenter` exec, so the printed pid is the daemon's own.
//!
//! Invariants:
//! - a pid is only signalled if it still runs the recorded command (its
//!   cmdline contains the command's last argument), so a reused pid is never
//!   killed;
//! - a zombie counts as dead (PID 1 here reaps orphans only lazily);
//! - an empty cmdline (mid-exec) counts as alive;
//! - every wait is bounded.

use super::LabError;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How often liveness is polled while waiting for a process to die.
const POLL: Duration = Duration::from_millis(50);
/// Bound on waiting for a SIGKILLed process to disappear (it cannot block SIGKILL).
pub const KILL_DEADLINE: Duration = Duration::from_secs(5);

/// Start `argv` detached, in `netns` if given; returns its pid.
pub fn spawn(netns: Option<&str>, argv: &[String], log: &Path, cwd: &Path) -> Result<u32, LabError> {
    let mut full: Vec<String> = Vec::new();
    if let Some(ns) = netns {
        full.push("nsenter".into());
        full.push(format!("--net=/run/netns/{ns}"));
        full.push("--".into());
    }
    full.extend(argv.iter().cloned());
    let out = Command::new("sh")
        .arg("-c")
        .arg(r#"log="$1"; shift; setsid "$@" >>"$log" 2>&1 </dev/null & echo $!"#)
        .arg("sh")
        .arg(log)
        .args(&full)
        .current_dir(cwd)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| LabError::Command { cmd: "sh".into(), detail: e.to_string() })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse::<u32>().map_err(|_| LabError::Command {
        cmd: full.join(" "),
        detail: format!("could not start: {}", String::from_utf8_lossy(&out.stderr).trim()),
    })
}

/// Is `pid` a live (non-zombie) process whose cmdline contains `argv`'s last argument?
pub fn alive(pid: u32, argv: &[String]) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, None | Some('Z') | Some('X')) {
        return false;
    }
    let Some(last) = argv.last() else { return true };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    // The cmdline reads empty for a moment while a process execs (a fresh lab
    // process execs sh -> setsid -> nsenter -> daemon): that is not a death.
    cmdline.is_empty() || cmdline.split(|b| *b == 0).any(|arg| arg == last.as_bytes())
}

/// Send `sig` to the process group of `pid` (the lab makes every process a
/// group leader), falling back to the pid alone.
pub fn signal(pid: u32, sig: i32) {
    let Ok(p) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        if libc::kill(-p, sig) != 0 {
            libc::kill(p, sig);
        }
    }
}

/// Wait until `pid` no longer runs `argv`, up to `deadline`. True if it is gone.
pub fn wait_dead(pid: u32, argv: &[String], deadline: Duration) -> bool {
    let start = Instant::now();
    while alive(pid, argv) {
        if start.elapsed() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
    true
}

/// SIGKILL and wait; true if the process is gone.
pub fn kill_now(pid: u32, argv: &[String]) -> bool {
    if !alive(pid, argv) {
        return true;
    }
    signal(pid, libc::SIGKILL);
    wait_dead(pid, argv, KILL_DEADLINE)
}

/// SIGTERM every process, wait up to `grace` for all of them, then SIGKILL
/// the rest. Returns the pids that survived even SIGKILL.
pub fn stop_all(procs: &[(u32, Vec<String>)], grace: Duration) -> Vec<u32> {
    let running: Vec<_> = procs.iter().filter(|(p, a)| alive(*p, a)).collect();
    for (pid, _) in &running {
        signal(*pid, libc::SIGTERM);
    }
    let start = Instant::now();
    while start.elapsed() < grace && running.iter().any(|(p, a)| alive(*p, a)) {
        std::thread::sleep(POLL);
    }
    running.iter().filter(|(p, a)| !kill_now(*p, a)).map(|(p, _)| *p).collect()
}

/// Last `n` lines of a log file (for error messages).
pub fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawned_process_is_detached_alive_and_killable() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("p.log");
        let argv = vec!["sleep".to_string(), "31.5".to_string()];
        let pid = spawn(None, &argv, &log, dir.path()).unwrap();
        assert!(alive(pid, &argv));
        let start = Instant::now();
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim() != "sleep" {
            assert!(start.elapsed() < Duration::from_secs(5), "sleep never exec'd");
            std::thread::sleep(POLL);
        }
        // Once it has exec'd sleep, it leads its own process group...
        // SAFETY: getpgid has no memory-safety preconditions.
        assert_eq!(unsafe { libc::getpgid(pid as i32) }, pid as i32);
        // ... and a different recorded command does not match the pid.
        assert!(!alive(pid, &["sleep".to_string(), "99".to_string()]));
        assert!(kill_now(pid, &argv));
        assert!(!alive(pid, &argv));
    }

    #[test]
    fn stop_all_terminates_with_sigterm_within_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("p.log");
        let argv = vec!["sleep".to_string(), "32.5".to_string()];
        let pid = spawn(None, &argv, &log, dir.path()).unwrap();
        let start = Instant::now();
        assert!(stop_all(&[(pid, argv.clone())], Duration::from_secs(5)).is_empty());
        assert!(start.elapsed() < Duration::from_secs(2), "sleep dies on SIGTERM at once");
        assert!(!alive(pid, &argv));
    }
}
