//! `AgentService.Connect`: one task per agent session, forwarding to the engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, info, info_span, warn};
use vigil_proto::v1::{self, agent_message::Body};

use crate::engine::{EngineHandle, Event};
use crate::node::GpuRecord;
use crate::state::Registration;

/// An agent must register this soon after opening its stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing messages queued per session.
const SESSION_QUEUE: usize = 64;
pub const MAX_GPUS: usize = 64;
pub const MAX_WORKERS: usize = 1024;
const MAX_NAME: usize = 63;
const MAX_TEXT: usize = 255;

pub struct AgentService {
    engine: EngineHandle,
    next_session: Arc<AtomicU64>,
}

impl AgentService {
    pub fn new(engine: EngineHandle) -> Self {
        Self {
            engine,
            next_session: Arc::new(AtomicU64::new(1)),
        }
    }
}

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for AgentService {
    type ConnectStream = ReceiverStream<Result<v1::CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        // Every connection comes through vigil_tls's acceptor, which attaches the peer.
        let tls_peer = request.extensions().get::<vigil_tls::Peer>().cloned();
        let remote = tls_peer
            .as_ref()
            .and_then(|p| p.remote)
            .or_else(|| request.remote_addr());
        let identity = match tls_peer {
            Some(p) => Identity::Verified(p.identity),
            None => Identity::Missing,
        };
        let peer = remote.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let address = remote.map_or_else(String::new, |a| a.ip().to_string());
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let span = info_span!("agent_session", session, peer = %peer);
        tokio::spawn(
            run_session(
                self.engine.clone(),
                session,
                address,
                identity,
                request.into_inner(),
                tx,
            )
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What the connection says about who the agent is.
enum Identity {
    /// From the acceptor: `None` on a plaintext (insecure) listener.
    Verified(Option<vigil_tls::PeerIdentity>),
    /// No peer attached: not through vigil's acceptor, so nobody vouches for it.
    Missing,
}

impl Identity {
    /// An agent registers only as the node its certificate names.
    fn may_register(&self, node: &str) -> Result<(), String> {
        match self {
            Identity::Verified(None) => Ok(()),
            Identity::Verified(Some(id)) if id.is_node(node) => Ok(()),
            Identity::Verified(Some(id)) => Err(format!(
                "certificate CN={} (O={}) may not register as node {node:?}: an agent needs a \
                 certificate with O=vigil:node whose CN or DNS name is its node name \
                 (deploy/tls/make-certs.sh node {node})",
                id.common_name,
                id.organizations.join(",")
            )),
            Identity::Missing => Err("the connection carries no identity".to_owned()),
        }
    }
}

async fn run_session(
    engine: EngineHandle,
    session: u64,
    address: String,
    identity: Identity,
    mut inbound: Streaming<v1::AgentMessage>,
    tx: crate::engine::SessionTx,
) {
    let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message()).await;
    let reg = match first {
        Ok(Ok(Some(v1::AgentMessage {
            body: Some(Body::Register(reg)),
            ..
        }))) => validate_register(reg, session, address)
            .and_then(|reg| identity.may_register(&reg.node).map(|()| reg)),
        Ok(Ok(Some(_))) => Err("the first message must be Register".to_owned()),
        Ok(Ok(None)) => return,
        Ok(Err(status)) => {
            warn!(error = %status, "agent stream failed before registering");
            return;
        }
        Err(_) => Err(format!(
            "no Register within {}s",
            REGISTER_TIMEOUT.as_secs()
        )),
    };
    let reg = match reg {
        Ok(reg) => reg,
        Err(reason) => {
            warn!(%reason, "refused agent registration");
            let msg = v1::CoordinatorMessage {
                body: Some(v1::coordinator_message::Body::Rejected(v1::Rejected {
                    reason,
                })),
            };
            tx.send(Ok(msg)).await.ok();
            return;
        }
    };
    let node = reg.node.clone();
    info!(node = %node, gpus = reg.gpus.len(), simulated = reg.simulated, "agent registering");
    if engine.send(Event::Register { reg, tx }).await.is_err() {
        return;
    }
    loop {
        let event = match inbound.message().await {
            Ok(Some(v1::AgentMessage { seq, body })) => match body {
                Some(Body::Heartbeat(heartbeat)) => match check_heartbeat(&heartbeat) {
                    Ok(()) => Event::Heartbeat {
                        node: node.clone(),
                        session,
                        seq,
                        heartbeat,
                    },
                    Err(reason) => {
                        warn!(node = %node, %reason, "closing session: invalid heartbeat");
                        break;
                    }
                },
                Some(Body::Event(event)) => Event::AgentEvent {
                    node: node.clone(),
                    session,
                    seq,
                    event,
                },
                Some(Body::Register(_)) => {
                    warn!(node = %node, "closing session: Register sent twice");
                    break;
                }
                None => continue,
            },
            Ok(None) => break,
            Err(status) => {
                info!(node = %node, error = %status.message(), "agent stream broke");
                break;
            }
        };
        if engine.send(event).await.is_err() {
            return;
        }
    }
    engine
        .send(Event::Disconnected { node, session })
        .await
        .ok();
}

/// A node name as DNS labels are: letters, digits, `-`, `.`, `_`, starting alphanumeric.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn check_len(field: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_TEXT {
        return Err(format!("{field} is longer than {MAX_TEXT} bytes"));
    }
    Ok(())
}

/// Check a Register and turn it into the engine's form; the error names the field.
pub fn validate_register(
    reg: v1::Register,
    session: u64,
    address: String,
) -> Result<Registration, String> {
    if reg.protocol_version != vigil_proto::PROTOCOL_VERSION {
        return Err(format!(
            "protocol_version {} is not supported (this coordinator speaks {}); upgrade the agent or the coordinator",
            reg.protocol_version,
            vigil_proto::PROTOCOL_VERSION
        ));
    }
    if !valid_node_name(&reg.node_name) {
        return Err(format!(
            "node_name {:?} is invalid: use 1-{MAX_NAME} letters, digits, '-', '.' or '_', starting with a letter or digit",
            reg.node_name
        ));
    }
    check_len("hostname", &reg.hostname)?;
    check_len("agent_version", &reg.agent_version)?;
    let simulated = match v1::GpuBackend::try_from(reg.gpu_backend) {
        Ok(v1::GpuBackend::Nvml) => false,
        Ok(v1::GpuBackend::Simulated) => true,
        _ => {
            return Err(format!(
                "gpu_backend {} is not nvml or simulated",
                reg.gpu_backend
            ));
        }
    };
    if reg.gpus.len() > MAX_GPUS {
        return Err(format!(
            "gpus lists {} GPUs; at most {MAX_GPUS}",
            reg.gpus.len()
        ));
    }
    if reg.workers.len() > MAX_WORKERS {
        return Err(format!(
            "workers lists {}; at most {MAX_WORKERS}",
            reg.workers.len()
        ));
    }
    let mut gpus = Vec::with_capacity(reg.gpus.len());
    for g in reg.gpus {
        for (field, value) in [
            ("gpus.uuid", &g.uuid),
            ("gpus.name", &g.name),
            ("gpus.pci_bus_id", &g.pci_bus_id),
            ("gpus.serial", &g.serial),
        ] {
            check_len(field, value)?;
        }
        if gpus.iter().any(|x: &GpuRecord| x.index == g.index) {
            return Err(format!("gpus lists index {} twice", g.index));
        }
        gpus.push(GpuRecord {
            index: g.index,
            uuid: g.uuid,
            name: g.name,
            pci_bus_id: g.pci_bus_id,
            memory_total_bytes: g.memory_total_bytes,
            serial: g.serial,
        });
    }
    gpus.sort_by_key(|g| g.index);
    Ok(Registration {
        session,
        node: reg.node_name,
        hostname: reg.hostname,
        address,
        agent_version: reg.agent_version,
        simulated,
        gpus,
        workers: reg.workers,
    })
}

fn check_heartbeat(hb: &v1::Heartbeat) -> Result<(), String> {
    if hb.gpus.len() > MAX_GPUS {
        return Err(format!(
            "heartbeat carries {} GPU samples; at most {MAX_GPUS}",
            hb.gpus.len()
        ));
    }
    if hb.workers.len() > MAX_WORKERS {
        return Err(format!(
            "heartbeat lists {} workers; at most {MAX_WORKERS}",
            hb.workers.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(name: &str) -> v1::Register {
        v1::Register {
            protocol_version: vigil_proto::PROTOCOL_VERSION,
            node_name: name.into(),
            hostname: "h".into(),
            agent_version: "0.1.0".into(),
            gpu_backend: v1::GpuBackend::Simulated as i32,
            gpus: (0..8)
                .rev()
                .map(|i| v1::GpuInfo {
                    index: i,
                    uuid: format!("GPU-{i}"),
                    ..Default::default()
                })
                .collect(),
            workers: Vec::new(),
            sent_at_unix_ms: 0,
        }
    }

    #[test]
    fn a_good_registration_is_accepted_with_gpus_in_index_order() {
        let reg = validate_register(register("gpu-001"), 7, "10.0.0.7".into()).expect("valid");
        assert_eq!(reg.session, 7);
        assert!(reg.simulated);
        assert_eq!(
            reg.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
            (0..8).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_registrations_name_the_field() {
        let cases: Vec<(v1::Register, &str)> = vec![
            (register(""), "node_name"),
            (register("-bad"), "node_name"),
            (register("has space"), "node_name"),
            (register(&"x".repeat(64)), "node_name"),
            (
                v1::Register {
                    protocol_version: 9,
                    ..register("a")
                },
                "protocol_version",
            ),
            (
                v1::Register {
                    gpu_backend: 0,
                    ..register("a")
                },
                "gpu_backend",
            ),
            (
                v1::Register {
                    hostname: "h".repeat(300),
                    ..register("a")
                },
                "hostname",
            ),
            (
                v1::Register {
                    gpus: (0..65)
                        .map(|i| v1::GpuInfo {
                            index: i,
                            ..Default::default()
                        })
                        .collect(),
                    ..register("a")
                },
                "gpus",
            ),
            (
                v1::Register {
                    gpus: vec![v1::GpuInfo::default(), v1::GpuInfo::default()],
                    ..register("a")
                },
                "index 0 twice",
            ),
        ];
        for (reg, field) in cases {
            let err = validate_register(reg, 1, String::new()).expect_err(field);
            assert!(err.contains(field), "{err:?} should name {field}");
        }
    }

    #[test]
    fn node_names_follow_dns_like_rules() {
        for ok in ["gpu-001", "a", "node.rack-1", "A_1"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        for bad in ["", ".a", "a/b", "a b", "ü"] {
            assert!(!valid_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn oversized_heartbeats_are_refused() {
        let hb = v1::Heartbeat {
            gpus: vec![v1::GpuSample::default(); MAX_GPUS + 1],
            ..Default::default()
        };
        assert!(check_heartbeat(&hb).is_err());
        assert!(check_heartbeat(&v1::Heartbeat::default()).is_ok());
    }
}
