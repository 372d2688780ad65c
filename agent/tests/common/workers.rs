//! The workers tests' harness: a fake coordinator that sends StartWorker/StopWorkers to an
//! in-process agent whose workers are real `sh` processes under real shims, and the helpers
//! those tests share (agent/tests/workers.rs, agent/tests/workers_restart.rs).

use std::error::Error;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use vigil_agent::AgentConfig;
use vigil_agent::config::{GpuBackendKind, ReconnectConfig, WorkersSection};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::agent_message::Body;
use vigil_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use vigil_proto::v1::command::Kind as CommandKind;
use vigil_proto::v1::coordinator_message::Body as Reply;
use vigil_proto::v1::{
    Ack, AgentMessage, Command, CoordinatorMessage, Heartbeat, Registered, StartWorker,
    StopWorkers, WorkerExited, WorkerStarted,
};

use super::{RunningAgent, TestResult, current_user};

type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

pub const WAIT: Duration = Duration::from_secs(15);

/// A coordinator that accepts every session and sends the test's commands on the newest one.
struct Fake {
    pub lease_ms: u64,
    /// Silent (no acks): the agent's lease runs out unless a command renews it.
    pub ack: bool,
    /// The test holds the receiver: every agent message.
    seen: mpsc::UnboundedSender<AgentMessage>,
    /// The newest session's sending end, for commands.
    current: Arc<Mutex<Option<Outbound>>>,
}

#[tonic::async_trait]
impl AgentService for Fake {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let (seen, current, lease_ms, ack) = (
            self.seen.clone(),
            Arc::clone(&self.current),
            self.lease_ms,
            self.ack,
        );
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                let seq = msg.seq;
                let registering = matches!(msg.body, Some(Body::Register(_)));
                let reply = if registering {
                    Reply::Registered(Registered {
                        heartbeat_interval_ms: 50,
                        lease_ms,
                        coordinator_version: env!("CARGO_PKG_VERSION").into(),
                        session_id: 1,
                        coordinator_name: "fake".into(),
                        ..Default::default()
                    })
                } else {
                    Reply::Ack(Ack {
                        seq,
                        ..Default::default()
                    })
                };
                if registering || ack {
                    let _ = tx
                        .send(Ok(CoordinatorMessage {
                            body: Some(reply),
                            term: 0,
                        }))
                        .await;
                }
                if registering {
                    *current.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx.clone());
                }
                let _ = seen.send(msg);
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

pub struct Options {
    pub lease_ms: u64,
    pub ack: bool,
    pub keep_workers_on_shutdown: bool,
    /// `workers.run_as`; `None`: the user running the tests.
    pub run_as: Option<&'static str>,
}

pub const NORMAL: Options = Options {
    lease_ms: 5_000,
    ack: true,
    keep_workers_on_shutdown: false,
    run_as: None,
};

pub struct Harness {
    seen: mpsc::UnboundedReceiver<AgentMessage>,
    current: Arc<Mutex<Option<Outbound>>>,
    next_command: u64,
    pub agent: RunningAgent,
}

impl Harness {
    pub async fn start(state_dir: &Path, options: Options) -> Result<Self, Box<dyn Error>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let coordinator = listener.local_addr()?;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let current = Arc::new(Mutex::new(None));
        let fake = Fake {
            lease_ms: options.lease_ms,
            ack: options.ack,
            seen: seen_tx,
            current: Arc::clone(&current),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(fake))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let config = AgentConfig {
            shim_program: Some(env!("CARGO_BIN_EXE_vigil-agent").into()),
            coordinator: format!("http://{coordinator}").into(),
            insecure: true,
            node_name: "worker-node".into(),
            gpu_backend: GpuBackendKind::Sim,
            sim_gpus: 1,
            state_dir: state_dir.to_owned(),
            reconnect: ReconnectConfig {
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            },
            keep_workers_on_shutdown: options.keep_workers_on_shutdown,
            // Tests run as whatever user runs them (root in CI): say so explicitly.
            workers: WorkersSection {
                run_as: Some(match options.run_as {
                    Some(user) => user.to_owned(),
                    None => current_user()?,
                }),
                allowed_roots: vec![
                    state_dir
                        .parent()
                        .ok_or("state dir has a parent")?
                        .to_owned(),
                ],
                ..WorkersSection::default()
            },
            ..AgentConfig::default()
        };
        let agent = RunningAgent::start(config).await?;
        let mut h = Self {
            seen,
            current,
            next_command: 1,
            agent,
        };
        h.message(|m| matches!(m.body, Some(Body::Register(_))))
            .await?;
        Ok(h)
    }

    pub async fn message(
        &mut self,
        pred: impl Fn(&AgentMessage) -> bool,
    ) -> Result<AgentMessage, Box<dyn Error>> {
        let wait = async {
            while let Some(msg) = self.seen.recv().await {
                if pred(&msg) {
                    return Ok(msg);
                }
            }
            Err::<_, Box<dyn Error>>("fake coordinator stopped".into())
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .map_err(|_| "no such message in time")?
    }

    pub async fn event(&mut self, pred: impl Fn(&Kind) -> bool) -> Result<Kind, Box<dyn Error>> {
        let is = |m: &AgentMessage| match &m.body {
            Some(Body::Event(e)) => e.kind.as_ref().is_some_and(&pred),
            _ => false,
        };
        match self.message(is).await?.body {
            Some(Body::Event(e)) => e.kind.ok_or_else(|| "event without kind".into()),
            _ => Err("not an event".into()),
        }
    }

    pub async fn started(
        &mut self,
        job: &str,
        attempt: u64,
    ) -> Result<WorkerStarted, Box<dyn Error>> {
        match self
            .event(
                |k| matches!(k, Kind::WorkerStarted(s) if s.job_id == job && s.attempt == attempt),
            )
            .await?
        {
            Kind::WorkerStarted(s) => Ok(s),
            _ => Err("not WorkerStarted".into()),
        }
    }

    pub async fn exited(
        &mut self,
        job: &str,
        attempt: u64,
    ) -> Result<WorkerExited, Box<dyn Error>> {
        match self
            .event(
                |k| matches!(k, Kind::WorkerExited(s) if s.job_id == job && s.attempt == attempt),
            )
            .await?
        {
            Kind::WorkerExited(s) => Ok(s),
            _ => Err("not WorkerExited".into()),
        }
    }

    pub async fn heartbeat(
        &mut self,
        pred: impl Fn(&Heartbeat) -> bool,
    ) -> Result<Heartbeat, Box<dyn Error>> {
        let is = |m: &AgentMessage| matches!(&m.body, Some(Body::Heartbeat(hb)) if pred(hb));
        match self.message(is).await?.body {
            Some(Body::Heartbeat(hb)) => Ok(hb),
            _ => Err("not a heartbeat".into()),
        }
    }

    pub async fn command(&mut self, kind: CommandKind) -> TestResult {
        let tx = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or("no session")?;
        let id = self.next_command;
        self.next_command += 1;
        let body = Reply::Command(Command {
            id,
            kind: Some(kind),
        });
        tx.send(Ok(CoordinatorMessage {
            body: Some(body),
            term: 0,
        }))
        .await
        .map_err(|_| "session closed")?;
        Ok(())
    }

    pub async fn start_worker(&mut self, start: StartWorker) -> TestResult {
        self.command(CommandKind::StartWorker(start)).await
    }

    pub async fn stop_workers(&mut self, job: &str, attempt: u64, reason: &str) -> TestResult {
        self.command(CommandKind::StopWorkers(StopWorkers {
            job_id: job.into(),
            attempt,
            reason: reason.into(),
            grace_ms: 2_000,
        }))
        .await
    }

    pub async fn stop(self) -> TestResult {
        self.agent.stop(WAIT).await
    }
}

pub fn sh(job: &str, attempt: u64, workdir: &Path, script: &str) -> StartWorker {
    StartWorker {
        job_id: job.into(),
        attempt,
        node_rank: 0,
        nnodes: 1,
        command: vec!["sh".into(), "-c".into(), script.into()],
        workdir: workdir.display().to_string(),
        env: [("VIGIL_JOB_ID".to_owned(), job.to_owned())].into(),
        stop_grace_ms: 2_000,
        ..StartWorker::default()
    }
}

pub const TRAINER: &str = "echo $VIGIL_JOB_ID; echo 5 > $VIGIL_PROGRESS_FILE; sleep 30";

/// The worker's process group: led by its shim's guard, not by the worker itself.
pub fn pgid(started: &WorkerStarted) -> i32 {
    stat_field(started.pid, 2).unwrap_or(i32::MAX)
}

/// Field `n` (0: state) after the command name of `/proc/<pid>/stat`.
pub fn stat_field(pid: u32, n: usize) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(n)?.parse().ok()
}

/// The shim of the worker of `job`, as `workers.json` records it.
pub fn shim_pid(state: &Path, job: &str) -> Result<u32, Box<dyn Error>> {
    let text = std::fs::read_to_string(state.join("workers.json"))?;
    let file: serde_json::Value = serde_json::from_str(&text)?;
    file["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["job_id"] == job))
        .and_then(|w| w["shim_pid"].as_u64())
        .and_then(|p| u32::try_from(p).ok())
        .ok_or_else(|| format!("no shim recorded for {job}: {text}").into())
}

/// Waits (generously) until `pred` holds.
pub async fn until(what: &str, mut pred: impl FnMut() -> bool) -> TestResult {
    for _ in 0..600 {
        if pred() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("timed out waiting until {what}").into())
}
