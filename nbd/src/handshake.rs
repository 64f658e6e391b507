//! Fixed-newstyle option haggling, from the greeting to the transmission phase.
//!
//! ```text
//! S: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)
//! C: client flags
//! loop (at most MAX_OPTIONS):
//!   C: IHAVEOPT option length data
//!   S: option replies ...         (GO/EXPORT_NAME success ends the loop)
//! ```
//!
//! Invariants:
//! - every option gets exactly one final reply (ACK or an error) before the
//!   next option is read, except EXPORT_NAME, which either enters
//!   transmission or closes (the spec gives it no error reply);
//! - option data larger than [`MAX_OPTION_DATA_BYTES`] is never buffered;
//! - an export that cannot be opened is answered with `NBD_REP_ERR_UNKNOWN`
//!   carrying the [`ExportError`] text, which names the primary to use.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::command::Geometry;
use super::proto::*;
use super::server::NbdLimits;
use super::wire;
use crate::block::{BlockDevice, ExportError, ExportRegistry};

/// Options a client may send before it must pick an export; real clients
/// send fewer than ten (nbdinfo --list sends about four per export).
pub const MAX_OPTIONS: usize = 256;
/// Largest option payload buffered: a 4096-byte name plus info requests fit.
pub const MAX_OPTION_DATA_BYTES: u32 = 16 * 1024;
/// Larger option payloads up to this size are skipped and answered
/// `NBD_REP_ERR_TOO_BIG`; anything bigger is garbage and closes the connection.
pub const MAX_SKIPPED_OPTION_BYTES: u32 = 1024 * 1024;

/// Transmission flags every export gets. CAN_MULTI_CONN is safe because one
/// primary serves each volume and FLUSH/FUA are device-wide.
pub const TRANSMISSION_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_CAN_MULTI_CONN;

/// The outcome of a successful negotiation.
pub struct Negotiated {
    pub export: String,
    pub device: Arc<dyn BlockDevice>,
    pub structured: bool,
    pub geometry: Geometry,
}

pub enum HandshakeOutcome {
    Transmission(Negotiated),
    /// The client aborted or asked only for a list.
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("I/O during handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation during handshake: {0}")]
    Protocol(String),
    #[error("export `{name}` refused to an NBD_OPT_EXPORT_NAME client: {error}")]
    ExportNameRefused { name: String, error: ExportError },
}

/// The block-size triple advertised for `device` under `limits`.
pub fn geometry_for(device: &dyn BlockDevice, limits: &NbdLimits) -> (Geometry, u32) {
    let min_block = device.min_block_size().max(1);
    let max_payload = (limits.max_request_bytes / min_block).max(1) * min_block;
    let preferred = device.block_size().clamp(min_block, max_payload.max(min_block));
    (Geometry { size: device.size(), min_block, max_payload }, preferred)
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, option: u32, reply: u32, data: &[u8]) -> std::io::Result<()> {
    s.write_all(&wire::encode_option_reply(option, reply, data)).await
}

async fn send_error<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply: u32,
    msg: &str,
) -> std::io::Result<()> {
    tracing::debug!(option = option_name(option), reply, msg, "nbd option refused");
    send(s, option, reply, wire::clamp_string(msg).as_bytes()).await?;
    s.flush().await
}

/// Read and discard `n` bytes without buffering them all.
pub async fn skip<S: AsyncRead + Unpin>(s: &mut S, mut n: u64) -> std::io::Result<()> {
    let mut buf = [0u8; 8192];
    while n > 0 {
        let want = n.min(buf.len() as u64) as usize;
        s.read_exact(&mut buf[..want]).await?;
        n -= want as u64;
    }
    Ok(())
}

/// Run option haggling on a fresh connection.
pub async fn negotiate<S>(
    s: &mut S,
    registry: &dyn ExportRegistry,
    limits: &NbdLimits,
) -> Result<HandshakeOutcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting).await?;
    s.flush().await?;

    let client_flags = s.read_u32().await?;
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if client_flags & !known != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut structured = false;

    for _ in 0..MAX_OPTIONS {
        let mut hdr = [0u8; wire::OPTION_HEADER_LEN];
        s.read_exact(&mut hdr).await?;
        let h = wire::parse_option_header(&hdr)
            .map_err(|e| HandshakeError::Protocol(format!("option header: {e}")))?;
        if h.length > MAX_OPTION_DATA_BYTES {
            if h.length > MAX_SKIPPED_OPTION_BYTES || h.option == NBD_OPT_EXPORT_NAME {
                return Err(HandshakeError::Protocol(format!(
                    "option {} carries {} bytes of data",
                    option_name(h.option),
                    h.length
                )));
            }
            skip(s, u64::from(h.length)).await?;
            send_error(s, h.option, NBD_REP_ERR_TOO_BIG, "option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; h.length as usize];
        s.read_exact(&mut data).await?;
        tracing::debug!(option = option_name(h.option), len = h.length, "nbd option");

        match h.option {
            NBD_OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let device = registry
                    .open(&name)
                    .map_err(|error| HandshakeError::ExportNameRefused { name: name.clone(), error })?;
                let (geometry, _) = geometry_for(device.as_ref(), limits);
                s.write_all(&wire::encode_export_name_reply(geometry.size, TRANSMISSION_FLAGS, no_zeroes))
                    .await?;
                s.flush().await?;
                // Old-style entry: no structured replies were negotiated unless asked.
                return Ok(HandshakeOutcome::Transmission(Negotiated {
                    export: name,
                    device,
                    structured,
                    geometry,
                }));
            }
            NBD_OPT_ABORT => {
                // The client may already have closed; a failed ACK is fine.
                let _ = send(s, h.option, NBD_REP_ACK, &[]).await;
                let _ = s.flush().await;
                return Ok(HandshakeOutcome::Closed);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    send_error(s, h.option, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    continue;
                }
                for name in registry.list() {
                    send(s, h.option, NBD_REP_SERVER, &wire::encode_server_entry(&name)).await?;
                }
                send(s, h.option, NBD_REP_ACK, &[]).await?;
                s.flush().await?;
            }
            NBD_OPT_STARTTLS => {
                let msg = "TLS is not offered on the metro NBD port; reach it over a trusted network \
                           (or a tunnel) and connect without TLS";
                send_error(s, h.option, NBD_REP_ERR_POLICY, msg).await?;
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(s, h.option, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
                        .await?;
                    continue;
                }
                structured = true;
                send(s, h.option, NBD_REP_ACK, &[]).await?;
                s.flush().await?;
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                let req = match wire::parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send_error(s, h.option, NBD_REP_ERR_INVALID, &e.to_string()).await?;
                        continue;
                    }
                };
                let device = match registry.open(&req.name) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::info!(export = %req.name, error = %e, "nbd export refused");
                        send_error(s, h.option, NBD_REP_ERR_UNKNOWN, &e.to_string()).await?;
                        continue;
                    }
                };
                let (geometry, preferred) = geometry_for(device.as_ref(), limits);
                let asked_block_size = req.requests.contains(&NBD_INFO_BLOCK_SIZE);
                if h.option == NBD_OPT_GO && geometry.min_block > 1 && !asked_block_size {
                    let msg = format!(
                        "export `{}` needs {}-byte aligned I/O; request NBD_INFO_BLOCK_SIZE",
                        req.name, geometry.min_block
                    );
                    send_error(s, h.option, NBD_REP_ERR_BLOCK_SIZE_REQD, &msg).await?;
                    continue;
                }
                if req.requests.contains(&NBD_INFO_NAME) {
                    send(s, h.option, NBD_REP_INFO, &wire::encode_info_name(&req.name)).await?;
                }
                let bs = wire::encode_info_block_size(geometry.min_block, preferred, geometry.max_payload);
                send(s, h.option, NBD_REP_INFO, &bs).await?;
                let export = wire::encode_info_export(geometry.size, TRANSMISSION_FLAGS);
                send(s, h.option, NBD_REP_INFO, &export).await?;
                send(s, h.option, NBD_REP_ACK, &[]).await?;
                s.flush().await?;
                if h.option == NBD_OPT_GO {
                    return Ok(HandshakeOutcome::Transmission(Negotiated {
                        export: req.name,
                        device,
                        structured,
                        geometry,
                    }));
                }
            }
            other => {
                let msg = format!(
                    "option {other} ({}) is not supported by the metro NBD server",
                    option_name(other)
                );
                send_error(s, other, NBD_REP_ERR_UNSUP, &msg).await?;
            }
        }
    }
    Err(HandshakeError::Protocol(format!("more than {MAX_OPTIONS} options without choosing an export")))
}
