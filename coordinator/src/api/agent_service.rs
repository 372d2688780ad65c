//! `AgentService.Connect`: one task per agent session, forwarding to the engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};
use vigil_proto::compat;
use vigil_proto::v1::{self, agent_message::Body};

use crate::api::node_view::millis;
use crate::engine::{EngineHandle, Event};
use crate::metrics::Metrics;
use crate::store::StoreMark;
use crate::throttle::{Rates, Throttle};
use crate::validate::validate;

/// An agent must register this soon after opening its stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Outgoing messages queued per session.
const SESSION_QUEUE: usize = 64;
/// Rejections per session logged at warn level; later ones at debug (they are all counted).
const WARN_REJECTIONS: u32 = 10;
/// How long an agent outside the version window waits before it registers again: an operator
/// installs another release, which takes minutes, not moments.
const VERSION_SKEW_RETRY_AFTER: Duration = Duration::from_secs(60);

pub use crate::limits::{MAX_GPUS, MAX_WORKERS, valid_node_name};
pub use crate::validate::validate_register;

pub struct AgentService {
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    rates: Rates,
    next_session: Arc<AtomicU64>,
    /// The leadership term, the fencing token on what this service sends itself.
    term: u64,
}

impl AgentService {
    pub fn new(engine: EngineHandle, metrics: Arc<Metrics>, rates: Rates, term: u64) -> Self {
        Self {
            engine,
            metrics,
            rates,
            next_session: Arc::new(AtomicU64::new(1)),
            term,
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
        let ctx = Ctx {
            engine: self.engine.clone(),
            metrics: self.metrics.clone(),
            rates: self.rates,
            term: self.term,
        };
        tokio::spawn(
            run_session(ctx, session, address, identity, request.into_inner(), tx).instrument(span),
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

/// What a session task needs from the service.
struct Ctx {
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    rates: Rates,
    term: u64,
}

async fn run_session(
    ctx: Ctx,
    session: u64,
    address: String,
    identity: Identity,
    mut inbound: Streaming<v1::AgentMessage>,
    tx: crate::engine::SessionTx,
) {
    let Ctx {
        engine,
        metrics,
        rates,
        term,
    } = ctx;
    let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message()).await;
    let mut wants_renewal = false;
    let reg = match first {
        Ok(Ok(Some(msg))) => match msg.body {
            Some(Body::Register(reg)) => {
                let told = told_mark(&reg);
                wants_renewal = reg.accepts_lease_renewal;
                compat::check(
                    compat::this_release(),
                    compat::Peer::Agent,
                    &reg.agent_version,
                )
                .map_err(|skew| ("version_skew", skew.0))
                .and_then(|()| {
                    validate_register(reg, session, address).map_err(|e| ("invalid_register", e))
                })
                .and_then(|reg| {
                    identity
                        .may_register(&reg.node)
                        .map(|()| (reg, told))
                        .map_err(|e| ("wrong_identity", e))
                })
            }
            _ => Err((
                "not_registered",
                "the first message must be Register".to_owned(),
            )),
        },
        Ok(Ok(None)) => return,
        Ok(Err(status)) => match refused(&status) {
            Some(reason) => Err((reason, status.message().to_owned())),
            None => {
                warn!(error = %status, "agent stream failed before registering");
                return;
            }
        },
        Err(_) => Err((
            "register_timeout",
            format!("no Register within {}s", REGISTER_TIMEOUT.as_secs()),
        )),
    };
    let (reg, told) = match reg {
        Ok(reg) => reg,
        Err((label, reason)) => {
            metrics.input.rejected(label);
            warn!(%reason, rejected = label, "refused agent registration");
            let msg = v1::CoordinatorMessage {
                body: Some(v1::coordinator_message::Body::Rejected(v1::Rejected {
                    reason,
                    // Another release is installed by an operator, not in a moment: the agent
                    // waits, and says so once.
                    retry_after_ms: if label == "version_skew" {
                        millis(VERSION_SKEW_RETRY_AFTER)
                    } else {
                        0
                    },
                })),
                term,
            };
            tx.send(Ok(msg)).await.ok();
            return;
        }
    };
    let node = reg.node.clone();
    info!(node = %node, gpus = reg.gpus.len(), simulated = reg.simulated, "agent registering");
    if wants_renewal {
        // Ahead of the queue the registration waits in (see `Engine::contact`).
        engine.contact(crate::engine::Contact {
            node: node.clone(),
            session,
            machine_id: reg.identity.machine_id.clone(),
            tx: tx.clone(),
        });
    }
    if engine
        .send(Event::Register { reg, told, tx })
        .await
        .is_err()
    {
        return;
    }
    let mut throttle = Throttle::new(rates, Instant::now());
    let mut rejections = 0u32;
    loop {
        let msg = match inbound.message().await {
            Ok(Some(msg)) => msg,
            Ok(None) => break,
            Err(status) => {
                if let Some(reason) = refused(&status) {
                    metrics.input.rejected(reason);
                    warn!(node = %node, error = %status.message(), rejected = reason, "closing session: agent sent a message it may not");
                } else {
                    info!(node = %node, error = %status.message(), "agent stream broke");
                }
                break;
            }
        };
        let verdict = throttle.admit(msg.encoded_len(), Instant::now());
        if !verdict.wait.is_zero() {
            metrics.input.throttled(&node);
            if verdict.episode_started {
                flag_flooding(&engine, &node, session, rates).await;
            }
            // Not reading is the backpressure: this agent's stream stalls, nobody else's.
            tokio::time::sleep(verdict.wait).await;
        }
        if let Err(r) = validate(&msg) {
            metrics.input.rejected(r.reason);
            rejections += 1;
            if rejections <= WARN_REJECTIONS {
                warn!(node = %node, rejected = r.reason, reason = %r, "dropped an invalid agent message (state unchanged)");
            } else {
                debug!(node = %node, rejected = r.reason, reason = %r, "dropped an invalid agent message (state unchanged)");
            }
            continue;
        }
        let v1::AgentMessage { seq, body } = msg;
        let event = match body {
            Some(Body::Heartbeat(heartbeat)) => Event::Heartbeat {
                node: node.clone(),
                session,
                seq,
                heartbeat,
            },
            Some(Body::Event(event)) => Event::AgentEvent {
                node: node.clone(),
                session,
                seq,
                event,
            },
            Some(Body::Register(_)) => {
                metrics.input.rejected("register_twice");
                warn!(node = %node, "closing session: Register sent twice");
                break;
            }
            None => continue,
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

/// The store mark a Register says its agent was told; `None` when it was told none.
fn told_mark(reg: &v1::Register) -> Option<StoreMark> {
    (!reg.last_store_id.is_empty()).then(|| StoreMark {
        store_id: reg.last_store_id.clone(),
        seq: reg.last_store_seq,
    })
}

/// The rejection label of a stream error the agent caused (a message over the size limit, or
/// bytes that are not a valid `AgentMessage`); `None` for a broken connection.
fn refused(status: &Status) -> Option<&'static str> {
    let text = status.message();
    match status.code() {
        Code::OutOfRange if text.contains("too large") => Some("oversized"),
        Code::Internal
            if text.starts_with("failed to decode Protobuf message")
                || text.starts_with("protocol error") =>
        {
            Some("malformed")
        }
        _ => None,
    }
}

/// A new throttling episode: warn once and record it on the node, where operators look.
async fn flag_flooding(engine: &EngineHandle, node: &str, session: u64, rates: Rates) {
    let message = format!(
        "agent stream throttled: over {} messages/s or {} bytes/s sustained; its messages are \
         delayed (see vigil_agent_messages_throttled_total); check the agent host",
        rates.messages_per_second, rates.bytes_per_second
    );
    warn!(node = %node, "{message}");
    engine
        .send(Event::Flag {
            node: node.to_owned(),
            session,
            kind: "throttled",
            message,
        })
        .await
        .ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_errors_the_agent_caused_are_told_apart_from_broken_connections() {
        let big = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        assert_eq!(refused(&big), Some("oversized"));
        let bad = Status::internal("failed to decode Protobuf message: invalid wire type value: 7");
        assert_eq!(refused(&bad), Some("malformed"));
        assert_eq!(refused(&Status::unknown("h2 protocol error: reset")), None);
        assert_eq!(refused(&Status::cancelled("gone")), None);
    }

    #[test]
    fn a_register_names_the_mark_its_agent_was_told_or_none() {
        let mut reg = v1::Register::default();
        assert_eq!(told_mark(&reg), None, "told nothing yet");
        reg.last_store_seq = 4;
        assert_eq!(told_mark(&reg), None, "no store, no mark");
        reg.last_store_id = "s".into();
        assert_eq!(
            told_mark(&reg),
            Some(StoreMark {
                store_id: "s".into(),
                seq: 4
            })
        );
    }
}
