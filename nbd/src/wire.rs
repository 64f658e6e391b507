//! Pure NBD wire encoding and decoding: no I/O, no async, never panics on
//! input bytes.
//!
//! Invariants:
//! - every `parse_*` takes a byte slice of any length and returns an error
//!   (never panics) when it is short, has a bad magic or inconsistent lengths;
//! - every `encode_*` output parses back to the same value (`parse(encode(x)) == x`),
//!   which the proptests below check.
//! - strings sent to the client (error messages) are cut to
//!   [`MAX_STRING_BYTES`] on a UTF-8 boundary, the spec's hard limit.

use super::proto::*;

/// The spec's hard limit on any string (export names, error messages).
pub const MAX_STRING_BYTES: usize = 4096;

/// A request header as sent by the client (compact, 28-byte form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("need {need} bytes, got {got}")]
    Short { need: usize, got: usize },
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: &'static str },
}

fn need(buf: &[u8], n: usize) -> Result<(), WireError> {
    if buf.len() < n {
        return Err(WireError::Short { need: n, got: buf.len() });
    }
    Ok(())
}

fn be_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Cut `s` to at most [`MAX_STRING_BYTES`] without splitting a character.
pub fn clamp_string(s: &str) -> &str {
    if s.len() <= MAX_STRING_BYTES {
        return s;
    }
    let mut end = MAX_STRING_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// --- Transmission requests ---------------------------------------------------

pub fn parse_request(buf: &[u8]) -> Result<RequestHeader, WireError> {
    need(buf, REQUEST_HEADER_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != NBD_REQUEST_MAGIC {
        return Err(WireError::BadMagic(u64::from(magic)));
    }
    Ok(RequestHeader {
        flags: be_u16(buf, 4),
        kind: be_u16(buf, 6),
        cookie: be_u64(buf, 8),
        offset: be_u64(buf, 16),
        length: be_u32(buf, 24),
    })
}

pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    out[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&h.flags.to_be_bytes());
    out[6..8].copy_from_slice(&h.kind.to_be_bytes());
    out[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&h.offset.to_be_bytes());
    out[24..28].copy_from_slice(&h.length.to_be_bytes());
    out
}

// --- Transmission replies ----------------------------------------------------

/// A simple reply header: `error` 0 means success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn encode_simple_reply(r: &SimpleReply) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_LEN];
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&r.error.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out
}

pub fn parse_simple_reply(buf: &[u8]) -> Result<SimpleReply, WireError> {
    need(buf, SIMPLE_REPLY_HEADER_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != NBD_SIMPLE_REPLY_MAGIC {
        return Err(WireError::BadMagic(u64::from(magic)));
    }
    Ok(SimpleReply { error: be_u32(buf, 4), cookie: be_u64(buf, 8) })
}

/// A structured reply chunk header; `length` counts the payload after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length: u32,
}

pub fn encode_chunk_header(c: &ChunkHeader) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
    let mut out = [0u8; STRUCTURED_REPLY_HEADER_LEN];
    out[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&c.flags.to_be_bytes());
    out[6..8].copy_from_slice(&c.kind.to_be_bytes());
    out[8..16].copy_from_slice(&c.cookie.to_be_bytes());
    out[16..20].copy_from_slice(&c.length.to_be_bytes());
    out
}

pub fn parse_chunk_header(buf: &[u8]) -> Result<ChunkHeader, WireError> {
    need(buf, STRUCTURED_REPLY_HEADER_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != NBD_STRUCTURED_REPLY_MAGIC {
        return Err(WireError::BadMagic(u64::from(magic)));
    }
    Ok(ChunkHeader {
        flags: be_u16(buf, 4),
        kind: be_u16(buf, 6),
        cookie: be_u64(buf, 8),
        length: be_u32(buf, 16),
    })
}

/// Header plus offset of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk; the
/// `data_len` data bytes follow on the wire.
pub fn encode_offset_data_prefix(cookie: u64, offset: u64, data_len: u32) -> [u8; 28] {
    let mut out = [0u8; 28];
    let header = ChunkHeader {
        flags: NBD_REPLY_FLAG_DONE,
        kind: NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        // data_len <= max request (<= u32::MAX - 8 enforced by NbdLimits).
        length: data_len.saturating_add(8),
    };
    out[..20].copy_from_slice(&encode_chunk_header(&header));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    out
}

/// A complete final `NBD_REPLY_TYPE_ERROR` chunk carrying `message`.
pub fn encode_error_chunk(cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let message = clamp_string(message);
    let payload_len = 4 + 2 + message.len();
    let header = ChunkHeader {
        flags: NBD_REPLY_FLAG_DONE,
        kind: NBD_REPLY_TYPE_ERROR,
        cookie,
        length: payload_len as u32,
    };
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + payload_len);
    out.extend_from_slice(&encode_chunk_header(&header));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// Decode the payload of an `NBD_REPLY_TYPE_ERROR` chunk: (errno, message).
pub fn parse_error_payload(payload: &[u8]) -> Result<(u32, String), WireError> {
    need(payload, 6)?;
    let errno = be_u32(payload, 0);
    let len = usize::from(be_u16(payload, 4));
    if payload.len() < 6 + len {
        return Err(WireError::Malformed { what: "error chunk", why: "message longer than payload" });
    }
    Ok((errno, String::from_utf8_lossy(&payload[6..6 + len]).into_owned()))
}

// --- Handshake ---------------------------------------------------------------

/// The header of one client option: `IHAVEOPT`, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

pub const OPTION_HEADER_LEN: usize = 16;

pub fn parse_option_header(buf: &[u8]) -> Result<OptionHeader, WireError> {
    need(buf, OPTION_HEADER_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic(magic));
    }
    Ok(OptionHeader { option: be_u32(buf, 8), length: be_u32(buf, 12) })
}

pub fn encode_option_header(h: &OptionHeader) -> [u8; OPTION_HEADER_LEN] {
    let mut out = [0u8; OPTION_HEADER_LEN];
    out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&h.option.to_be_bytes());
    out[12..16].copy_from_slice(&h.length.to_be_bytes());
    out
}

/// One option reply: magic, option, reply type, length, data.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// A decoded option reply header (used by test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

pub const OPTION_REPLY_HEADER_LEN: usize = 20;

pub fn parse_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, WireError> {
    need(buf, OPTION_REPLY_HEADER_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    Ok(OptionReplyHeader { option: be_u32(buf, 8), reply_type: be_u32(buf, 12), length: be_u32(buf, 16) })
}

/// The data of `NBD_OPT_GO` / `NBD_OPT_INFO`: export name and info requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, WireError> {
    const WHAT: &str = "NBD_OPT_GO/INFO data";
    need(data, 4)?;
    let name_len = be_u32(data, 0) as usize;
    if name_len > MAX_STRING_BYTES {
        return Err(WireError::Malformed { what: WHAT, why: "export name longer than 4096 bytes" });
    }
    let after_name = 4 + name_len;
    if data.len() < after_name + 2 {
        return Err(WireError::Malformed { what: WHAT, why: "shorter than its name length says" });
    }
    let name = std::str::from_utf8(&data[4..after_name])
        .map_err(|_| WireError::Malformed { what: WHAT, why: "export name is not UTF-8" })?
        .to_owned();
    let count = usize::from(be_u16(data, after_name));
    let rest = &data[after_name + 2..];
    if rest.len() != count * 2 {
        return Err(WireError::Malformed { what: WHAT, why: "info request count does not match length" });
    }
    let requests = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, requests })
}

pub fn encode_info_request(r: &InfoRequest) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + r.name.len() + 2 * r.requests.len());
    out.extend_from_slice(&(r.name.len() as u32).to_be_bytes());
    out.extend_from_slice(r.name.as_bytes());
    out.extend_from_slice(&(r.requests.len() as u16).to_be_bytes());
    for q in &r.requests {
        out.extend_from_slice(&q.to_be_bytes());
    }
    out
}

/// `NBD_INFO_EXPORT` data: size and transmission flags.
pub fn encode_info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE` data: minimum, preferred, maximum.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&min.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&max.to_be_bytes());
    out
}

/// `NBD_INFO_NAME` data.
pub fn encode_info_name(name: &str) -> Vec<u8> {
    let name = clamp_string(name);
    let mut out = Vec::with_capacity(2 + name.len());
    out.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_REP_SERVER` data for `NBD_OPT_LIST`.
pub fn encode_server_entry(name: &str) -> Vec<u8> {
    let name = clamp_string(name);
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
/// unless the client negotiated `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_header_has_the_spec_layout() {
        let h = RequestHeader {
            flags: 1,
            kind: NBD_CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let b = encode_request(&h);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&b[24..28], &[0, 0, 2, 0]);
        assert_eq!(parse_request(&b), Ok(h));
    }

    #[test]
    fn request_with_bad_magic_is_rejected() {
        let mut b = encode_request(&RequestHeader { flags: 0, kind: 0, cookie: 1, offset: 0, length: 1 });
        b[0] = 0;
        assert!(matches!(parse_request(&b), Err(WireError::BadMagic(_))));
        assert!(matches!(parse_request(&b[..10]), Err(WireError::Short { .. })));
    }

    #[test]
    fn option_reply_magic_matches_the_spec() {
        let r = encode_option_reply(NBD_OPT_GO, NBD_REP_ACK, &[]);
        assert_eq!(&r[0..8], &[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(r.len(), 20);
    }

    #[test]
    fn error_chunk_carries_errno_and_message() {
        let c = encode_error_chunk(9, NBD_EINVAL, "offset past end");
        let h = parse_chunk_header(&c).unwrap();
        assert_eq!(h.flags, NBD_REPLY_FLAG_DONE);
        assert_eq!(h.kind, NBD_REPLY_TYPE_ERROR);
        assert_eq!(h.length as usize, c.len() - 20);
        assert_eq!(parse_error_payload(&c[20..]).unwrap(), (NBD_EINVAL, "offset past end".to_owned()));
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = "é".repeat(3000);
        let c = clamp_string(&s);
        assert!(c.len() <= MAX_STRING_BYTES);
        assert!(c.len() >= MAX_STRING_BYTES - 1);
    }

    #[test]
    fn info_request_with_wrong_count_is_malformed() {
        let mut d = encode_info_request(&InfoRequest { name: "vol".into(), requests: vec![3] });
        d.push(0);
        assert!(matches!(parse_info_request(&d), Err(WireError::Malformed { .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_any_parser(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = parse_request(&bytes);
            let _ = parse_simple_reply(&bytes);
            let _ = parse_chunk_header(&bytes);
            let _ = parse_error_payload(&bytes);
            let _ = parse_option_header(&bytes);
            let _ = parse_option_reply_header(&bytes);
            let _ = parse_info_request(&bytes);
        }

        #[test]
        fn request_headers_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let h = RequestHeader { flags, kind, cookie, offset, length };
            prop_assert_eq!(parse_request(&encode_request(&h)), Ok(h));
        }

        #[test]
        fn requests_with_magic_prefix_parse_from_any_tail(tail in proptest::collection::vec(any::<u8>(), 24..40)) {
            let mut b = NBD_REQUEST_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&tail);
            let h = parse_request(&b).unwrap();
            prop_assert_eq!(&encode_request(&h)[..], &b[..28]);
        }

        #[test]
        fn replies_round_trip(error: u32, cookie: u64, flags: u16, kind: u16, length: u32) {
            let s = SimpleReply { error, cookie };
            prop_assert_eq!(parse_simple_reply(&encode_simple_reply(&s)), Ok(s));
            let c = ChunkHeader { flags, kind, cookie, length };
            prop_assert_eq!(parse_chunk_header(&encode_chunk_header(&c)), Ok(c));
        }

        #[test]
        fn info_requests_round_trip(name in "[a-z0-9/_-]{0,64}", requests in proptest::collection::vec(any::<u16>(), 0..8)) {
            let r = InfoRequest { name, requests };
            prop_assert_eq!(parse_info_request(&encode_info_request(&r)), Ok(r));
        }

        #[test]
        fn option_headers_round_trip(option: u32, length: u32) {
            let h = OptionHeader { option, length };
            prop_assert_eq!(parse_option_header(&encode_option_header(&h)), Ok(h));
        }

        #[test]
        fn error_chunks_round_trip(errno: u32, cookie: u64, msg in ".{0,200}") {
            let c = encode_error_chunk(cookie, errno, &msg);
            let h = parse_chunk_header(&c).unwrap();
            prop_assert_eq!(h.cookie, cookie);
            prop_assert_eq!(parse_error_payload(&c[20..]).unwrap(), (errno, msg));
        }
    }
}
