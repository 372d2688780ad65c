//! A throwaway PKI for tests: a CA and certificates made at run time, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};

use crate::TlsFiles;
use crate::identity::{ORG_ADMIN, ORG_NODE, ORG_VIEWER};

/// A CA whose certificate lies at `<dir>/<name>-ca.crt`.
pub struct TestCa {
    dir: PathBuf,
    name: String,
    params: CertificateParams,
    key: KeyPair,
}

/// What to put in a certificate.
pub struct Leaf<'a> {
    pub common_name: &'a str,
    pub organization: Option<&'a str>,
    /// DNS names and IP addresses.
    pub sans: Vec<String>,
    /// Issue it already expired.
    pub expired: bool,
}

impl<'a> Leaf<'a> {
    /// A coordinator's server certificate for loopback.
    pub fn server(common_name: &'a str) -> Self {
        Self {
            common_name,
            organization: None,
            sans: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            expired: false,
        }
    }

    /// An agent's certificate for node `name`.
    pub fn node(name: &'a str) -> Self {
        Self {
            common_name: name,
            organization: Some(ORG_NODE),
            sans: vec![name.to_owned()],
            expired: false,
        }
    }

    pub fn admin(user: &'a str) -> Self {
        Self {
            common_name: user,
            organization: Some(ORG_ADMIN),
            sans: Vec::new(),
            expired: false,
        }
    }

    pub fn viewer(user: &'a str) -> Self {
        Self {
            common_name: user,
            organization: Some(ORG_VIEWER),
            sans: Vec::new(),
            expired: false,
        }
    }
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

impl TestCa {
    /// Makes a CA called `name` and writes its certificate into `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        std::fs::write(dir.join(format!("{name}-ca.crt")), cert.pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            name: name.to_owned(),
            params,
            key,
        })
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.crt", self.name))
    }

    /// Issues `leaf`, written as `<file>.crt` and `<file>.key`; returns the three paths
    /// with this CA as the trust anchor.
    pub fn issue(&self, file: &str, leaf: &Leaf<'_>) -> Result<TlsFiles, Error> {
        let mut params = CertificateParams::new(leaf.sans.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.common_name);
        if let Some(org) = leaf.organization {
            params
                .distinguished_name
                .push(DnType::OrganizationName, org);
        }
        if leaf.expired {
            params.not_before = date_time_ymd(2000, 1, 1);
            params.not_after = date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        let files = TlsFiles {
            ca: self.ca_path(),
            cert: self.dir.join(format!("{file}.crt")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
