//! The agent against a scripted fake coordinator: registration, heartbeats, reconnects, the lease.

mod common;

use common::{RunningAgent, TestResult};

use std::collections::VecDeque;
use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use vigil_agent::AgentConfig;
use vigil_agent::config::{GpuBackendKind, ReconnectConfig};
use vigil_proto::v1::agent_message::Body;
use vigil_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use vigil_proto::v1::coordinator_message::Body as Reply;
use vigil_proto::v1::{Ack, AgentMessage, CoordinatorMessage, GpuBackend, Registered, Rejected};

/// How the fake coordinator answers one session.
#[derive(Clone, Copy)]
enum Answer {
    Accept {
        lease_ms: u64,
        ack: bool,
        /// End the stream after this many heartbeats.
        close_after: Option<usize>,
    },
    Reject,
    /// Rejected with `retry_after_ms` (as for a node name another host holds).
    RejectFor(u64),
    /// [`ACCEPT`], from a coordinator that says it is this release.
    AcceptFrom(&'static str),
    /// [`ACCEPT`] (ending the stream after `close_after` heartbeats), from a coordinator
    /// that reads heartbeats saying GPU health is unchanged.
    AcceptCompact {
        close_after: Option<usize>,
    },
    /// A coordinator in a reconnect storm: a `LeaseRenewed` at once, `Registered` only after
    /// this many milliseconds (then as [`ACCEPT`]).
    RenewThenAccept(u64),
}

/// The fake coordinator's store id (see the marks it tells in `connect`).
const STORE_ID: &str = "fake-store";

const ACCEPT: Answer = Answer::Accept {
    lease_ms: 5_000,
    ack: true,
    close_after: None,
};

struct FakeCoordinator {
    /// Answers for the next sessions, in order; [`ACCEPT`] once they run out.
    answers: Mutex<VecDeque<Answer>>,
    /// The test holds the receiver: every agent message, tagged with its session number.
    seen: mpsc::UnboundedSender<(u64, AgentMessage)>,
    sessions: AtomicU64,
}

#[tonic::async_trait]
impl AgentService for FakeCoordinator {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let session = self.sessions.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = self
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
            .unwrap_or(ACCEPT);
        let mut renew_then_wait = None;
        let (answer, version, compact) = match answer {
            Answer::AcceptFrom(version) => (ACCEPT, version, false),
            Answer::RenewThenAccept(ms) => {
                renew_then_wait = Some(ms);
                (ACCEPT, env!("CARGO_PKG_VERSION"), false)
            }
            Answer::AcceptCompact { close_after } => (
                Answer::Accept {
                    lease_ms: 5_000,
                    ack: true,
                    close_after,
                },
                env!("CARGO_PKG_VERSION"),
                true,
            ),
            answer => (answer, env!("CARGO_PKG_VERSION"), false),
        };
        let mut inbound = request.into_inner();
        let seen = self.seen.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut out = Some(tx);
            let mut heartbeats = 0;
            while let Ok(Some(msg)) = inbound.message().await {
                let seq = msg.seq;
                let registering = matches!(msg.body, Some(Body::Register(_)));
                let _ = seen.send((session, msg));
                let reply = match (answer, registering) {
                    (Answer::Reject, true) => Reply::Rejected(Rejected {
                        reason: "node is banned".into(),
                        retry_after_ms: 0,
                    }),
                    (Answer::RejectFor(ms), true) => Reply::Rejected(Rejected {
                        reason: "node \"test-node\" is already connected from elsewhere".into(),
                        retry_after_ms: ms,
                    }),
                    (Answer::Accept { lease_ms, .. }, true) => Reply::Registered(Registered {
                        heartbeat_interval_ms: 50,
                        lease_ms,
                        coordinator_version: version.into(),
                        session_id: session,
                        coordinator_name: "fake".into(),
                        // The store's mark: session N starts at commit 10 N, and every
                        // heartbeat acknowledged is one commit more.
                        store_id: STORE_ID.into(),
                        store_seq: session * 10,
                        accepts_gpu_health_unchanged: compact,
                    }),
                    (
                        Answer::Accept {
                            ack, close_after, ..
                        },
                        false,
                    ) => {
                        heartbeats += 1;
                        if close_after == Some(heartbeats) {
                            out = None;
                        }
                        if !ack {
                            continue;
                        }
                        Reply::Ack(Ack {
                            seq,
                            store_id: STORE_ID.into(),
                            store_seq: session * 10 + heartbeats as u64,
                        })
                    }
                    // AcceptFrom, AcceptCompact and RenewThenAccept became ACCEPT above.
                    (Answer::Reject | Answer::RejectFor(_), false)
                    | (
                        Answer::AcceptFrom(_)
                        | Answer::AcceptCompact { .. }
                        | Answer::RenewThenAccept(_),
                        _,
                    ) => {
                        continue;
                    }
                };
                if let (Some(out), Some(wait), true) = (&out, renew_then_wait, registering) {
                    let renewal =
                        Reply::LeaseRenewed(vigil_proto::v1::LeaseRenewed { lease_ms: 10_000 });
                    let _ = out
                        .send(Ok(CoordinatorMessage {
                            body: Some(renewal),
                            term: 0,
                        }))
                        .await;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                if let Some(out) = &out {
                    let _ = out
                        .send(Ok(CoordinatorMessage {
                            body: Some(reply),
                            term: 0,
                        }))
                        .await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

struct Harness {
    seen: mpsc::UnboundedReceiver<(u64, AgentMessage)>,
    agent: RunningAgent,
    state: tempfile::TempDir,
}

impl Harness {
    async fn start(answers: Vec<Answer>) -> Result<Self, Box<dyn Error>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let coordinator = listener.local_addr()?;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let fake = FakeCoordinator {
            answers: Mutex::new(answers.into()),
            seen: seen_tx,
            sessions: AtomicU64::new(0),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let state = tempfile::tempdir()?;
        let config = AgentConfig {
            shim_program: Some(env!("CARGO_BIN_EXE_vigil-agent").into()),
            coordinator: format!("http://{coordinator}").into(),
            insecure: true,
            node_name: "test-node".into(),
            gpu_backend: GpuBackendKind::Sim,
            sim_gpus: 2,
            state_dir: state.path().join("state"),
            reconnect: ReconnectConfig {
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            },
            ..AgentConfig::default()
        };
        let agent = RunningAgent::start(config).await?;
        Ok(Self { seen, agent, state })
    }

    async fn next(&mut self) -> Result<(u64, AgentMessage), Box<dyn Error>> {
        tokio::time::timeout(Duration::from_secs(5), self.seen.recv())
            .await?
            .ok_or_else(|| "fake coordinator stopped".into())
    }

    /// Skips messages until one from `session` satisfies `pred`.
    async fn wait_for(
        &mut self,
        session: u64,
        pred: impl Fn(&AgentMessage) -> bool,
    ) -> Result<AgentMessage, Box<dyn Error>> {
        loop {
            let (s, msg) = self.next().await?;
            if s == session && pred(&msg) {
                return Ok(msg);
            }
        }
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.state.path().join("state")
    }

    async fn metrics(&self) -> Result<String, Box<dyn Error>> {
        self.agent.metrics().await
    }

    async fn stop(self) -> TestResult {
        self.agent.stop(Duration::from_secs(5)).await
    }
}

fn is_register(m: &AgentMessage) -> bool {
    matches!(m.body, Some(Body::Register(_)))
}

fn is_heartbeat(m: &AgentMessage) -> bool {
    matches!(m.body, Some(Body::Heartbeat(_)))
}

#[tokio::test]
async fn agent_registers_first_then_heartbeats_with_gpu_samples() -> TestResult {
    let mut h = Harness::start(vec![]).await?;
    let (session, first) = h.next().await?;
    assert_eq!((session, first.seq), (1, 1));
    let Some(Body::Register(reg)) = first.body else {
        return Err("first message is not Register".into());
    };
    assert_eq!(reg.protocol_version, vigil_proto::PROTOCOL_VERSION);
    assert_eq!(reg.node_name, "test-node");
    assert_eq!(reg.gpu_backend, GpuBackend::Simulated as i32);
    assert_eq!(reg.gpus.len(), 2);
    assert_eq!(reg.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(reg.workers.is_empty());
    assert_eq!(
        (reg.last_store_id.as_str(), reg.last_store_seq),
        ("", 0),
        "no store mark told yet"
    );
    for seq in [2, 3] {
        let (_, msg) = h.next().await?;
        assert_eq!(msg.seq, seq);
        let Some(Body::Heartbeat(hb)) = msg.body else {
            return Err("expected a heartbeat".into());
        };
        assert_eq!(hb.gpus.len(), 2);
        assert!(hb.gpus.iter().all(|g| g.temperature_c.is_some()));
        assert!(
            !hb.gpu_health_unchanged && hb.telemetry.is_empty(),
            "full samples only: this coordinator does not accept the compact form"
        );
    }
    let text = h.metrics().await?;
    for line in [
        "vigil_agent_connected 1",
        "vigil_agent_registrations_total 1",
        "vigil_agent_gpus{backend=\"simulated\"} 2",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing in\n{text}"
        );
    }
    h.stop().await
}

fn heartbeat_of(m: AgentMessage) -> Result<vigil_proto::v1::Heartbeat, Box<dyn Error>> {
    match m.body {
        Some(Body::Heartbeat(hb)) => Ok(hb),
        _ => Err("expected a heartbeat".into()),
    }
}

#[tokio::test]
async fn agent_sends_telemetry_alone_once_full_samples_went_to_a_coordinator_that_reads_it()
-> TestResult {
    // Sessions 1 and 2 end after 4 heartbeats each; 2 and 3 are told the capability.
    let closing = Answer::Accept {
        lease_ms: 5_000,
        ack: true,
        close_after: Some(4),
    };
    let answers = vec![
        closing,
        Answer::AcceptCompact {
            close_after: Some(4),
        },
        Answer::AcceptCompact { close_after: None },
    ];
    let mut h = Harness::start(answers).await?;
    // Session 1 (no capability): full samples throughout.
    for _ in 0..3 {
        let hb = heartbeat_of(h.wait_for(1, is_heartbeat).await?)?;
        assert!(!hb.gpu_health_unchanged && hb.gpus.len() == 2);
    }
    for session in [2, 3] {
        let first = heartbeat_of(h.wait_for(session, is_heartbeat).await?)?;
        assert!(
            !first.gpu_health_unchanged && first.gpus.len() == 2,
            "session {session} starts with full samples"
        );
        for _ in 0..3 {
            let hb = heartbeat_of(h.wait_for(session, is_heartbeat).await?)?;
            assert!(hb.gpu_health_unchanged, "session {session}: {hb:?}");
            assert!(hb.gpus.is_empty());
            assert_eq!(hb.telemetry.len(), 2);
            assert!(hb.telemetry.iter().all(|t| t.temperature_c.is_some()));
        }
    }
    h.stop().await
}

/// A coordinator restarted under thousands of agents renews each lease as soon as it has the
/// agent's Register, and answers it seconds later: the agent keeps waiting (past its 5 s register
/// timeout, within its lease) instead of dialing again, and registers in that same session.
#[tokio::test]
async fn a_lease_renewal_before_registered_keeps_the_agent_waiting_in_its_session() -> TestResult {
    let mut h = Harness::start(vec![Answer::RenewThenAccept(6_500)]).await?;
    let (session, first) = h.next().await?;
    assert_eq!(session, 1);
    match first.body {
        Some(Body::Register(r)) => {
            assert!(r.accepts_lease_renewal, "the agent says it reads renewals")
        }
        other => return Err(format!("expected Register, got {other:?}").into()),
    }
    // Nothing for 6.5 s (the Registered is late), then heartbeats.
    let (session, next) = tokio::time::timeout(Duration::from_secs(30), h.seen.recv())
        .await?
        .ok_or("fake coordinator stopped")?;
    assert_eq!(
        session, 1,
        "registered in the session the renewal came on, no new dial: {next:?}"
    );
    assert!(is_heartbeat(&next), "then heartbeats: {next:?}");
    Ok(())
}

#[tokio::test]
async fn agent_reregisters_when_the_coordinator_closes_the_stream() -> TestResult {
    let closing = Answer::Accept {
        lease_ms: 5_000,
        ack: true,
        close_after: Some(2),
    };
    let mut h = Harness::start(vec![closing]).await?;
    h.wait_for(1, is_register).await?;
    let again = h.wait_for(2, is_register).await?;
    assert_eq!(again.seq, 1, "seq restarts with each session");
    h.wait_for(2, is_heartbeat).await?;
    let text = h.metrics().await?;
    assert!(text.contains("vigil_agent_reconnects_total 1"), "{text}");
    assert!(text.contains("vigil_agent_registrations_total 2"), "{text}");
    h.stop().await
}

#[tokio::test]
async fn agent_keeps_the_highest_store_mark_told_and_registers_with_it() -> TestResult {
    let closing = Answer::Accept {
        lease_ms: 5_000,
        ack: true,
        close_after: Some(2),
    };
    let mut h = Harness::start(vec![closing]).await?;
    h.wait_for(1, is_register).await?;
    // Session 1: Registered at commit 10, the first heartbeat acked at 11, then the stream
    // ends (the second heartbeat is not acked).
    let again = h.wait_for(2, is_register).await?;
    let Some(Body::Register(reg)) = again.body else {
        return Err("not a Register".into());
    };
    assert_eq!(
        (reg.last_store_id.as_str(), reg.last_store_seq),
        (STORE_ID, 11)
    );
    h.wait_for(2, is_heartbeat).await?;
    h.wait_for(2, is_heartbeat).await?;
    let text = h.metrics().await?;
    assert!(
        metric(&text, "vigil_agent_coordinator_store_seq").is_some_and(|n| n >= 20),
        "{text}"
    );
    let kept = std::fs::read_to_string(h.state_dir().join("coordinator-store"))?;
    let seq = kept
        .strip_prefix(STORE_ID)
        .and_then(|rest| rest.trim().parse::<u64>().ok());
    assert!(seq.is_some_and(|n| n >= 20), "{kept:?}");
    h.stop().await
}

#[tokio::test]
async fn rejected_registration_is_retried() -> TestResult {
    let mut h = Harness::start(vec![Answer::Reject, Answer::Reject]).await?;
    h.wait_for(1, is_register).await?;
    h.wait_for(2, is_register).await?;
    h.wait_for(3, is_register).await?;
    h.wait_for(3, is_heartbeat).await?;
    h.stop().await
}

#[tokio::test]
async fn a_registration_refused_with_retry_after_waits_that_long_not_its_backoff() -> TestResult {
    let mut h = Harness::start(vec![Answer::RejectFor(1500)]).await?;
    let first = h.wait_for(1, is_register).await?;
    let refused_at = tokio::time::Instant::now();
    match first.body {
        Some(Body::Register(r)) => assert!(!r.machine_id.is_empty(), "sent its machine-id"),
        other => panic!("not a Register: {other:?}"),
    }
    h.wait_for(2, is_register).await?;
    let waited = refused_at.elapsed();
    // Its reconnect backoff here is at most 50 ms.
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    h.wait_for(2, is_heartbeat).await?;
    h.stop().await
}

#[tokio::test]
async fn a_coordinator_outside_the_version_window_is_not_followed() -> TestResult {
    // This release's minor + 2: outside the one-minor window either way.
    let this = vigil_proto::compat::this_release();
    let far: &'static str = Box::leak(format!("{}.{}.0", this.major, this.minor + 2).into());
    let mut h = Harness::start(vec![Answer::AcceptFrom(far), Answer::AcceptFrom("0.0.1")]).await?;
    h.wait_for(1, is_register).await?;
    // It sends no heartbeat on that session and waits (a minute) before registering again.
    let quiet = tokio::time::timeout(Duration::from_millis(1500), h.next()).await;
    assert!(quiet.is_err(), "the agent went on talking: {quiet:?}");
    let text = h.metrics().await?;
    assert!(text.contains("vigil_agent_connected 0"), "{text}");
    assert_eq!(
        metric(&text, "vigil_agent_registrations_total"),
        Some(0),
        "{text}"
    );
    h.stop().await
}

#[tokio::test]
async fn silent_coordinator_costs_the_session_its_lease() -> TestResult {
    let silent = Answer::Accept {
        lease_ms: 300,
        ack: false,
        close_after: None,
    };
    let mut h = Harness::start(vec![silent]).await?;
    h.wait_for(1, is_register).await?;
    h.wait_for(1, is_heartbeat).await?;
    h.wait_for(2, is_register).await?;
    h.stop().await
}

/// The agent must keep running, redialing and serving `/metrics`, with no
/// coordinator at all, until its own shutdown future fires.
#[tokio::test]
async fn unreachable_coordinator_does_not_stop_the_agent() -> TestResult {
    let state = tempfile::tempdir()?;
    let config = AgentConfig {
        shim_program: Some(env!("CARGO_BIN_EXE_vigil-agent").into()),
        // Port 9 (discard) on loopback: nothing listens there in a test environment.
        coordinator: "http://127.0.0.1:9".into(),
        insecure: true,
        node_name: "lonely".into(),
        gpu_backend: GpuBackendKind::Sim,
        state_dir: state.path().join("s"),
        reconnect: ReconnectConfig {
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
        },
        ..AgentConfig::default()
    };
    let agent = RunningAgent::start(config).await?;
    // Every failed dial counts one reconnect: three of them, each seen on a
    // /metrics page the running agent served, prove it kept trying.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if !agent.is_running() {
            let ended = agent.stop(Duration::from_secs(1)).await;
            return Err(format!("the agent returned before its shutdown fired: {ended:?}").into());
        }
        let text = agent.metrics().await?;
        assert!(text.contains("vigil_agent_connected 0"), "{text}");
        if metric(&text, "vigil_agent_reconnects_total").is_some_and(|n| n >= 3) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("no three failed dials within 10 s:\n{text}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        agent.is_running(),
        "the agent returned before its shutdown fired"
    );
    agent.stop(Duration::from_secs(5)).await
}

/// The value of the unlabelled sample `name` on a /metrics page.
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
