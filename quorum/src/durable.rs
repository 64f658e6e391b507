//! Small durable files (the vote, the state-machine snapshot): a versioned,
//! checksummed envelope written atomically.
//!
//! Layout: `magic (8) | version u32 LE | crc32c u32 LE | len u64 LE | body`.
//!
//! Invariants:
//! - A reader sees either the previous complete file or the new complete file:
//!   the body goes to `NAME.tmp`, is fsynced, renamed over `NAME`, and the
//!   directory is fsynced.
//! - A file whose magic, version, length or checksum does not match is refused
//!   with an error naming the file; it is never silently replaced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Length of the fixed envelope header.
const HEADER_LEN: usize = 8 + 4 + 4 + 8;

/// Upper bound on a durable file body: the vote is tiny, and the snapshot of
/// a metro cluster (nodes + volumes) is far below this; a bigger length means
/// a corrupt header, not a real file.
pub const MAX_BODY_BYTES: u64 = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}; the file is damaged, restore it or remove the member's data dir and re-join")]
    Corrupt { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DurableError + '_ {
    move |source| DurableError::Io { path: path.to_path_buf(), source }
}

/// fsync a directory so a rename inside it is durable.
pub fn fsync_dir(dir: &Path) -> Result<(), DurableError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Atomically replace `path` with an envelope around `body`.
pub fn write_atomic(path: &Path, magic: &[u8; 8], version: u32, body: &[u8]) -> Result<(), DurableError> {
    let tmp = path.with_extension("tmp");
    let mut buf = Vec::with_capacity(HEADER_LEN + body.len());
    buf.extend_from_slice(magic);
    buf.extend_from_slice(&version.to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    buf.extend_from_slice(&(body.len() as u64).to_le_bytes());
    buf.extend_from_slice(body);
    {
        let mut f =
            OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&buf).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Read an envelope; `Ok(None)` when the file does not exist.
pub fn read(path: &Path, magic: &[u8; 8], version: u32) -> Result<Option<Vec<u8>>, DurableError> {
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let corrupt = |reason: String| DurableError::Corrupt { path: path.to_path_buf(), reason };
    if buf.len() < HEADER_LEN {
        return Err(corrupt(format!("{} bytes is shorter than the header", buf.len())));
    }
    if &buf[..8] != magic {
        return Err(corrupt("wrong magic".into()));
    }
    let v = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if v != version {
        return Err(corrupt(format!("format version {v}, this build reads version {version}")));
    }
    let crc = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
    if len > MAX_BODY_BYTES || len != (buf.len() - HEADER_LEN) as u64 {
        return Err(corrupt(format!("length {len} does not match the file size {}", buf.len())));
    }
    let body = &buf[HEADER_LEN..];
    if crc32c::crc32c(body) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    Ok(Some(body.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: &[u8; 8] = b"METRTEST";

    #[test]
    fn a_written_file_reads_back_and_a_flipped_bit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        assert!(read(&p, MAGIC, 1).unwrap().is_none());
        write_atomic(&p, MAGIC, 1, b"hello").unwrap();
        assert_eq!(read(&p, MAGIC, 1).unwrap().unwrap(), b"hello");
        assert!(matches!(read(&p, MAGIC, 2), Err(DurableError::Corrupt { .. })));
        let mut raw = fs::read(&p).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        fs::write(&p, raw).unwrap();
        let err = read(&p, MAGIC, 1).unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
    }
}
