//! TLS material: loading PEM files and building tonic and rustls configs for
//! mutual TLS with the cluster CA.
//!
//! Every server certificate carries the DNS name [`SERVER_NAME`] (plus its
//! IPs); clients verify the server against that name. Who the peer *is* comes
//! from the client certificate's common name (see [`crate::identity`]).

use std::path::Path;
use std::sync::Arc;

/// DNS SAN every metro server certificate carries.
pub const SERVER_NAME: &str = "metro";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: no PEM {what} found")]
    Empty { path: String, what: &'static str },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// PEM contents of a CA, a certificate chain and its key.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.display().to_string(), source })
}

impl TlsFiles {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: read(key)? })
    }

    pub fn from_config(t: &crate::config::TlsConfig) -> Result<Self, TlsError> {
        Self::load(&t.ca_cert, &t.cert, &t.key)
    }

    /// tonic server config that requires a client certificate from the cluster CA.
    pub fn tonic_server(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(tonic::transport::Certificate::from_pem(&self.ca_pem))
    }

    /// tonic client config presenting our certificate.
    pub fn tonic_client(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .domain_name(SERVER_NAME)
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    fn certs(&self) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
        let certs: Vec<_> = rustls_pemfile::certs(&mut &self.cert_pem[..])
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::Empty { path: "cert".into(), what: "certificate" });
        }
        Ok(certs)
    }

    fn key(&self) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
        rustls_pemfile::private_key(&mut &self.key_pem[..])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .ok_or(TlsError::Empty { path: "key".into(), what: "private key" })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut &self.ca_pem[..]) {
            roots
                .add(c.map_err(|e| TlsError::Config(e.to_string()))?)
                .map_err(|e| TlsError::Config(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Empty { path: "ca".into(), what: "CA certificate" });
        }
        Ok(Arc::new(roots))
    }

    /// rustls server config for raw TLS links (replication), client cert required.
    pub fn rustls_server(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, provider.clone())
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs()?, self.key()?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(cfg))
    }

    /// rustls client config for raw TLS links (replication), presenting our cert.
    pub fn rustls_client(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.certs()?, self.key()?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Arc::new(cfg))
    }
}

/// Install ring as the process-wide rustls provider (idempotent). Call early
/// in every binary; see TESTBED.md for why.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl TlsFiles {
    /// Why a daemon would refuse our client certificate, judged locally:
    /// expired or not yet valid, or issued by another CA than the cluster CA
    /// in `ca_pem`. `None` when nothing is wrong that we can see. Used to
    /// explain a connection the server closed at the first RPC (with TLS 1.3
    /// the client only learns of the rejection then, as a broken pipe).
    pub fn diagnose_client_cert(&self) -> Option<String> {
        let first = |pem: &[u8]| rustls_pemfile::certs(&mut &pem[..]).next().and_then(Result::ok);
        let Some(cert_der) = first(&self.cert_pem) else {
            return Some("the client certificate file holds no PEM certificate".into());
        };
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).ok()?;
        let v = cert.validity();
        let now = x509_parser::time::ASN1Time::now();
        if v.not_after < now {
            return Some(format!("the client certificate expired on {}", v.not_after));
        }
        if v.not_before > now {
            return Some(format!("the client certificate is not valid before {}", v.not_before));
        }
        let ca_der = first(&self.ca_pem)?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).ok()?;
        // Key identifiers tell two CAs with the same name apart.
        let aki = cert.extensions().iter().find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
        let ski = ca.extensions().iter().find_map(|e| match e.parsed_extension() {
            x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
        let other_key = matches!((&aki, &ski), (Some(a), Some(s)) if a != s);
        if cert.issuer() == ca.subject() && other_key {
            return Some(format!(
                "the client certificate was issued by another CA than the cluster CA (same name `{}`, different key)",
                ca.subject()
            ));
        }
        if cert.issuer() != ca.subject() {
            return Some(format!(
                "the client certificate was issued by `{}`, not by the cluster CA `{}`",
                cert.issuer(),
                ca.subject()
            ));
        }
        None
    }
}
