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
    metro_api::telemetry::init_tracing();
    let file = args.config.display().to_string();
    let cfg = match metro_witness::load_config(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("metro-witness: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.check {
        if let Err(e) = cfg.check_secrets(&file) {
            eprintln!("metro-witness: {e}");
            return std::process::ExitCode::from(2);
        }
        println!("{file}: OK");
        return std::process::ExitCode::SUCCESS;
    }
    // A small runtime: the witness only votes and answers status.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(metro_witness::run(cfg, &file)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(r) = e.downcast_ref::<metro_node::daemon::RestartInPlace>() {
                tracing::warn!("{r}");
                rt.shutdown_timeout(std::time::Duration::from_secs(2));
                let err = metro_node::daemon::reexec();
                eprintln!("metro-witness: cannot restart in place: {err}");
                return std::process::ExitCode::FAILURE;
            }
            tracing::error!("fatal: {e:#}");
            eprintln!("metro-witness: {e:#}");
            if e.downcast_ref::<metro_node::daemon::JoinRefused>().is_some() {
                return std::process::ExitCode::from(metro_node::daemon::EXIT_REFUSED);
            }
            std::process::ExitCode::FAILURE
        }
    }
}
