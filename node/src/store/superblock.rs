//! The versioned superblock of a local volume replica (`<dir>/meta`).
//!
//! Payload inside the common [`envelope`] (magic `MTROVOL1`, crc32c):
//! - version 2 (written): `name: str, size: u64, epoch: u64, generation: u64,
//!   id_serial: u64, id_nonce: u64` (the volume's [`VolumeId`]);
//! - version 1 (still read): the same without the id, which reads as
//!   [`VolumeId::LEGACY`] until the replica is opened for its committed id
//!   and the superblock is rewritten as version 2.
//!
//! Invariants: the superblock is only ever replaced atomically; a bad
//! checksum or unknown version on open is an error, never a reason to
//! recreate it. A replica is opened only as the volume whose id its
//! superblock holds (see `NodeStore::open_identified`).

use super::envelope::{self, Dec, Enc};
use super::error::{StoreError, StoreResult};
use metro_quorum::VolumeId;
use std::path::Path;

/// Magic of the `meta` file.
pub const SUPERBLOCK_MAGIC: &[u8; 8] = b"MTROVOL1";
/// Current superblock format version.
pub const SUPERBLOCK_VERSION: u32 = 2;
/// The format before volume ids (read, never written).
const SUPERBLOCK_VERSION_NO_ID: u32 = 1;
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
    /// Which volume this replica belongs to ([`VolumeId::LEGACY`]: written
    /// before ids existed, not yet adopted).
    pub id: VolumeId,
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.str(&self.name).u64(self.size).u64(self.epoch).u64(self.generation);
        e.u64(self.id.serial).u64(self.id.nonce);
        envelope::encode(SUPERBLOCK_MAGIC, SUPERBLOCK_VERSION, &e.0)
    }

    /// Decode the current format or version 1 (no id: `LEGACY`).
    pub fn decode(path: &Path, bytes: &[u8]) -> StoreResult<Self> {
        let version = match bytes.get(8..12) {
            Some(v) if v == SUPERBLOCK_VERSION_NO_ID.to_le_bytes() => SUPERBLOCK_VERSION_NO_ID,
            _ => SUPERBLOCK_VERSION,
        };
        let payload = envelope::decode(path, SUPERBLOCK_MAGIC, version, bytes)?;
        let mut d = Dec::new(path, payload);
        let (name, size, epoch, generation) = (d.str()?, d.u64()?, d.u64()?, d.u64()?);
        let id = if version == SUPERBLOCK_VERSION_NO_ID {
            VolumeId::LEGACY
        } else {
            VolumeId { serial: d.u64()?, nonce: d.u64()? }
        };
        let sb = Superblock { name, size, epoch, generation, id };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(id: VolumeId) -> Superblock {
        Superblock { name: "v".into(), size: 1 << 20, epoch: 3, generation: 1, id }
    }

    #[test]
    fn the_id_round_trips() {
        let want = sb(VolumeId { serial: 4, nonce: 0xfeed });
        let back = Superblock::decode(Path::new("meta"), &want.encode()).unwrap();
        assert_eq!(back, want);
    }

    #[test]
    fn a_version_1_superblock_reads_as_legacy() {
        let old = sb(VolumeId::LEGACY);
        let mut e = Enc::default();
        e.str(&old.name).u64(old.size).u64(old.epoch).u64(old.generation);
        let bytes = envelope::encode(SUPERBLOCK_MAGIC, 1, &e.0);
        assert_eq!(Superblock::decode(Path::new("meta"), &bytes).unwrap(), old);
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let bytes = envelope::encode(SUPERBLOCK_MAGIC, 9, &sb(VolumeId::LEGACY).encode()[16..]);
        let e = Superblock::decode(Path::new("meta"), &bytes).unwrap_err();
        assert!(matches!(e, StoreError::UnsupportedVersion { found: 9, supported: 2, .. }), "{e:?}");
    }
}
