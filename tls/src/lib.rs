//! vigil mutual TLS, shared by the coordinator, the agent and clusterctl.
//!
//! Layout:
//! - `files`: the certificate, key and CA files named in a config, read with errors that
//!   name the file and the fix (missing, not PEM, expired, key of another certificate).
//! - `identity`: who a peer certificate says it is (common name, organizations, DNS names)
//!   and the vigil role its organization grants (`vigil:node`, `vigil:viewer`, `vigil:admin`).
//! - `server`: the coordinator's acceptor: TLS handshakes off the accept loop, plaintext
//!   refused and counted, the server config swappable on SIGHUP without touching open streams.
//! - `tickets`: TLS 1.3 session-ticket keys kept in the data dir, so agents resume their
//!   sessions after a coordinator restart instead of full handshakes.
//! - `client`: the connector agents and clusterctl dial through, verifying the coordinator.
//! - `testing` (feature `testing`): a CA and certificates made at test time.
//!
//! vigil runs its own acceptor and connector on rustls (rather than tonic's built-in TLS) so
//! certificates can be re-read at run time and each request carries the peer's identity.

pub mod client;
pub mod files;
pub mod identity;
pub mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tickets;

pub use client::{ClientTls, SchemeError, check_scheme, connect, dial_url};
pub use files::{ClientSessions, TlsError, TlsFiles};
pub use identity::{Peer, PeerIdentity, Role};
pub use rustls::ServerConfig;
pub use server::{Handshake, Refusal, ServerTls, incoming};

/// One crypto provider for every config vigil builds (ring: no cmake at build time).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
