//! The clap command tree of `metroctl`. Adding a subcommand is one variant in
//! [`Command`] plus one match arm in `src/bin/metroctl.rs`.
//!
//! Lab directory resolution (every command that needs a lab): the command's
//! own `--dir`, else the global `--lab`, else `METRO_LAB_DIR`, else `./lab`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::IpAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "metroctl",
    version,
    about = "metro stretch-cluster storage: operate the cluster and the lab"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Lab directory whose lab.json gives endpoints and certificates.
    #[arg(long, global = true, env = "METRO_LAB_DIR", value_name = "DIR")]
    pub lab: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl Global {
    /// The lab directory: `explicit` (a command's `--dir`), else `--lab`/`METRO_LAB_DIR`, else `./lab`.
    pub fn lab_dir(&self, explicit: Option<&PathBuf>) -> PathBuf {
        explicit.cloned().or_else(|| self.lab.clone()).unwrap_or_else(crate::lab::default_dir)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build, break and tear down the one-machine lab.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Create the cluster CA and issue certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// One screen: sites, quorum and leader, witness, etcd, volumes, alerts.
    Status(Conn),
    /// Sites: list, activate (quorum-loss override), deactivate (maintenance).
    #[command(subcommand)]
    Site(SiteCmd),
    /// Storage nodes and the witness.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Volumes: create, list, show, attach, detach, delete.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// The witness: reachability, quorum role and round-trip time.
    #[command(subcommand)]
    Witness(WitnessCmd),
    /// Cluster-wide settings stored in etcd (preferred site, policies, timings).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Print shell completions for SHELL to stdout.
    Completions { shell: clap_complete::Shell },
    /// Write man pages into DIR.
    Manpages { dir: PathBuf },
}

/// How to reach the cluster (defaults come from --lab's lab.json or METRO_* variables).
#[derive(Debug, Clone, Args, Default)]
pub struct Conn {
    /// Control API endpoint host:port (repeatable; tried in order). Env: METRO_ENDPOINTS (comma-separated).
    #[arg(long = "endpoint", global = true)]
    pub endpoints: Vec<String>,
    /// Cluster CA certificate. Env: METRO_CA.
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (CN admin:<n> or viewer:<n>). Env: METRO_CERT.
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Client key. Env: METRO_KEY.
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// Use the lab's viewer certificate instead of the admin one.
    #[arg(long, global = true)]
    pub viewer: bool,
}

#[derive(Debug, Subcommand)]
pub enum SiteCmd {
    List(Conn),
    /// Put a data site (back) into service. Refused when it may lack acknowledged writes, unless --force.
    Activate {
        site: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Take a data site out of service for maintenance.
    Deactivate {
        site: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    List(Conn),
    /// Move every primary off NODE before maintenance.
    Drain {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Subcommand)]
pub enum WitnessCmd {
    Status(Conn),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// The cluster config in etcd (/metro/<cluster>/config).
    #[command(subcommand)]
    Config(ConfigCmd),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Show the stored config and which generation the cluster applied.
    Show(Conn),
    /// Change keys (admin only), e.g. `preferred_site=dc-b node_loss_ms=3000`;
    /// invalid values are refused and nothing changes. Waits until the leader applied it.
    Set {
        /// KEY=VALUE pairs. Keys: preferred_site, default_lease_policy, site_stable_ms, node_loss_ms, voters_per_site.
        #[arg(required = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
        pairs: Vec<(String, String)>,
        #[command(flatten)]
        conn: Conn,
    },
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if k.trim().is_empty() {
        return Err(format!("`{s}` has no key"));
    }
    Ok((k.trim().to_string(), v.trim().to_string()))
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a thin, synchronously mirrored volume (one replica per data site).
    Create {
        name: String,
        /// Size, e.g. 1GiB, 512MiB.
        #[arg(long)]
        size: String,
        /// IOPS limit (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        iops: u64,
        /// Bandwidth limit in bytes/s (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        bandwidth: u64,
        /// What the primary does without a lease: suspend (hold I/O) or error
        /// (default: the cluster config's default_lease_policy).
        #[arg(long)]
        policy: Option<String>,
        /// Preferred site for the primary.
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    List(Conn),
    Show {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make NODE the primary (planned move, no lost write).
    Attach {
        name: String,
        #[arg(long)]
        node: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop serving the volume anywhere (replicas are kept).
    Detach {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    Delete {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `--dir DIR` of the lab commands.
#[derive(Debug, Clone, Args)]
pub struct DirArg {
    /// Lab directory (default: --lab, METRO_LAB_DIR, or ./lab).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum LabCmd {
    /// Build the topology, start etcd and the daemons, wait until healthy, write lab.json.
    Up {
        #[command(flatten)]
        dir: DirArg,
        /// Use 127.77.x.y addresses in the root namespace instead of network namespaces.
        #[arg(long, conflicts_with = "netns")]
        loopback: bool,
        /// Require network namespaces (no fallback to loopback).
        #[arg(long)]
        netns: bool,
        /// Directory holding metro-node and metro-witness (default: METRO_BIN_DIR or metroctl's own).
        #[arg(long)]
        bin_dir: Option<PathBuf>,
        /// Seconds to wait for the lab to become healthy.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Loopback mode: use 127.N.x.y (default 77), e.g. to run a second loopback lab.
        #[arg(long, value_name = "N", default_value_t = crate::lab::topology::DEFAULT_LOOPBACK_OCTET)]
        loopback_net: u8,
        /// Do not start the witness site (w1, etcd-w): the witness VM serves it (images/test-witness-image --lab).
        #[arg(long)]
        external_witness: bool,
        /// Multiply every quorum timing (heartbeat, elections, lease, node loss) by N, for slow
        /// members such as the witness VM under TCG.
        #[arg(long, value_name = "N", default_value_t = 1)]
        timing_scale: u32,
        /// Test only: storage nodes keep unflushed volume writes in their own memory
        /// (`storage.volatile_write_cache`), so `lab power-cut` loses them like a power cut.
        #[arg(long, env = "METRO_LAB_POWER_CUT_MODE")]
        power_cut_mode: bool,
        /// Stand-in for the metro daemons (space-separated; placeholders as in LabOptions).
        #[arg(long, hide = true)]
        daemon_cmd: Option<String>,
    },
    /// Stop every lab process and remove its namespaces (keeps data unless --purge).
    Down {
        #[command(flatten)]
        dir: DirArg,
        /// Delete the lab directory too.
        #[arg(long)]
        purge: bool,
    },
    /// kill -9 every process of a site (daemons and its etcd member).
    KillSite {
        #[command(flatten)]
        dir: DirArg,
        site: String,
    },
    /// Restart a killed site's processes with their existing data.
    StartSite {
        #[command(flatten)]
        dir: DirArg,
        site: String,
    },
    /// kill -9 one daemon (a1, w1, etcd-a, ...).
    KillNode {
        #[command(flatten)]
        dir: DirArg,
        id: String,
    },
    /// Power cut: kill -9 a site (SITE) or one daemon (NODE) and lose every write its storage
    /// nodes had not flushed. Needs a lab started with `lab up --power-cut-mode`.
    /// Restart with `start-site`/`start-node`.
    PowerCut {
        #[command(flatten)]
        dir: DirArg,
        /// A site (dc-a, dc-b, witness) or a daemon (a1, a2, b1, b2, ...).
        target: String,
    },
    /// Restart one killed daemon.
    StartNode {
        #[command(flatten)]
        dir: DirArg,
        id: String,
    },
    /// Silently drop all traffic between two sites.
    Partition {
        #[command(flatten)]
        dir: DirArg,
        site_a: String,
        site_b: String,
    },
    /// Remove every partition.
    Heal {
        #[command(flatten)]
        dir: DirArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create the cluster CA (ca.pem, ca.key) in DIR; keeps an existing one.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by DIR's CA, written to DIR/<cn with ':' as '-'>.{pem,key}.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// node:<id>, witness, admin:<name> or viewer:<name>.
        #[arg(long)]
        cn: String,
        /// IP SAN (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Extra DNS SAN (repeatable); `metro` is always included.
        #[arg(long)]
        dns: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = crate::certs::DEFAULT_VALIDITY_DAYS)]
        days: u32,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_commands_dir_wins_over_the_global_lab() {
        let cli = Cli::try_parse_from(["metroctl", "--lab", "/x", "lab", "down", "--dir", "/y", "--purge"])
            .unwrap();
        let Command::Lab(LabCmd::Down { dir, purge }) = &cli.command else { panic!("{cli:?}") };
        assert!(purge);
        assert_eq!(cli.global.lab_dir(dir.dir.as_ref()), PathBuf::from("/y"));
        let cli = Cli::try_parse_from(["metroctl", "-o", "json", "lab", "heal", "--lab", "/x"]).unwrap();
        let Command::Lab(LabCmd::Heal { dir }) = &cli.command else { panic!() };
        assert_eq!(cli.global.lab_dir(dir.dir.as_ref()), PathBuf::from("/x"));
        assert_eq!(cli.global.output, Output::Json);
    }

    #[test]
    fn config_set_takes_key_value_pairs() {
        let cli = Cli::try_parse_from([
            "metroctl",
            "cluster",
            "config",
            "set",
            "preferred_site=dc-b",
            "node_loss_ms = 3000",
        ])
        .unwrap();
        let Command::Cluster(ClusterCmd::Config(ConfigCmd::Set { pairs, .. })) = &cli.command else {
            panic!("{cli:?}")
        };
        assert_eq!(
            pairs,
            &[("preferred_site".into(), "dc-b".into()), ("node_loss_ms".into(), "3000".into())]
        );
        let e = Cli::try_parse_from(["metroctl", "cluster", "config", "set", "preferred_site"]).unwrap_err();
        assert!(e.to_string().contains("is not KEY=VALUE"), "{e}");
        assert!(Cli::try_parse_from(["metroctl", "cluster", "config", "set"]).is_err());
    }
}
