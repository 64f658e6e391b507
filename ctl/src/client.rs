//! Finding and calling the cluster: endpoints and certificates come from
//! flags, then `METRO_*` environment variables, then a lab's `lab.json`.
//! Every call has a connect timeout and a deadline, and endpoints are tried
//! in order, so no command ever hangs on a dead node.

use metro_api::pb::control::control_client::ControlClient;
use metro_api::tls::TlsFiles;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

/// Connect timeout per endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);
/// Deadline for a read RPC.
pub const READ_DEADLINE: Duration = Duration::from_secs(8);
/// Deadline for a state-changing RPC (create waits for placement).
pub const WRITE_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no cluster endpoints: pass --endpoint, set METRO_ENDPOINTS, or point --lab at a lab directory ({0})"
    )]
    NoEndpoints(String),
    #[error(
        "cannot read certificates: {0} (next step: check --ca/--cert/--key or METRO_CA/METRO_CERT/METRO_KEY)"
    )]
    Tls(String),
    #[error("no daemon answered at {tried}: {last} (next step: is the cluster up? `metroctl lab up` starts the lab)")]
    Unreachable { tried: String, last: String },
}

/// What is wrong with our client certificate, as far as we can tell locally
/// (set by [`Target::connect`]); explains a daemon closing the connection at
/// the first RPC, which is how TLS 1.3 reports a refused client certificate.
pub(crate) static CERT_PROBLEM: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Explain a transport-level failure of an RPC (not a gRPC status from the daemon).
pub fn explain_transport(s: &tonic::Status) -> Option<String> {
    use std::error::Error;
    let mut chain = Vec::new();
    let mut src: Option<&dyn Error> = s.source();
    while let Some(e) = src {
        chain.push(e.to_string());
        src = e.source();
    }
    if chain.is_empty() && s.message() != "transport error" {
        return None;
    }
    let detail = chain.last().cloned().unwrap_or_else(|| s.message().to_string());
    let closed = ["broken pipe", "reset", "closed", "alert", "certificate"]
        .iter()
        .any(|w| chain.iter().any(|c| c.to_lowercase().contains(w)));
    if !closed {
        return Some(format!(
            "the daemon could not be reached: {detail} (next step: check `metroctl status` and that the daemons run)"
        ));
    }
    let why = match CERT_PROBLEM.get().cloned().flatten() {
        Some(p) => format!("it refused our client certificate: {p}"),
        None => "it most likely refused our client certificate".to_string(),
    };
    Some(format!(
        "the daemon closed the TLS connection at the first request ({detail}): {why} (next step: use a certificate issued by the cluster CA with `metroctl certs issue`, still valid, and pass it with --cert/--key or METRO_CERT/METRO_KEY)"
    ))
}

/// Where the cluster is and who we are.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub endpoints: Vec<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// etcd client URL → member name (from lab.json), for nicer status output.
    pub etcd_names: Vec<(String, String)>,
}

/// Explicit overrides from the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub endpoints: Vec<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub viewer: bool,
}

impl Target {
    pub fn resolve(lab_dir: &Path, o: &Overrides) -> Result<Target, ClientError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut t = Target::default();
        let lab_json = lab_dir.join("lab.json");
        if let Ok(text) = std::fs::read_to_string(&lab_json) {
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ClientError::NoEndpoints(format!("{} is not valid JSON: {e}", lab_json.display()))
            })?;
            let s = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            for n in v.get("nodes").and_then(|n| n.as_array()).into_iter().flatten() {
                if let Some(api) = s(n, "api") {
                    t.endpoints.push(api);
                }
            }
            if let Some(w) = v.get("witness").and_then(|w| s(w, "api")) {
                t.endpoints.push(w);
            }
            for e in v.get("etcd").and_then(|n| n.as_array()).into_iter().flatten() {
                if let (Some(url), Some(name)) = (s(e, "client_url"), s(e, "name")) {
                    t.etcd_names.push((url, name));
                }
            }
            t.ca = s(&v, "ca_cert").map(PathBuf::from).unwrap_or_default();
            let (c, k) = if o.viewer { ("viewer_cert", "viewer_key") } else { ("admin_cert", "admin_key") };
            t.cert = s(&v, c).map(PathBuf::from).unwrap_or_default();
            t.key = s(&v, k).map(PathBuf::from).unwrap_or_default();
        }
        if let Some(eps) = env("METRO_ENDPOINTS") {
            t.endpoints = eps.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        }
        if !o.endpoints.is_empty() {
            t.endpoints = o.endpoints.clone();
        }
        for (field, flag, var) in [
            (&mut t.ca, &o.ca, "METRO_CA"),
            (&mut t.cert, &o.cert, "METRO_CERT"),
            (&mut t.key, &o.key, "METRO_KEY"),
        ] {
            if let Some(v) = env(var) {
                *field = PathBuf::from(v);
            }
            if let Some(p) = flag {
                *field = p.clone();
            }
        }
        if t.endpoints.is_empty() {
            return Err(ClientError::NoEndpoints(format!("{} not found", lab_json.display())));
        }
        Ok(t)
    }

    pub fn etcd_name(&self, url: &str) -> String {
        self.etcd_names
            .iter()
            .find(|(u, _)| u == url)
            .map(|(_, n)| n.clone())
            .unwrap_or_else(|| url.to_string())
    }

    /// Connect to the first endpoint that answers the TLS handshake.
    pub async fn connect(&self) -> Result<ControlClient<Channel>, ClientError> {
        self.connect_from(0).await.map(|(_, c)| c)
    }

    /// Connect to the first endpoint from index `start` on that answers;
    /// returns its index too (to go on with the next one).
    pub async fn connect_from(&self, start: usize) -> Result<(usize, ControlClient<Channel>), ClientError> {
        metro_api::tls::install_crypto_provider();
        let tls =
            TlsFiles::load(&self.ca, &self.cert, &self.key).map_err(|e| ClientError::Tls(e.to_string()))?;
        let _ = CERT_PROBLEM.set(tls.diagnose_client_cert());
        let mut last = String::from("no endpoint tried");
        for (i, ep) in self.endpoints.iter().enumerate().skip(start) {
            let uri = if ep.starts_with("https://") { ep.clone() } else { format!("https://{ep}") };
            let endpoint = match Channel::from_shared(uri.clone()) {
                Ok(e) => e,
                Err(e) => {
                    last = format!("{uri}: {e}");
                    continue;
                }
            };
            let endpoint = match endpoint.tls_config(tls.tonic_client()) {
                Ok(e) => e.connect_timeout(CONNECT_TIMEOUT),
                Err(e) => return Err(ClientError::Tls(e.to_string())),
            };
            match tokio::time::timeout(CONNECT_TIMEOUT * 2, endpoint.connect()).await {
                Ok(Ok(ch)) => return Ok((i, ControlClient::new(ch))),
                Ok(Err(e)) => last = format!("{uri}: {}", error_chain(&e)),
                Err(_) => last = format!("{uri}: connect timeout"),
            }
        }
        let tried: Vec<&str> = self.endpoints.iter().skip(start).map(String::as_str).collect();
        Err(ClientError::Unreachable { tried: tried.join(", "), last })
    }
}

/// An error and its sources, `a: b: c` (tonic's own text is only "transport error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.ends_with(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

/// Wrap a request with a deadline (gRPC `grpc-timeout` plus a local timer).
pub fn request<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(deadline);
    r
}
