//! `metroctl`: parse the command line, run one command, print the result.
//! Logic lives in the library (`metroctl::lab`, `metroctl::certs`).

use anyhow::Context;
use clap::Parser;
use metroctl::cli::{CertsCmd, Cli, Command, Global, LabCmd, Output};
use metroctl::{certs, lab};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    metro_api::telemetry::init_tracing();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metroctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Lab(cmd) => run_lab(&cli.global, cmd).await,
        Command::Certs(cmd) => run_certs(&cli.global, cmd),
    }
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}

/// Print a done-message, or `{"ok":true, …}` with `-o json`.
fn done(g: &Global, msg: &str, json: serde_json::Value) {
    match g.output {
        Output::Table => println!("{msg}"),
        Output::Json => print_json(&json),
    }
}

fn print_lab(g: &Global, info: &lab::LabInfo, elapsed: std::time::Duration) {
    if g.output == Output::Json {
        return print_json(info);
    }
    println!(
        "lab up in {:.1} s ({:?} mode), {}",
        elapsed.as_secs_f64(),
        info.mode,
        info.dir.join(lab::LAB_JSON).display()
    );
    println!("{:<8} {:<8} {:<8} {:<14} {:<8} ENDPOINT", "ID", "SITE", "ROLE", "ADDRESS", "PID");
    for e in &info.etcd {
        let pid = e.proc.pid.map(|p| p.to_string()).unwrap_or_default();
        println!("{:<8} {:<8} {:<8} {:<14} {:<8} {}", e.name, e.site, "etcd", e.address, pid, e.client_url);
    }
    for d in info.nodes.iter().chain(std::iter::once(&info.witness)) {
        let pid = d.proc.pid.map(|p| p.to_string()).unwrap_or_default();
        println!("{:<8} {:<8} {:<8} {:<14} {:<8} {}", d.id, d.site, d.role, d.address, pid, d.api);
    }
}

async fn run_lab(g: &Global, cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up { dir, loopback, netns, bin_dir, timeout, loopback_net, daemon_cmd } => {
            let mut opts = lab::LabOptions::new(g.lab_dir(dir.dir.as_ref()));
            if let Some(b) = bin_dir {
                opts.bin_dir = b;
            }
            opts.mode = if loopback {
                lab::NetMode::Loopback
            } else if netns {
                lab::NetMode::Netns
            } else {
                lab::NetMode::Auto
            };
            opts.health_deadline = std::time::Duration::from_secs(timeout);
            opts.loopback_octet = loopback_net;
            opts.daemon_override = daemon_cmd.map(|c| c.split_whitespace().map(String::from).collect());
            let t = std::time::Instant::now();
            let info = lab::up(opts).await?;
            print_lab(g, &info, t.elapsed());
        }
        LabCmd::Down { dir, purge } => {
            let d = g.lab_dir(dir.dir.as_ref());
            let t = std::time::Instant::now();
            lab::down(&d, purge)?;
            let ms = t.elapsed().as_millis();
            done(
                g,
                &format!("lab down in {ms} ms"),
                serde_json::json!({"ok": true, "ms": ms as u64, "purged": purge}),
            );
        }
        LabCmd::KillSite { dir, site } => {
            let killed = lab::kill_site(&g.lab_dir(dir.dir.as_ref()), &site)?;
            done(g, &format!("killed {}", killed.join(", ")), serde_json::json!({"killed": killed}));
        }
        LabCmd::KillNode { dir, id } => {
            let killed = lab::kill_node(&g.lab_dir(dir.dir.as_ref()), &id)?;
            done(g, &format!("killed {}", killed.join(", ")), serde_json::json!({"killed": killed}));
        }
        LabCmd::StartSite { dir, site } => {
            let started = lab::start_site(&g.lab_dir(dir.dir.as_ref()), &site).await?;
            done(g, &format!("started {}", started.join(", ")), serde_json::json!({"started": started}));
        }
        LabCmd::StartNode { dir, id } => {
            let started = lab::start_node(&g.lab_dir(dir.dir.as_ref()), &id).await?;
            done(g, &format!("started {}", started.join(", ")), serde_json::json!({"started": started}));
        }
        LabCmd::Partition { dir, site_a, site_b } => {
            lab::partition(&g.lab_dir(dir.dir.as_ref()), &site_a, &site_b)?;
            done(
                g,
                &format!("partitioned {site_a} from {site_b}"),
                serde_json::json!({"partitioned": [site_a, site_b]}),
            );
        }
        LabCmd::Heal { dir } => {
            lab::heal(&g.lab_dir(dir.dir.as_ref()))?;
            done(g, "healed", serde_json::json!({"healed": true}));
        }
    }
    Ok(())
}

fn run_certs(g: &Global, cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { dir } => {
            let (_, p) = certs::init(&dir)?;
            done(
                g,
                &format!("CA: {} (key {})", p.cert.display(), p.key.display()),
                serde_json::json!({"ca_cert": p.cert, "ca_key": p.key}),
            );
        }
        CertsCmd::Issue { dir, cn, ip, dns, days } => {
            let ca = certs::Ca::load(&dir)?;
            let pair = certs::issue(&ca, &cn, &ip, &dns, days)?;
            let p = certs::write_pair(&dir, &certs::file_stem(&cn), &pair)
                .with_context(|| format!("writing the certificate for {cn}"))?;
            done(
                g,
                &format!("{cn}: {} (key {})", p.cert.display(), p.key.display()),
                serde_json::json!({"cn": cn, "cert": p.cert, "key": p.key}),
            );
        }
    }
    Ok(())
}
