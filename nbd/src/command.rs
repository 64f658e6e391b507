//! Turning a request header into a validated [`Command`] or a
//! [`Rejection`] with the NBD error number the spec asks for. Pure.
//!
//! Invariants:
//! - a `Command` that carries a range always has `offset + len <= size`,
//!   `len <= max_payload` for READ/WRITE, and is aligned to `min_block`;
//! - the number of payload bytes that follow a header on the wire depends only
//!   on the header ([`payload_len`]), never on whether it was accepted, so the
//!   reader can always skip a rejected WRITE's data and stay in sync.

use super::proto::*;
use super::wire::RequestHeader;

/// What the connection negotiated for one export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    /// Minimum block size advertised; 1 means no alignment requirement.
    pub min_block: u32,
    /// Largest READ or WRITE payload accepted (advertised maximum).
    pub max_payload: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    /// `len` bytes of payload follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_punch: bool,
    },
    /// A zero-length READ/WRITE/TRIM/WRITE_ZEROES: succeeds without touching the device.
    Noop,
    Disconnect,
}

/// A request the server answers with an error without touching the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub message: String,
}

fn reject(errno: u32, message: String) -> Rejection {
    Rejection { errno, message }
}

/// Bytes of payload that follow this header on the wire.
pub fn payload_len(h: &RequestHeader) -> u32 {
    if h.kind == NBD_CMD_WRITE {
        h.length
    } else {
        0
    }
}

/// Command flags each command accepts. FUA is accepted (and ignored where it
/// has no meaning) on every data command; NO_HOLE only on WRITE_ZEROES.
fn allowed_flags(kind: u16) -> u16 {
    match kind {
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM => NBD_CMD_FLAG_FUA,
        _ => 0,
    }
}

pub fn classify(h: &RequestHeader, g: &Geometry) -> Result<Command, Rejection> {
    let name = command_name(h.kind);
    match h.kind {
        NBD_CMD_READ | NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES | NBD_CMD_DISC => {
        }
        other => {
            return Err(reject(
                NBD_EINVAL,
                format!("command type {other} ({name}) is not supported by this server"),
            ));
        }
    }
    let unknown = h.flags & !allowed_flags(h.kind);
    if unknown != 0 && h.kind != NBD_CMD_DISC {
        return Err(reject(NBD_EINVAL, format!("flags {unknown:#x} are not valid on {name}")));
    }
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    match h.kind {
        NBD_CMD_DISC => return Ok(Command::Disconnect),
        NBD_CMD_FLUSH => return Ok(Command::Flush),
        _ => {}
    }
    let (offset, len) = (h.offset, h.length);
    if (h.kind == NBD_CMD_READ || h.kind == NBD_CMD_WRITE) && len > g.max_payload {
        return Err(reject(
            NBD_EOVERFLOW,
            format!("{name} of {len} bytes exceeds the maximum payload of {} bytes", g.max_payload),
        ));
    }
    if g.min_block > 1 && (offset % u64::from(g.min_block) != 0 || len % g.min_block != 0) {
        return Err(reject(
            NBD_EINVAL,
            format!(
                "{name} at offset {offset} length {len} is not aligned to the minimum block size {}",
                g.min_block
            ),
        ));
    }
    let end = offset.checked_add(u64::from(len));
    if end.is_none_or(|end| end > g.size) {
        // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
        let errno =
            if matches!(h.kind, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES) { NBD_ENOSPC } else { NBD_EINVAL };
        return Err(reject(
            errno,
            format!("{name} at offset {offset} length {len} goes past the export size {}", g.size),
        ));
    }
    if len == 0 {
        return Ok(Command::Noop);
    }
    Ok(match h.kind {
        NBD_CMD_READ => Command::Read { offset, len },
        NBD_CMD_WRITE => Command::Write { offset, len, fua },
        NBD_CMD_TRIM => Command::Trim { offset, len, fua },
        _ => Command::WriteZeroes { offset, len, fua, may_punch: h.flags & NBD_CMD_FLAG_NO_HOLE == 0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const G: Geometry = Geometry { size: 1 << 20, min_block: 1, max_payload: 65536 };

    fn hdr(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, kind, cookie: 7, offset, length }
    }

    #[test]
    fn valid_commands_are_accepted() {
        assert_eq!(classify(&hdr(NBD_CMD_READ, 0, 0, 512), &G), Ok(Command::Read { offset: 0, len: 512 }));
        assert_eq!(
            classify(&hdr(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 512, 512), &G),
            Ok(Command::Write { offset: 512, len: 512, fua: true })
        );
        assert_eq!(
            classify(&hdr(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 1 << 20), &G),
            Ok(Command::WriteZeroes { offset: 0, len: 1 << 20, fua: false, may_punch: false })
        );
        assert_eq!(classify(&hdr(NBD_CMD_FLUSH, 0, 0, 0), &G), Ok(Command::Flush));
        assert_eq!(classify(&hdr(NBD_CMD_DISC, 0, 0, 0), &G), Ok(Command::Disconnect));
        assert_eq!(classify(&hdr(NBD_CMD_READ, 0, 4096, 0), &G), Ok(Command::Noop));
    }

    #[test]
    fn trim_and_zeroes_may_exceed_the_payload_limit() {
        assert!(classify(&hdr(NBD_CMD_TRIM, 0, 0, 1 << 20), &G).is_ok());
    }

    #[test]
    fn oversized_reads_and_writes_get_eoverflow() {
        assert_eq!(classify(&hdr(NBD_CMD_READ, 0, 0, 65537), &G).unwrap_err().errno, NBD_EOVERFLOW);
        assert_eq!(classify(&hdr(NBD_CMD_WRITE, 0, 0, 65537), &G).unwrap_err().errno, NBD_EOVERFLOW);
    }

    #[test]
    fn out_of_range_reads_get_einval_and_writes_enospc() {
        assert_eq!(classify(&hdr(NBD_CMD_READ, 0, 1 << 20, 1), &G).unwrap_err().errno, NBD_EINVAL);
        assert_eq!(classify(&hdr(NBD_CMD_WRITE, 0, (1 << 20) - 1, 2), &G).unwrap_err().errno, NBD_ENOSPC);
        assert_eq!(classify(&hdr(NBD_CMD_TRIM, 0, u64::MAX, 2), &G).unwrap_err().errno, NBD_EINVAL);
    }

    #[test]
    fn unknown_commands_and_flags_get_einval() {
        assert_eq!(classify(&hdr(99, 0, 0, 1), &G).unwrap_err().errno, NBD_EINVAL);
        assert_eq!(classify(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 1), &G).unwrap_err().errno, NBD_EINVAL);
        assert_eq!(
            classify(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_NO_HOLE, 0, 1), &G).unwrap_err().errno,
            NBD_EINVAL
        );
    }

    #[test]
    fn unaligned_requests_are_refused_only_when_a_minimum_is_advertised() {
        let g = Geometry { min_block: 512, ..G };
        assert_eq!(classify(&hdr(NBD_CMD_READ, 0, 1, 512), &g).unwrap_err().errno, NBD_EINVAL);
        assert_eq!(classify(&hdr(NBD_CMD_WRITE, 0, 0, 100), &g).unwrap_err().errno, NBD_EINVAL);
        assert!(classify(&hdr(NBD_CMD_READ, 0, 1, 100), &G).is_ok());
    }

    proptest! {
        #[test]
        fn accepted_ranges_always_fit_the_export(kind in 0u16..10, flags: u16, offset: u64, length: u32) {
            let g = Geometry { size: 1 << 30, min_block: 512, max_payload: 1 << 25 };
            match classify(&hdr(kind, flags, offset, length), &g) {
                Ok(Command::Read { offset, len }) | Ok(Command::Write { offset, len, .. }) => {
                    prop_assert!(len <= g.max_payload);
                    prop_assert!(offset + u64::from(len) <= g.size);
                    prop_assert_eq!(offset % 512, 0);
                }
                Ok(Command::Trim { offset, len, .. }) | Ok(Command::WriteZeroes { offset, len, .. }) => {
                    prop_assert!(offset + u64::from(len) <= g.size);
                }
                Ok(_) => {}
                Err(r) => prop_assert!(r.errno != 0 && !r.message.is_empty()),
            }
        }
    }
}
