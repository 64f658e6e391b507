//! The replica's side of replication links: accept TLS connections from
//! primaries, check the protocol version and epochs, apply ops in order with
//! group commit, and acknowledge each op.
//!
//! Durability rule: a plain write is acknowledged once it is in the local
//! file (page cache); an op with FUA, or a FLUSH, only after fdatasync.

use super::replica::ReplicaVolume;
use super::wire::{read_frame, AckStatus, Frame, OpKind, VERSION};
use crate::block::BlockError;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Ops read ahead of the applier per connection (bounded).
const APPLY_QUEUE: usize = 256;
/// Deadline for the TLS handshake plus hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Finds (or creates) the local replica a primary writes to.
pub trait ReplicaSink: Send + Sync + 'static {
    fn replica(&self, volume: &str, size: u64) -> Option<Arc<ReplicaVolume>>;
    fn node_id(&self) -> &str;
    /// Ranges this node's activity logs mark as possibly divergent, for the
    /// volumes it shares with `primary`: `(volume, offset, len)`.
    fn hot_ranges(&self, primary: &str) -> Vec<(String, u64, u64)>;
    /// This replica's session: boot id plus process incarnation (see
    /// [`Frame::HelloAck`]).
    fn session(&self) -> String;
    /// Activity-log extents of `volume` here (a `QueryHot` op).
    fn query_hot(&self, volume: &str) -> Vec<(u64, u64)>;
    /// Forget them (a `ClearHot` op: the primary's copies are durable here).
    fn clear_hot(&self, volume: &str) -> std::io::Result<()>;
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    sink: Arc<dyn ReplicaSink>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            r = listener.accept() => {
                let Ok((tcp, peer)) = r else { continue };
                let _ = super::link::tune(&tcp);
                let acceptor = acceptor.clone();
                let sink = sink.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(acceptor, tcp, sink).await {
                        tracing::warn!(%peer, error = %e, "replication connection ended");
                    }
                });
            }
        }
    }
}

async fn handle(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    sink: Arc<dyn ReplicaSink>,
) -> anyhow::Result<()> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake timeout"))??;
    serve_stream(stream, sink).await
}

/// Serve one replication connection on an established byte stream: the
/// hello exchange, then ops applied in order and acknowledged. The daemon
/// calls it after the TLS handshake; the simulator on its own connections.
pub async fn serve_stream<S>(mut stream: S, sink: Arc<dyn ReplicaSink>) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let from = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        match read_frame(&mut stream).await {
            Ok(Frame::Hello { from, .. }) => {
                let hot = sink.hot_ranges(&from);
                if !hot.is_empty() {
                    tracing::info!(%from, ranges = hot.len(), "reporting possibly divergent extents for resync");
                }
                let ack = Frame::HelloAck {
                    version: VERSION,
                    node: sink.node_id().to_string(),
                    session: sink.session(),
                    hot,
                };
                stream.write_all(&ack.encode()).await?;
                stream.flush().await?;
                Ok::<_, anyhow::Error>(from)
            }
            Ok(other) => anyhow::bail!("expected Hello, got {other:?}"),
            Err(e) => {
                // Tell an old or foreign peer why, then close.
                let msg = Frame::Error { message: format!("replication handshake refused: {e}") };
                let _ = stream.write_all(&msg.encode()).await;
                let _ = stream.flush().await;
                anyhow::bail!("handshake refused: {e}")
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("handshake timeout"))??;
    tracing::info!(%from, "replication link accepted");
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Frame>(APPLY_QUEUE);
    let reader = tokio::spawn(async move {
        loop {
            match read_frame(&mut rd).await {
                Ok(f) => {
                    if tx.send(f).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "replication reader ended");
                    return;
                }
            }
        }
    });
    let mut batch = Vec::with_capacity(64);
    while rx.recv_many(&mut batch, 64).await > 0 {
        let acks = apply_batch(&sink, &from, std::mem::take(&mut batch)).await;
        let mut buf = Vec::with_capacity(acks.len() * 32);
        for a in acks {
            buf.extend_from_slice(&a.encode());
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            break;
        }
    }
    reader.abort();
    Ok(())
}

/// Consecutive plain writes to one volume, applied in one
/// [`BlockDevice::write_batch`](crate::block::BlockDevice::write_batch) call.
struct WriteRun {
    vol: Arc<ReplicaVolume>,
    /// `(index of the ack, offset, data, needs fdatasync)`.
    writes: Vec<(usize, u64, bytes::Bytes, bool)>,
}

/// Apply ops in order; one fdatasync per volume covers every FUA/FLUSH in the
/// batch (group commit), and their acks wait for it. Runs of consecutive
/// writes to one volume go to the device in one call (in order), so a batch
/// of small writes costs one thread hand-off rather than one per write.
async fn apply_batch(sink: &Arc<dyn ReplicaSink>, from: &str, frames: Vec<Frame>) -> Vec<Frame> {
    let mut acks: Vec<Frame> = Vec::with_capacity(frames.len());
    let mut needs_sync: Vec<(Arc<ReplicaVolume>, Vec<usize>)> = Vec::new();
    let mut run: Option<WriteRun> = None;
    for f in frames {
        match f {
            Frame::Op { seq, volume, epoch, size, fua, op, .. } => {
                let Some(vol) = sink.replica(&volume, size) else {
                    acks.push(Frame::Ack { seq, status: AckStatus::NoVolume, epoch: 0 });
                    continue;
                };
                if let Err(floor) = vol.admit(from, epoch) {
                    tracing::warn!(%volume, %from, epoch, floor, "refused a write with a stale epoch");
                    acks.push(Frame::Ack { seq, status: AckStatus::StaleEpoch, epoch: floor });
                    continue;
                }
                let sync = fua || matches!(op, OpKind::Flush);
                acks.push(Frame::Ack { seq, status: AckStatus::Ok, epoch });
                let idx = acks.len() - 1;
                if let OpKind::Write { offset, data } = op {
                    if run.as_ref().is_some_and(|r| !Arc::ptr_eq(&r.vol, &vol)) {
                        finish_run(run.take(), &mut acks, &mut needs_sync).await;
                    }
                    run.get_or_insert_with(|| WriteRun { vol: vol.clone(), writes: Vec::new() })
                        .writes
                        .push((idx, offset, data, sync));
                    continue;
                }
                // Anything else is ordered after every write before it.
                finish_run(run.take(), &mut acks, &mut needs_sync).await;
                let r = match op {
                    OpKind::Zero { offset, len, punch } => {
                        vol.device.write_zeroes(offset, len, false, punch).await
                    }
                    OpKind::QueryHot => {
                        let ranges = sink.query_hot(&volume);
                        acks[idx] = Frame::HotAck { seq, status: AckStatus::Ok, epoch, ranges };
                        continue;
                    }
                    OpKind::ClearHot => sink.clear_hot(&volume).map_err(BlockError::Io),
                    OpKind::Read { offset, len } => {
                        let (status, data) = match vol.device.read(offset, len).await {
                            Ok(d) => (AckStatus::Ok, d),
                            Err(e) => (status_of(Err(e)), bytes::Bytes::new()),
                        };
                        acks[idx] = Frame::DataAck { seq, status, epoch, data };
                        continue;
                    }
                    OpKind::Write { .. } | OpKind::Flush => Ok(()),
                };
                let status = status_of(r);
                set_status(&mut acks[idx], status);
                if sync && status == AckStatus::Ok {
                    add_sync(&mut needs_sync, &vol, idx);
                }
            }
            Frame::Fence { seq, volume, epoch } => {
                finish_run(run.take(), &mut acks, &mut needs_sync).await;
                let status = match sink.replica(&volume, 0) {
                    Some(v) => match v.admit(from, epoch) {
                        Ok(()) => AckStatus::Ok,
                        Err(_) => AckStatus::StaleEpoch,
                    },
                    None => AckStatus::NoVolume,
                };
                acks.push(Frame::Ack { seq, status, epoch });
            }
            other => tracing::warn!(?other, "unexpected frame on replication link"),
        }
    }
    finish_run(run.take(), &mut acks, &mut needs_sync).await;
    for (vol, idxs) in needs_sync {
        let status = status_of(vol.device.flush().await);
        if status != AckStatus::Ok {
            for i in idxs {
                set_status(&mut acks[i], status);
            }
        }
    }
    acks
}

/// Write a run and set its acks; FUA writes that succeeded join the sync.
async fn finish_run(
    run: Option<WriteRun>,
    acks: &mut [Frame],
    needs_sync: &mut Vec<(Arc<ReplicaVolume>, Vec<usize>)>,
) {
    let Some(WriteRun { vol, writes }) = run else { return };
    let meta: Vec<(usize, bool)> = writes.iter().map(|(i, _, _, sync)| (*i, *sync)).collect();
    let results = vol.device.write_batch(writes.into_iter().map(|(_, o, d, _)| (o, d)).collect()).await;
    for ((idx, sync), r) in meta.into_iter().zip(results) {
        let status = status_of(r);
        set_status(&mut acks[idx], status);
        if sync && status == AckStatus::Ok {
            add_sync(needs_sync, &vol, idx);
        }
    }
}

fn set_status(ack: &mut Frame, status: AckStatus) {
    if let Frame::Ack { status: s, .. } = ack {
        *s = status;
    }
}

fn add_sync(needs_sync: &mut Vec<(Arc<ReplicaVolume>, Vec<usize>)>, vol: &Arc<ReplicaVolume>, idx: usize) {
    match needs_sync.iter_mut().find(|(v, _)| Arc::ptr_eq(v, vol)) {
        Some((_, v)) => v.push(idx),
        None => needs_sync.push((vol.clone(), vec![idx])),
    }
}

fn status_of(r: Result<(), BlockError>) -> AckStatus {
    match r {
        Ok(()) => AckStatus::Ok,
        Err(e) if e.nbd_errno() == 28 => AckStatus::NoSpace,
        Err(e) => {
            tracing::error!(error = %e, "replica write failed");
            AckStatus::Io
        }
    }
}
