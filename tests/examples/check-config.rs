//! Parse rendered daemon configs with the real parser.
//!
//! `scripts/pkg-test` renders every host's `metro.toml` from the Ansible
//! templates (ansible/render-configs.yml) and runs this on the results, so a
//! template that drifts from `metro_api::config::DaemonConfig` fails CI.
//!
//! Usage: `check-config FILE...`. Prints one line per file:
//! `FILE node_id=ID site=SITE role=ROLE api=ADDR etcd=N`, and exits 1 with the
//! parser's error (file, key, reason) on the first file that does not parse.

use metro_api::config::DaemonConfig;

fn main() -> anyhow::Result<()> {
    let files: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!files.is_empty(), "usage: check-config FILE...");
    for file in &files {
        let cfg = DaemonConfig::load(std::path::Path::new(file))?;
        println!(
            "{file} node_id={} site={} role={} api={} etcd={}",
            cfg.node_id,
            cfg.site,
            format!("{:?}", cfg.role).to_lowercase(),
            cfg.listen.api,
            cfg.etcd.endpoints.len()
        );
    }
    Ok(())
}
