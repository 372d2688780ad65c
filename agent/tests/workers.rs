//! Job workers against a fake coordinator that sends StartWorker/StopWorkers:
//! real `sh` processes, their progress in heartbeats, stops, fencing, the lease, agent restarts.

mod common;

use common::{RunningAgent, TestResult, current_user, root_or_skip, skip_root_test};

use std::error::Error;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};
use vigil_agent::AgentConfig;
use vigil_agent::config::{GpuBackendKind, ReconnectConfig, WorkersSection};
use vigil_agent::workers::{ALREADY_GONE_REASON, ORPHAN_REASON, group_alive};
use vigil_proto::v1::agent_event::Kind;
use vigil_proto::v1::agent_message::Body;
use vigil_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use vigil_proto::v1::command::Kind as CommandKind;
use vigil_proto::v1::coordinator_message::Body as Reply;
use vigil_proto::v1::{
    Ack, AgentMessage, CheckpointSeen, Command, CoordinatorMessage, Heartbeat, Registered,
    StartWorker, StopWorkers, WorkerExited, WorkerStarted,
};

type Outbound = mpsc::Sender<Result<CoordinatorMessage, Status>>;

const WAIT: Duration = Duration::from_secs(15);

/// A coordinator that accepts every session and sends the test's commands on the newest one.
struct Fake {
    lease_ms: u64,
    /// Silent (no acks): the agent's lease runs out unless a command renews it.
    ack: bool,
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
                        coordinator_version: "fake".into(),
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

struct Options {
    lease_ms: u64,
    ack: bool,
    keep_workers_on_shutdown: bool,
    /// `workers.run_as`; `None`: the user running the tests.
    run_as: Option<&'static str>,
}

const NORMAL: Options = Options {
    lease_ms: 5_000,
    ack: true,
    keep_workers_on_shutdown: false,
    run_as: None,
};

struct Harness {
    seen: mpsc::UnboundedReceiver<AgentMessage>,
    current: Arc<Mutex<Option<Outbound>>>,
    next_command: u64,
    agent: RunningAgent,
}

impl Harness {
    async fn start(state_dir: &Path, options: Options) -> Result<Self, Box<dyn Error>> {
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

    async fn message(
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

    async fn event(&mut self, pred: impl Fn(&Kind) -> bool) -> Result<Kind, Box<dyn Error>> {
        let is = |m: &AgentMessage| match &m.body {
            Some(Body::Event(e)) => e.kind.as_ref().is_some_and(&pred),
            _ => false,
        };
        match self.message(is).await?.body {
            Some(Body::Event(e)) => e.kind.ok_or_else(|| "event without kind".into()),
            _ => Err("not an event".into()),
        }
    }

    async fn started(&mut self, job: &str, attempt: u64) -> Result<WorkerStarted, Box<dyn Error>> {
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

    async fn exited(&mut self, job: &str, attempt: u64) -> Result<WorkerExited, Box<dyn Error>> {
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

    async fn heartbeat(
        &mut self,
        pred: impl Fn(&Heartbeat) -> bool,
    ) -> Result<Heartbeat, Box<dyn Error>> {
        let is = |m: &AgentMessage| matches!(&m.body, Some(Body::Heartbeat(hb)) if pred(hb));
        match self.message(is).await?.body {
            Some(Body::Heartbeat(hb)) => Ok(hb),
            _ => Err("not a heartbeat".into()),
        }
    }

    async fn command(&mut self, kind: CommandKind) -> TestResult {
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

    async fn start_worker(&mut self, start: StartWorker) -> TestResult {
        self.command(CommandKind::StartWorker(start)).await
    }

    async fn stop_workers(&mut self, job: &str, attempt: u64, reason: &str) -> TestResult {
        self.command(CommandKind::StopWorkers(StopWorkers {
            job_id: job.into(),
            attempt,
            reason: reason.into(),
            grace_ms: 2_000,
        }))
        .await
    }

    async fn stop(self) -> TestResult {
        self.agent.stop(WAIT).await
    }
}

fn sh(job: &str, attempt: u64, workdir: &Path, script: &str) -> StartWorker {
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

const TRAINER: &str = "echo $VIGIL_JOB_ID; echo 5 > $VIGIL_PROGRESS_FILE; sleep 30";

/// The worker's process group: led by its shim's guard, not by the worker itself.
fn pgid(started: &WorkerStarted) -> i32 {
    stat_field(started.pid, 2).unwrap_or(i32::MAX)
}

/// Field `n` (0: state) after the command name of `/proc/<pid>/stat`.
fn stat_field(pid: u32, n: usize) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(n)?.parse().ok()
}

/// The shim of the worker of `job`, as `workers.json` records it.
fn shim_pid(state: &Path, job: &str) -> Result<u32, Box<dyn Error>> {
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
async fn until(what: &str, mut pred: impl FnMut() -> bool) -> TestResult {
    for _ in 0..600 {
        if pred() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("timed out waiting until {what}").into())
}

#[tokio::test]
async fn worker_starts_reports_progress_and_stops_with_its_whole_group() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let mut h = Harness::start(&state, NORMAL).await?;
    h.start_worker(sh("job-a", 1, tmp.path(), TRAINER)).await?;
    let started = h.started("job-a", 1).await?;
    assert!(started.pid > 0);
    let log = state.join("jobs/job-a/1/rank0.log");
    assert_eq!(PathBuf::from(&started.log_path), log);
    let hb = h
        .heartbeat(|hb| hb.workers.iter().any(|w| w.progress_step == Some(5)))
        .await?;
    let w = &hb.workers[0];
    assert_eq!(
        (w.job_id.as_str(), w.attempt, w.pid),
        ("job-a", 1, started.pid)
    );
    assert!(w.progress_at_unix_ms >= w.started_at_unix_ms);
    assert!(group_alive(pgid(&started)));

    h.stop_workers("job-a", 1, "job cancelled").await?;
    let exited = h.exited("job-a", 1).await?;
    assert!(exited.stopped);
    assert_eq!(exited.reason, "job cancelled");
    assert_eq!(exited.log_path, started.log_path);
    assert!(exited.log_tail.contains("job-a"), "{:?}", exited.log_tail);
    assert!(
        !group_alive(pgid(&started)),
        "the sleep child died with its shell"
    );
    let text = std::fs::read_to_string(&log)?;
    assert!(text.starts_with("==> vigil-agent "), "{text}");
    assert!(text.contains("VIGIL_PROGRESS_FILE"), "{text}");
    h.heartbeat(|hb| hb.workers.is_empty()).await?;

    // Asking again is answered, so the coordinator can confirm the node is clean.
    h.stop_workers("job-a", 1, "job cancelled").await?;
    let again = h.exited("job-a", 1).await?;
    assert!(again.stopped);
    assert_eq!(again.reason, ALREADY_GONE_REASON);
    h.stop().await
}

#[tokio::test]
async fn worker_exit_code_is_reported() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    h.start_worker(sh("job-b", 4, tmp.path(), "echo failing >&2; exit 3"))
        .await?;
    h.started("job-b", 4).await?;
    let exited = h.exited("job-b", 4).await?;
    assert_eq!(exited.exit_code, Some(3));
    assert_eq!(exited.signal, None);
    assert!(!exited.stopped);
    assert_eq!(exited.reason, "exited with code 3");
    assert!(
        exited.log_tail.ends_with("failing\n"),
        "{:?}",
        exited.log_tail
    );
    h.stop().await
}

#[tokio::test]
async fn bad_starts_are_reported_with_their_reason() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    let missing = tmp.path().join("no-such-dir");
    h.start_worker(sh("job-c", 1, &missing, "true")).await?;
    let exited = h.exited("job-c", 1).await?;
    assert!(!exited.stopped);
    assert!(
        exited.reason.contains(&missing.display().to_string()),
        "{}",
        exited.reason
    );
    let mut start = sh("job-c", 2, tmp.path(), "");
    start.command = vec!["/no/such/program".into()];
    h.start_worker(start).await?;
    let exited = h.exited("job-c", 2).await?;
    assert_eq!(exited.exit_code, None);
    assert!(
        exited.reason.starts_with("cannot start /no/such/program: "),
        "{}",
        exited.reason
    );
    h.stop().await
}

#[tokio::test]
async fn a_newer_attempt_starts_only_after_the_older_one_is_dead() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    h.start_worker(sh("job-d", 1, tmp.path(), TRAINER)).await?;
    let first = h.started("job-d", 1).await?;
    h.start_worker(sh("job-d", 2, tmp.path(), TRAINER)).await?;
    let is_d = |k: &Kind| match k {
        Kind::WorkerExited(e) => e.job_id == "job-d",
        Kind::WorkerStarted(s) => s.job_id == "job-d",
        _ => false,
    };
    let Kind::WorkerExited(old) = h.event(is_d).await? else {
        return Err("attempt 2 started before attempt 1 was reported dead".into());
    };
    assert_eq!(old.attempt, 1);
    assert!(old.stopped);
    assert!(
        old.reason.contains("superseded by attempt 2"),
        "{}",
        old.reason
    );
    assert!(!group_alive(pgid(&first)));
    let second = h.started("job-d", 2).await?;

    h.start_worker(sh("job-d", 1, tmp.path(), TRAINER)).await?;
    let refused = h.exited("job-d", 1).await?;
    assert!(refused.stopped);
    assert!(
        refused.reason.contains("older than attempt 2"),
        "{}",
        refused.reason
    );

    h.stop_workers("job-d", 2, "done").await?;
    h.exited("job-d", 2).await?;
    assert!(!group_alive(pgid(&second)));
    h.stop().await
}

#[tokio::test]
async fn lease_expiry_stops_workers() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let silent = Options {
        lease_ms: 600,
        ack: false,
        ..NORMAL
    };
    let mut h = Harness::start(&tmp.path().join("state"), silent).await?;
    h.start_worker(sh("job-e", 1, tmp.path(), TRAINER)).await?;
    let started = h.started("job-e", 1).await?;
    let exited = h.exited("job-e", 1).await?;
    assert!(exited.stopped);
    assert!(
        exited.reason.starts_with("lease expired"),
        "{}",
        exited.reason
    );
    assert!(!group_alive(pgid(&started)));
    h.stop().await
}

#[tokio::test]
async fn a_restarted_agent_re_adopts_the_worker_its_shim_kept_running() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let keep = Options {
        keep_workers_on_shutdown: true,
        ..NORMAL
    };
    let script = "i=0; while true; do i=$((i+1)); echo $i > $VIGIL_PROGRESS_FILE; echo step $i; sleep 0.1; done";
    let mut first = Harness::start(&state, keep).await?;
    first
        .start_worker(sh("job-f", 7, tmp.path(), script))
        .await?;
    let started = first.started("job-f", 7).await?;
    let shim = shim_pid(&state, "job-f")?;
    assert_ne!(shim, started.pid, "the worker runs under its own shim");
    first.stop().await?;
    assert!(
        group_alive(pgid(&started)),
        "kept running over the agent's exit"
    );

    let mut second = Harness::start(&state, NORMAL).await?;
    // Reported at once (registration's heartbeat), same pid, and its progress goes on.
    let hb = second
        .heartbeat(|hb| hb.workers.iter().any(|w| w.job_id == "job-f"))
        .await?;
    let step = hb.workers[0].progress_step.unwrap_or(0);
    assert_eq!((hb.workers[0].attempt, hb.workers[0].pid), (7, started.pid));
    second
        .heartbeat(|hb| hb.workers.iter().any(|w| w.progress_step > Some(step + 2)))
        .await?;
    assert_eq!(shim_pid(&state, "job-f")?, shim, "the same shim");
    let metrics = second.agent.metrics().await?;
    assert!(
        metrics.contains("vigil_agent_workers_adopted_total{outcome=\"running\"} 1"),
        "{metrics}"
    );

    second.stop_workers("job-f", 7, "job cancelled").await?;
    let exited = second.exited("job-f", 7).await?;
    assert!(exited.stopped);
    assert_eq!(exited.reason, "job cancelled");
    assert!(exited.log_tail.contains("step "), "{:?}", exited.log_tail);
    assert!(!group_alive(pgid(&started)));
    let status = std::fs::read_to_string(state.join("jobs/job-f/7/shim-status.json"))?;
    assert!(status.contains("job cancelled"), "{status}");
    second.stop().await
}

#[tokio::test]
async fn a_worker_that_ends_while_no_agent_runs_is_reported_with_its_exit_code() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let keep = Options {
        keep_workers_on_shutdown: true,
        ..NORMAL
    };
    let mut first = Harness::start(&state, keep).await?;
    first
        .start_worker(sh("job-x", 2, tmp.path(), "sleep 0.5; echo bye; exit 3"))
        .await?;
    first.started("job-x", 2).await?;
    first.stop().await?;
    let status = state.join("jobs/job-x/2/shim-status.json");
    until("the shim records the exit", || {
        std::fs::read_to_string(&status).is_ok_and(|s| s.contains("\"exit_code\": 3"))
    })
    .await?;
    let mut second = Harness::start(&state, NORMAL).await?;
    let exited = second.exited("job-x", 2).await?;
    assert!(!exited.stopped);
    assert_eq!(exited.exit_code, Some(3));
    assert_eq!(
        exited.reason,
        "while the agent was down: exited with code 3"
    );
    assert!(exited.log_tail.contains("bye"), "{:?}", exited.log_tail);
    second.stop().await
}

#[tokio::test]
async fn with_no_agent_the_shim_stops_its_worker_when_the_lease_runs_out() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let short = Options {
        lease_ms: 1_500,
        keep_workers_on_shutdown: true,
        ..NORMAL
    };
    let mut first = Harness::start(&state, short).await?;
    first
        .start_worker(sh("job-l", 1, tmp.path(), TRAINER))
        .await?;
    let started = first.started("job-l", 1).await?;
    let group = pgid(&started);
    first.stop().await?;
    assert!(group_alive(group), "alive inside the lease");
    until("the shim fences its worker", || !group_alive(group)).await?;
    let status = std::fs::read_to_string(state.join("jobs/job-l/1/shim-status.json"))?;
    assert!(
        status.contains("lease expired: no live agent renewed it"),
        "{status}"
    );

    let mut second = Harness::start(&state, NORMAL).await?;
    let exited = second.exited("job-l", 1).await?;
    assert!(exited.stopped);
    assert!(
        exited
            .reason
            .starts_with("while the agent was down: lease expired"),
        "{}",
        exited.reason
    );
    second.stop().await
}

#[tokio::test]
async fn a_killed_shim_takes_its_worker_with_it() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let mut h = Harness::start(&state, NORMAL).await?;
    h.start_worker(sh("job-k", 1, tmp.path(), TRAINER)).await?;
    let started = h.started("job-k", 1).await?;
    let group = pgid(&started);
    let shim = shim_pid(&state, "job-k")?;
    std::process::Command::new("kill")
        .args(["-KILL", &shim.to_string()])
        .status()?;
    let exited = h.exited("job-k", 1).await?;
    assert!(
        !exited.stopped,
        "a failure, not a stop the coordinator asked for"
    );
    assert!(
        exited.reason.starts_with(&format!(
            "its shim (pid {shim}) died (killed by signal 9 (SIGKILL))"
        )) && exited
            .reason
            .ends_with("the shim's guard killed the worker"),
        "{}",
        exited.reason
    );
    until("the guard kills the group", || !group_alive(group)).await?;
    h.stop().await
}

#[tokio::test]
async fn workers_of_an_agent_from_before_shims_are_stopped_as_orphans() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state)?;
    let orphan = std::process::Command::new("sleep")
        .arg("30")
        .process_group(0)
        .spawn()?;
    let pid = orphan.id();
    let start_time = stat_field(pid, 19).ok_or("no start time")?;
    std::fs::write(
        state.join("workers.json"),
        format!(
            r#"{{"workers":[{{"job_id":"job-o","attempt":1,"node_rank":0,"pid":{pid},"pgid":{pid},
                "log_path":"{}","started_at_unix_ms":1,"start_time":{start_time}}}]}}"#,
            state.join("jobs/job-o/1/rank0.log").display()
        ),
    )?;
    let mut h = Harness::start(&state, NORMAL).await?;
    let exited = h.exited("job-o", 1).await?;
    assert!(exited.stopped);
    assert_eq!(exited.reason, ORPHAN_REASON);
    let metrics = h.agent.metrics().await?;
    assert!(
        metrics.contains("vigil_agent_workers_adopted_total{outcome=\"orphan\"} 1"),
        "{metrics}"
    );
    let mut orphan = orphan;
    let _ = orphan.wait();
    assert!(!group_alive(i32::try_from(pid)?));
    h.stop().await
}

#[tokio::test]
async fn agent_shutdown_stops_its_workers() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    h.start_worker(sh("job-g", 1, tmp.path(), TRAINER)).await?;
    let started = h.started("job-g", 1).await?;
    h.stop().await?;
    assert!(!group_alive(pgid(&started)));
    Ok(())
}

#[tokio::test]
async fn rank_0_reports_each_new_complete_checkpoint() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let ckpt = tmp.path().join("ckpt");
    std::fs::create_dir_all(ckpt.join("step_9"))?;
    std::fs::write(ckpt.join("step_9/COMPLETE"), "9\n")?;
    std::fs::create_dir_all(ckpt.join("step_10"))?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    let mut start = sh("job-h", 1, tmp.path(), "sleep 30");
    start.checkpoint_dir = ckpt.display().to_string();
    start.checkpoint_layout = "marker".into();
    h.start_worker(start).await?;
    let seen = |k: &Kind| matches!(k, Kind::Checkpoint(_));
    let Kind::Checkpoint(first) = h.event(seen).await? else {
        return Err("not a checkpoint".into());
    };
    let expect = |dir: &str, step| CheckpointSeen {
        job_id: "job-h".into(),
        attempt: 1,
        path: ckpt.join(dir).display().to_string(),
        step: Some(step),
        save_ms: None,
        completed_at_unix_ms: None,
    };
    let first = CheckpointSeen {
        save_ms: None,
        completed_at_unix_ms: None,
        ..first
    };
    assert_eq!(first, expect("step_9", 9), "step_10 is not complete yet");
    std::fs::write(ckpt.join("step_10/COMPLETE"), "10\n")?;
    let Kind::Checkpoint(second) = h.event(seen).await? else {
        return Err("not a checkpoint".into());
    };
    assert!(second.save_ms.is_some(), "the save is timed: {second:?}");
    let second = CheckpointSeen {
        save_ms: None,
        completed_at_unix_ms: None,
        ..second
    };
    assert_eq!(second, expect("step_10", 10));
    h.stop().await
}

#[tokio::test]
async fn starts_outside_the_allowed_roots_or_of_a_stale_attempt_are_refused() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let mut h = Harness::start(&tmp.path().join("state"), NORMAL).await?;
    // The harness allows only the test's temp dir.
    h.start_worker(sh("job-r", 1, Path::new("/"), "true"))
        .await?;
    let exited = h.exited("job-r", 1).await?;
    assert!(
        exited.reason.starts_with("refused: workdir")
            && exited.reason.contains("workers.allowed_roots"),
        "{}",
        exited.reason
    );
    let mut escape = sh("job-r", 2, tmp.path(), "true");
    escape.node_rank = 0;
    escape.checkpoint_dir = "/etc".into();
    escape.checkpoint_layout = "marker".into();
    h.start_worker(escape).await?;
    let exited = h.exited("job-r", 2).await?;
    assert!(
        exited.reason.contains("checkpoint_dir"),
        "{}",
        exited.reason
    );

    // Attempt 3 runs and exits; the same attempt sent again is stale, as is an older one.
    h.start_worker(sh("job-r", 3, tmp.path(), "exit 0")).await?;
    assert_eq!(h.exited("job-r", 3).await?.exit_code, Some(0));
    h.start_worker(sh("job-r", 3, tmp.path(), "true")).await?;
    let exited = h.exited("job-r", 3).await?;
    assert!(exited.reason.contains("stale"), "{}", exited.reason);
    h.start_worker(sh("job-r", 1, tmp.path(), "true")).await?;
    let exited = h.exited("job-r", 1).await?;
    assert!(exited.reason.contains("stale"), "{}", exited.reason);
    // A stop of a job this node never ran stops nothing and still completes.
    h.stop_workers("never-here", 1, "test").await?;
    assert_eq!(h.exited("never-here", 1).await?.reason, ALREADY_GONE_REASON);
    h.stop().await
}

#[tokio::test]
async fn workers_run_as_the_configured_user() -> TestResult {
    const TEST: &str = "workers_run_as_the_configured_user";
    // Switching users needs root; without it the unit tests cover the refusal.
    if !root_or_skip(TEST)? {
        return Ok(());
    }
    let Some(nobody) = nix::unistd::User::from_name("nobody")? else {
        skip_root_test(TEST, "no user \"nobody\" to run workers as")?;
        return Ok(());
    };
    let tmp = tempfile::tempdir()?;
    // The worker (nobody) must be able to enter its workdir and reach its progress file.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let as_nobody = Options {
        run_as: Some("nobody"),
        ..NORMAL
    };
    let mut h = Harness::start(&tmp.path().join("state"), as_nobody).await?;
    let script = "id -u > $VIGIL_PROGRESS_FILE; id -G >> $VIGIL_PROGRESS_FILE.groups; sleep 30";
    h.start_worker(sh("job-u", 1, tmp.path(), script)).await?;
    h.started("job-u", 1).await?;
    let uid = u64::from(nobody.uid.as_raw());
    h.heartbeat(|hb| {
        hb.workers
            .iter()
            .any(|w| w.job_id == "job-u" && w.progress_step == Some(uid))
    })
    .await?;
    let groups = tmp.path().join("state/jobs/job-u/1/run/progress.groups");
    let groups = std::fs::read_to_string(groups)?;
    assert_eq!(
        groups.split_whitespace().collect::<Vec<_>>(),
        vec![nobody.gid.as_raw().to_string()],
        "only the user's own group: the agent's supplementary groups are cleared"
    );
    h.stop_workers("job-u", 1, "test over").await?;
    h.exited("job-u", 1).await?;
    h.stop().await
}

#[tokio::test]
async fn a_shim_recorded_while_starting_is_adopted_from_its_status() -> TestResult {
    use std::io::{BufRead as _, Write as _};
    use vigil_agent::shim::{Handshake, LEASE_FILE, LeaseFile, Spec, write_json};
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    let dir = state.join("jobs/job-p/1");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("rank0.log");
    std::fs::write(&log, "")?;
    write_json(
        &state.join(LEASE_FILE),
        &LeaseFile::from_now(Duration::from_secs(600), Duration::from_secs(600)),
        false,
    )?;
    // What an agent that died between starting a shim and hearing its answer leaves behind: a
    // running shim, and a record of it without a worker pid.
    let spec = Spec {
        job_id: "job-p".into(),
        attempt: 1,
        node_rank: 0,
        command: vec!["sleep".into(), "60".into()],
        workdir: tmp.path().to_owned(),
        env: Default::default(),
        identity: None,
        log: log.clone(),
        dir: dir.clone(),
        lease_file: state.join(LEASE_FILE),
        lease_stop_grace_ms: 500,
        stop_grace_ms: 1_000,
    };
    let mut shim = std::process::Command::new(env!("CARGO_BIN_EXE_vigil-agent"))
        .args(["shim", "job-p", "1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()?;
    let mut stdin = shim.stdin.take().ok_or("stdin")?;
    stdin.write_all(&serde_json::to_vec(&spec)?)?;
    drop(stdin);
    let mut line = String::new();
    std::io::BufReader::new(shim.stdout.take().ok_or("stdout")?).read_line(&mut line)?;
    let Handshake::Running(running) = serde_json::from_str(&line)? else {
        return Err(format!("not running: {line}").into());
    };
    std::fs::write(
        state.join("workers.json"),
        format!(
            r#"{{"workers":[{{"job_id":"job-p","attempt":1,"node_rank":0,"pid":0,"pgid":0,
                "log_path":"{}","started_at_unix_ms":1,"shim_pid":{},"stop_grace_ms":1000}}]}}"#,
            log.display(),
            shim.id()
        ),
    )?;
    let mut h = Harness::start(&state, NORMAL).await?;
    h.heartbeat(|hb| {
        hb.workers
            .iter()
            .any(|w| w.job_id == "job-p" && w.pid == running.worker_pid)
    })
    .await?;
    h.stop_workers("job-p", 1, "job cancelled").await?;
    let exited = h.exited("job-p", 1).await?;
    assert!(exited.stopped);
    assert_eq!(exited.reason, "job cancelled");
    let _ = shim.wait();
    assert!(!group_alive(running.pgid));
    h.stop().await
}

#[tokio::test]
async fn a_shim_that_never_answered_is_stopped_and_its_worker_reported_gone() -> TestResult {
    let tmp = tempfile::tempdir()?;
    let state = tmp.path().join("state");
    std::fs::create_dir_all(state.join("jobs/job-q/1"))?;
    // A process that stands for a shim stuck before its answer: it never writes a status.
    let mut stuck = std::process::Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()?;
    let pid = stuck.id();
    std::fs::write(
        state.join("workers.json"),
        format!(
            r#"{{"workers":[{{"job_id":"job-q","attempt":1,"node_rank":0,"pid":0,"pgid":0,
                "log_path":"{}","started_at_unix_ms":1,"shim_pid":{pid}}}]}}"#,
            state.join("jobs/job-q/1/rank0.log").display()
        ),
    )?;
    let mut h = Harness::start(&state, NORMAL).await?;
    let exited = h.exited("job-q", 1).await?;
    assert!(
        exited.stopped,
        "stopped by the agent's side: not the job's failure"
    );
    assert_eq!(
        exited.reason,
        format!(
            "the agent ended while starting it: its shim (pid {pid}) never said the worker runs; stopped it"
        )
    );
    assert!(
        stuck.wait()?.signal() == Some(9),
        "the stuck shim was killed"
    );
    h.stop().await
}
