//! `metro-attach`: serve attached volumes on local NBD sockets and follow
//! their primaries. Logic lives in the library; this is flags and signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use metro_attach::agent::Agent;
use metro_attach::follower::{FollowOptions, HoldPolicy};
use metro_attach::locator::Locator;

#[derive(Parser)]
#[command(name = "metro-attach", version, about = "metro attach agent for storage-less application hosts")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach volumes and serve them until SIGTERM.
    Run(RunArgs),
    /// List what a running agent serves (reads <socket-dir>/attachments.json).
    Attachments {
        #[arg(long, default_value = "/run/metro/attach")]
        socket_dir: PathBuf,
        #[arg(short, long, default_value = "table")]
        output: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Control API endpoints (host:port), comma-separated: storage nodes and the witness.
    #[arg(long, env = "METRO_ENDPOINTS", value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, env = "METRO_CA")]
    ca: PathBuf,
    /// This host's certificate (CN client:<host>).
    #[arg(long, env = "METRO_CERT")]
    cert: PathBuf,
    #[arg(long, env = "METRO_KEY")]
    key: PathBuf,
    /// A volume to attach (repeat for more).
    #[arg(long = "volume", required = true)]
    volumes: Vec<String>,
    /// Where the sockets go: <dir>/<volume>.sock.
    #[arg(long, default_value = "/run/metro/attach")]
    socket_dir: PathBuf,
    /// Also serve VOLUME on a TCP address (loopback only), e.g. v=127.0.0.1:10810.
    #[arg(long = "tcp")]
    tcp: Vec<String>,
    /// How long requests are held while no primary answers.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// After the hold: fail requests with EIO (`error`), or keep holding (`suspend`).
    #[arg(long, value_enum, default_value = "error")]
    policy: HoldPolicy,
    /// Serve Prometheus metrics here (e.g. 127.0.0.1:9487).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Attachments { socket_dir, output } => {
            let path = socket_dir.join("attachments.json");
            let body = std::fs::read(&path)
                .with_context(|| format!("reading {} (is metro-attach running?)", path.display()))?;
            let list: Vec<serde_json::Value> = serde_json::from_slice(&body).context("attachments.json")?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<20} {:<40} {:<22} {:>8} {:>10} {:>8}",
                    "VOLUME", "SOCKET", "UPSTREAM", "HOLDING", "RECONNECTS", "STALL-MS"
                );
                for a in list {
                    let s = |k: &str| a[k].as_str().unwrap_or("").to_string();
                    println!(
                        "{:<20} {:<40} {:<22} {:>8} {:>10} {:>8}",
                        s("volume"),
                        s("socket"),
                        s("upstream"),
                        a["holding"].as_bool().unwrap_or(false),
                        a["reconnects"].as_u64().unwrap_or(0),
                        a["longest_stall_ms"].as_u64().unwrap_or(0)
                    );
                }
            }
            Ok(())
        }
        Cmd::Run(args) => tokio::runtime::Runtime::new()?.block_on(run(args)),
    }
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    metro_api::telemetry::init_tracing();
    metro_api::tls::install_crypto_provider();
    let tls = metro_api::tls::TlsFiles::load(&a.ca, &a.cert, &a.key).context("loading the TLS files")?;
    let mut tcp = std::collections::HashMap::new();
    for t in &a.tcp {
        let (v, addr) = t.split_once('=').with_context(|| format!("--tcp {t}: use VOLUME=ADDR"))?;
        let addr: SocketAddr = addr.parse().with_context(|| format!("--tcp {t}: bad address"))?;
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "--tcp {t}: only loopback addresses (the socket has no authentication)"
        );
        tcp.insert(v.to_string(), addr);
    }
    std::fs::create_dir_all(&a.socket_dir).with_context(|| format!("creating {}", a.socket_dir.display()))?;
    let opts = FollowOptions { hold: a.hold, policy: a.policy, ..FollowOptions::default() };
    let agent = Agent::new(
        Locator { endpoints: a.endpoints, tls },
        opts,
        Some(a.socket_dir.join("attachments.json")),
    );
    if let Some(addr) = a.metrics {
        let registry = metro_api::telemetry::new_registry();
        metro_attach::metrics::spawn(agent.clone(), registry.clone());
        metro_api::telemetry::serve_metrics(addr, registry)
            .await
            .with_context(|| format!("cannot serve metrics on {addr} (change it with --metrics)"))?;
    }
    for v in &a.volumes {
        let sock = a.socket_dir.join(format!("{v}.sock"));
        if let Err(e) = agent.attach(v, &sock, tcp.get(v).copied()).await {
            agent.detach_all().await;
            return Err(anyhow::anyhow!("attaching {v}: {e}"));
        }
    }
    agent.save();
    metro_api::telemetry::notify_ready(&format!("serving {} volume(s)", a.volumes.len()));
    metro_api::telemetry::spawn_watchdog(|| true);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    metro_api::telemetry::notify_stopping();
    tracing::info!("stopping: detaching every volume");
    agent.detach_all().await;
    Ok(())
}
