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
    let load = |path: &std::path::Path| {
        let cfg = metro_api::config::DaemonConfig::load(path)?;
        if cfg.role == metro_api::config::Role::Witness {
            return Err(metro_api::config::ConfigError {
                file: path.display().to_string(),
                key: "role".into(),
                reason: "`witness` runs metro-witness, not metro-node".into(),
            });
        }
        Ok(cfg)
    };
    let daemon = metro_node::entry::Daemon { program: "metro-node", worker_threads: None };
    daemon.main(&args.config, args.check, load, |cfg, file| async move {
        metro_node::daemon::run(cfg, &file).await
    })
}
