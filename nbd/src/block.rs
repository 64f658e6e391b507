//! The block-device seam: what the NBD server serves and what every volume
//! implementation (local file, in-memory, faulty, replicated primary) provides.
//!
//! Offsets and lengths are in bytes. Implementations must check ranges and
//! return [`BlockError::OutOfRange`] rather than touching data past `size()`.

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;

/// Errors a block device returns; each maps to one NBD error number.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("request out of range: offset {offset} len {len} size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("no space left on the device")]
    NoSpace,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The export is going away (lease lost with policy `error`, planned move,
    /// daemon shutdown). The NBD server answers ESHUTDOWN and disconnects.
    #[error("export shutting down: {0}")]
    Shutdown(String),
    #[error("read-only export")]
    ReadOnly,
}

impl BlockError {
    /// NBD error number (values from the NBD protocol spec).
    pub fn nbd_errno(&self) -> u32 {
        match self {
            BlockError::OutOfRange { .. } => 22, // EINVAL
            BlockError::NoSpace => 28,           // ENOSPC
            BlockError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => 28,
            BlockError::Io(_) => 5,         // EIO
            BlockError::Shutdown(_) => 108, // ESHUTDOWN
            BlockError::ReadOnly => 1,      // EPERM
        }
    }
}

pub type BlockResult<T> = Result<T, BlockError>;

#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Preferred (and minimum advertised) block size.
    fn block_size(&self) -> u32 {
        4096
    }
    /// Smallest alignment (power of two) the device accepts for offsets and
    /// lengths; 1 means any byte range. The NBD server advertises it and
    /// refuses unaligned requests with EINVAL when it is above 1.
    fn min_block_size(&self) -> u32 {
        1
    }
    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes>;
    /// Write `data` at `offset`. With `fua`, durable before returning.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()>;
    /// Write several ranges in order (each as [`BlockDevice::write`] without
    /// FUA), one result per range. Implementations may do it in one blocking
    /// call instead of one per range; the default writes them one by one.
    async fn write_batch(&self, writes: Vec<(u64, Bytes)>) -> Vec<BlockResult<()>> {
        let mut out = Vec::with_capacity(writes.len());
        for (offset, data) in writes {
            out.push(self.write(offset, data, false).await);
        }
        out
    }
    /// Make every completed write durable.
    async fn flush(&self) -> BlockResult<()>;
    /// Discard a range (may punch a hole; reads after return zeroes).
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> BlockResult<()>;
    /// Zero a range; `may_punch` allows a hole instead of written zeroes.
    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool, may_punch: bool) -> BlockResult<()>;
}

/// Why an export name cannot be opened on this node.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExportError {
    #[error("no volume named `{0}`")]
    NotFound(String),
    /// This node is not the primary: the message names who is.
    #[error("volume `{volume}` is served by its primary `{primary}` at nbd://{nbd}/{volume}; connect there")]
    NotPrimary { volume: String, primary: String, nbd: String },
    #[error("volume `{volume}` is unavailable: {reason}")]
    Unavailable { volume: String, reason: String },
}

/// Resolves NBD export names to devices.
pub trait ExportRegistry: Send + Sync + 'static {
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, ExportError>;
    /// Names for NBD_OPT_LIST.
    fn list(&self) -> Vec<String>;
}
