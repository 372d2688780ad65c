//! Who a request comes from and whether their role allows the call.
//!
//! Roles come from the client certificate's organization (see `vigil_tls::identity`):
//! `vigil:viewer` reads, `vigil:admin` also changes state; `vigil:node` is for agents
//! and gets nothing here. On an insecure (plaintext) coordinator nobody is authenticated
//! and every caller is an anonymous admin: that is what `insecure` means.

use tonic::Request;
use vigil_tls::{Peer, Role};

use crate::error::ControlError;

/// Who made a call, for the audit trail and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `alice (admin)`, `anonymous (insecure)`.
    pub actor: String,
    pub role: Role,
}

/// The caller of `request` if its role allows `needed`, for the call named `call`.
pub fn authorize<T>(
    request: &Request<T>,
    needed: Role,
    call: &str,
) -> Result<Caller, ControlError> {
    let Some(peer) = request.extensions().get::<Peer>() else {
        return Err(ControlError::Unauthenticated(format!(
            "{call}: the request carries no connection identity; it must come through the \
             coordinator's listener"
        )));
    };
    check(peer, needed, call)
}

/// The pure rule behind [`authorize`].
pub fn check(peer: &Peer, needed: Role, call: &str) -> Result<Caller, ControlError> {
    let Some(identity) = &peer.identity else {
        return Ok(Caller {
            actor: peer.actor(),
            role: Role::Admin,
        });
    };
    let who = &identity.common_name;
    match identity.role() {
        Some(Role::Node) | None => Err(ControlError::PermissionDenied(format!(
            "certificate CN={who} (O={}) grants no access to clusterctl calls: operators need a \
             certificate with O=vigil:viewer or O=vigil:admin (deploy/tls/make-certs.sh)",
            identity.organizations.join(",")
        ))),
        Some(role) if role >= needed => Ok(Caller {
            actor: peer.actor(),
            role,
        }),
        Some(role) => Err(ControlError::PermissionDenied(format!(
            "{who} is a {}: {call} needs the {} role (a certificate with O=vigil:{})",
            role.as_str(),
            needed.as_str(),
            needed.as_str()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use vigil_tls::PeerIdentity;

    use super::*;

    fn peer(org: &str) -> Peer {
        Peer {
            remote: None,
            identity: Some(PeerIdentity {
                common_name: "alice".into(),
                organizations: vec![org.into()],
                dns_names: vec![],
            }),
        }
    }

    #[test]
    fn a_viewer_reads_but_cannot_change_anything() {
        assert!(check(&peer("vigil:viewer"), Role::Viewer, "nodes").is_ok());
        let err = check(&peer("vigil:viewer"), Role::Admin, "cordon").err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("alice is a viewer: cordon needs the admin role"),
            "{msg}"
        );
    }

    #[test]
    fn an_admin_does_everything_and_is_named() {
        let caller = check(&peer("vigil:admin"), Role::Admin, "cordon").ok();
        assert_eq!(caller.map(|c| c.actor).as_deref(), Some("alice (admin)"));
        assert!(check(&peer("vigil:admin"), Role::Viewer, "nodes").is_ok());
    }

    #[test]
    fn node_and_roleless_certificates_get_nothing() {
        for org in ["vigil:node", "acme"] {
            assert!(check(&peer(org), Role::Viewer, "nodes").is_err(), "{org}");
        }
    }

    #[test]
    fn plaintext_callers_are_anonymous_admins() {
        let p = Peer {
            remote: None,
            identity: None,
        };
        let caller = check(&p, Role::Admin, "cordon").ok();
        assert_eq!(
            caller.map(|c| c.actor).as_deref(),
            Some("anonymous (insecure)")
        );
    }
}
