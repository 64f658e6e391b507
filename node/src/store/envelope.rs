//! The one on-disk envelope every small metadata file uses (superblock,
//! dirty bitmap, activity log, resync cursor), and atomic replacement.
//!
//! ```text
//!  0        8         12            16              16+len
//!  | magic  | version | payload_len | payload ...   | crc32c(bytes 0..16+len) |
//! ```
//! All integers are little-endian.
//!
//! Invariants:
//! - A file is replaced only by [`atomic_write`]: temp file, fdatasync,
//!   rename, fsync of the directory. A crash leaves the old or the new file.
//! - [`decode`] trusts nothing: it checks length, magic, checksum, then
//!   version, and names the file and the defect in its error.

use super::error::{StoreError, StoreResult};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Header bytes before the payload.
const HEADER_LEN: usize = 16;
/// Trailer bytes (crc32c).
const TRAILER_LEN: usize = 4;
/// Largest payload accepted: a dirty bitmap of a 16 TiB volume at 64 KiB
/// regions is 32 MiB; anything larger is a corrupt length field.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 20;

/// Wrap `payload` in the envelope.
pub fn encode(magic: &[u8; 8], version: u32, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= MAX_PAYLOAD_BYTES, "payload too large");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Check and unwrap an envelope read from `path`; returns the payload.
pub fn decode<'a>(path: &Path, magic: &[u8; 8], version: u32, bytes: &'a [u8]) -> StoreResult<&'a [u8]> {
    let corrupt = |what: String| StoreError::Corrupt { path: path.to_path_buf(), what };
    if bytes.len() < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(format!(
            "truncated: {} bytes, an empty file of this kind has {}",
            bytes.len(),
            HEADER_LEN + TRAILER_LEN
        )));
    }
    if &bytes[0..8] != magic {
        return Err(corrupt(format!(
            "bad magic {:?}, expected {:?}",
            String::from_utf8_lossy(&bytes[0..8]),
            String::from_utf8_lossy(magic)
        )));
    }
    let found_version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if len > MAX_PAYLOAD_BYTES || bytes.len() != HEADER_LEN + len + TRAILER_LEN {
        return Err(corrupt(format!(
            "length mismatch: header says {len} payload bytes, file has {} bytes (torn write?)",
            bytes.len()
        )));
    }
    let body = &bytes[..HEADER_LEN + len];
    let stored = u32::from_le_bytes(bytes[HEADER_LEN + len..].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x} (torn write or bit rot)"
        )));
    }
    if found_version != version {
        return Err(StoreError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: found_version,
            supported: version,
        });
    }
    Ok(&bytes[HEADER_LEN..HEADER_LEN + len])
}

/// Read the whole file at `path` and [`decode`] it; returns the payload.
pub fn read_file(path: &Path, magic: &[u8; 8], version: u32) -> StoreResult<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| StoreError::io(path, "read", e))?;
    decode(path, magic, version, &bytes).map(<[u8]>::to_vec)
}

/// Path of the temporary file used while replacing `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replace `path` with `bytes` atomically and durably.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> StoreResult<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| StoreError::io(&tmp, "create", e))?;
        f.write_all(bytes).map_err(|e| StoreError::io(&tmp, "write", e))?;
        f.sync_data().map_err(|e| StoreError::io(&tmp, "fdatasync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, "rename onto", e))?;
        fsync_parent(path)
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is harmless, but tidy up.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// fsync the directory holding `path`, making a create/rename/unlink durable.
pub fn fsync_parent(path: &Path) -> StoreResult<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fsync_dir(dir)
}

/// fsync a directory.
pub fn fsync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| StoreError::io(dir, "fsync directory", e))
}

/// Little-endian payload writer.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A string with a u32 length prefix.
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.u32(v.len() as u32).bytes(v.as_bytes())
    }
}

/// Little-endian payload reader; every short read is a [`StoreError::Corrupt`].
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Dec<'a> {
    pub fn new(path: &'a Path, buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0, path }
    }
    pub fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt { path: self.path.to_path_buf(), what: what.into() }
    }
    pub fn take(&mut self, n: usize) -> StoreResult<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(self.corrupt(format!("payload ends early at byte {}, needed {n} more", self.pos)));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u32(&mut self) -> StoreResult<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> StoreResult<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    pub fn str(&mut self) -> StoreResult<String> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.corrupt("string field is not UTF-8"))
    }
    /// Error unless the payload was consumed exactly.
    pub fn finish(&self) -> StoreResult<()> {
        if self.pos != self.buf.len() {
            return Err(
                self.corrupt(format!("{} unexpected trailing payload bytes", self.buf.len() - self.pos))
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"MTROTEST";

    #[test]
    fn encoded_payload_decodes_back() {
        let e = encode(MAGIC, 3, b"hello");
        assert_eq!(decode(Path::new("f"), MAGIC, 3, &e).unwrap(), b"hello");
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let e = encode(MAGIC, 1, b"some payload bytes");
        for i in 0..e.len() * 8 {
            let mut c = e.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(decode(Path::new("f"), MAGIC, 1, &c).is_err(), "flip of bit {i} undetected");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let e = encode(MAGIC, 1, b"payload");
        for n in 0..e.len() {
            assert!(decode(Path::new("f"), MAGIC, 1, &e[..n]).is_err(), "truncation to {n} undetected");
        }
    }

    #[test]
    fn unknown_version_is_a_typed_error_naming_both_versions() {
        let e = encode(MAGIC, 9, b"x");
        match decode(Path::new("meta"), MAGIC, 1, &e) {
            Err(StoreError::UnsupportedVersion { found: 9, supported: 1, .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn atomic_write_replaces_the_file_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!temp_path(&p).exists());
    }
}
