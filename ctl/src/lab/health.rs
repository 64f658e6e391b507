//! Health checks of a running lab, each with a deadline.
//!
//! - etcd: `GET /health` on the client URL answers 200 with `"health":"true"`
//!   (etcd 3.4 says true only when the member sees a leader).
//! - metro daemons: `GET /metrics` answers with any HTTP status line (a stand-in
//!   daemon may answer 404; the point is that it listens and speaks HTTP).
//!
//! [`wait_healthy`] is the one place that decides "the lab is up"; the
//! integrator extends it with a gRPC cluster-status check.

use super::info::{LabInfo, ProcInfo};
use super::{process, LabError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Deadline of one probe (connect + request + response).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between rounds of probes.
const ROUND_PAUSE: Duration = Duration::from_millis(200);
/// Largest response read from a probe; health answers are tiny.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// How often `wait_healthy` reports what it is still waiting for.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `http://host:port/path` -> (`host:port`, `/path`).
pub fn split_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    match rest.find('/') {
        Some(i) => Some((rest[..i].to_string(), rest[i..].to_string())),
        None => Some((rest.to_string(), "/".to_string())),
    }
}

/// One HTTP/1.0 GET; returns (status, body). Bounded by [`PROBE_TIMEOUT`].
pub async fn http_get(url: &str) -> Result<(u16, String), String> {
    let (authority, path) = split_url(url).ok_or_else(|| format!("not an http URL: {url}"))?;
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(&authority).await.map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 || buf.len() >= MAX_RESPONSE_BYTES {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .strip_prefix("HTTP/1.")
            .and_then(|r| r.get(2..5))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| format!("not an HTTP answer from {authority}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(PROBE_TIMEOUT, fut)
        .await
        .map_err(|_| format!("{url}: no answer within {PROBE_TIMEOUT:?}"))?
}

/// Does the etcd member at `client_url` report itself healthy?
pub async fn etcd_healthy(client_url: &str) -> bool {
    let url = format!("{}/health", client_url.trim_end_matches('/'));
    matches!(http_get(&url).await, Ok((200, body)) if body.contains("\"health\":\"true\""))
}

/// Does a metro daemon answer HTTP on its metrics URL?
pub async fn metrics_up(metrics_url: &str) -> bool {
    http_get(metrics_url).await.is_ok()
}

/// One probe target: (id, what to probe).
enum Probe {
    Etcd(String),
    Metrics(String),
}

/// Wait until every process of `info` (or only those in `only`, if given) is
/// healthy, or fail at `deadline` naming what is still pending. A process that
/// exits fails at once with the tail of its log.
pub async fn wait_healthy_subset(
    info: &LabInfo,
    only: Option<&[String]>,
    deadline: Duration,
) -> Result<(), LabError> {
    let wanted = |id: &str| only.is_none_or(|o| o.iter().any(|x| x == id));
    let mut pending: Vec<(String, Probe, &ProcInfo)> = Vec::new();
    for e in info.etcd.iter().filter(|e| wanted(&e.name)) {
        pending.push((e.name.clone(), Probe::Etcd(e.client_url.clone()), &e.proc));
    }
    for d in info.nodes.iter().chain(std::iter::once(&info.witness)).filter(|d| wanted(&d.id)) {
        pending.push((d.id.clone(), Probe::Metrics(d.metrics.clone()), &d.proc));
    }
    let start = Instant::now();
    let mut last_report = Instant::now();
    while !pending.is_empty() {
        for (id, _, p) in &pending {
            if !p.pid.is_some_and(|pid| process::alive(pid, &p.command)) {
                let tail = process::tail(&p.log, 20);
                let last = match tail.lines().rev().find(|l| !l.trim().is_empty()) {
                    Some(l) => l.to_string(),
                    None => "(nothing: killed from outside? the OOM killer logs to dmesg)".to_string(),
                };
                return Err(LabError::Exited { id: id.clone(), log: p.log.clone(), last, tail });
            }
        }
        let checks = pending.iter().map(|(_, probe, ..)| async move {
            match probe {
                Probe::Etcd(url) => etcd_healthy(url).await,
                Probe::Metrics(url) => metrics_up(url).await,
            }
        });
        // At most 8 probes, each bounded by PROBE_TIMEOUT.
        let results = futures::future::join_all(checks).await;
        let mut i = 0;
        pending.retain(|_| {
            let keep = !results[i];
            i += 1;
            keep
        });
        if pending.is_empty() {
            break;
        }
        let names = || pending.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join(", ");
        if start.elapsed() >= deadline {
            return Err(LabError::Unhealthy {
                waited_s: start.elapsed().as_secs(),
                pending: names(),
                logs: info.dir.join("logs"),
            });
        }
        if last_report.elapsed() >= PROGRESS_EVERY {
            tracing::info!("lab: still waiting for {} ({} s)", names(), start.elapsed().as_secs());
            last_report = Instant::now();
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
    Ok(())
}

/// Wait until etcd is healthy and every metro daemon serves `/metrics`.
pub async fn wait_healthy(info: &LabInfo, deadline: Duration) -> Result<(), LabError> {
    wait_healthy_subset(info, None, deadline).await
}

/// Is `info` running the real metro daemons (not stand-ins)?
pub fn runs_metro_daemons(info: &LabInfo) -> bool {
    info.nodes.iter().all(|d| d.proc.command.iter().any(|a| a.ends_with("metro-node")))
}

/// Who serves the witness site while `up` waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Witness {
    /// The lab's own w1 and etcd-w.
    Lab,
    /// Something outside the lab (the witness VM), started after `up`: wait
    /// for a leader and the storage nodes only.
    External,
}

/// Wait until the cluster itself is healthy: a leader, every daemon
/// registered and reachable from it, and balanced voters (one per data site
/// plus the witness; with an external witness, the data sites only).
pub async fn wait_cluster(info: &LabInfo, deadline: Duration, witness: Witness) -> Result<(), LabError> {
    use crate::client::{request, Overrides, Target};
    let start = Instant::now();
    let (expected, min_voters) = match witness {
        Witness::Lab => (info.nodes.len() + 1, 3),
        Witness::External => (info.nodes.len(), 2),
    };
    let mut last = String::from("no answer yet");
    while start.elapsed() < deadline {
        let attempt = async {
            let t = Target::resolve(&info.dir, &Overrides::default()).map_err(|e| e.to_string())?;
            let mut c = t.connect().await.map_err(|e| e.to_string())?;
            let s = c
                .get_status(request(metro_api::pb::control::GetStatusRequest {}, Duration::from_secs(3)))
                .await
                .map_err(|e| e.message().to_string())?
                .into_inner();
            let reachable = s.nodes.iter().filter(|n| n.reachable && n.role != "witness").count()
                + usize::from(
                    witness == Witness::Lab && s.nodes.iter().any(|n| n.reachable && n.role == "witness"),
                );
            if s.leader.is_empty() {
                return Err("no leader yet".to_string());
            }
            if s.stale {
                return Err(format!("{} could not confirm its view with a leader yet", s.answered_by));
            }
            if s.nodes.len() < expected || reachable < expected {
                return Err(format!("{reachable}/{expected} daemons registered and reachable"));
            }
            if s.voters.len() < min_voters {
                return Err(format!("voters {:?} (want one per data site plus the witness)", s.voters));
            }
            Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => {
                tracing::info!("lab: cluster healthy after {} ms", start.elapsed().as_millis());
                return Ok(());
            }
            Ok(Err(e)) => last = e,
            Err(_) => last = "status call timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(LabError::Unhealthy {
        waited_s: deadline.as_secs(),
        pending: format!("cluster: {last}"),
        logs: info.dir.join("logs"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_authority_and_path() {
        assert_eq!(
            split_url("http://10.77.1.11:9100/metrics"),
            Some(("10.77.1.11:9100".into(), "/metrics".into()))
        );
        assert_eq!(split_url("http://10.77.1.10:2379"), Some(("10.77.1.10:2379".into(), "/".into())));
        assert_eq!(split_url("https://x"), None);
    }

    #[tokio::test]
    async fn a_probe_of_a_closed_port_fails_fast_and_a_listener_answering_http_passes() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 512];
            let _ = s.read(&mut b).await;
            s.write_all(b"HTTP/1.0 404 Not Found\r\n\r\nnope").await.unwrap();
        });
        assert_eq!(http_get(&format!("http://{addr}/metrics")).await, Ok((404, "nope".into())));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let t = Instant::now();
        assert!(!metrics_up(&format!("http://{closed}/metrics")).await);
        assert!(t.elapsed() <= PROBE_TIMEOUT + Duration::from_millis(500));
    }
}
