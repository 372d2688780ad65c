//! The certificate, key and CA files a config names, read and checked before any handshake.
//!
//! Every error names the file and says what to do: a TLS failure at handshake time would
//! only say "bad certificate" to the peer at the other end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Session tickets sent after each handshake (see `server_config_resuming`).
pub const TICKETS_PER_HANDSHAKE: usize = 4;

/// ALPN for gRPC: HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// The three files of a mutual-TLS identity, as the `[tls]` config section names them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA (PEM): peers must present a certificate it signed.
    pub ca: PathBuf,
    /// This process's certificate (PEM), optionally followed by intermediates.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {error}; check the path under [tls] (or the flag)")]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{what} {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----); \
         point it at the .crt file, not the key"
    )]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not valid PEM: {error}")]
    BadPem {
        what: &'static str,
        path: PathBuf,
        error: String,
    },
    #[error("{what} {path} is not a valid X.509 certificate: {error}")]
    BadCertificate {
        what: &'static str,
        path: PathBuf,
        error: String,
    },
    #[error(
        "private key {path} holds no PEM private key (expected -----BEGIN PRIVATE KEY----- or \
         an RSA/EC key); point it at the .key file"
    )]
    NoKey { path: PathBuf },
    #[error(
        "certificate {path} expired at {not_after} (unix {not_after_unix}); issue a new one \
         (deploy/tls/make-certs.sh) and send SIGHUP"
    )]
    Expired {
        path: PathBuf,
        not_after: String,
        not_after_unix: i64,
    },
    #[error(
        "certificate {path} is not valid before {not_before}; check this host's clock or \
         issue a new one"
    )]
    NotYetValid { path: PathBuf, not_before: String },
    #[error(
        "certificate {cert} and key {key} do not go together ({error}); give the key the \
         certificate was issued for"
    )]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        error: String,
    },
    #[error("CA file {path} cannot be used: {error}")]
    Ca { path: PathBuf, error: String },
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

/// What a certificate file holds, checked for time validity against `now`.
pub fn load_certs(
    path: &Path,
    what: &'static str,
    now: SystemTime,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from(&read(path, what)?, path, what, now)
}

/// [`load_certs`] of `bytes`, already read from `path`.
fn certs_from(
    bytes: &[u8],
    path: &Path,
    what: &'static str,
    now: SystemTime,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            path: path.to_owned(),
            error: e.to_string(),
        })?;
    let Some(leaf) = certs.first() else {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    };
    check_validity(leaf, path, what, now)?;
    Ok(certs)
}

/// Rejects a certificate outside its validity period, naming the file.
fn check_validity(
    der: &CertificateDer<'_>,
    path: &Path,
    what: &'static str,
    now: SystemTime,
) -> Result<(), TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadCertificate {
        what,
        path: path.to_owned(),
        error: e.to_string(),
    })?;
    check_cert_validity(&cert, path, now)
}

/// [`check_validity`] of a certificate already parsed.
pub(crate) fn check_cert_validity(
    cert: &X509Certificate<'_>,
    path: &Path,
    now: SystemTime,
) -> Result<(), TlsError> {
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let validity = cert.validity();
    if now > validity.not_after.timestamp() {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: validity.not_after.to_string(),
            not_after_unix: validity.not_after.timestamp(),
        });
    }
    if now < validity.not_before.timestamp() {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
        });
    }
    Ok(())
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_from(&read(path, "private key")?, path)
}

/// [`load_key`] of `bytes`, already read from `path`.
fn key_from(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|_| TlsError::NoKey {
        path: path.to_owned(),
    })
}

pub fn load_roots(path: &Path, now: SystemTime) -> Result<Arc<RootCertStore>, TlsError> {
    roots_from(&read(path, "CA certificate")?, path, now)
}

/// [`load_roots`] of `bytes`, already read from `path`.
fn roots_from(bytes: &[u8], path: &Path, now: SystemTime) -> Result<Arc<RootCertStore>, TlsError> {
    let certs = certs_from(bytes, path, "CA certificate", now)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::Ca {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The unix time at which the certificate in `path` expires: for the expiry metric.
pub fn not_after(path: &Path) -> Result<i64, TlsError> {
    let bytes = read(path, "certificate")?;
    let der = CertificateDer::pem_slice_iter(&bytes)
        .next()
        .ok_or_else(|| TlsError::NoCertificate {
            what: "certificate",
            path: path.to_owned(),
        })?
        .map_err(|e| TlsError::BadPem {
            what: "certificate",
            path: path.to_owned(),
            error: e.to_string(),
        })?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| TlsError::BadCertificate {
        what: "certificate",
        path: path.to_owned(),
        error: e.to_string(),
    })?;
    Ok(cert.validity().not_after.timestamp())
}

impl TlsFiles {
    /// The coordinator's config: its certificate, and client certificates required and
    /// verified against the CA.
    pub fn server_config(&self, now: SystemTime) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_resuming(now, None)
    }

    /// [`Self::server_config`] issuing TLS 1.3 session tickets sealed with the keys kept in
    /// `tickets_dir` (the data dir), so agents resume their sessions after a restart
    /// ([`crate::tickets`]); `None`: keys in memory, resumption within this process only.
    pub fn server_config_resuming(
        &self,
        now: SystemTime,
        tickets_dir: Option<&Path>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let ca_bytes = read(&self.ca, "CA certificate")?;
        let roots = roots_from(&ca_bytes, &self.ca, now)?;
        let certs = load_certs(&self.cert, "certificate", now)?;
        let key = load_key(&self.key)?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, crate::provider())
            .build()
            .map_err(|e| TlsError::Ca {
                path: self.ca.clone(),
                error: e.to_string(),
            })?;
        let mut config = ServerConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.identity_error(e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|e| self.identity_error(e))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.ticketer = Arc::new(crate::tickets::TicketKeys::open(tickets_dir, &ca_bytes));
        // A client spends a ticket on every attempt, finished or not: an agent that gives up on
        // a coordinator swamped by a reconnect storm (its 3 s connect timeout) must still hold
        // one for its next attempt, or it falls back to a full handshake, which costs the
        // coordinator three to four times the CPU and deepens the storm (rustls sends 2).
        config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
        Ok(Arc::new(config))
    }

    /// An agent's or clusterctl's config: its certificate, and the coordinator verified
    /// against the CA.
    pub fn client_config(&self, now: SystemTime) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = load_roots(&self.ca, now)?;
        let certs = load_certs(&self.cert, "certificate", now)?;
        let key = load_key(&self.key)?;
        self.build_client_config(roots, certs, key).map(Arc::new)
    }

    /// [`Self::client_config`], kept in `sessions` while the certificate, key and CA files are
    /// unchanged, with the session tickets it holds: a process that dials again (an agent
    /// after its coordinator restarted) resumes its last session instead of a full handshake.
    /// (rustls resumes only through the config that made the session.) When the files change,
    /// a new config and no ticket: a ticket carries the certificate it was made with.
    pub fn client_config_resuming(
        &self,
        now: SystemTime,
        sessions: &ClientSessions,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let [ca, cert, key] = [
            read(&self.ca, "CA certificate")?,
            read(&self.cert, "certificate")?,
            read(&self.key, "private key")?,
        ];
        let mut fingerprint = Vec::with_capacity(3 * 32);
        for f in [&ca, &cert, &key] {
            fingerprint.extend_from_slice(ring::digest::digest(&ring::digest::SHA256, f).as_ref());
        }
        // Checked whether the config is kept or not: time passes, and an expired certificate
        // is named here.
        let roots = roots_from(&ca, &self.ca, now)?;
        let certs = certs_from(&cert, &self.cert, "certificate", now)?;
        let mut kept = sessions.kept.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, config)) = kept.as_ref()
            && *seen == fingerprint
        {
            return Ok(config.clone());
        }
        let config =
            Arc::new(self.build_client_config(roots, certs, key_from(&key, &self.key)?)?);
        *kept = Some((fingerprint, config.clone()));
        Ok(config)
    }

    fn build_client_config(
        &self,
        roots: Arc<RootCertStore>,
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<ClientConfig, TlsError> {
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, crate::provider())
            .build()
            .map_err(|e| TlsError::Ca {
                path: self.ca.clone(),
                error: e.to_string(),
            })?;
        let mut config = ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.identity_error(e))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(certs, key)
            .map_err(|e| self.identity_error(e))?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }

    fn identity_error(&self, e: rustls::Error) -> TlsError {
        TlsError::Identity {
            cert: self.cert.clone(),
            key: self.key.clone(),
            error: e.to_string(),
        }
    }
}

/// The client config (and so the session tickets) a client keeps across its connections; see
/// [`TlsFiles::client_config_resuming`].
#[derive(Default)]
pub struct ClientSessions {
    kept: std::sync::Mutex<Option<(Vec<u8>, Arc<ClientConfig>)>>,
}
