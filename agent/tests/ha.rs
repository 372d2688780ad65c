//! The agent against a group of fake coordinators (highly available coordinators): it
//! finds the leader a standby names, abandons a deposed leader (lower term), ignores a
//! command carried at a stale term, and leaves a leader that fell silent.

mod common;

use common::{RunningAgent, TestResult, current_user};

use std::collections::VecDeque;
use std::error::Error;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use vigil_agent::AgentConfig;
use vigil_agent::config::{Coordinators, GpuBackendKind, ReconnectConfig, WorkersSection};
use vigil_proto::v1::agent_message::Body;
use vigil_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use vigil_proto::v1::command::Kind as CommandKind;
use vigil_proto::v1::coordinator_message::Body as Reply;
use vigil_proto::v1::{
    Ack, AgentMessage, Command, CoordinatorMessage, Register, Registered, StartWorker,
};

/// Generous: these run on a loaded two-core machine.
const WAIT: Duration = Duration::from_secs(20);

/// How a fake coordinator answers one session.
#[derive(Clone)]
enum Answer {
    /// FAILED_PRECONDITION, naming `leader` in `vigil-leader`.
    Standby { leader: Option<String> },
    /// Registered at `term`; `commands` (each with its own term) right after it; then an
    /// ack at `term` for every agent message when `ack`, or silence.
    Lead {
        term: u64,
        lease_ms: u64,
        ack: bool,
        commands: Vec<(u64, CommandKind)>,
        /// End the stream after this many agent messages past Register.
        close_after: Option<usize>,
    },
}

fn lead(term: u64) -> Answer {
    Answer::Lead {
        term,
        lease_ms: 5_000,
        ack: true,
        commands: Vec::new(),
        close_after: None,
    }
}

/// What the test sees: which fake, its session number, the agent's message.
type Seen = (&'static str, u64, AgentMessage);

struct Fake {
    name: &'static str,
    /// Answers for the next sessions, in order; the last one repeats.
    answers: Mutex<VecDeque<Answer>>,
    seen: mpsc::UnboundedSender<Seen>,
    sessions: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl AgentService for Fake {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let session = self.sessions.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = {
            let mut answers = self.answers.lock().unwrap_or_else(PoisonError::into_inner);
            match answers.len() {
                0 => lead(0),
                1 => answers.front().cloned().unwrap_or_else(|| lead(0)),
                _ => answers.pop_front().unwrap_or_else(|| lead(0)),
            }
        };
        let (term, lease_ms, ack, commands, close_after) = match answer {
            Answer::Lead {
                term,
                lease_ms,
                ack,
                commands,
                close_after,
            } => (term, lease_ms, ack, commands, close_after),
            Answer::Standby { leader } => return Err(standby(self.name, leader)),
        };
        let mut inbound = request.into_inner();
        let (seen, name) = (self.seen.clone(), self.name);
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut out = Some(tx);
            let mut after_register = 0;
            while let Ok(Some(msg)) = inbound.message().await {
                let seq = msg.seq;
                let registering = matches!(msg.body, Some(Body::Register(_)));
                let _ = seen.send((name, session, msg));
                let Some(tx) = &out else { continue };
                let mut replies = Vec::new();
                if registering {
                    replies.push((
                        term,
                        Reply::Registered(Registered {
                            heartbeat_interval_ms: 50,
                            lease_ms,
                            coordinator_version: env!("CARGO_PKG_VERSION").into(),
                            session_id: session,
                            coordinator_name: name.into(),
                            ..Default::default()
                        }),
                    ));
                    for (id, (term, kind)) in commands.iter().enumerate() {
                        let command = Command {
                            id: id as u64 + 1,
                            kind: Some(kind.clone()),
                        };
                        replies.push((*term, Reply::Command(command)));
                    }
                } else {
                    after_register += 1;
                    if ack {
                        replies.push((
                            term,
                            Reply::Ack(Ack {
                                seq,
                                ..Default::default()
                            }),
                        ));
                    }
                }
                for (term, body) in replies {
                    let _ = tx
                        .send(Ok(CoordinatorMessage {
                            body: Some(body),
                            term,
                        }))
                        .await;
                }
                if close_after == Some(after_register) {
                    out = None;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A standby's refusal: FAILED_PRECONDITION, the leader in `vigil-leader`.
fn standby(name: &str, leader: Option<String>) -> Status {
    let mut status = Status::failed_precondition(format!(
        "{name} is a standby; the leader is {}",
        leader.as_deref().unwrap_or("unknown")
    ));
    if let Some(value) = leader.and_then(|l| l.parse().ok()) {
        status
            .metadata_mut()
            .insert(vigil_proto::LEADER_METADATA, value);
    }
    status
}

/// Listeners bound first, so a standby can name another fake's URL.
struct Bound {
    listener: TcpListener,
    url: String,
}

async fn bind() -> Result<Bound, Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    Ok(Bound { listener, url })
}

struct Harness {
    seen: mpsc::UnboundedReceiver<Seen>,
    sessions: Vec<(&'static str, Arc<AtomicU64>)>,
    agent: RunningAgent,
}

impl Harness {
    /// Serves each fake on its listener; the agent's list is the fakes in this order.
    async fn start(
        fakes: Vec<(&'static str, Bound, Vec<Answer>)>,
        state_dir: &Path,
    ) -> Result<Self, Box<dyn Error>> {
        Self::start_with_outsiders(fakes, Vec::new(), state_dir).await
    }

    /// [`Self::start`], also serving `outsiders`: coordinators not in the agent's list.
    async fn start_with_outsiders(
        fakes: Vec<(&'static str, Bound, Vec<Answer>)>,
        outsiders: Vec<(&'static str, Bound, Vec<Answer>)>,
        state_dir: &Path,
    ) -> Result<Self, Box<dyn Error>> {
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let mut urls = Vec::new();
        let mut sessions = Vec::new();
        let listed = fakes.len();
        for (i, (name, bound, answers)) in fakes.into_iter().chain(outsiders).enumerate() {
            let counter = Arc::new(AtomicU64::new(0));
            sessions.push((name, Arc::clone(&counter)));
            if i < listed {
                urls.push(bound.url);
            }
            let fake = Fake {
                name,
                answers: Mutex::new(answers.into()),
                seen: seen_tx.clone(),
                sessions: counter,
            };
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(AgentServiceServer::new(fake))
                    .serve_with_incoming(TcpListenerStream::new(bound.listener)),
            );
        }
        let config = AgentConfig {
            shim_program: Some(env!("CARGO_BIN_EXE_vigil-agent").into()),
            coordinator: Coordinators::from(urls),
            insecure: true,
            node_name: "ha-node".into(),
            gpu_backend: GpuBackendKind::Sim,
            sim_gpus: 1,
            state_dir: state_dir.to_owned(),
            reconnect: ReconnectConfig {
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(50),
            },
            workers: WorkersSection {
                run_as: Some(current_user()?),
                allowed_roots: vec![state_dir.parent().ok_or("state dir parent")?.to_owned()],
                ..WorkersSection::default()
            },
            ..AgentConfig::default()
        };
        let agent = RunningAgent::start(config).await?;
        Ok(Self {
            seen,
            sessions,
            agent,
        })
    }

    /// Skips messages until one satisfies `pred`; every message skipped goes to `skipped`.
    async fn wait_for(
        &mut self,
        skipped: &mut Vec<Seen>,
        pred: impl Fn(&Seen) -> bool,
    ) -> Result<Seen, Box<dyn Error>> {
        let wait = async {
            while let Some(seen) = self.seen.recv().await {
                if pred(&seen) {
                    return Ok(seen);
                }
                skipped.push(seen);
            }
            Err::<_, Box<dyn Error>>("fakes stopped".into())
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .map_err(|_| "no such message in time")?
    }

    fn sessions(&self, fake: &str) -> u64 {
        self.sessions
            .iter()
            .find(|(name, _)| *name == fake)
            .map_or(0, |(_, n)| n.load(Ordering::SeqCst))
    }

    async fn metrics(&self) -> Result<String, Box<dyn Error>> {
        self.agent.metrics().await
    }

    /// The value of a metric line `name value`.
    async fn metric(&self, name: &str) -> Result<u64, Box<dyn Error>> {
        let text = self.metrics().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .ok_or_else(|| format!("{name} missing in\n{text}").into())
    }

    async fn stop(self) -> TestResult {
        self.agent.stop(WAIT).await
    }
}

fn register(seen: &Seen) -> Option<&Register> {
    match &seen.2.body {
        Some(Body::Register(r)) => Some(r),
        _ => None,
    }
}

fn is_register_at(fake: &'static str) -> impl Fn(&Seen) -> bool {
    move |s| s.0 == fake && register(s).is_some()
}

#[tokio::test]
async fn a_standby_sends_the_agent_to_the_leader_it_names() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, c, b) = (bind().await?, bind().await?, bind().await?);
    let leader = b.url.clone();
    let standby = Answer::Standby {
        leader: Some(leader),
    };
    // The list is [a, c, b]: the agent must skip c, going straight to the leader a names.
    let mut h = Harness::start(
        vec![
            ("a", a, vec![standby]),
            ("c", c, vec![lead(7)]),
            ("b", b, vec![lead(7)]),
        ],
        &tmp.path().join("state"),
    )
    .await?;
    let mut skipped = Vec::new();
    h.wait_for(&mut skipped, is_register_at("b")).await?;
    h.wait_for(&mut skipped, |s| s.0 == "b" && register(s).is_none())
        .await?;
    assert_eq!(h.sessions("a"), 1, "a was asked first");
    assert_eq!(h.sessions("c"), 0, "c was never dialed");
    assert_eq!(h.metric("vigil_agent_coordinator_term").await?, 7);
    assert_eq!(h.metric("vigil_agent_connected").await?, 1);
    assert_eq!(
        h.metric("vigil_agent_leader_changes_total").await?,
        0,
        "the first leader this agent sees is no change"
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("state/coordinator-term"))?,
        "7\n"
    );
    h.stop().await
}

#[tokio::test]
async fn a_leader_outside_the_list_is_never_dialed() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, b) = (bind().await?, bind().await?);
    let stranger = bind().await?;
    let standby = Answer::Standby {
        leader: Some(stranger.url.clone()),
    };
    let mut h = Harness::start_with_outsiders(
        vec![("a", a, vec![standby]), ("b", b, vec![lead(2)])],
        vec![("stranger", stranger, vec![lead(2)])],
        &tmp.path().join("state"),
    )
    .await?;
    let mut skipped = Vec::new();
    h.wait_for(&mut skipped, is_register_at("b")).await?;
    h.wait_for(&mut skipped, |s| s.0 == "b" && register(s).is_none())
        .await?;
    assert_eq!(h.sessions("stranger"), 0, "an unlisted leader was dialed");
    h.stop().await
}

#[tokio::test]
async fn a_deposed_leader_at_a_lower_term_is_abandoned() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, b) = (bind().await?, bind().await?);
    let first = Answer::Lead {
        term: 5,
        lease_ms: 5_000,
        ack: true,
        commands: Vec::new(),
        close_after: Some(2),
    };
    let mut h = Harness::start(
        vec![("a", a, vec![first, lead(5)]), ("b", b, vec![lead(3)])],
        &tmp.path().join("state"),
    )
    .await?;
    let mut skipped = Vec::new();
    let (_, session, _) = h.wait_for(&mut skipped, is_register_at("a")).await?;
    assert_eq!(session, 1);
    // a closes its first session; b answers at term 3 and is left at once.
    h.wait_for(&mut skipped, is_register_at("b")).await?;
    let (_, again, _) = h.wait_for(&mut skipped, is_register_at("a")).await?;
    assert_eq!(again, 2, "back to the leader at term 5");
    h.wait_for(&mut skipped, |s| s.0 == "a" && register(s).is_none())
        .await?;
    assert!(
        skipped.iter().all(|s| s.0 != "b" || register(s).is_some()),
        "nothing but Register went to the deposed leader"
    );
    assert!(h.metric("vigil_agent_stale_term_messages_total").await? >= 1);
    assert_eq!(h.metric("vigil_agent_coordinator_term").await?, 5);
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("state/coordinator-term"))?,
        "5\n"
    );
    h.stop().await
}

#[tokio::test]
async fn a_term_file_from_an_earlier_run_fences_a_lower_leader() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state)?;
    std::fs::write(state.join("coordinator-term"), "8\n")?;
    let (a, b) = (bind().await?, bind().await?);
    let mut h = Harness::start(
        vec![("a", a, vec![lead(6)]), ("b", b, vec![lead(9)])],
        &state,
    )
    .await?;
    let mut skipped = Vec::new();
    h.wait_for(&mut skipped, is_register_at("b")).await?;
    h.wait_for(&mut skipped, |s| s.0 == "b" && register(s).is_none())
        .await?;
    assert!(skipped.iter().all(|s| s.0 != "a" || register(s).is_some()));
    assert_eq!(h.metric("vigil_agent_leader_changes_total").await?, 1);
    assert_eq!(h.metric("vigil_agent_coordinator_term").await?, 9);
    h.stop().await
}

fn sh(job: &str, workdir: &Path) -> CommandKind {
    CommandKind::StartWorker(StartWorker {
        job_id: job.into(),
        attempt: 1,
        node_rank: 0,
        nnodes: 1,
        command: vec!["sh".into(), "-c".into(), "sleep 30".into()],
        workdir: workdir.display().to_string(),
        stop_grace_ms: 2_000,
        ..StartWorker::default()
    })
}

fn lists_job(seen: &Seen, job: &str) -> bool {
    register(seen).is_some_and(|r| r.workers.iter().any(|w| w.job_id == job))
}

#[tokio::test]
async fn a_command_at_a_stale_term_is_not_run_and_renews_nothing() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let a = bind().await?;
    // Session 1: the leader at term 5 starts job-ok, then a deposed leader's command
    // (term 4) arrives on the same stream. Later sessions: registered at term 3 only.
    let first = Answer::Lead {
        term: 5,
        lease_ms: 1_500,
        ack: true,
        commands: vec![
            (5, sh("job-ok", tmp.path())),
            (4, sh("job-stale", tmp.path())),
        ],
        close_after: None,
    };
    let deposed = Answer::Lead {
        term: 3,
        lease_ms: 1_500,
        ack: true,
        commands: Vec::new(),
        close_after: None,
    };
    let mut h = Harness::start(
        vec![("a", a, vec![first, deposed])],
        &tmp.path().join("state"),
    )
    .await?;
    let mut skipped = Vec::new();
    // job-ok runs: a later Register (at the deposed term) lists it.
    let (_, listed_in, _) = h.wait_for(&mut skipped, |s| lists_job(s, "job-ok")).await?;
    assert!(listed_in >= 2);
    // Nothing but stale-term messages since: its lease (1.5 s) runs out and it is stopped.
    h.wait_for(&mut skipped, |s| {
        s.2.seq == 1 && register(s).is_some_and(|r| r.workers.is_empty()) && s.1 > listed_in
    })
    .await?;
    assert!(
        skipped.iter().all(|s| !lists_job(s, "job-stale")),
        "the stale command was run"
    );
    assert!(
        skipped.iter().all(|s| s.1 == 1 || register(s).is_some()),
        "only Register goes to a deposed leader"
    );
    assert!(h.metric("vigil_agent_stale_term_messages_total").await? >= 2);
    assert_eq!(h.metric("vigil_agent_connected").await?, 0);
    h.stop().await
}

#[tokio::test]
async fn a_silent_leader_is_left_for_another_within_the_lease() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let (a, b) = (bind().await?, bind().await?);
    const LEASE_MS: u64 = 6_000;
    let silent = Answer::Lead {
        term: 5,
        lease_ms: LEASE_MS,
        ack: false,
        commands: Vec::new(),
        close_after: None,
    };
    let mut h = Harness::start(
        vec![("a", a, vec![silent]), ("b", b, vec![lead(6)])],
        &tmp.path().join("state"),
    )
    .await?;
    let mut skipped = Vec::new();
    h.wait_for(&mut skipped, is_register_at("a")).await?;
    let registered_at_a = Instant::now();
    h.wait_for(&mut skipped, |s| s.0 == "a" && register(s).is_none())
        .await?;
    h.wait_for(&mut skipped, is_register_at("b")).await?;
    let switched_after = registered_at_a.elapsed();
    assert!(
        switched_after < Duration::from_millis(LEASE_MS),
        "switched after {switched_after:?}, not within the lease"
    );
    assert!(
        switched_after >= Duration::from_millis(LEASE_MS / 2 - 1_000),
        "left a after {switched_after:?}, before half the lease of silence"
    );
    h.wait_for(&mut skipped, |s| s.0 == "b" && register(s).is_none())
        .await?;
    assert_eq!(h.metric("vigil_agent_leader_changes_total").await?, 1);
    assert_eq!(h.metric("vigil_agent_coordinator_term").await?, 6);
    h.stop().await
}
