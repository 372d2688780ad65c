//! How agents and clusterctl dial the coordinator: `https://` through rustls with their own
//! certificate, verifying the coordinator's against the cluster CA; `http://` only when the
//! caller said `insecure`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

/// How a client reaches the coordinator.
#[derive(Clone)]
pub enum ClientTls {
    /// Plaintext: only with an explicit `insecure`, only to an `http://` URL.
    Insecure,
    /// Mutual TLS to an `https://` URL. `server_name` overrides the URL's host for
    /// verifying the coordinator's certificate (when dialing it by an address it does not
    /// name).
    Tls {
        config: Arc<ClientConfig>,
        server_name: Option<String>,
    },
}

/// Why a URL and a transport do not go together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SchemeError {
    #[error(
        "coordinator URL {0} is plaintext http://: use https:// with a CA, certificate and key \
         (--ca/--cert/--key or [tls]), or pass --insecure (insecure = true) on a test cluster"
    )]
    PlaintextWithoutInsecure(String),
    #[error(
        "coordinator URL {0} is https:// but no CA, certificate and key were given: add them \
         (--ca/--cert/--key or [tls]), or use http:// with --insecure on a test cluster"
    )]
    HttpsWithoutTls(String),
    #[error(
        "coordinator URL {0} is https:// but --insecure (insecure = true) was given: drop \
         --insecure, or use http:// for a plaintext test cluster"
    )]
    InsecureWithHttps(String),
    #[error("coordinator URL {0} must start with http:// or https://")]
    Scheme(String),
}

/// Checks that `url`'s scheme matches what the caller configured.
pub fn check_scheme(url: &str, tls_configured: bool, insecure: bool) -> Result<(), SchemeError> {
    let owned = || url.to_owned();
    match (url.split("://").next(), tls_configured, insecure) {
        (Some("https"), true, false) => Ok(()),
        (Some("https"), _, true) => Err(SchemeError::InsecureWithHttps(owned())),
        (Some("https"), false, false) => Err(SchemeError::HttpsWithoutTls(owned())),
        (Some("http"), _, true) => Ok(()),
        (Some("http"), _, false) => Err(SchemeError::PlaintextWithoutInsecure(owned())),
        _ => Err(SchemeError::Scheme(owned())),
    }
}

/// The URL to build the tonic `Endpoint` from for [`connect`]: with TLS, `https://` becomes
/// `http://`, because vigil's own connector does the handshake. When tonic is built with one of
/// its TLS features (etcd-client, in the same binary, turns on `tonic/tls-ring`), tonic refuses an
/// `https://` URI whose channel has no tonic TLS config ("Connecting to HTTPS without TLS
/// enabled"), even with a custom connector. The host (the name verified against the
/// certificate) is unchanged; the check that the scheme matches the TLS settings is
/// [`check_scheme`]'s, on the URL the user gave.
pub fn dial_url(url: &str, tls: &ClientTls) -> String {
    match (tls, url.strip_prefix("https://")) {
        (ClientTls::Tls { .. }, Some(rest)) => format!("http://{rest}"),
        _ => url.to_owned(),
    }
}

/// Connects `endpoint` (built from [`dial_url`]) with `tls`.
pub async fn connect(
    endpoint: Endpoint,
    tls: &ClientTls,
) -> Result<Channel, tonic::transport::Error> {
    match tls {
        ClientTls::Insecure => endpoint.connect().await,
        ClientTls::Tls {
            config,
            server_name,
        } => {
            endpoint
                .connect_with_connector(Connector {
                    config: config.clone(),
                    server_name: server_name.clone(),
                })
                .await
        }
    }
}

/// A tower connector: TCP, then a TLS handshake verifying the coordinator.
#[derive(Clone)]
struct Connector {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
}

type Stream = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        let name_override = self.server_name.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URL has no host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = name_override.unwrap_or_else(|| host.clone());
            let server_name = ServerName::try_from(name.clone()).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name:?} is not a valid TLS server name"),
                )
            })?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true).ok();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn tls_dials_an_http_uri_and_keeps_the_host() {
        let tls = ClientTls::Tls {
            config: std::sync::Arc::new(
                rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .expect("protocols")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            ),
            server_name: None,
        };
        assert_eq!(
            dial_url("https://coord-1.example:7770", &tls),
            "http://coord-1.example:7770"
        );
        assert_eq!(
            dial_url("http://127.0.0.1:7770", &ClientTls::Insecure),
            "http://127.0.0.1:7770"
        );
    }

    use super::*;

    #[test]
    fn each_scheme_goes_with_its_transport_only() {
        assert!(check_scheme("https://c:7770", true, false).is_ok());
        assert!(check_scheme("http://c:7770", false, true).is_ok());
        assert!(matches!(
            check_scheme("http://c:7770", true, false),
            Err(SchemeError::PlaintextWithoutInsecure(_))
        ));
        assert!(matches!(
            check_scheme("http://c:7770", false, false),
            Err(SchemeError::PlaintextWithoutInsecure(_))
        ));
        assert!(matches!(
            check_scheme("https://c:7770", false, false),
            Err(SchemeError::HttpsWithoutTls(_))
        ));
        assert!(matches!(
            check_scheme("https://c:7770", true, true),
            Err(SchemeError::InsecureWithHttps(_))
        ));
        assert!(matches!(
            check_scheme("c:7770", true, false),
            Err(SchemeError::Scheme(_))
        ));
    }
}
