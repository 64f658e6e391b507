//! Replication wire format: length-prefixed binary frames over a TLS link.
//!
//! ```text
//! frame := magic u32 "MREP" | version u16 | kind u8 | flags u8 | len u32 | payload[len]
//! ```
//! All integers are big-endian. Strings are u16 length + UTF-8. The first
//! frame on a link is `Hello` from the primary side; the replica answers
//! `HelloAck`, or `Error` when the version differs (the message names both).
//! Every request carries a link-unique `seq`; the replica answers each with an
//! `Ack` carrying the same `seq` (pipelined; acks may come in any order across
//! volumes but a volume's writes are applied in `seq` order).

use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: u32 = 0x4d52_4550; // "MREP"
pub const VERSION: u16 = metro_api::PROTOCOL_VERSION as u16;
pub const HEADER_LEN: usize = 12;
/// Largest payload accepted: the largest NBD request plus headroom for fields.
pub const MAX_PAYLOAD: u32 = 33 * 1024 * 1024;
/// Largest `Read` op: its answer must fit in one frame.
pub const MAX_READ: u32 = 32 * 1024 * 1024;
/// Bound on hot ranges reported in one HelloAck (1 M ranges ≈ 30 MB).
pub const MAX_HOT_RANGES: usize = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad frame magic {0:#x}: peer is not a metro replication endpoint")]
    BadMagic(u32),
    #[error("peer speaks replication protocol v{peer}, this node speaks v{ours}; upgrade the older node")]
    Version { peer: u16, ours: u16 },
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(u32),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("truncated frame")]
    Truncated,
    #[error("invalid string in frame")]
    BadString,
}

/// Outcome code in an `Ack`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AckStatus {
    Ok = 0,
    /// The write carried an epoch older than one this replica accepted from
    /// another primary: the sender has been deposed.
    StaleEpoch = 1,
    Io = 2,
    NoVolume = 3,
    NoSpace = 4,
}

impl AckStatus {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => AckStatus::Ok,
            1 => AckStatus::StaleEpoch,
            3 => AckStatus::NoVolume,
            4 => AckStatus::NoSpace,
            _ => AckStatus::Io,
        }
    }
}

/// Operation carried by a `Op` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    Write {
        offset: u64,
        data: Bytes,
    },
    /// Zero a range; `punch` allows a hole.
    Zero {
        offset: u64,
        len: u32,
        punch: bool,
    },
    Flush,
    /// Report the ranges this replica's copy may hold that no completed
    /// flush of its primary covers (activity-log extents from a time as
    /// primary, and regions it tracked as dirty for others). Answered with
    /// [`Frame::HotAck`]. A new primary asks every replica before serving.
    QueryHot,
    /// The primary copied its data over those ranges and the copies are
    /// durable here: forget them.
    ClearHot,
    /// Read `len` bytes of this replica's copy at `offset` (ordered after
    /// every op before it), answered with [`Frame::DataAck`]. A primary whose
    /// copy may lack writes of the previous primaryship pulls them from a
    /// replica that was in sync then.
    Read {
        offset: u64,
        len: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        from: String,
    },
    /// The replica's answer; `hot` lists `(volume, offset, len)` ranges its
    /// activity log marks as possibly divergent (it was a primary that lost
    /// its role with writes in flight): the primary must resync them.
    HelloAck {
        version: u16,
        node: String,
        /// The replica's session: boot id plus process incarnation. A new
        /// session may have lost every write that no completed flush on it
        /// covers (a power cut empties the page cache), so the primary treats
        /// a change as a loss of those writes.
        session: String,
        hot: Vec<(String, u64, u64)>,
    },
    Error {
        message: String,
    },
    Op {
        seq: u64,
        volume: String,
        epoch: u64,
        size: u64,
        fua: bool,
        resync: bool,
        op: OpKind,
    },
    Ack {
        seq: u64,
        status: AckStatus,
        epoch: u64,
    },
    /// The answer to a `QueryHot` op: `(offset, len)` ranges.
    HotAck {
        seq: u64,
        status: AckStatus,
        epoch: u64,
        ranges: Vec<(u64, u64)>,
    },
    /// The answer to a `Read` op: the bytes read (empty unless `Ok`).
    DataAck {
        seq: u64,
        status: AckStatus,
        epoch: u64,
        data: Bytes,
    },
    /// Keepalive / fence: raises the replica's epoch floor for a volume.
    Fence {
        seq: u64,
        volume: String,
        epoch: u64,
    },
}

const K_HELLO: u8 = 1;
const K_HELLO_ACK: u8 = 2;
const K_ERROR: u8 = 3;
const K_WRITE: u8 = 4;
const K_ZERO: u8 = 5;
const K_FLUSH: u8 = 6;
const K_ACK: u8 = 7;
const K_FENCE: u8 = 8;
const K_QUERY_HOT: u8 = 9;
const K_CLEAR_HOT: u8 = 10;
const K_HOT_ACK: u8 = 11;
const K_READ: u8 = 12;
const K_DATA_ACK: u8 = 13;

const F_FUA: u8 = 1;
const F_RESYNC: u8 = 2;
const F_PUNCH: u8 = 4;

fn put_str(b: &mut BytesMut, s: &str) {
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn get_str(b: &mut Bytes) -> Result<String, WireError> {
    if b.remaining() < 2 {
        return Err(WireError::Truncated);
    }
    let n = b.get_u16() as usize;
    if b.remaining() < n {
        return Err(WireError::Truncated);
    }
    String::from_utf8(b.split_to(n).to_vec()).map_err(|_| WireError::BadString)
}

fn need(b: &Bytes, n: usize) -> Result<(), WireError> {
    if b.remaining() < n {
        Err(WireError::Truncated)
    } else {
        Ok(())
    }
}

impl Frame {
    /// Encode into one contiguous buffer (header + payload).
    pub fn encode(&self) -> BytesMut {
        let mut p = BytesMut::with_capacity(64);
        let (kind, mut flags) = match self {
            Frame::Hello { version, from } => {
                p.put_u16(*version);
                put_str(&mut p, from);
                (K_HELLO, 0)
            }
            Frame::HelloAck { version, node, session, hot } => {
                p.put_u16(*version);
                put_str(&mut p, node);
                put_str(&mut p, session);
                p.put_u32(hot.len() as u32);
                for (v, off, len) in hot {
                    put_str(&mut p, v);
                    p.put_u64(*off);
                    p.put_u64(*len);
                }
                (K_HELLO_ACK, 0)
            }
            Frame::Error { message } => {
                put_str(&mut p, message);
                (K_ERROR, 0)
            }
            Frame::Op { seq, volume, epoch, size, fua, resync, op } => {
                p.put_u64(*seq);
                put_str(&mut p, volume);
                p.put_u64(*epoch);
                p.put_u64(*size);
                let mut f = 0;
                if *fua {
                    f |= F_FUA;
                }
                if *resync {
                    f |= F_RESYNC;
                }
                match op {
                    OpKind::Write { offset, data } => {
                        p.put_u64(*offset);
                        p.reserve(data.len());
                        p.put_slice(data);
                        (K_WRITE, f)
                    }
                    OpKind::Zero { offset, len, punch } => {
                        p.put_u64(*offset);
                        p.put_u32(*len);
                        if *punch {
                            f |= F_PUNCH;
                        }
                        (K_ZERO, f)
                    }
                    OpKind::Flush => (K_FLUSH, f),
                    OpKind::QueryHot => (K_QUERY_HOT, f),
                    OpKind::ClearHot => (K_CLEAR_HOT, f),
                    OpKind::Read { offset, len } => {
                        p.put_u64(*offset);
                        p.put_u32(*len);
                        (K_READ, f)
                    }
                }
            }
            Frame::Ack { seq, status, epoch } => {
                p.put_u64(*seq);
                p.put_u8(*status as u8);
                p.put_u64(*epoch);
                (K_ACK, 0)
            }
            Frame::HotAck { seq, status, epoch, ranges } => {
                p.put_u64(*seq);
                p.put_u8(*status as u8);
                p.put_u64(*epoch);
                p.put_u32(ranges.len() as u32);
                for (off, len) in ranges {
                    p.put_u64(*off);
                    p.put_u64(*len);
                }
                (K_HOT_ACK, 0)
            }
            Frame::DataAck { seq, status, epoch, data } => {
                p.put_u64(*seq);
                p.put_u8(*status as u8);
                p.put_u64(*epoch);
                p.reserve(data.len());
                p.put_slice(data);
                (K_DATA_ACK, 0)
            }
            Frame::Fence { seq, volume, epoch } => {
                p.put_u64(*seq);
                put_str(&mut p, volume);
                p.put_u64(*epoch);
                (K_FENCE, 0)
            }
        };
        flags &= 0xff;
        let mut out = BytesMut::with_capacity(HEADER_LEN + p.len());
        out.put_u32(MAGIC);
        out.put_u16(VERSION);
        out.put_u8(kind);
        out.put_u8(flags);
        out.put_u32(p.len() as u32);
        out.put_slice(&p);
        out
    }

    /// Parse a header; returns (kind, flags, payload length).
    pub fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(u8, u8, u32), WireError> {
        let mut b = &h[..];
        let magic = b.get_u32();
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = b.get_u16();
        let kind = b.get_u8();
        let flags = b.get_u8();
        let len = b.get_u32();
        if version != VERSION {
            return Err(WireError::Version { peer: version, ours: VERSION });
        }
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge(len));
        }
        Ok((kind, flags, len))
    }

    /// Decode a payload given the header's kind and flags.
    pub fn decode(kind: u8, flags: u8, mut b: Bytes) -> Result<Frame, WireError> {
        Ok(match kind {
            K_HELLO => {
                need(&b, 2)?;
                let version = b.get_u16();
                Frame::Hello { version, from: get_str(&mut b)? }
            }
            K_HELLO_ACK => {
                need(&b, 2)?;
                let version = b.get_u16();
                let node = get_str(&mut b)?;
                let session = get_str(&mut b)?;
                need(&b, 4)?;
                let n = b.get_u32() as usize;
                if n > MAX_HOT_RANGES {
                    return Err(WireError::TooLarge(n as u32));
                }
                let mut hot = Vec::with_capacity(n);
                for _ in 0..n {
                    let v = get_str(&mut b)?;
                    need(&b, 16)?;
                    hot.push((v, b.get_u64(), b.get_u64()));
                }
                Frame::HelloAck { version, node, session, hot }
            }
            K_ERROR => Frame::Error { message: get_str(&mut b)? },
            K_WRITE | K_ZERO | K_FLUSH | K_QUERY_HOT | K_CLEAR_HOT | K_READ => {
                need(&b, 8)?;
                let seq = b.get_u64();
                let volume = get_str(&mut b)?;
                need(&b, 16)?;
                let epoch = b.get_u64();
                let size = b.get_u64();
                let op = match kind {
                    K_WRITE => {
                        need(&b, 8)?;
                        let offset = b.get_u64();
                        OpKind::Write { offset, data: b }
                    }
                    K_ZERO => {
                        need(&b, 12)?;
                        OpKind::Zero { offset: b.get_u64(), len: b.get_u32(), punch: flags & F_PUNCH != 0 }
                    }
                    K_QUERY_HOT => OpKind::QueryHot,
                    K_CLEAR_HOT => OpKind::ClearHot,
                    K_READ => {
                        need(&b, 12)?;
                        let (offset, len) = (b.get_u64(), b.get_u32());
                        if len > MAX_READ {
                            return Err(WireError::TooLarge(len));
                        }
                        OpKind::Read { offset, len }
                    }
                    _ => OpKind::Flush,
                };
                Frame::Op {
                    seq,
                    volume,
                    epoch,
                    size,
                    fua: flags & F_FUA != 0,
                    resync: flags & F_RESYNC != 0,
                    op,
                }
            }
            K_ACK => {
                need(&b, 17)?;
                Frame::Ack { seq: b.get_u64(), status: AckStatus::from_u8(b.get_u8()), epoch: b.get_u64() }
            }
            K_HOT_ACK => {
                need(&b, 21)?;
                let (seq, status, epoch) = (b.get_u64(), AckStatus::from_u8(b.get_u8()), b.get_u64());
                let n = b.get_u32() as usize;
                if n > MAX_HOT_RANGES {
                    return Err(WireError::TooLarge(n as u32));
                }
                let mut ranges = Vec::with_capacity(n.min(b.remaining() / 16));
                for _ in 0..n {
                    need(&b, 16)?;
                    ranges.push((b.get_u64(), b.get_u64()));
                }
                Frame::HotAck { seq, status, epoch, ranges }
            }
            K_DATA_ACK => {
                need(&b, 17)?;
                let (seq, status, epoch) = (b.get_u64(), AckStatus::from_u8(b.get_u8()), b.get_u64());
                Frame::DataAck { seq, status, epoch, data: b }
            }
            K_FENCE => {
                need(&b, 8)?;
                let seq = b.get_u64();
                let volume = get_str(&mut b)?;
                need(&b, 8)?;
                Frame::Fence { seq, volume, epoch: b.get_u64() }
            }
            k => return Err(WireError::UnknownKind(k)),
        })
    }
}

/// Read one frame from an async reader.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Frame> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; HEADER_LEN];
    r.read_exact(&mut h).await?;
    let (kind, flags, len) = Frame::parse_header(&h).map_err(invalid)?;
    let mut payload = BytesMut::zeroed(len as usize);
    r.read_exact(&mut payload).await?;
    Frame::decode(kind, flags, payload.freeze()).map_err(invalid)
}

fn invalid(e: WireError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let enc = f.encode();
        let h: [u8; HEADER_LEN] = enc[..HEADER_LEN].try_into().unwrap();
        let (k, fl, len) = Frame::parse_header(&h).unwrap();
        assert_eq!(len as usize, enc.len() - HEADER_LEN);
        let back = Frame::decode(k, fl, Bytes::copy_from_slice(&enc[HEADER_LEN..])).unwrap();
        assert_eq!(back, f);
    }

    #[test]
    fn every_frame_kind_round_trips() {
        roundtrip(Frame::Hello { version: VERSION, from: "a1".into() });
        roundtrip(Frame::HelloAck {
            version: VERSION,
            node: "b1".into(),
            session: "0b9c-boot/17".into(),
            hot: vec![("v".into(), 4096, 1 << 22)],
        });
        roundtrip(Frame::Error { message: "nope".into() });
        roundtrip(Frame::Op {
            seq: 9,
            volume: "v".into(),
            epoch: 3,
            size: 1 << 20,
            fua: true,
            resync: false,
            op: OpKind::Write { offset: 4096, data: Bytes::from_static(b"hello") },
        });
        roundtrip(Frame::Op {
            seq: 10,
            volume: "v".into(),
            epoch: 3,
            size: 1 << 20,
            fua: false,
            resync: true,
            op: OpKind::Zero { offset: 0, len: 8192, punch: true },
        });
        roundtrip(Frame::Op {
            seq: 11,
            volume: "v".into(),
            epoch: 3,
            size: 1,
            fua: false,
            resync: false,
            op: OpKind::Flush,
        });
        roundtrip(Frame::Ack { seq: 11, status: AckStatus::StaleEpoch, epoch: 4 });
        roundtrip(Frame::Fence { seq: 12, volume: "v".into(), epoch: 5 });
        roundtrip(Frame::DataAck {
            seq: 14,
            status: AckStatus::Ok,
            epoch: 6,
            data: Bytes::from_static(b"copy"),
        });
        for op in [OpKind::QueryHot, OpKind::ClearHot, OpKind::Read { offset: 1 << 20, len: 65536 }] {
            roundtrip(Frame::Op {
                seq: 13,
                volume: "v".into(),
                epoch: 6,
                size: 1,
                fua: false,
                resync: true,
                op,
            });
        }
        roundtrip(Frame::HotAck {
            seq: 13,
            status: AckStatus::Ok,
            epoch: 6,
            ranges: vec![(0, 4 << 20), (8 << 20, 4096)],
        });
    }

    #[test]
    fn an_old_protocol_version_is_refused_naming_both_versions() {
        let mut enc = Frame::Flush_for_test().encode();
        enc[4] = 0;
        enc[5] = 0;
        let h: [u8; HEADER_LEN] = enc[..HEADER_LEN].try_into().unwrap();
        let e = Frame::parse_header(&h).unwrap_err();
        assert_eq!(e, WireError::Version { peer: 0, ours: VERSION });
        assert!(e.to_string().contains("v0") && e.to_string().contains(&format!("v{VERSION}")));
    }

    #[test]
    fn oversized_and_garbage_frames_are_refused() {
        let mut h = [0u8; HEADER_LEN];
        assert!(matches!(Frame::parse_header(&h), Err(WireError::BadMagic(0))));
        h[..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&VERSION.to_be_bytes());
        h[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Frame::parse_header(&h), Err(WireError::TooLarge(_))));
        assert_eq!(Frame::decode(K_ACK, 0, Bytes::from_static(b"x")), Err(WireError::Truncated));
        assert_eq!(Frame::decode(99, 0, Bytes::new()), Err(WireError::UnknownKind(99)));
    }

    impl Frame {
        #[allow(non_snake_case)]
        fn Flush_for_test() -> Frame {
            Frame::Op {
                seq: 1,
                volume: "v".into(),
                epoch: 1,
                size: 1,
                fua: false,
                resync: false,
                op: OpKind::Flush,
            }
        }
    }
}
