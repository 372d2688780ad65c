//! Errors at the coordinator's boundaries, and their one mapping to gRPC status.

use std::net::SocketAddr;

use tonic::Status;

use crate::state::StateError;
use crate::store::StoreError;

/// Why the coordinator could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr} ({what}): {source}; is another process using it? set {flag}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] vigil_tls::TlsError),
    #[error("{0}")]
    Ha(String),
}

/// Why a control request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("change not saved, nothing was changed: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    InvalidArgument(String),
    /// The caller's certificate does not grant the call.
    #[error("{0}")]
    PermissionDenied(String),
    /// No identity at all: a request that did not come through the coordinator's acceptor.
    #[error("{0}")]
    Unauthenticated(String),
    #[error("the coordinator is shutting down; retry in a moment")]
    ShuttingDown,
    #[error("node \"{0}\" has no connected agent; diagnostics need it (see clusterctl node {0})")]
    NotConnected(String),
    #[error("node \"{node}\" did not report diagnostics within {secs}s; see the agent's log")]
    DiagnosticsTimeout { node: String, secs: u64 },
}

impl CoordinatorError {
    /// Whether the state store is damaged: the process exits with [`EXIT_DATAERR`].
    pub fn is_damaged_store(&self) -> bool {
        matches!(self, CoordinatorError::Store(StoreError::Damaged { .. }))
    }
}

/// EX_DATAERR from sysexits.h: the state store is damaged (see [`StoreError::Damaged`]).
pub const EXIT_DATAERR: u8 = 65;

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Self {
        let message = e.to_string();
        match e {
            ControlError::State(
                StateError::UnknownNode(_)
                | StateError::UnknownJob(_)
                | StateError::UnknownLemon(_),
            ) => Status::not_found(message),
            ControlError::State(StateError::InvalidSpec(_) | StateError::InvalidRequest(_)) => {
                Status::invalid_argument(message)
            }
            ControlError::State(
                StateError::StaleSession { .. }
                | StateError::NeedsDiagnostics { .. }
                | StateError::Blocklisted { .. }
                | StateError::NeedsRepair { .. }
                | StateError::NoRecoveryHold(_),
            ) => Status::failed_precondition(message),
            ControlError::NotConnected(_) => Status::unavailable(message),
            ControlError::DiagnosticsTimeout { .. } => Status::deadline_exceeded(message),
            ControlError::Store(StoreError::Full { .. }) => Status::resource_exhausted(message),
            ControlError::Store(_) => Status::internal(message),
            ControlError::InvalidArgument(_) => Status::invalid_argument(message),
            ControlError::ShuttingDown => Status::unavailable(message),
            ControlError::PermissionDenied(_) => Status::permission_denied(message),
            ControlError::Unauthenticated(_) => Status::unauthenticated(message),
        }
    }
}
