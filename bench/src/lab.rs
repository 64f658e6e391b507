//! A fresh lab per section, through the `metroctl::lab` library (the same
//! code `metroctl lab up` runs), torn down and purged on drop.

use crate::ctl::Ctl;
use crate::ctl::CtlExt;
use anyhow::Context;
use metroctl::lab::{LabInfo, LabOptions, NetMode};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Lab bring-up deadline on a loaded 2-core machine.
const HEALTH_DEADLINE: Duration = Duration::from_secs(120);

/// Where and how to build labs.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub dir: PathBuf,
    pub bin_dir: PathBuf,
    pub netns: bool,
    pub octet: u8,
}

pub struct BenchLab {
    pub info: LabInfo,
    pub ctl: Ctl,
    pub spec: LabSpec,
}

impl BenchLab {
    pub async fn up(spec: &LabSpec) -> anyhow::Result<BenchLab> {
        let _ = metroctl::lab::down(&spec.dir, true);
        let mut opts = LabOptions::new(&spec.dir);
        opts.bin_dir = spec.bin_dir.clone();
        opts.health_deadline = HEALTH_DEADLINE;
        if spec.netns {
            opts.mode = NetMode::Netns;
        } else {
            opts.mode = NetMode::Loopback;
            opts.loopback_octet = spec.octet;
        }
        let t = Instant::now();
        let info = metroctl::lab::up(opts).await.context("lab up")?;
        eprintln!("lab up in {:.1} s ({:?})", t.elapsed().as_secs_f64(), info.mode);
        Ok(BenchLab { ctl: Ctl::new(&spec.bin_dir, &spec.dir), info, spec: spec.clone() })
    }

    pub fn dir(&self) -> &Path {
        &self.spec.dir
    }

    /// Subnet of a site, e.g. `127.90.1.0/24`.
    pub fn subnet(&self, site: &str) -> String {
        let s = metroctl::lab::topology::site(site).expect("known site");
        metroctl::lab::topology::site_subnet(self.base(), s)
    }

    /// An unused address inside a site's subnet (for RTT and link probes).
    pub fn probe_addr(&self, site: &str) -> Ipv4Addr {
        let s = metroctl::lab::topology::site(site).expect("known site");
        let [a, b] = self.base();
        Ipv4Addr::new(a, b, s.octet, 200)
    }

    fn base(&self) -> [u8; 2] {
        metroctl::lab::topology::base(self.info.mode, self.spec.octet)
    }

    /// Poll until `name` is fully in sync, or fail after `timeout`.
    pub async fn wait_in_sync(&self, name: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < timeout {
            match self.ctl.in_sync(name) {
                Ok(true) => return Ok(t.elapsed()),
                Ok(false) => {}
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("{name} not in sync after {timeout:?} (last error: {last})")
    }

    pub fn site_of(&self, node: &str) -> Option<String> {
        self.info.daemon(node).map(|d| d.site.clone())
    }
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        if std::env::var_os("METRO_KEEP_LAB").is_some() {
            return;
        }
        if let Err(e) = metroctl::lab::down(&self.spec.dir, true) {
            eprintln!("lab down {}: {e}", self.spec.dir.display());
        }
    }
}
