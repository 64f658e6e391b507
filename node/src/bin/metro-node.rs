//! `metro-node`: the storage daemon. Thin: parse flags, load config, run.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "metro-node", version, about = "metro storage daemon (volumes, NBD, synchronous mirroring)")]
struct Args {
    /// Configuration file (TOML; template: api/metro.toml.example).
    #[arg(long, short, env = "METRO_CONFIG", default_value = "/etc/metro/metro.toml")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    metro_api::telemetry::init_tracing();
    let file = args.config.display().to_string();
    let cfg = match metro_api::config::DaemonConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("metro-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if cfg.role == metro_api::config::Role::Witness {
        eprintln!("metro-node: config {file}: key `role`: `witness` runs metro-witness, not metro-node");
        return std::process::ExitCode::from(2);
    }
    if args.check {
        if let Err(e) = cfg.check_secrets(&file) {
            eprintln!("metro-node: {e}");
            return std::process::ExitCode::from(2);
        }
        println!("{file}: OK");
        return std::process::ExitCode::SUCCESS;
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(metro_node::daemon::run(cfg, &file)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(r) = e.downcast_ref::<metro_node::daemon::RestartInPlace>() {
                tracing::warn!("{r}");
                rt.shutdown_timeout(std::time::Duration::from_secs(2));
                let err = metro_node::daemon::reexec();
                eprintln!("metro-node: cannot restart in place: {err}");
                return std::process::ExitCode::FAILURE;
            }
            tracing::error!("fatal: {e:#}");
            eprintln!("metro-node: {e:#}");
            if e.downcast_ref::<metro_node::daemon::JoinRefused>().is_some() {
                return std::process::ExitCode::from(metro_node::daemon::EXIT_REFUSED);
            }
            std::process::ExitCode::FAILURE
        }
    }
}
