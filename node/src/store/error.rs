//! Typed errors of the local storage layer.
//!
//! Every variant that concerns a file names the file and what is wrong with
//! it, so an operator can act on the message alone. Nothing in `store` ever
//! silently recreates a file whose contents it cannot trust.

use std::path::PathBuf;

/// Errors of the persistent store (superblock, bitmaps, logs, node store).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A system call on `path` failed.
    #[error("{op} `{}`: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The filesystem holding `path` is full.
    #[error("no space left on the filesystem holding `{}`; free space or move volumes", path.display())]
    NoSpace { path: PathBuf },
    /// The file exists but its contents cannot be trusted (bad magic, bad
    /// checksum, truncated, inconsistent fields).
    #[error("`{}` is corrupt: {what}; restore it from a replica (resync) instead of editing it", path.display())]
    Corrupt { path: PathBuf, what: String },
    /// The file was written by a format version this binary does not know.
    #[error("`{}` has format version {found}, this binary supports version {supported}; run a newer metro-node", path.display())]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },
    /// A file or directory the caller expected is missing.
    #[error("`{}` does not exist", path.display())]
    NotFound { path: PathBuf },
    /// Refusing to overwrite existing state.
    #[error("`{}` already exists; delete it first if you really mean to recreate it", path.display())]
    AlreadyExists { path: PathBuf },
    /// A caller-supplied argument is invalid (name, size, region size...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Creating a volume would exceed the node's capacity.
    #[error("volume of {requested} bytes exceeds node capacity {capacity} bytes; pick a smaller size or another node")]
    CapacityExceeded { requested: u64, capacity: u64 },
    /// The activity log's hot set is full of extents written since the last
    /// flush; the caller must flush the volume, call
    /// [`crate::store::ActivityLog::mark_flushed`] and retry.
    #[error("activity log full: {hot} hot extents, all written since the last flush; flush, then retry")]
    ActivityLogFull { hot: usize },
    /// The replica directory belongs to a later volume of the same name than
    /// the one asked for: this node's replicated state is behind. Opened
    /// once the state catches up; never removed for this.
    #[error("`{}` holds volume id {found}, later than the requested {wanted}: this node's cluster state is behind; it is opened once the state catches up", path.display())]
    LaterVolume { path: PathBuf, found: String, wanted: String },
    /// The replica directory holds another volume with the same serial (a
    /// different cluster's data?): never opened nor removed automatically.
    #[error("`{}` holds volume id {found}, not {wanted} (another cluster's data?); move it out of the data directory by hand", path.display())]
    ForeignVolume { path: PathBuf, found: String, wanted: String },
}

impl StoreError {
    /// Classify an I/O error on `path`: ENOSPC/EDQUOT become [`StoreError::NoSpace`],
    /// ENOENT becomes [`StoreError::NotFound`].
    pub fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => StoreError::NoSpace { path },
            Some(libc::ENOENT) => StoreError::NotFound { path },
            _ => StoreError::Io { path, op, source },
        }
    }

    /// True when retrying after freeing space may succeed.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }
}

pub type StoreResult<T> = Result<T, StoreError>;
