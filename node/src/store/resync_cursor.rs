//! `ResyncCursor`: how far an interrupted resync got (invariant 6).
//!
//! File: the common envelope (magic `MTRORSC1`, version 1, crc32c) around
//! `next_offset: u64, generation: u64`.
//!
//! Invariants: every step below `next_offset` was completed (and made
//! durable on the target) before the cursor was saved; a cursor whose
//! `generation` differs from the current resync's is ignored; a cursor that
//! fails its checksum loads as "no cursor" (restart from 0), which only
//! costs time, never correctness.

use super::envelope::{self, Dec, Enc};
use super::error::{StoreError, StoreResult};
use std::path::Path;

pub const CURSOR_MAGIC: &[u8; 8] = b"MTRORSC1";
pub const CURSOR_VERSION: u32 = 1;

/// Progress of one resync toward one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncCursor {
    /// Everything below this offset is done.
    pub next_offset: u64,
    /// Identifies the resync (e.g. source generation or epoch at its start).
    pub generation: u64,
}

impl ResyncCursor {
    /// Durably save (atomic replace). Blocking.
    pub fn save(&self, path: &Path) -> StoreResult<()> {
        let mut e = Enc::default();
        e.u64(self.next_offset).u64(self.generation);
        envelope::atomic_write(path, &envelope::encode(CURSOR_MAGIC, CURSOR_VERSION, &e.0))
    }

    /// Load the cursor: `None` if missing or corrupt (logged), error if its
    /// version is unknown or it cannot be read. Blocking.
    pub fn load(path: &Path) -> StoreResult<Option<ResyncCursor>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(path, "read resync cursor", e)),
        };
        let parsed = envelope::decode(path, CURSOR_MAGIC, CURSOR_VERSION, &bytes).and_then(|p| {
            let mut d = Dec::new(path, p);
            let c = ResyncCursor { next_offset: d.u64()?, generation: d.u64()? };
            d.finish()?;
            Ok(c)
        });
        match parsed {
            Ok(c) => Ok(Some(c)),
            Err(e @ StoreError::UnsupportedVersion { .. }) => Err(e),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "resync cursor untrusted; restarting resync from offset 0");
                Ok(None)
            }
        }
    }

    /// Where to resume a resync of `generation`: the saved offset if the
    /// cursor belongs to it, else 0.
    pub fn resume_offset(cursor: Option<ResyncCursor>, generation: u64) -> u64 {
        match cursor {
            Some(c) if c.generation == generation => c.next_offset,
            _ => 0,
        }
    }

    /// Delete the cursor (resync finished). Blocking.
    pub fn remove(path: &Path) -> StoreResult<()> {
        match std::fs::remove_file(path) {
            Ok(()) => envelope::fsync_parent(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io(path, "remove", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_cursor_loads_back_and_only_applies_to_its_generation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resync-b1.cursor");
        assert_eq!(ResyncCursor::load(&p).unwrap(), None);
        let c = ResyncCursor { next_offset: 1 << 30, generation: 7 };
        c.save(&p).unwrap();
        let loaded = ResyncCursor::load(&p).unwrap();
        assert_eq!(loaded, Some(c));
        assert_eq!(ResyncCursor::resume_offset(loaded, 7), 1 << 30);
        assert_eq!(ResyncCursor::resume_offset(loaded, 8), 0);
        ResyncCursor::remove(&p).unwrap();
        assert_eq!(ResyncCursor::load(&p).unwrap(), None);
    }

    #[test]
    fn torn_cursor_restarts_from_zero_instead_of_being_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        ResyncCursor { next_offset: 4096, generation: 1 }.save(&p).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[17] ^= 0xFF;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(ResyncCursor::load(&p).unwrap(), None);
    }
}
