//! Logs, metrics and systemd notifications, the same way in every daemon.
//!
//! - Logs: tracing to journald when running under systemd (`JOURNAL_STREAM`
//!   set), otherwise to stderr. `RUST_LOG` filters (default `info`).
//! - Metrics: a prometheus-client [`Registry`] served at `/metrics`.
//! - systemd: `READY=1`, `STATUS=` and `WATCHDOG=1` via the `systemd` crate;
//!   all are no-ops when `NOTIFY_SOCKET` is unset.

use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tracing_subscriber::{prelude::*, EnvFilter};

/// Install the global tracing subscriber. Safe to call more than once.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = registry.with(journald).try_init();
            return;
        }
    }
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let _ = registry
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi))
        .try_init();
}

/// Tell systemd we are ready (no-op outside systemd).
pub fn notify_ready(status: &str) {
    let _ = systemd::daemon::notify([("READY", "1"), ("STATUS", status)].iter());
}

pub fn notify_status(status: &str) {
    let _ = systemd::daemon::notify([("STATUS", status)].iter());
}

pub fn notify_stopping() {
    let _ = systemd::daemon::notify([("STOPPING", "1")].iter());
}

/// Ping the watchdog every half of `WATCHDOG_USEC`, as long as `healthy()` says so.
pub fn spawn_watchdog(healthy: impl Fn() -> bool + Send + 'static) {
    let Some(usec) = std::env::var("WATCHDOG_USEC").ok().and_then(|v| v.parse::<u64>().ok()) else {
        return;
    };
    let period = std::time::Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            if healthy() {
                let _ = systemd::daemon::notify([("WATCHDOG", "1")].iter());
            }
        }
    });
}

/// A shared metrics registry.
pub type SharedRegistry = Arc<Mutex<Registry>>;

pub fn new_registry() -> SharedRegistry {
    Arc::new(Mutex::new(Registry::with_prefix("metro")))
}

/// Serve `GET /metrics` on `addr` until the process ends.
pub async fn serve_metrics(addr: SocketAddr, registry: SharedRegistry) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                let mut out = String::new();
                let reg = registry.lock().expect("metrics registry poisoned");
                if prometheus_client::encoding::text::encode(&mut out, &reg).is_err() {
                    out.clear();
                }
                ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], out)
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}
