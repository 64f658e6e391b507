//! The versioned superblock of a local volume replica (`<dir>/meta`).
//!
//! Payload (format version 1): `name: str, size: u64, epoch: u64, generation: u64`
//! inside the common [`envelope`] (magic `MTROVOL1`, crc32c).
//!
//! Invariants: the superblock is only ever replaced atomically; a bad
//! checksum or unknown version on open is an error, never a reason to
//! recreate it.

use super::envelope::{self, Dec, Enc};
use super::error::{StoreError, StoreResult};
use std::path::Path;

/// Magic of the `meta` file.
pub const SUPERBLOCK_MAGIC: &[u8; 8] = b"MTROVOL1";
/// Current superblock format version.
pub const SUPERBLOCK_VERSION: u32 = 1;
/// Longest volume name stored (a file name must fit in 255 bytes).
pub const MAX_VOLUME_NAME_BYTES: usize = 200;

/// What the superblock records about a volume replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub name: String,
    /// Size in bytes; equals the length of the `data` file.
    pub size: u64,
    /// Highest epoch this replica has accepted (fencing, invariant 2).
    pub epoch: u64,
    /// Data lineage: bumped by the caller when the replica's contents are
    /// replaced wholesale (full resync) so stale cursors are ignored.
    pub generation: u64,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.str(&self.name).u64(self.size).u64(self.epoch).u64(self.generation);
        envelope::encode(SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION, &e.0)
    }

    pub fn decode(path: &Path, bytes: &[u8]) -> StoreResult<Self> {
        let payload = envelope::decode(path, SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION, bytes)?;
        let mut d = Dec::new(path, payload);
        let sb = Superblock { name: d.str()?, size: d.u64()?, epoch: d.u64()?, generation: d.u64()? };
        d.finish()?;
        if sb.name.is_empty() || sb.name.len() > MAX_VOLUME_NAME_BYTES {
            return Err(d.corrupt(format!("volume name length {} out of bounds", sb.name.len())));
        }
        Ok(sb)
    }

    pub fn load(path: &Path) -> StoreResult<Self> {
        let bytes = std::fs::read(path).map_err(|e| StoreError::io(path, "read superblock", e))?;
        Self::decode(path, &bytes)
    }

    pub fn store(&self, path: &Path) -> StoreResult<()> {
        envelope::atomic_write(path, &self.encode())
    }
}
