//! Who is calling: the identity in a client certificate's common name, and the
//! authorization rules of DESIGN.md section 6.
//!
//! | CN            | internal services | change state | read |
//! |---------------|-------------------|--------------|------|
//! | `node:<id>`   | yes               | yes          | yes  |
//! | `witness`     | yes               | no           | yes  |
//! | `admin:<n>`   | no                | yes          | yes  |
//! | `viewer:<n>`  | no                | no           | yes  |
//! | `client:<h>`  | no                | no           | yes  |
//!
//! `client:<host>` is an application host's attach agent (`metro-attach`):
//! it reads where volumes are served and opens their exports.

use crate::error::{ApiError, Code};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Node(String),
    Witness(String),
    Admin(String),
    Viewer(String),
    /// An application host (its attach agent).
    Client(String),
}

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Internal,
    Write,
    Read,
}

impl Identity {
    /// Parse a certificate common name.
    pub fn parse(cn: &str) -> Option<Self> {
        if cn == "witness" {
            return Some(Identity::Witness("witness".into()));
        }
        let (kind, name) = cn.split_once(':')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "node" => Some(Identity::Node(name.into())),
            "witness" => Some(Identity::Witness(name.into())),
            "admin" => Some(Identity::Admin(name.into())),
            "viewer" => Some(Identity::Viewer(name.into())),
            "client" => Some(Identity::Client(name.into())),
            _ => None,
        }
    }

    pub fn common_name(&self) -> String {
        match self {
            Identity::Node(n) => format!("node:{n}"),
            Identity::Witness(n) if n == "witness" => "witness".into(),
            Identity::Witness(n) => format!("witness:{n}"),
            Identity::Admin(n) => format!("admin:{n}"),
            Identity::Viewer(n) => format!("viewer:{n}"),
            Identity::Client(n) => format!("client:{n}"),
        }
    }

    pub fn allows(&self, access: Access) -> bool {
        matches!(
            (self, access),
            (_, Access::Read)
                | (Identity::Node(_) | Identity::Witness(_), Access::Internal)
                | (Identity::Node(_) | Identity::Admin(_), Access::Write)
        )
    }

    /// Extract the identity from a DER certificate's subject CN.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
        Self::parse(&cn)
    }
}

/// Authorize a tonic request: the one place that turns certificates into
/// permissions. Returns the caller's identity.
pub fn authorize<T>(req: &tonic::Request<T>, access: Access) -> Result<Identity, tonic::Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        tonic::Status::from(ApiError::new(
            Code::PermissionDenied,
            "no client certificate",
            "connect with a certificate issued by `metroctl certs issue`",
        ))
    })?;
    let first = certs.first().ok_or_else(|| {
        tonic::Status::from(ApiError::new(Code::PermissionDenied, "empty client certificate chain", ""))
    })?;
    let id = Identity::from_der(first.as_ref()).ok_or_else(|| {
        tonic::Status::from(ApiError::new(
            Code::PermissionDenied,
            "client certificate has no metro identity in its common name",
            "issue certificates with `metroctl certs issue` (CN node:<id>, admin:<n>, viewer:<n>, client:<host>)",
        ))
    })?;
    if !id.allows(access) {
        return Err(ApiError::new(
            Code::PermissionDenied,
            format!("{} may not perform {access:?} operations", id.common_name()),
            "use an admin certificate to change state",
        )
        .into());
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_the_design_table() {
        let node = Identity::parse("node:a1").unwrap();
        let admin = Identity::parse("admin:ops").unwrap();
        let viewer = Identity::parse("viewer:grafana").unwrap();
        let witness = Identity::parse("witness").unwrap();
        assert!(node.allows(Access::Internal) && node.allows(Access::Write));
        assert!(witness.allows(Access::Internal) && !witness.allows(Access::Write));
        assert!(!admin.allows(Access::Internal) && admin.allows(Access::Write));
        assert!(!viewer.allows(Access::Write) && viewer.allows(Access::Read));
        let client = Identity::parse("client:app1").unwrap();
        assert!(
            client.allows(Access::Read) && !client.allows(Access::Write) && !client.allows(Access::Internal)
        );
        assert_eq!(client.common_name(), "client:app1");
        assert_eq!(Identity::parse("root"), None);
        assert_eq!(Identity::parse("node:"), None);
    }
}
