//! The agent: one local NBD endpoint per attached volume (a unix socket,
//! optionally a TCP port on loopback), each served by a [`Follower`].
//!
//! The attach API is deliberately small, for a CSI node plugin later:
//! [`Agent::attach`] (volume, socket path, optional TCP address),
//! [`Agent::detach`], [`Agent::attachments`]. The daemon writes the list to
//! `<socket dir>/attachments.json` on every change, which
//! `metro-attach attachments` reads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use metro_nbd::block::{BlockDevice, ExportError, ExportRegistry};
use metro_nbd::{NbdLimits, NbdServer};
use tokio::sync::{watch, Notify};

use crate::follower::{FollowError, FollowOptions, Follower};
use crate::locator::{LocateError, Locator};

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("`{0}` is already attached here")]
    AlreadyAttached(String),
    #[error("`{0}` is not attached here")]
    NotAttached(String),
    #[error(transparent)]
    Locate(#[from] LocateError),
    #[error(transparent)]
    Follow(#[from] FollowError),
    #[error("socket {path}: {why}")]
    Socket { path: PathBuf, why: String },
    #[error("cannot listen on {addr}: {source} (choose another with --tcp VOLUME=ADDR)")]
    Tcp { addr: SocketAddr, source: std::io::Error },
}

/// One attachment as `attachments` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachmentInfo {
    pub volume: String,
    pub socket: PathBuf,
    pub tcp: Option<SocketAddr>,
    pub size_bytes: u64,
    pub upstream: String,
    pub holding: bool,
    pub reconnects: u64,
    pub resent_requests: u64,
    pub failed_after_hold: u64,
    pub longest_stall_ms: u64,
    pub last_stall_ms: u64,
}

struct Attached {
    follower: Arc<Follower>,
    socket: PathBuf,
    tcp: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Serves exactly one export: the attached volume (by its name, or the
/// default export "").
struct OneExport {
    name: String,
    dev: Arc<Follower>,
}

impl ExportRegistry for OneExport {
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, ExportError> {
        if name == self.name || name.is_empty() {
            Ok(self.dev.clone())
        } else {
            Err(ExportError::NotFound(name.to_string()))
        }
    }
    fn list(&self) -> Vec<String> {
        vec![self.name.clone()]
    }
}

pub struct Agent {
    locator: Locator,
    opts: FollowOptions,
    state_file: Option<PathBuf>,
    attached: Mutex<BTreeMap<String, Attached>>,
}

impl Agent {
    pub fn new(locator: Locator, opts: FollowOptions, state_file: Option<PathBuf>) -> Arc<Agent> {
        Arc::new(Agent { locator, opts, state_file, attached: Mutex::default() })
    }

    /// Attach `volume`: find its primary, connect, then serve it at
    /// `socket` (and `tcp`, if given).
    pub async fn attach(
        &self,
        volume: &str,
        socket: &Path,
        tcp: Option<SocketAddr>,
    ) -> Result<AttachmentInfo, AttachError> {
        if self.attached.lock().expect("poisoned").contains_key(volume) {
            return Err(AttachError::AlreadyAttached(volume.into()));
        }
        let listener = bind_unix(socket)?;
        let tcp_listener = match tcp {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| AttachError::Tcp { addr, source })?,
            ),
            None => None,
        };
        let rotate = Arc::new(Notify::new());
        let located = async {
            let target = self.locator.clone().follow(volume, rotate.clone()).await?;
            Ok::<_, AttachError>(Follower::start(volume, self.opts.clone(), target, rotate).await?)
        }
        .await;
        let follower = match located {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                return Err(e);
            }
        };
        let registry = Arc::new(OneExport { name: volume.to_string(), dev: follower.clone() });
        let server = Arc::new(NbdServer::new(registry, NbdLimits::default()));
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = vec![tokio::spawn(server.clone().serve_unix(listener, stop_rx.clone()))];
        if let Some(l) = tcp_listener {
            tasks.push(tokio::spawn(server.serve(l, stop_rx)));
        }
        tracing::info!(volume, socket = %socket.display(), tcp = ?tcp, "attached: serving the volume locally");
        self.attached.lock().expect("poisoned").insert(
            volume.to_string(),
            Attached { follower, socket: socket.to_path_buf(), tcp, stop, tasks },
        );
        self.save();
        Ok(self.info(volume).expect("just attached"))
    }

    /// Stop serving `volume` locally: open clients are disconnected once
    /// their in-flight requests finish.
    pub async fn detach(&self, volume: &str) -> Result<(), AttachError> {
        let a = self
            .attached
            .lock()
            .expect("poisoned")
            .remove(volume)
            .ok_or_else(|| AttachError::NotAttached(volume.into()))?;
        let _ = a.stop.send(true);
        for t in a.tasks {
            let _ = t.await;
        }
        let _ = std::fs::remove_file(&a.socket);
        self.save();
        tracing::info!(volume, "detached");
        Ok(())
    }

    pub async fn detach_all(&self) {
        let names: Vec<String> = self.attached.lock().expect("poisoned").keys().cloned().collect();
        for n in names {
            let _ = self.detach(&n).await;
        }
    }

    pub fn attachments(&self) -> Vec<AttachmentInfo> {
        let names: Vec<String> = self.attached.lock().expect("poisoned").keys().cloned().collect();
        names.iter().filter_map(|n| self.info(n)).collect()
    }

    fn info(&self, volume: &str) -> Option<AttachmentInfo> {
        let g = self.attached.lock().expect("poisoned");
        let a = g.get(volume)?;
        let s = &a.follower.stats;
        let stalls = s.stalls.lock().expect("poisoned").clone();
        let info = AttachmentInfo {
            volume: volume.to_string(),
            socket: a.socket.clone(),
            tcp: a.tcp,
            size_bytes: a.follower.size(),
            upstream: s.primary.lock().expect("poisoned").clone(),
            holding: s.holding.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            resent_requests: s.resent.load(Ordering::Relaxed),
            failed_after_hold: s.failed_after_hold.load(Ordering::Relaxed),
            longest_stall_ms: (stalls.iter().cloned().fold(0.0, f64::max) * 1000.0) as u64,
            last_stall_ms: (stalls.last().copied().unwrap_or(0.0) * 1000.0) as u64,
        };
        Some(info)
    }

    /// Write the attachment list (atomically) for `metro-attach attachments`.
    pub fn save(&self) {
        let Some(path) = &self.state_file else { return };
        let body = serde_json::to_vec_pretty(&self.attachments()).expect("serializable");
        let tmp = path.with_extension("json.tmp");
        if let Err(e) = std::fs::write(&tmp, body).and_then(|_| std::fs::rename(&tmp, path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the attachment list");
        }
    }

    /// The followers, for metrics.
    pub fn followers(&self) -> Vec<Arc<Follower>> {
        self.attached.lock().expect("poisoned").values().map(|a| a.follower.clone()).collect()
    }
}

/// Bind a unix socket at `path`. A stale socket (nothing listening) is
/// replaced; a live one, or anything that is not a socket, is an error.
pub fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, AttachError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |why: String| AttachError::Socket { path: path.to_path_buf(), why };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(err("already in use: another agent (or program) is serving there".into()));
            }
            std::fs::remove_file(path).map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
        }
        Ok(_) => return Err(err("exists and is not a socket: refusing to replace it".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e.to_string())),
    }
    tokio::net::UnixListener::bind(path).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_socket_path_in_use_or_not_a_socket_is_refused_and_a_stale_one_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.sock");
        let _l = bind_unix(&live).unwrap();
        let e = bind_unix(&live).unwrap_err().to_string();
        assert!(e.contains("already in use"), "{e}");
        let file = dir.path().join("file.sock");
        std::fs::write(&file, b"x").unwrap();
        let e = bind_unix(&file).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file is left alone");
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        bind_unix(&stale).expect("a stale socket is replaced");
    }
}
