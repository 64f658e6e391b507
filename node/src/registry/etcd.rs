//! [`Registry`] on etcd (v3 API; works against Debian's etcd 3.4).
//! Every call has a deadline; etcd being down is reported as
//! [`RegistryError::Unavailable`] and never blocks the I/O path.
//!
//! Plain `http://` endpoints by default; [`EtcdRegistry::with_tls`] turns on
//! TLS (rustls with ring, through tonic), with an optional client certificate
//! for etcd's `--client-cert-auth`. The server certificate is verified against
//! the endpoint's host (IP or DNS SAN).

use super::{Registry, RegistryError, VolumeSpec};
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use metro_quorum::{ClusterConfig, NodeRecord};
use std::time::Duration;
use tokio::sync::Mutex;

/// Registration lease TTL: a dead node's key disappears after this.
pub const REGISTRATION_TTL_S: i64 = 10;

/// TLS material for etcd: the CA that signed etcd's certificate, and an
/// optional client certificate and key (PEM contents).
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_pem: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl EtcdTls {
    /// Read the files named by `[etcd]` in the daemon config; `None` without `ca_cert`.
    pub fn from_config(e: &metro_api::config::EtcdConfig) -> std::io::Result<Option<Self>> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        let Some(ca) = &e.ca_cert else { return Ok(None) };
        let client = match (&e.cert, &e.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(Some(Self { ca_pem: read(ca)?, client }))
    }

    fn options(&self) -> etcd_client::TlsOptions {
        let mut o =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&self.ca_pem));
        if let Some((c, k)) = &self.client {
            o = o.identity(etcd_client::Identity::from_pem(c, k));
        }
        o
    }
}

pub struct EtcdRegistry {
    endpoints: Vec<String>,
    tls: Option<EtcdTls>,
    prefix: String,
    timeout: Duration,
    client: Mutex<Option<Client>>,
    keepalive: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Pause before retrying a write a member refused to connect for.
const CONNECT_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

fn unavailable(e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

impl EtcdRegistry {
    /// Does not connect yet: the first call does, so a daemon can start while etcd is down.
    pub fn new(cluster: &str, endpoints: Vec<String>, timeout: Duration) -> Self {
        Self {
            endpoints,
            tls: None,
            prefix: format!("/metro/{cluster}/"),
            timeout,
            client: Mutex::new(None),
            keepalive: std::sync::Mutex::new(None),
        }
    }

    /// Talk TLS to etcd (endpoints must be `https://`).
    pub fn with_tls(mut self, tls: Option<EtcdTls>) -> Self {
        self.tls = tls;
        self
    }

    fn connect_options(&self) -> ConnectOptions {
        let opts = ConnectOptions::new().with_connect_timeout(self.timeout).with_timeout(self.timeout);
        match &self.tls {
            Some(t) => opts.with_tls(t.options()),
            None => opts,
        }
    }

    async fn client(&self) -> Result<Client, RegistryError> {
        let mut g = self.client.lock().await;
        if let Some(c) = g.as_ref() {
            return Ok(c.clone());
        }
        let opts = self.connect_options().with_keep_alive(Duration::from_secs(2), self.timeout);
        let c = tokio::time::timeout(self.timeout, Client::connect(&self.endpoints, Some(opts)))
            .await
            .map_err(|_| unavailable("connect timeout"))?
            .map_err(unavailable)?;
        *g = Some(c.clone());
        Ok(c)
    }

    async fn with_deadline<T, F>(&self, f: F) -> Result<T, RegistryError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable(format!("no answer within {:?}", self.timeout))),
        }
    }

    /// Run a write whose request may be repeated when it provably never
    /// reached etcd: the balanced channel can hand the first request to a
    /// member it could not connect to ("tcp connect error") although others
    /// answer. Such a failure is retried on the next member until the
    /// deadline; any other error, or a timeout, is returned at once (an
    /// ambiguous write is never repeated).
    async fn write<T, F, Fut>(&self, op: F) -> Result<T, RegistryError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let c = self.client().await?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, op(c)).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if e.to_string().contains("tcp connect error") && left > CONNECT_RETRY_PAUSE => {
                    tracing::debug!(error = %e, "etcd member refused the connection; trying the next one");
                    tokio::time::sleep(CONNECT_RETRY_PAUSE).await;
                }
                Ok(Err(e)) => return Err(unavailable(e)),
                Err(_) => return Err(unavailable(format!("no answer within {:?}", self.timeout))),
            }
        }
    }

    async fn list<T: serde::de::DeserializeOwned>(&self, sub: &str) -> Result<Vec<T>, RegistryError> {
        let mut c = self.client().await?;
        let key = format!("{}{sub}", self.prefix);
        let resp = self.with_deadline(c.get(key, Some(GetOptions::new().with_prefix()))).await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map_err(|e| RegistryError::Corrupt {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    async fn put_on_lease(&self, key: String, value: String) -> Result<i64, RegistryError> {
        let mut c = self.client().await?;
        let lease = self.with_deadline(c.lease_grant(REGISTRATION_TTL_S, None)).await?.id();
        self.with_deadline(c.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
        Ok(lease)
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn register(&self, rec: &NodeRecord) -> Result<(), RegistryError> {
        let key = format!("{}nodes/{}", self.prefix, rec.id);
        let value = serde_json::to_string(rec).expect("serializable");
        let mut lease = self.put_on_lease(key.clone(), value.clone()).await?;
        let timeout = self.timeout;
        // Keep the lease alive; on any failure re-register with a new lease.
        let me = EtcdRegistry::new("-", self.endpoints.clone(), timeout).with_tls(self.tls.clone());
        let task = tokio::spawn(async move {
            let period = Duration::from_secs((REGISTRATION_TTL_S / 3).max(1) as u64);
            let mut keeper = None;
            loop {
                tokio::time::sleep(period).await;
                let ok = async {
                    if keeper.is_none() {
                        let mut c = me.client().await?;
                        keeper = Some(me.with_deadline(c.lease_keep_alive(lease)).await?);
                    }
                    let (k, s) = keeper.as_mut().expect("set above");
                    me.with_deadline(k.keep_alive()).await?;
                    match me.with_deadline(s.message()).await? {
                        Some(r) if r.ttl() > 0 => Ok(()),
                        _ => Err(unavailable("lease expired")),
                    }
                }
                .await;
                if let Err(e) = ok {
                    tracing::debug!(error = %e, "registration keepalive failed; re-registering");
                    keeper = None;
                    *me.client.lock().await = None;
                    if let Ok(l) = me.put_on_lease(key.clone(), value.clone()).await {
                        lease = l;
                    }
                }
            }
        });
        if let Some(old) = self.keepalive.lock().expect("poisoned").replace(task) {
            old.abort();
        }
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, RegistryError> {
        self.list("nodes/").await
    }

    async fn claim_bootstrap(&self, node: &str) -> Result<String, RegistryError> {
        let mut c = self.client().await?;
        let key = format!("{}bootstrap", self.prefix);
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key.clone(), node, None)])
            .or_else(vec![TxnOp::get(key.clone(), None)]);
        let resp = self.with_deadline(c.txn(txn)).await?;
        if resp.succeeded() {
            return Ok(node.to_string());
        }
        let got = self.with_deadline(c.get(key.clone(), None)).await?;
        got.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
            .ok_or(RegistryError::Corrupt { key, reason: "bootstrap key vanished".into() })
    }

    async fn put_spec(&self, spec: &VolumeSpec, create_only: bool) -> Result<(), RegistryError> {
        let key = format!("{}volumes/{}", self.prefix, spec.name);
        let value = serde_json::to_string(spec).expect("serializable");
        if create_only {
            let txn = Txn::new()
                .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(key, value, None)]);
            let r = self.write(|mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            });
            if !r.await?.succeeded() {
                return Err(RegistryError::AlreadyExists(spec.name.clone()));
            }
        } else {
            self.write(|mut c| {
                let (k, v) = (key.clone(), value.clone());
                async move { c.put(k, v, None).await }
            })
            .await?;
        }
        Ok(())
    }

    async fn remove_spec(&self, name: &str) -> Result<(), RegistryError> {
        let key = format!("{}volumes/{name}", self.prefix);
        self.write(|mut c| {
            let k = key.clone();
            async move { c.delete(k, None).await }
        })
        .await?;
        Ok(())
    }

    async fn specs(&self) -> Result<Vec<VolumeSpec>, RegistryError> {
        self.list("volumes/").await
    }

    async fn specs_version(&self) -> Result<(i64, i64), RegistryError> {
        // The newest spec's mod revision (puts) and the number of specs
        // (removals): keys only, one key returned.
        let mut c = self.client().await?;
        let opts = GetOptions::new()
            .with_prefix()
            .with_keys_only()
            .with_sort(SortTarget::Mod, SortOrder::Descend)
            .with_limit(1);
        let resp = self.with_deadline(c.get(format!("{}volumes/", self.prefix), Some(opts))).await?;
        Ok((resp.kvs().first().map_or(0, |kv| kv.mod_revision()), resp.count()))
    }

    async fn put_status(&self, json: &str) -> Result<(), RegistryError> {
        let mut c = self.client().await?;
        self.with_deadline(c.put(format!("{}status", self.prefix), json, None)).await?;
        Ok(())
    }

    async fn status(&self) -> Result<Option<String>, RegistryError> {
        let mut c = self.client().await?;
        let resp = self.with_deadline(c.get(format!("{}status", self.prefix), None)).await?;
        Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    async fn config(&self) -> Result<Option<(ClusterConfig, i64)>, RegistryError> {
        let mut c = self.client().await?;
        let key = format!("{}config", self.prefix);
        let resp = self.with_deadline(c.get(key.clone(), None)).await?;
        let Some(kv) = resp.kvs().first() else { return Ok(None) };
        ClusterConfig::from_json(kv.value())
            .map(|cfg| Some((cfg, kv.mod_revision())))
            .map_err(|e| RegistryError::Corrupt { key, reason: e.to_string() })
    }

    async fn put_config(&self, new: &ClusterConfig, expected: Option<i64>) -> Result<(), RegistryError> {
        let mut c = self.client().await?;
        let key = format!("{}config", self.prefix);
        let cmp = match expected {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
        };
        let value = serde_json::to_vec(new).expect("serializable");
        let txn = Txn::new().when(vec![cmp]).and_then(vec![TxnOp::put(key, value, None)]);
        if !self.with_deadline(c.txn(txn)).await?.succeeded() {
            return Err(RegistryError::Conflict("config".into()));
        }
        Ok(())
    }

    async fn health(&self) -> Vec<(String, bool)> {
        // All members at once, so a status call with every member down costs
        // one timeout, not one per member.
        let probes = self.endpoints.iter().map(|ep| async move {
            let opts = self.connect_options();
            let ok = tokio::time::timeout(self.timeout, async {
                let mut c = Client::connect([ep.as_str()], Some(opts)).await.ok()?;
                c.status().await.ok()
            })
            .await
            .ok()
            .flatten()
            .is_some();
            (ep.clone(), ok)
        });
        futures::future::join_all(probes).await
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        if let Some(t) = self.keepalive.lock().expect("poisoned").take() {
            t.abort();
        }
    }
}
