//! What both daemon binaries (`metro-node`, `metro-witness`) do after parsing
//! their flags: load and validate the configuration (exit 2 on a bad one, so
//! systemd's `RestartPreventExitStatus` stops a restart loop), or only check
//! it (`--check`), or run the daemon and map its end to an exit code (3 when
//! the cluster refused the node), or re-exec itself in place when the daemon
//! asks to (after a quorum-loss override rebuilt or superseded its group).

use metro_api::config::{ConfigError, DaemonConfig};
use std::future::Future;
use std::path::Path;
use std::process::ExitCode;

/// Exit status for a configuration the daemon cannot start with.
pub const EXIT_BAD_CONFIG: u8 = 2;

/// How one daemon binary starts.
pub struct Daemon<'a> {
    /// The program name errors start with.
    pub program: &'a str,
    /// Tokio worker threads (`None`: one per core).
    pub worker_threads: Option<usize>,
}

impl Daemon<'_> {
    /// Load `path` with `load`, then check it (`check`) or run it with `run`.
    pub fn main<F, Fut>(
        &self,
        path: &Path,
        check: bool,
        load: impl FnOnce(&Path) -> Result<DaemonConfig, ConfigError>,
        run: F,
    ) -> ExitCode
    where
        F: FnOnce(DaemonConfig, String) -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        let program = self.program;
        metro_api::telemetry::init_tracing();
        let file = path.display().to_string();
        let cfg = match load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{program}: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        };
        if check {
            if let Err(e) = cfg.check_secrets(&file) {
                eprintln!("{program}: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            println!("{file}: OK");
            return ExitCode::SUCCESS;
        }
        tune_allocator();
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.worker_threads {
            rt.worker_threads(n);
        }
        let rt = rt.enable_all().build().expect("tokio runtime");
        match rt.block_on(run(cfg, file)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                if let Some(r) = e.downcast_ref::<crate::daemon::RestartInPlace>() {
                    tracing::warn!("{r}");
                    rt.shutdown_timeout(std::time::Duration::from_secs(2));
                    let err = crate::daemon::reexec();
                    eprintln!("{program}: cannot restart in place: {err}");
                    return ExitCode::FAILURE;
                }
                tracing::error!("fatal: {e:#}");
                eprintln!("{program}: {e:#}");
                if e.downcast_ref::<crate::daemon::JoinRefused>().is_some() {
                    return ExitCode::from(crate::daemon::EXIT_REFUSED);
                }
                ExitCode::FAILURE
            }
        }
    }
}

/// Keep I/O-sized buffers in malloc's heaps.
///
/// A request or replication buffer (up to a few MiB) is allocated on one
/// thread and freed on another. With glibc's defaults, buffers this size come
/// from mmap or from an arena that is trimmed on free, so every 1 MiB write
/// paid for fresh pages: a page fault and a page clear per 4 KiB (about 12%
/// of the primary's CPU in a 1 MiB sequential-write profile). Fixed
/// thresholds (environment settings `MALLOC_MMAP_THRESHOLD_` and
/// `MALLOC_TRIM_THRESHOLD_` still win) keep those pages for reuse; what stays
/// cached is bounded by the trim threshold per arena.
fn tune_allocator() {
    /// Allocations at least this big still come straight from mmap.
    const MMAP_THRESHOLD: libc::c_int = 8 << 20;
    /// Free memory at the top of an arena beyond this goes back to the kernel.
    const TRIM_THRESHOLD: libc::c_int = 64 << 20;
    let set = |param, value, env: &str| {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only changes allocator parameters; it runs before
            // any other thread exists.
            unsafe { libc::mallopt(param, value) };
        }
    };
    set(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_");
    set(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_");
}
