//! Prometheus metrics of transport security and access control: refused connections,
//! denied calls, certificate expiry and reloads, and node names claimed by two hosts.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabel {
    pub call: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabel {
    pub kind: String,
}

#[derive(Default)]
pub struct SecurityMetrics {
    pub connections_refused: Family<RefusalLabel, Counter>,
    /// TLS handshakes that let a connection in, full or resumed.
    pub tls_handshakes: Family<HandshakeLabel, Counter>,
    pub calls_denied: Family<CallLabel, Counter>,
    pub certificate_expiry: Gauge,
    pub insecure: Gauge,
    pub tls_reloads: Family<ResultLabel, Counter>,
    /// Registrations refused because another live host holds the node name (a cloned image,
    /// a node certificate copied to a second host).
    pub identity_conflicts: Counter,
}

impl SecurityMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "vigil_connections_refused",
            "Connections refused before any request: plaintext to a TLS listener, failed TLS \
             handshake (no client certificate, another CA, expired) or handshake timeout",
            self.connections_refused.clone(),
        );
        registry.register(
            "vigil_tls_handshakes",
            "TLS handshakes that let a connection in, by kind: full (certificates signed and \
             verified on both sides) or resumed (an agent's session ticket from before, as after \
             a coordinator restart: no certificate work)",
            self.tls_handshakes.clone(),
        );
        registry.register(
            "vigil_control_calls_denied",
            "clusterctl calls refused for lack of a role (a viewer asking to change state, a \
             certificate without a vigil role)",
            self.calls_denied.clone(),
        );
        registry.register(
            "vigil_tls_certificate_expiry_timestamp_seconds",
            "When the coordinator's own TLS certificate expires, unix seconds (0 when insecure)",
            self.certificate_expiry.clone(),
        );
        registry.register(
            "vigil_transport_insecure",
            "1 when the coordinator serves plaintext (insecure = true): nobody is authenticated",
            self.insecure.clone(),
        );
        registry.register(
            "vigil_node_identity_conflicts",
            "Agent registrations refused because another live host (machine-id) holds the node \
             name: give the second host its own name",
            self.identity_conflicts.clone(),
        );
        registry.register(
            "vigil_tls_reloads",
            "Re-reads of the TLS files on SIGHUP, by result (ok, error: the old files stay in use)",
            self.tls_reloads.clone(),
        );
        for reason in ["plaintext", "handshake", "timeout"] {
            let _ = self.connections_refused.get_or_create(&RefusalLabel {
                reason: reason.to_owned(),
            });
        }
        for kind in ["full", "resumed"] {
            let _ = self.tls_handshakes.get_or_create(&HandshakeLabel {
                kind: kind.to_owned(),
            });
        }
        for result in ["ok", "error"] {
            let _ = self.tls_reloads.get_or_create(&ResultLabel {
                result: result.to_owned(),
            });
        }
    }
}

impl SecurityMetrics {
    /// What the acceptor calls once each connection's handshake ended: counts refusals by
    /// reason and accepted handshakes by kind.
    pub fn handshake_observer(&self) -> vigil_tls::server::OnHandshake {
        let refused = self.connections_refused.clone();
        let accepted = self.tls_handshakes.clone();
        std::sync::Arc::new(move |h: vigil_tls::Handshake| match h {
            vigil_tls::Handshake::Refused(r) => {
                refused
                    .get_or_create(&RefusalLabel {
                        reason: r.as_str().to_owned(),
                    })
                    .inc();
            }
            kind => {
                accepted
                    .get_or_create(&HandshakeLabel {
                        kind: kind.as_str().to_owned(),
                    })
                    .inc();
            }
        })
    }
}
