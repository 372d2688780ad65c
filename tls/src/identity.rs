//! Who is at the other end of a connection: the identity in its client certificate and the
//! role that grants.
//!
//! Naming follows Kubernetes' client certificates: the common name (CN) is the user or the
//! node, the organization (O) is the group, here one of `vigil:node`, `vigil:viewer`,
//! `vigil:admin`.

use std::net::SocketAddr;

use rustls_pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

pub const ORG_NODE: &str = "vigil:node";
pub const ORG_VIEWER: &str = "vigil:viewer";
pub const ORG_ADMIN: &str = "vigil:admin";

/// What a peer may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// An agent: AgentService only, as the node its certificate names.
    Node,
    /// Read-only ControlService: status, nodes, jobs, events, logs.
    Viewer,
    /// Everything in ControlService, including cordon, drain, diagnose, submit, cancel.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// The names a verified client certificate carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    pub common_name: String,
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
}

impl PeerIdentity {
    /// Parses the leaf certificate rustls already verified against the CA.
    pub fn from_der(der: &CertificateDer<'_>) -> Result<Self, String> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        Ok(Self::from_cert(&cert))
    }

    /// [`Self::from_der`] of a certificate already parsed.
    pub fn from_cert(cert: &X509Certificate<'_>) -> Self {
        let subject = cert.subject();
        let common_name = subject
            .iter_common_name()
            .find_map(|a| a.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        let organizations = subject
            .iter_organization()
            .filter_map(|a| a.as_str().ok())
            .map(str::to_owned)
            .collect();
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Self {
            common_name,
            organizations,
            dns_names,
        }
    }

    /// The highest role the certificate's organizations grant; a certificate with none of
    /// vigil's organizations has no role.
    pub fn role(&self) -> Option<Role> {
        self.organizations
            .iter()
            .filter_map(|o| match o.as_str() {
                ORG_ADMIN => Some(Role::Admin),
                ORG_VIEWER => Some(Role::Viewer),
                ORG_NODE => Some(Role::Node),
                _ => None,
            })
            .max()
    }

    /// Whether this certificate may speak for node `name`: a node certificate whose CN or
    /// one of whose DNS names is exactly `name`.
    pub fn is_node(&self, name: &str) -> bool {
        self.organizations.iter().any(|o| o == ORG_NODE)
            && (self.common_name == name || self.dns_names.iter().any(|d| d == name))
    }
}

/// What the coordinator knows of a connection; tonic hands it to every request in its
/// extensions (`request.extensions().get::<Peer>()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub remote: Option<SocketAddr>,
    /// `None` on a plaintext (insecure) listener: nobody is authenticated there.
    pub identity: Option<PeerIdentity>,
}

impl Peer {
    /// Who did it, for the event log: `alice (admin)` or `anonymous (insecure)`.
    pub fn actor(&self) -> String {
        match &self.identity {
            Some(id) => match id.role() {
                Some(role) => format!("{} ({})", id.common_name, role.as_str()),
                None => format!("{} (no role)", id.common_name),
            },
            None => "anonymous (insecure)".to_owned(),
        }
    }
}
