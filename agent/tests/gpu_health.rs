//! GPU health end to end through a fake coordinator: injected faults arrive at once, diagnostics answer.

mod common;

use common::{RunningAgent, TestResult};

use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use vigil_agent::AgentConfig;
use vigil_agent::config::{GpuBackendKind, ReconnectConfig};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::agent_message::Body;
use vigil_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use vigil_proto::v1::coordinator_message::Body as Reply;
use vigil_proto::v1::{
    Ack, AgentEvent, AgentMessage, Command, CoordinatorMessage, DiagnosticsResult, Heartbeat,
    Registered, RunDiagnostics, command,
};

const DIAGNOSTICS_ID: u64 = 7;

/// Accepts every registration with a slow heartbeat (so only an immediate one
/// can carry a fresh fault), then asks for diagnostics once.
struct FakeCoordinator {
    /// The test holds the receiver.
    seen: mpsc::UnboundedSender<AgentMessage>,
}

#[tonic::async_trait]
impl AgentService for FakeCoordinator {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let seen = self.seen.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let replies = match msg.body {
                    Some(Body::Register(_)) => vec![
                        Reply::Registered(Registered {
                            heartbeat_interval_ms: 60_000,
                            lease_ms: 120_000,
                            coordinator_version: env!("CARGO_PKG_VERSION").into(),
                            session_id: 1,
                            coordinator_name: "fake".into(),
                            ..Default::default()
                        }),
                        Reply::Command(Command {
                            id: DIAGNOSTICS_ID,
                            kind: Some(command::Kind::RunDiagnostics(RunDiagnostics {
                                timeout_ms: 5_000,
                                command: Vec::new(),
                            })),
                        }),
                    ],
                    _ => vec![Reply::Ack(Ack {
                        seq: msg.seq,
                        ..Default::default()
                    })],
                };
                let _ = seen.send(msg);
                for reply in replies {
                    let _ = tx
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
    seen: mpsc::UnboundedReceiver<AgentMessage>,
    faults: PathBuf,
    agent: RunningAgent,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(diagnostics_command: Vec<String>) -> Result<Self, Box<dyn Error>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let coordinator = listener.local_addr()?;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(FakeCoordinator { seen: seen_tx }))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let dir = tempfile::tempdir()?;
        let faults = dir.path().join("faults");
        let config = AgentConfig {
            shim_program: Some(env!("CARGO_BIN_EXE_vigil-agent").into()),
            coordinator: format!("http://{coordinator}").into(),
            insecure: true,
            node_name: "health-node".into(),
            gpu_backend: GpuBackendKind::Sim,
            sim_gpus: 4,
            sim_fault_file: Some(faults.clone()),
            diagnostics_command,
            state_dir: dir.path().join("state"),
            reconnect: ReconnectConfig {
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            },
            ..AgentConfig::default()
        };
        let agent = RunningAgent::start(config).await?;
        Ok(Self {
            seen,
            faults,
            agent,
            _dir: dir,
        })
    }

    /// The first message matching `pick` within `within`.
    async fn wait_for<T>(
        &mut self,
        within: Duration,
        pick: impl Fn(&AgentMessage) -> Option<T>,
    ) -> Result<T, Box<dyn Error>> {
        let deadline = Instant::now() + within;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.seen.recv())
                .await?
                .ok_or("fake coordinator stopped")?;
            if let Some(t) = pick(&msg) {
                return Ok(t);
            }
        }
    }

    async fn stop(self) -> TestResult {
        self.agent.stop(Duration::from_secs(5)).await
    }
}

fn heartbeat(m: &AgentMessage) -> Option<Heartbeat> {
    match &m.body {
        Some(Body::Heartbeat(hb)) => Some(hb.clone()),
        _ => None,
    }
}

fn event(m: &AgentMessage) -> Option<AgentEvent> {
    match &m.body {
        Some(Body::Event(e)) => Some(e.clone()),
        _ => None,
    }
}

fn diagnostics(m: &AgentMessage) -> Option<DiagnosticsResult> {
    match event(m)?.kind {
        Some(Kind::Diagnostics(d)) => Some(d),
        _ => None,
    }
}

/// How long an injected fault may take to reach the coordinator: generous for a
/// loaded machine, yet far below the 60 s heartbeat the fake coordinator asks
/// for, so only an immediate report arrives in time. How fast it really is, is
/// a measurement, printed here, not asserted.
const PROMPTLY: Duration = Duration::from_secs(10);

#[tokio::test]
async fn injected_faults_reach_the_coordinator_at_once_not_at_the_next_heartbeat() -> TestResult {
    let mut h = Harness::start(Vec::new()).await?;
    h.wait_for(Duration::from_secs(5), heartbeat).await?;
    let injected = Instant::now();
    std::fs::write(
        &h.faults,
        "gpu=1 xid=79\ngpu=0 ecc_uncorrected=3\ngpu=3 lost\n",
    )?;
    let (gpu, xid) = h
        .wait_for(PROMPTLY, |m| match event(m)?.kind {
            Some(Kind::Xid(x)) => Some((x.gpu_index, x.xid)),
            _ => None,
        })
        .await?;
    assert_eq!((gpu, xid), (1, 79));
    let lost = h
        .wait_for(PROMPTLY, |m| match event(m)?.kind {
            Some(Kind::GpuLost(l)) => Some(l.gpu_index),
            _ => None,
        })
        .await?;
    assert_eq!(lost, 3);
    let hb = h
        .wait_for(PROMPTLY, |m| {
            heartbeat(m).filter(|hb| {
                hb.gpus
                    .iter()
                    .any(|g| g.ecc_uncorrected_volatile == Some(3))
            })
        })
        .await?;
    println!(
        "fault file write -> XID, lost GPU and ECC heartbeat at the coordinator: {:?}",
        injected.elapsed()
    );
    assert_eq!(hb.gpus.len(), 3, "the lost GPU has no sample");
    h.stop().await
}

#[tokio::test]
async fn diagnostics_run_on_request_and_answer_with_the_command_id() -> TestResult {
    let mut h = Harness::start(Vec::new()).await?;
    let d = h.wait_for(Duration::from_secs(5), diagnostics).await?;
    assert_eq!(d.command_id, DIAGNOSTICS_ID);
    assert!(d.passed, "{d:?}");
    assert_eq!(d.summary, "all checks passed");
    assert_eq!(d.command, "builtin simulated self-check");
    h.stop().await
}

#[tokio::test]
async fn a_configured_diagnostics_command_reports_its_exit_and_output() -> TestResult {
    let command = ["sh", "-c", "echo checked; exit 1"]
        .map(String::from)
        .to_vec();
    let mut h = Harness::start(command).await?;
    let d = h.wait_for(Duration::from_secs(5), diagnostics).await?;
    assert_eq!(d.command_id, DIAGNOSTICS_ID);
    assert!(!d.passed);
    assert_eq!(d.output, "checked\n");
    assert_eq!(d.command, "sh -c echo checked; exit 1");
    h.stop().await
}
