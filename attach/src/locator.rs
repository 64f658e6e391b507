//! Where a volume is served: a `WatchVolume` stream from the control API
//! (mutual TLS, the host's `client:<host>` identity), through one cluster
//! node at a time. A node that ends the stream, falls silent for three
//! keepalives, says its view is stale (it knows no leader), or is asked to
//! by the follower (`rotate`: the primary it names does not answer), is
//! replaced by the next endpoint in the list.

use std::sync::Arc;
use std::time::Duration;

use metro_api::pb::control as pb;
use metro_api::pb::control::control_client::ControlClient;
use metro_api::tls::TlsFiles;
use tokio::sync::{watch, Notify};

use crate::follower::Location;

/// The server repeats itself every 2 s; three silent periods end a stream.
const SILENCE: Duration = Duration::from_secs(6);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BETWEEN_ENDPOINTS: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error("no volume `{0}` in the cluster")]
    NotFound(String),
    #[error("the cluster refused this host's identity: {0}")]
    Denied(String),
    #[error("no control endpoint answered: {0}")]
    Unreachable(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Control endpoints and this host's identity.
#[derive(Clone)]
pub struct Locator {
    pub endpoints: Vec<String>,
    pub tls: TlsFiles,
}

impl Locator {
    async fn client(&self, ep: &str) -> Result<ControlClient<tonic::transport::Channel>, String> {
        let uri = if ep.starts_with("https://") { ep.to_string() } else { format!("https://{ep}") };
        let endpoint = tonic::transport::Channel::from_shared(uri.clone())
            .map_err(|e| format!("{uri}: {e}"))?
            .tls_config(self.tls.tonic_client())
            .map_err(|e| format!("{uri}: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, endpoint.connect()).await {
            Ok(Ok(ch)) => Ok(ControlClient::new(ch)),
            Ok(Err(e)) => Err(format!("{uri}: {e}")),
            Err(_) => Err(format!("{uri}: connect timeout")),
        }
    }

    /// Open a watch on `volume` through the first endpoint from `start` on
    /// that answers; the stream, the endpoint's index and the first location.
    async fn open(
        &self,
        volume: &str,
        start: usize,
    ) -> Result<(tonic::Streaming<pb::VolumeLocation>, usize, pb::VolumeLocation), LocateError> {
        let mut last = String::from("no endpoint configured");
        let n = self.endpoints.len();
        for k in 0..n {
            let i = (start + k) % n;
            let ep = &self.endpoints[i];
            let mut c = match self.client(ep).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            let req = tonic::Request::new(pb::VolumeRef { name: volume.to_string() });
            let opened = tokio::time::timeout(SILENCE, async {
                let mut s = c.watch_volume(req).await?.into_inner();
                let first = s.message().await?;
                Ok::<_, tonic::Status>((s, first))
            })
            .await;
            match opened {
                Ok(Ok((s, Some(first)))) => {
                    if first.stale && k + 1 < n {
                        last = format!("{ep}: knows no leader");
                        continue;
                    }
                    return Ok((s, i, first));
                }
                Ok(Ok((_, None))) => last = format!("{ep}: the watch ended at once"),
                Ok(Err(st)) if st.code() == tonic::Code::NotFound => {
                    return Err(LocateError::NotFound(volume.to_string()))
                }
                Ok(Err(st)) if st.code() == tonic::Code::PermissionDenied => {
                    return Err(LocateError::Denied(st.message().to_string()))
                }
                Ok(Err(st)) => last = format!("{ep}: {}", st.message()),
                Err(_) => last = format!("{ep}: no answer in {SILENCE:?}"),
            }
        }
        Err(LocateError::Unreachable(last))
    }

    /// Find `volume` once (a clear error for an unknown volume or a refused
    /// identity), then follow it in the background, publishing every new
    /// location on the returned channel. `rotate` moves the watch to the
    /// next endpoint.
    pub async fn follow(
        self,
        volume: &str,
        rotate: Arc<Notify>,
    ) -> Result<watch::Receiver<Option<Location>>, LocateError> {
        let (stream, at, first) = self.open(volume, 0).await?;
        let (tx, rx) = watch::channel(Some(location(&first)));
        let volume = volume.to_string();
        tokio::spawn(async move {
            let mut current = Some((stream, at));
            let mut next = at + 1;
            loop {
                if let Some((mut s, i)) = current.take() {
                    next = i + 1;
                    loop {
                        let msg = tokio::select! {
                            m = tokio::time::timeout(SILENCE, s.message()) => m,
                            _ = rotate.notified() => {
                                tracing::info!(volume, endpoint = %self.endpoints[i], "the primary it names does not answer: watching through the next node");
                                break;
                            }
                            _ = tx.closed() => return,
                        };
                        match msg {
                            Ok(Ok(Some(loc))) if loc.stale => {
                                tracing::info!(volume, endpoint = %self.endpoints[i], "this node knows no leader: watching through the next one");
                                break;
                            }
                            Ok(Ok(Some(loc))) => publish(&tx, &volume, &loc),
                            Ok(Ok(None)) => break,
                            Ok(Err(st)) => {
                                tracing::warn!(volume, endpoint = %self.endpoints[i], error = %st.message(), "watch ended");
                                break;
                            }
                            Err(_) => {
                                tracing::warn!(volume, endpoint = %self.endpoints[i], "watch silent for {SILENCE:?}");
                                break;
                            }
                        }
                    }
                }
                tokio::time::sleep(BETWEEN_ENDPOINTS).await;
                match self.open(&volume, next % self.endpoints.len().max(1)).await {
                    Ok((s, i, first)) => {
                        publish(&tx, &volume, &first);
                        current = Some((s, i));
                    }
                    Err(e) => {
                        tracing::warn!(volume, error = %e, "cannot watch the volume; trying again");
                        next += 1;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Tell the follower about `loc` if it names something new.
fn publish(tx: &watch::Sender<Option<Location>>, volume: &str, loc: &pb::VolumeLocation) {
    let l = location(loc);
    tx.send_if_modified(|cur| {
        let changed = cur.as_ref() != Some(&l);
        if changed {
            tracing::info!(volume, primary = %l.primary, nbd = %l.nbd, epoch = l.epoch, "the cluster names the primary");
            *cur = Some(l.clone());
        }
        changed
    });
}

fn location(l: &pb::VolumeLocation) -> Location {
    Location { primary: l.primary.clone(), nbd: l.primary_nbd.clone(), epoch: l.epoch }
}
