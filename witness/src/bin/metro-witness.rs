//! `metro-witness`: the storage-less voter of the third site.

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "metro-witness", version, about = "metro witness: votes, stores no volume data")]
struct Args {
    /// Configuration file (TOML; `role = "witness"`).
    #[arg(long, short, env = "METRO_CONFIG", default_value = "/etc/metro/metro.toml")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // A small runtime: the witness only votes and answers status.
    let daemon = metro_node::entry::Daemon { program: "metro-witness", worker_threads: Some(2) };
    daemon.main(&args.config, args.check, metro_witness::load_config, |cfg, file| async move {
        metro_witness::run(cfg, &file).await
    })
}
