//! metro benchmarks: the library behind `metro-bench` and the delay helpers
//! the tests reuse. Every number comes from a real lab on this machine
//! (`metroctl::lab`), real NBD clients (fio, qemu-nbd) and real faults.
//!
//! Invariants: every section cleans up what it installed (iptables rules,
//! delayer processes, qemu-nbd) even on error, through `Drop` guards; every
//! wait has a deadline.

pub mod attach;
pub mod ctl;
pub mod delay;
pub mod fio;
pub mod io;
pub mod lab;
pub mod report;
pub mod resync;
pub mod rto;
pub mod scale;
pub mod stats;

/// The repository root (for the test tools the bench reuses).
pub fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}
