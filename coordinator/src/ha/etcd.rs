//! The etcd client: one connection balanced over every member, failing fast without quorum.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use super::HaConfig;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("cannot read {what} {path}: {source}; fix [ha.etcd_tls] {what}")]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to etcd ({endpoints}): {source}")]
    Connect {
        endpoints: String,
        source: etcd_client::Error,
    },
}

/// Connects to every endpoint of `ha`. The client keeps dead members in its
/// balancer: callers retry [`retryable`] errors. `require_leader` makes a
/// request fail at once when etcd has no quorum instead of hanging.
pub async fn connect(ha: &HaConfig) -> Result<Client, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(ha.request_timeout)
        .with_timeout(ha.request_timeout)
        .with_keep_alive(Duration::from_secs(2), ha.request_timeout)
        .with_require_leader(true);
    if let Some(tls) = &ha.etcd_tls {
        let read = |what: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| EtcdError::TlsFile {
                what,
                path: path.to_owned(),
                source,
            })
        };
        let ca = read("ca", &tls.ca)?;
        let cert = read("cert", &tls.cert)?;
        let key = read("key", &tls.key)?;
        options = options.with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key)),
        );
    }
    Client::connect(&ha.etcd_endpoints, Some(options))
        .await
        .map_err(|source| EtcdError::Connect {
            endpoints: ha.etcd_endpoints.join(","),
            source,
        })
}

/// A client connected to one member only: for asking each member how it is.
pub async fn connect_one(ha: &HaConfig, endpoint: &str) -> Result<Client, EtcdError> {
    let mut one = ha.clone();
    one.etcd_endpoints = vec![endpoint.to_owned()];
    connect(&one).await
}

/// Worth trying again (another member, a moment later): the member was down,
/// had no leader, or the request timed out. Anything else is an answer.
pub fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::Aborted
                | tonic::Code::ResourceExhausted
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// [`describe`], with the likely fix where etcd's client port speaks TLS: a
/// certificate etcd does not trust shows on this side only as a closed
/// connection (etcd's log says `rejected connection`).
pub fn explain(ha: &HaConfig, e: &etcd_client::Error) -> String {
    let mut text = describe(e);
    if ha.etcd_tls.is_some() {
        let lower = text.to_lowercase();
        if ["certificate", "handshake", "alert"]
            .iter()
            .any(|w| lower.contains(w))
        {
            text.push_str(
                " (TLS with etcd failed: [ha.etcd_tls] ca must be the CA that signed etcd's \
                 server certificate)",
            );
        } else if [
            "connection closed",
            "connection reset",
            "broken pipe",
            "connection error",
        ]
        .iter()
        .any(|w| lower.contains(w))
        {
            text.push_str(
                " (etcd closes connections whose client certificate it does not trust: if \
                 etcd's log says \"rejected connection\", sign [ha.etcd_tls] cert with the CA \
                 in etcd's --trusted-ca-file)",
            );
        }
    }
    text
}

/// One line for logs and status: the gRPC message rather than its debug form,
/// with its causes (where a refused certificate or a closed port is named).
pub fn describe(e: &etcd_client::Error) -> String {
    let (mut text, mut cause): (String, Option<&(dyn std::error::Error + 'static)>) = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            let text = if m.is_empty() {
                format!("{:?}", s.code())
            } else {
                m.to_owned()
            };
            (text, std::error::Error::source(s))
        }
        etcd_client::Error::TransportError(t) => (e.to_string(), std::error::Error::source(t)),
        other => (other.to_string(), None),
    };
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = c.source();
    }
    text
}
