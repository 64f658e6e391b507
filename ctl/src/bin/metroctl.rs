//! `metroctl`: parse the command line, run one command, print the result.
//! Logic lives in the library (`metroctl::lab`, `metroctl::certs`).

use anyhow::Context;
use clap::Parser;
use metroctl::cli::{
    CertsCmd, Cli, ClusterCmd, Command, ConfigCmd, Conn, Global, LabCmd, NodeCmd, Output, SiteCmd, VolumeCmd,
    WitnessCmd,
};
use metroctl::client::{Overrides, Target};
use metroctl::{certs, commands, lab};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    // Behave like a Unix filter when stdout closes early (`metroctl status | head`):
    // exit quietly. SIGPIPE stays ignored (Rust's default) because the TLS
    // transport writes with writev(2), which would raise it when a daemon
    // closes the connection, e.g. on refusing our certificate, and kill us
    // before we could explain why.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg =
            p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
        // println! and clap_complete panic on a closed stdout; nothing else here
        // writes to a pipe.
        if msg.is_some_and(|m| m.contains("Broken pipe") || m.contains("BrokenPipe")) {
            std::process::exit(0);
        }
        default_hook(info)
    }));
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
        Command::Completions { shell } => {
            let mut c = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut c, "metroctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpages { dir } => {
            std::fs::create_dir_all(&dir)?;
            let c = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(c, &dir)?;
            println!("man pages written to {}", dir.display());
            Ok(())
        }
        other => run_cluster(&cli.global, other).await,
    }
}

fn target(g: &Global, c: &Conn) -> anyhow::Result<Target> {
    let o = Overrides {
        endpoints: c.endpoints.clone(),
        ca: c.ca.clone(),
        cert: c.cert.clone(),
        key: c.key.clone(),
        viewer: c.viewer,
    };
    Ok(Target::resolve(&g.lab_dir(None), &o)?)
}

async fn run_cluster(g: &Global, cmd: Command) -> anyhow::Result<()> {
    let json = g.output == Output::Json;
    match cmd {
        Command::Status(c) => commands::status(&target(g, &c)?, json).await,
        Command::Witness(WitnessCmd::Status(c)) => commands::witness_status(&target(g, &c)?, json).await,
        Command::Cluster(ClusterCmd::Config(ConfigCmd::Show(c))) => {
            commands::config_show(&target(g, &c)?, json).await
        }
        Command::Cluster(ClusterCmd::Config(ConfigCmd::Set { pairs, conn })) => {
            commands::config_set(&target(g, &conn)?, pairs, json).await
        }
        Command::Node(NodeCmd::List(c)) => commands::node_list(&target(g, &c)?, json).await,
        Command::Node(NodeCmd::Drain { id, conn }) => commands::node_drain(&target(g, &conn)?, &id).await,
        Command::Site(SiteCmd::List(c)) => commands::site_list(&target(g, &c)?, json).await,
        Command::Site(SiteCmd::Activate { site, force, conn }) => {
            commands::site_set(&target(g, &conn)?, &site, true, force).await
        }
        Command::Site(SiteCmd::Deactivate { site, conn }) => {
            commands::site_set(&target(g, &conn)?, &site, false, false).await
        }
        Command::Volume(v) => match v {
            VolumeCmd::Create { name, size, iops, bandwidth, policy, site, conn } => {
                let size = commands::parse_size(&size).map_err(anyhow::Error::msg)?;
                let policy = policy.unwrap_or_default();
                let a = commands::CreateArgs { name, size, iops, bandwidth, policy, site };
                commands::volume_create(&target(g, &conn)?, a, json).await
            }
            VolumeCmd::List(c) => commands::volume_list(&target(g, &c)?, json).await,
            VolumeCmd::Show { name, conn } => commands::volume_show(&target(g, &conn)?, &name, json).await,
            VolumeCmd::Attach { name, node, conn } => {
                commands::volume_attach(&target(g, &conn)?, &name, &node, json).await
            }
            VolumeCmd::Detach { name, conn } => {
                commands::volume_detach(&target(g, &conn)?, &name, json).await
            }
            VolumeCmd::Delete { name, conn } => commands::volume_delete(&target(g, &conn)?, &name).await,
        },
        Command::Lab(_) | Command::Certs(_) | Command::Completions { .. } | Command::Manpages { .. } => {
            unreachable!("handled in run")
        }
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
        LabCmd::Up {
            dir,
            loopback,
            netns,
            bin_dir,
            timeout,
            loopback_net,
            external_witness,
            timing_scale,
            power_cut_mode,
            daemon_cmd,
        } => {
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
            opts.external_witness = external_witness;
            opts.timing_scale = timing_scale;
            opts.power_cut_mode = power_cut_mode;
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
        LabCmd::PowerCut { dir, target } => {
            let killed = lab::power_cut(&g.lab_dir(dir.dir.as_ref()), &target)?;
            done(
                g,
                &format!("power cut: killed {} (their unflushed writes are lost)", killed.join(", ")),
                serde_json::json!({"killed": killed, "power_cut": true}),
            );
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
