//! The cluster CA and the certificates it issues (`metroctl certs init|issue`,
//! and `metroctl lab up`).
//!
//! Layout of a certificate directory:
//!
//! ```text
//! DIR/ca.pem  DIR/ca.key          the cluster CA (key mode 0600)
//! DIR/<name>.pem  DIR/<name>.key  issued pairs; <name> is the CN with ':' -> '-'
//! ```
//!
//! Invariants:
//! - every issued certificate carries the DNS SAN [`metro_api::tls::SERVER_NAME`]
//!   (clients verify servers against that name) plus the IPs and names asked for;
//! - every issued certificate is usable both as a server and as a client
//!   certificate (EKU serverAuth + clientAuth), because daemons are both;
//! - private keys are written with mode 0600 from the start (never briefly
//!   world-readable).
//!
//! Test helpers for other suites: [`Ca::generate`] makes a CA that is not the
//! cluster's, and [`issue_expired`] makes a certificate that expired yesterday.

use metro_api::tls::SERVER_NAME;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Validity of the CA: long enough that a lab or a test cluster never sees it expire.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Default validity of an issued certificate.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// Backdating of `not_before`, so peers with slightly slow clocks accept a fresh certificate.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no CA in {dir}: run `metroctl certs init --dir {dir}` first")]
    NoCa { dir: String },
    #[error(
        "invalid common name `{0}`: use node:<id>, witness, admin:<name>, viewer:<name> or client:<host>"
    )]
    BadCn(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io { path: path.display().to_string(), source }
}

/// A PEM certificate and its PEM private key.
#[derive(Debug, Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Paths of a written pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority able to sign certificates.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    /// A brand-new CA in memory (`cn` names it). Use it for a cluster CA, or in
    /// tests as "a CA the cluster does not trust".
    pub fn generate(cn: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationName, "metro");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = now_utc();
        params.not_before = now - CLOCK_SKEW_ALLOWANCE;
        params.not_after = now + DAY * CA_VALIDITY_DAYS;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Load a CA from its PEM certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signing yields the same subject and key, which is all issuing needs.
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Load the CA of a certificate directory (`DIR/ca.pem`, `DIR/ca.key`).
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let (cp, kp) = (dir.join("ca.pem"), dir.join("ca.key"));
        if !cp.exists() || !kp.exists() {
            return Err(CertError::NoCa { dir: dir.display().to_string() });
        }
        let cert = std::fs::read_to_string(&cp).map_err(io_err(&cp))?;
        let key = std::fs::read_to_string(&kp).map_err(io_err(&kp))?;
        Self::from_pem(&cert, &key)
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Write `ca.pem` and `ca.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<CertPaths, CertError> {
        write_pair(dir, "ca", &CertPair { cert_pem: self.cert_pem(), key_pem: self.key_pem() })
    }
}

/// Create the cluster CA in `dir` (idempotent: an existing CA is kept and loaded).
pub fn init(dir: &Path) -> Result<(Ca, CertPaths), CertError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let paths = CertPaths { cert: dir.join("ca.pem"), key: dir.join("ca.key") };
    if paths.cert.exists() && paths.key.exists() {
        return Ok((Ca::load(dir)?, paths));
    }
    let ca = Ca::generate("metro cluster CA")?;
    ca.write(dir)?;
    Ok((ca, paths))
}

/// Issue a certificate for `cn`, valid from now (minus a clock-skew allowance)
/// for `days` days, with SANs `metro`, `dns` and `ips`.
pub fn issue(ca: &Ca, cn: &str, ips: &[IpAddr], dns: &[String], days: u32) -> Result<CertPair, CertError> {
    let now = now_utc();
    issue_between(ca, cn, ips, dns, now - CLOCK_SKEW_ALLOWANCE, now + DAY * days)
}

/// Issue a certificate that expired yesterday (for tests of certificate checks).
pub fn issue_expired(ca: &Ca, cn: &str, ips: &[IpAddr], dns: &[String]) -> Result<CertPair, CertError> {
    let now = now_utc();
    issue_between(ca, cn, ips, dns, now - DAY * 30, now - DAY)
}

/// Issue a certificate with an explicit validity window.
pub fn issue_between(
    ca: &Ca,
    cn: &str,
    ips: &[IpAddr],
    dns: &[String],
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<CertPair, CertError> {
    check_cn(cn)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.distinguished_name.push(DnType::OrganizationName, "metro");
    let mut names: Vec<String> = vec![SERVER_NAME.to_string()];
    for d in dns {
        if !names.contains(d) {
            names.push(d.clone());
        }
    }
    for n in names {
        params.subject_alt_names.push(SanType::DnsName(n.try_into()?));
    }
    for ip in ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    Ok(CertPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// File stem for a CN: `node:a1` -> `node-a1`.
pub fn file_stem(cn: &str) -> String {
    cn.replace(':', "-")
}

/// Write `DIR/<stem>.pem` and `DIR/<stem>.key` (key mode 0600, created that way).
pub fn write_pair(dir: &Path, stem: &str, pair: &CertPair) -> Result<CertPaths, CertError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    write_file(&cert, pair.cert_pem.as_bytes(), 0o644)?;
    write_file(&key, pair.key_pem.as_bytes(), 0o600)?;
    Ok(CertPaths { cert, key })
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    // The umask may have narrowed the mode; set it exactly.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn check_cn(cn: &str) -> Result<(), CertError> {
    if metro_api::identity::Identity::parse(cn).is_none() {
        return Err(CertError::BadCn(cn.into()));
    }
    Ok(())
}

fn now_utc() -> time::OffsetDateTime {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rcgen::date_time_ymd(1970, 1, 1) + since_epoch
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::*;

    fn der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }

    /// (authority key id, subject key id) of a certificate.
    fn key_ids(cert: &X509Certificate<'_>) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let (mut aki, mut ski) = (None, None);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    aki = a.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0.to_vec()),
                _ => {}
            }
        }
        (aki, ski)
    }

    #[test]
    fn an_issued_certificate_carries_the_cn_the_metro_san_and_its_ips() {
        let ca = Ca::generate("test CA").unwrap();
        let ip: IpAddr = "10.77.1.11".parse().unwrap();
        let pair = issue(&ca, "node:a1", &[ip], &[], 30).unwrap();
        let d = der(&pair.cert_pem);
        let (_, cert) = X509Certificate::from_der(&d).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap().as_str().unwrap();
        assert_eq!(cn, "node:a1");
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let mut dns = vec![];
        let mut ips = vec![];
        for g in &san.value.general_names {
            match g {
                GeneralName::DNSName(n) => dns.push(n.to_string()),
                GeneralName::IPAddress(b) => ips.push(b.to_vec()),
                _ => {}
            }
        }
        assert_eq!(dns, vec![SERVER_NAME.to_string()]);
        assert_eq!(ips, vec![vec![10u8, 77, 1, 11]]);
        assert!(cert.validity().is_valid());
        let cd = der(&ca.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&cd).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        assert_eq!(key_ids(&cert).0, key_ids(&ca_cert).1, "AKI names the CA key");
    }

    #[test]
    fn an_expired_certificate_is_not_valid_now() {
        let ca = Ca::generate("test CA").unwrap();
        let pair = issue_expired(&ca, "admin:old", &[], &[]).unwrap();
        let d = der(&pair.cert_pem);
        let (_, cert) = X509Certificate::from_der(&d).unwrap();
        assert!(!cert.validity().is_valid());
        assert!(cert.validity().not_after.timestamp() < now_utc().unix_timestamp());
    }

    #[test]
    fn init_is_idempotent_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (_, paths) = init(dir.path()).unwrap();
        let first = std::fs::read_to_string(&paths.cert).unwrap();
        let (ca, _) = init(dir.path()).unwrap();
        assert_eq!(first, std::fs::read_to_string(&paths.cert).unwrap());
        let mode = std::fs::metadata(&paths.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let written = write_pair(dir.path(), "x", &issue(&ca, "viewer:v", &[], &[], 1).unwrap()).unwrap();
        let mode = std::fs::metadata(&written.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_certificate_from_another_ca_names_a_different_issuer_key() {
        let cluster = Ca::generate("metro cluster CA").unwrap();
        let rogue = Ca::generate("metro cluster CA").unwrap();
        let pair = issue(&rogue, "admin:mallory", &[], &[], 1).unwrap();
        let d = der(&pair.cert_pem);
        let (_, cert) = X509Certificate::from_der(&d).unwrap();
        let cd = der(&cluster.cert_pem());
        let (_, ca_cert) = X509Certificate::from_der(&cd).unwrap();
        assert_ne!(key_ids(&cert).0, key_ids(&ca_cert).1);
    }

    #[test]
    fn a_malformed_cn_is_refused() {
        let ca = Ca::generate("c").unwrap();
        assert!(matches!(issue(&ca, "root", &[], &[], 1), Err(CertError::BadCn(_))));
    }
}
