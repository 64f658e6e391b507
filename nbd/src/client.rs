//! A pipelined NBD client for one export: the attach agent's upstream
//! connection to a volume's primary.
//!
//! Fixed newstyle, `NBD_OPT_GO`, simple replies (every reply is a header,
//! and a READ's is followed by exactly the bytes asked for). The connection
//! splits into a [`Sender`], which writes requests under cookies the caller
//! chooses, and a [`Receiver`], which yields `(cookie, result)` in the order
//! the server answers. The caller matches them up, which is what lets the
//! agent re-send its unanswered requests on another connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;

use crate::proto::*;

/// Largest option reply the client reads (an error message, an info).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
const IO_BUFFER_BYTES: usize = 256 * 1024;

/// Why a connection could not be made or broke.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("connecting to {addr} timed out after {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("{addr} does not speak fixed-newstyle NBD: {why}")]
    Protocol { addr: String, why: String },
    /// The server refused the export, with its reason (for a metro node that
    /// is not the primary, the message names the one that is).
    #[error("{addr} refused export `{export}`: {message} (NBD option error {code:#x})")]
    Refused { addr: String, export: String, code: u32, message: String },
    #[error("connection to {addr} failed: {source}")]
    Io { addr: String, source: std::io::Error },
}

/// What the server said about the export in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// One request, as the client sends it.
#[derive(Debug, Clone)]
pub enum Request {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool, may_punch: bool },
}

impl Request {
    fn header(&self, cookie: u64) -> [u8; REQUEST_HEADER_LEN] {
        let (ty, flags, offset, len) = match self {
            Request::Read { offset, len } => (NBD_CMD_READ, 0, *offset, *len),
            Request::Write { offset, data, fua } => {
                (NBD_CMD_WRITE, fua_flag(*fua), *offset, data.len() as u32)
            }
            Request::Flush => (NBD_CMD_FLUSH, 0, 0, 0),
            Request::Trim { offset, len, fua } => (NBD_CMD_TRIM, fua_flag(*fua), *offset, *len),
            Request::WriteZeroes { offset, len, fua, may_punch } => {
                let hole = if *may_punch { 0 } else { NBD_CMD_FLAG_NO_HOLE };
                (NBD_CMD_WRITE_ZEROES, fua_flag(*fua) | hole, *offset, *len)
            }
        };
        let mut h = [0u8; REQUEST_HEADER_LEN];
        h[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&ty.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        h
    }
}

fn fua_flag(fua: bool) -> u16 {
    if fua {
        NBD_CMD_FLAG_FUA
    } else {
        0
    }
}

/// READ lengths by cookie, shared by the two halves.
type ReadLens = Arc<Mutex<HashMap<u64, u32>>>;

/// The sending half.
pub struct Sender {
    wr: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    reads: ReadLens,
    addr: String,
}

impl Sender {
    /// Queue `req` under `cookie` (call [`flush`](Self::flush) to send what
    /// is queued).
    pub async fn send(&mut self, cookie: u64, req: &Request) -> Result<(), ClientError> {
        if let Request::Read { len, .. } = req {
            self.reads.lock().expect("poisoned").insert(cookie, *len);
        }
        let io = async {
            self.wr.write_all(&req.header(cookie)).await?;
            if let Request::Write { data, .. } = req {
                self.wr.write_all(data).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        io.await.map_err(|source| ClientError::Io { addr: self.addr.clone(), source })
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        self.wr.flush().await.map_err(|source| ClientError::Io { addr: self.addr.clone(), source })
    }

    /// Tell the server we are done (NBD_CMD_DISC) and close our half.
    pub async fn disconnect(mut self) {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        h[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        h[6..8].copy_from_slice(&NBD_CMD_DISC.to_be_bytes());
        let _ = self.wr.write_all(&h).await;
        let _ = self.wr.flush().await;
        let _ = self.wr.shutdown().await;
    }
}

/// The receiving half.
pub struct Receiver {
    rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    reads: ReadLens,
    addr: String,
}

/// A reply: READ data (empty for other commands), or the NBD error number.
pub type Reply = Result<Bytes, u32>;

impl Receiver {
    /// The next reply. An error means the connection is unusable.
    pub async fn next(&mut self) -> Result<(u64, Reply), ClientError> {
        let addr = self.addr.clone();
        let bad = |why: String| ClientError::Protocol { addr: addr.clone(), why };
        let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
        self.rd
            .read_exact(&mut h)
            .await
            .map_err(|source| ClientError::Io { addr: self.addr.clone(), source })?;
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4"));
        if magic != NBD_SIMPLE_REPLY_MAGIC {
            return Err(bad(format!("reply magic {magic:#x}, not a simple reply")));
        }
        let errno = u32::from_be_bytes(h[4..8].try_into().expect("4"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8"));
        let len = self.reads.lock().expect("poisoned").remove(&cookie);
        if errno != 0 {
            return Ok((cookie, Err(errno)));
        }
        let Some(len) = len else { return Ok((cookie, Ok(Bytes::new()))) };
        let mut buf = BytesMut::with_capacity(len as usize);
        buf.put_bytes(0, len as usize);
        self.rd
            .read_exact(&mut buf)
            .await
            .map_err(|source| ClientError::Io { addr: self.addr.clone(), source })?;
        Ok((cookie, Ok(buf.freeze())))
    }
}

/// Connect to `addr` (host:port) and open `export`, all within `timeout`.
pub async fn connect(
    addr: &str,
    export: &str,
    timeout: Duration,
) -> Result<(Sender, Receiver, ExportInfo), ClientError> {
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })?;
        let _ = stream.set_nodelay(true);
        let mut stream = stream;
        let info = handshake(&mut stream, addr, export).await?;
        Ok::<_, ClientError>((stream, info))
    };
    let (stream, info) = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ClientError::Timeout { addr: addr.to_string(), after: timeout })??;
    let (rd, wr) = stream.into_split();
    let reads: ReadLens = Arc::default();
    Ok((
        Sender {
            wr: BufWriter::with_capacity(IO_BUFFER_BYTES, wr),
            reads: reads.clone(),
            addr: addr.to_string(),
        },
        Receiver { rd: BufReader::with_capacity(IO_BUFFER_BYTES, rd), reads, addr: addr.to_string() },
        info,
    ))
}

/// The fixed-newstyle handshake up to transmission, with NBD_OPT_GO.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    addr: &str,
    export: &str,
) -> Result<ExportInfo, ClientError> {
    let io = |source| ClientError::Io { addr: addr.to_string(), source };
    let bad = |why: String| ClientError::Protocol { addr: addr.to_string(), why };
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await.map_err(io)?;
    let (magic, opt, flags) = (
        u64::from_be_bytes(greet[0..8].try_into().expect("8")),
        u64::from_be_bytes(greet[8..16].try_into().expect("8")),
        u16::from_be_bytes(greet[16..18].try_into().expect("2")),
    );
    if magic != NBD_MAGIC || opt != IHAVEOPT {
        return Err(bad(format!("greeting {magic:#x} {opt:#x}")));
    }
    if flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the server is not fixed-newstyle".into()));
    }
    let no_zeroes = flags & NBD_FLAG_NO_ZEROES != 0;
    let mut cflags = NBD_FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= NBD_FLAG_C_NO_ZEROES;
    }
    let mut out = BytesMut::new();
    out.put_u32(cflags);
    // NBD_OPT_GO: name, and one info request (block sizes).
    let name = export.as_bytes();
    out.put_u64(IHAVEOPT);
    out.put_u32(NBD_OPT_GO);
    out.put_u32(4 + name.len() as u32 + 2 + 2);
    out.put_u32(name.len() as u32);
    out.put_slice(name);
    out.put_u16(1);
    out.put_u16(NBD_INFO_BLOCK_SIZE);
    s.write_all(&out).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    let mut info = ExportInfo { size: 0, flags: 0, min_block: 1, preferred_block: 4096, max_block: 32 << 20 };
    let mut have_export = false;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.map_err(io)?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
        let reply = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        if magic != OPTION_REPLY_MAGIC {
            return Err(bad(format!("option reply magic {magic:#x}")));
        }
        if len > MAX_OPTION_REPLY {
            return Err(bad(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.map_err(io)?;
        match reply {
            NBD_REP_ACK => break,
            NBD_REP_INFO if data.len() >= 2 => match u16::from_be_bytes([data[0], data[1]]) {
                NBD_INFO_EXPORT if data.len() >= 12 => {
                    info.size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                    info.flags = u16::from_be_bytes(data[10..12].try_into().expect("2"));
                    have_export = true;
                }
                NBD_INFO_BLOCK_SIZE if data.len() >= 14 => {
                    info.min_block = u32::from_be_bytes(data[2..6].try_into().expect("4"));
                    info.preferred_block = u32::from_be_bytes(data[6..10].try_into().expect("4"));
                    info.max_block = u32::from_be_bytes(data[10..14].try_into().expect("4"));
                }
                _ => {}
            },
            r if r & NBD_REP_FLAG_ERROR != 0 => {
                return Err(ClientError::Refused {
                    addr: addr.to_string(),
                    export: export.to_string(),
                    code: r,
                    message: String::from_utf8_lossy(&data).into_owned(),
                });
            }
            _ => {}
        }
    }
    if !have_export {
        return Err(bad("NBD_OPT_GO ended without the export's size".into()));
    }
    // (No zeroes to skip after NBD_OPT_GO: they follow only EXPORT_NAME.)
    Ok(info)
}
