//! The in-process cluster: the real engine, simulated agents and the memory store in one
//! paused-time runtime. Deterministic and fast (simulated seconds cost microseconds), so the
//! core loop is tested end to end without sockets, processes or real time: XID -> cordon ->
//! gang stop -> relaunch on the spare; a lost stop command; a store whose commits fail; a
//! store rolled back under a restarted coordinator, exposed by an agent's store mark.
//!
//! A `SimAgent` speaks the engine's side of `AgentService.Connect` directly (`Event`s in,
//! `CoordinatorMessage`s out) and behaves like `vigil-agent`: it starts and stops workers on
//! command (idempotently), reports them in heartbeats with a growing step, and answers a stop
//! of a worker it does not run with `WorkerExited { stopped }`. Like `vigil-agent`, it keeps
//! the highest store mark it was told and registers with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::Status;
use vigil_coordinator::config::Config;
use vigil_coordinator::engine::{Engine, EngineHandle, Event};
use vigil_coordinator::job::{Job, JobPhase};
use vigil_coordinator::metrics::Metrics;
use vigil_coordinator::node::CordonSource;
use vigil_coordinator::node::{GpuRecord, Node};
use vigil_coordinator::state::Registration;
use vigil_coordinator::store::{Memory, MemoryFaults, RecoveryReport, StoreError, StoreMark};
use vigil_core::recovery::{JOBS_HELD, RecoveryHold};
use vigil_proto::v1;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How far simulated time moves per round of the harness.
const ROUND: Duration = Duration::from_millis(50);

struct SimAgent {
    node: String,
    session: u64,
    rx: mpsc::Receiver<Result<v1::CoordinatorMessage, Status>>,
    /// Whether the coordinator answered its registration `Registered`.
    registered: bool,
    /// Why the coordinator refused its registration, if it did.
    rejected: Option<String>,
    /// The highest store mark the coordinator told it (Registered, Ack).
    mark: Option<StoreMark>,
    /// (job, attempt) -> (node rank, step).
    running: BTreeMap<(String, u64), (u32, u64)>,
    seq: u64,
    /// Stops to drop on the floor (a lost message) before obeying one.
    drop_stops: u32,
    stops_seen: u32,
    /// Starts received, and diagnostics answered (passed), in order.
    log: Vec<&'static str>,
    since_heartbeat: Duration,
}

struct Cluster {
    handle: EngineHandle,
    engine: JoinHandle<Result<(), StoreError>>,
    agents: Vec<SimAgent>,
    stop: watch::Sender<bool>,
    faults: MemoryFaults,
    memory: Memory,
    config: Config,
    metrics: Arc<Metrics>,
    elapsed: Duration,
}

/// An engine over `memory`, running: its handle, its stop switch, its task, its metrics.
type Running = (
    EngineHandle,
    watch::Sender<bool>,
    JoinHandle<Result<(), StoreError>>,
    Arc<Metrics>,
);

/// As `vigil-coordinator` starts one: the recovery hold committed before anything is served.
async fn spawn_engine(
    memory: &Memory,
    config: &Config,
) -> Result<Running, Box<dyn std::error::Error>> {
    let metrics = Arc::new(Metrics::new(1));
    let (mut engine, handle) = Engine::new(memory.store(), config, metrics.clone())?;
    engine.commit_recovery_hold().await?;
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(engine.run(stop_rx));
    Ok((handle, stop, task, metrics))
}

impl Cluster {
    async fn start(nodes: usize) -> Result<Self, Box<dyn std::error::Error>> {
        Self::start_with(Config::default(), nodes).await
    }

    async fn start_with(config: Config, nodes: usize) -> Result<Self, Box<dyn std::error::Error>> {
        Self::start_on(Memory::new(), config, nodes).await
    }

    /// A coordinator on `memory` (what an earlier one committed, if anything), and the agents
    /// of nodes `n0`.. `n{nodes - 1}` registered.
    async fn start_on(
        memory: Memory,
        config: Config,
        nodes: usize,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let faults = memory.faults();
        let (handle, stop, engine, metrics) = spawn_engine(&memory, &config).await?;
        let mut cluster = Self {
            handle,
            engine,
            agents: Vec::new(),
            stop,
            faults,
            memory,
            config,
            metrics,
            elapsed: Duration::ZERO,
        };
        let names: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
        for (i, name) in names.iter().enumerate() {
            cluster.register(name, i as u64 + 1).await?;
        }
        cluster
            .until("every node registered", |c| {
                let snap = c.handle.snapshot();
                names.iter().all(|name| {
                    snap.nodes
                        .iter()
                        .any(|n| n.record.name == *name && n.session.is_some())
                })
            })
            .await?;
        Ok(cluster)
    }

    /// Stop the engine and wait until it has flushed: a "restart" may then start on the
    /// same memory.
    async fn shutdown(mut self) -> TestResult {
        self.stop.send(true).ok();
        (&mut self.engine).await??;
        Ok(())
    }

    async fn register(
        &mut self,
        node: &str,
        session: u64,
    ) -> Result<(), Box<dyn std::error::Error>> {
        self.register_running(node, session, BTreeMap::new()).await
    }

    /// `node`'s agent reconnects: a new session, reporting the workers it runs and the
    /// highest store mark it was told.
    async fn reconnect(&mut self, node: &str, session: u64) -> TestResult {
        let i = self
            .agents
            .iter()
            .position(|a| a.node == node)
            .ok_or("no such agent")?;
        let old = self.agents.remove(i);
        self.register_told(node, session, old.running, old.mark)
            .await?;
        self.agent(node).seq = old.seq;
        Ok(())
    }

    /// The coordinator stops (flushing, as it does) and starts again on `memory`: the same
    /// maps, or others (a restored store). Agents reconnect when the test says so.
    async fn restart_on(&mut self, memory: Memory) -> TestResult {
        self.stop.send(true).ok();
        (&mut self.engine).await??;
        let (handle, stop, engine, metrics) = spawn_engine(&memory, &self.config).await?;
        (self.handle, self.stop, self.engine, self.metrics) = (handle, stop, engine, metrics);
        self.faults = memory.faults();
        self.memory = memory;
        Ok(())
    }

    /// Lets the engine run (time passes, no agent speaks) until it ends by itself; its result.
    async fn engine_end(&mut self) -> Result<Result<(), StoreError>, Box<dyn std::error::Error>> {
        for _ in 0..1200 {
            if self.engine.is_finished() {
                return Ok((&mut self.engine).await?);
            }
            tokio::time::advance(ROUND).await;
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
        }
        Err("the engine still runs after a simulated minute".into())
    }

    async fn register_running(
        &mut self,
        node: &str,
        session: u64,
        running: BTreeMap<(String, u64), (u32, u64)>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        self.register_told(node, session, running, None).await
    }

    async fn register_told(
        &mut self,
        node: &str,
        session: u64,
        running: BTreeMap<(String, u64), (u32, u64)>,
        told: Option<StoreMark>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (tx, rx) = mpsc::channel(1024);
        let reg = Registration {
            session,
            node: node.to_owned(),
            hostname: node.to_owned(),
            address: "127.0.0.1".into(),
            agent_version: "test".into(),
            simulated: true,
            gpus: (0..8)
                .map(|i| GpuRecord {
                    index: i,
                    uuid: format!("GPU-{node}-{i}"),
                    name: "simulated".into(),
                    pci_bus_id: String::new(),
                    memory_total_bytes: 80 << 30,
                    serial: format!("{node}-{i}"),
                })
                .collect(),
            workers: running
                .iter()
                .map(|((job, attempt), (rank, step))| v1::WorkerInfo {
                    job_id: job.clone(),
                    attempt: *attempt,
                    node_rank: *rank,
                    pid: 1000 + *rank,
                    progress_step: Some(*step),
                    ..Default::default()
                })
                .collect(),
        };
        let mark = told.clone();
        self.handle.send(Event::Register { reg, told, tx }).await?;
        self.agents.push(SimAgent {
            node: node.to_owned(),
            session,
            rx,
            registered: false,
            rejected: None,
            mark,
            running,
            seq: 0,
            drop_stops: 0,
            stops_seen: 0,
            log: Vec::new(),
            since_heartbeat: Duration::ZERO,
        });
        Ok(())
    }

    fn agent(&mut self, node: &str) -> &mut SimAgent {
        self.agents
            .iter_mut()
            .find(|a| a.node == node)
            .expect("a simulated agent of that name")
    }

    /// One round: time moves on, every agent reads its commands, answers them, heartbeats.
    async fn round(&mut self) -> TestResult {
        tokio::time::advance(ROUND).await;
        self.elapsed += ROUND;
        for i in 0..self.agents.len() {
            let events = self.agents[i].read_commands();
            let agent = &mut self.agents[i];
            agent.since_heartbeat += ROUND;
            let mut out: Vec<Event> = events;
            if agent.since_heartbeat >= Duration::from_secs(1) {
                agent.since_heartbeat = Duration::ZERO;
                out.push(agent.heartbeat());
            }
            for event in out {
                self.handle.send(event).await?;
            }
        }
        // Let the engine take its turn at this instant.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Run rounds until `cond` holds; fails after a simulated minute.
    async fn until(&mut self, what: &str, cond: impl Fn(&Self) -> bool) -> TestResult {
        let limit = self.elapsed + Duration::from_secs(60);
        while self.elapsed < limit {
            if cond(self) {
                return Ok(());
            }
            self.round().await?;
        }
        Err(format!(
            "{what}: not within a simulated minute; nodes {:?}; jobs {:?}",
            self.nodes(),
            self.jobs()
        )
        .into())
    }

    fn nodes(&self) -> Vec<(String, String)> {
        self.handle
            .snapshot()
            .nodes
            .iter()
            .map(|n| (n.record.name.clone(), n.display_state().to_string()))
            .collect()
    }

    fn jobs(&self) -> Vec<(String, JobPhase, u64, Vec<String>)> {
        self.handle
            .snapshot()
            .jobs
            .iter()
            .map(|j| (j.id.clone(), j.phase, j.attempt, j.placement.clone()))
            .collect()
    }

    fn job(&self, id: &str) -> Option<Job> {
        self.handle
            .snapshot()
            .jobs
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }

    fn node(&self, name: &str) -> Option<Node> {
        self.handle
            .snapshot()
            .nodes
            .iter()
            .find(|n| n.record.name == name)
            .cloned()
    }

    async fn submit(
        &mut self,
        nodes: u32,
        spares: u32,
    ) -> Result<String, Box<dyn std::error::Error>> {
        let spec = format!(
            r#"name = "train"
nodes = {nodes}
gpus_per_node = 8
command = ["python3", "train.py"]
workdir = "/w"
spare_nodes = {spares}
[checkpoint]
dir = "/c"
[restart]
backoff = "1s"
"#
        );
        let job = self
            .handle
            .ask(|reply| Event::SubmitJob {
                spec_toml: spec,
                source: "test.toml".into(),
                actor: "test".into(),
                reply,
            })
            .await?;
        Ok(job.id)
    }

    /// An XID from `node` on GPU `gpu`.
    async fn xid(&mut self, node: &str, gpu: u32, xid: u32) -> TestResult {
        let agent = self.agent(node);
        agent.seq += 1;
        let event = Event::AgentEvent {
            node: agent.node.clone(),
            session: agent.session,
            seq: agent.seq,
            event: v1::AgentEvent {
                at_unix_ms: 0,
                kind: Some(v1::agent_event::Kind::Xid(v1::XidError {
                    gpu_index: gpu,
                    xid,
                    gpu_uuid: format!("GPU-{node}-{gpu}"),
                })),
            },
        };
        self.handle.send(event).await?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.send(true).ok();
    }
}

impl SimAgent {
    /// Obey every command queued for this agent; the events that answer them.
    fn read_commands(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Ok(msg) = self.rx.try_recv() {
            let Ok(msg) = msg else { continue };
            let cmd = match msg.body {
                Some(v1::coordinator_message::Body::Command(cmd)) => cmd,
                Some(v1::coordinator_message::Body::Registered(r)) => {
                    self.registered = true;
                    self.told(r.store_id, r.store_seq);
                    continue;
                }
                Some(v1::coordinator_message::Body::Ack(a)) => {
                    self.told(a.store_id, a.store_seq);
                    continue;
                }
                Some(v1::coordinator_message::Body::Rejected(r)) => {
                    self.rejected = Some(r.reason);
                    continue;
                }
                None => continue,
            };
            match cmd.kind {
                Some(v1::command::Kind::RunDiagnostics(_)) => {
                    self.log.push("diagnostics passed");
                    out.push(self.event(v1::agent_event::Kind::Diagnostics(
                        v1::DiagnosticsResult {
                            command_id: cmd.id,
                            passed: true,
                            summary: "all checks passed".into(),
                            output: String::new(),
                            duration_ms: 10,
                            command: "simulated".into(),
                        },
                    )));
                }
                Some(v1::command::Kind::StartWorker(s)) => {
                    self.log.push("start");
                    let key = (s.job_id.clone(), s.attempt);
                    self.running.entry(key).or_insert((s.node_rank, 0));
                    out.push(
                        self.event(v1::agent_event::Kind::WorkerStarted(v1::WorkerStarted {
                            job_id: s.job_id,
                            attempt: s.attempt,
                            pid: 1000 + s.node_rank,
                            log_path: String::new(),
                        })),
                    );
                }
                Some(v1::command::Kind::StopWorkers(s)) => {
                    self.stops_seen += 1;
                    if self.drop_stops > 0 {
                        self.drop_stops -= 1;
                        continue;
                    }
                    self.running.remove(&(s.job_id.clone(), s.attempt));
                    out.push(
                        self.event(v1::agent_event::Kind::WorkerExited(v1::WorkerExited {
                            job_id: s.job_id,
                            attempt: s.attempt,
                            stopped: true,
                            reason: s.reason,
                            ..Default::default()
                        })),
                    );
                }
                _ => {}
            }
        }
        out
    }

    /// Keeps a mark the coordinator told, like `vigil-agent`: a new store id replaces the mark,
    /// the same store only rises.
    fn told(&mut self, store_id: String, seq: u64) {
        if store_id.is_empty() {
            return;
        }
        let keep = match &self.mark {
            Some(m) => m.store_id != store_id || seq > m.seq,
            None => true,
        };
        if keep {
            self.mark = Some(StoreMark { store_id, seq });
        }
    }

    fn event(&mut self, kind: v1::agent_event::Kind) -> Event {
        self.seq += 1;
        Event::AgentEvent {
            node: self.node.clone(),
            session: self.session,
            seq: self.seq,
            event: v1::AgentEvent {
                at_unix_ms: 0,
                kind: Some(kind),
            },
        }
    }

    /// A heartbeat reporting every running worker one step further.
    fn heartbeat(&mut self) -> Event {
        self.seq += 1;
        let workers = self
            .running
            .iter_mut()
            .map(|((job, attempt), (rank, step))| {
                *step += 1;
                v1::WorkerInfo {
                    job_id: job.clone(),
                    attempt: *attempt,
                    node_rank: *rank,
                    pid: 1000 + *rank,
                    progress_step: Some(*step),
                    ..Default::default()
                }
            })
            .collect();
        Event::Heartbeat {
            node: self.node.clone(),
            session: self.session,
            seq: self.seq,
            heartbeat: v1::Heartbeat {
                sent_at_unix_ms: 0,
                gpus: Vec::new(),
                workers,
            },
        }
    }
}

fn running_attempt(c: &Cluster, id: &str, attempt: u64) -> bool {
    c.job(id).is_some_and(|j| {
        j.phase == JobPhase::Running
            && j.attempt == attempt
            && j.workers.values().all(|w| w.progress_step.is_some())
    })
}

#[tokio::test(start_paused = true)]
async fn an_xid_cordons_the_node_stops_the_gang_and_relaunches_on_the_spare() -> TestResult {
    let mut c = Cluster::start(3).await?;
    let id = c.submit(2, 1).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    let job = c.job(&id).ok_or("job")?;
    let (bad, good) = (job.placement[0].clone(), job.placement[1].clone());
    let spare = job.spares.first().cloned().ok_or("a spare node")?;
    let injected = c.elapsed;
    c.xid(&bad, 3, 79).await?;
    c.until("the node cordoned", |c| {
        c.node(&bad).is_some_and(|n| n.cordoned())
    })
    .await?;
    let cordoned_after = c.elapsed - injected;
    let reason = c
        .node(&bad)
        .and_then(|n| n.record.cordon.clone())
        .ok_or("cordon")?;
    assert!(reason.reason.contains("XID 79"), "{}", reason.reason);
    c.until("attempt 2 running", |c| running_attempt(c, &id, 2))
        .await?;
    let job = c.job(&id).ok_or("job")?;
    assert!(!job.placement.contains(&bad), "{:?}", job.placement);
    assert!(
        job.placement.contains(&spare) && job.placement.contains(&good),
        "{:?}",
        job.placement
    );
    // Fencing: the gang's every worker of attempt 1 was stopped before attempt 2 started.
    for a in &c.agents {
        assert!(
            !a.running.contains_key(&(id.clone(), 1)),
            "{} still runs attempt 1",
            a.node
        );
    }
    // Simulated time: the cordon comes with the engine's first turn after the XID, and readers
    // see it with the next snapshot (published every 300 ms).
    assert!(
        cordoned_after <= Duration::from_millis(300) + ROUND,
        "cordoned after {cordoned_after:?}"
    );
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_lost_stop_command_delays_the_restart_but_never_strands_the_job() -> TestResult {
    let mut c = Cluster::start(3).await?;
    let id = c.submit(2, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    let job = c.job(&id).ok_or("job")?;
    let (bad, other) = (job.placement[0].clone(), job.placement[1].clone());
    // The healthy node's first StopWorkers is lost on the way.
    c.agent(&other).drop_stops = 1;
    c.xid(&bad, 0, 79).await?;
    c.until("the job stopping", |c| {
        c.job(&id)
            .is_some_and(|j| j.phase != JobPhase::Running || j.attempt > 1)
    })
    .await?;
    c.until("attempt 2 running", |c| running_attempt(c, &id, 2))
        .await?;
    let agent = c.agent(&other);
    assert!(
        agent.stops_seen >= 2,
        "the stop was sent again: {} stops seen",
        agent.stops_seen
    );
    assert!(!agent.running.contains_key(&(id.clone(), 1)));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn commits_that_fail_hold_every_effect_until_the_store_recovers() -> TestResult {
    let mut c = Cluster::start(2).await?;
    // Every commit fails for a while: the submission is refused and nothing starts.
    c.faults.fail_next_commits(1);
    let refused = c.submit(1, 0).await;
    assert!(refused.is_err(), "a job is refused while its commit fails");
    assert!(
        c.jobs().is_empty(),
        "the refused job is undone: {:?}",
        c.jobs()
    );
    // Until the store has recovered (it writes the whole state again within a second),
    // requests are refused; heartbeats are still acknowledged, so leases hold.
    assert!(
        c.submit(1, 0).await.is_err(),
        "refused until the store recovered"
    );
    for _ in 0..40 {
        c.round().await?;
    }
    assert!(
        c.jobs().is_empty(),
        "no refused job came back: {:?}",
        c.jobs()
    );
    let id = c.submit(1, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    assert!(
        c.nodes().iter().all(|(_, s)| s == "Ready"),
        "{:?}",
        c.nodes()
    );
    // What the store holds is what was acknowledged: the accepted job, not the refused one.
    let stored = c.memory.store().load_jobs()?;
    let ids: Vec<&str> = stored.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [id.as_str()], "only the acknowledged job is stored");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_node_joining_is_burned_in_before_a_waiting_job_lands_on_it() -> TestResult {
    let mut config = Config::default();
    config.burn_in.on_join = true;
    let mut c = Cluster::start_with(config, 2).await?;
    c.until("n0 and n1 burned in", |c| {
        c.nodes().iter().all(|(_, state)| state == "Ready")
    })
    .await?;
    let busy = c.submit(2, 0).await?;
    c.until("the first job running", |c| running_attempt(c, &busy, 1))
        .await?;
    // A second job waits for a free node; then one joins. The step that registers it cordons
    // it for burn-in before the scheduler runs, so the job must not start there until its
    // burn-in passes.
    let id = c.submit(1, 0).await?;
    c.register("n2", 3).await?;
    c.until("the second job running", |c| running_attempt(c, &id, 1))
        .await?;
    assert_eq!(
        c.agent("n2").log,
        ["diagnostics passed", "start"],
        "burn-in ran before the start"
    );
    assert_eq!(c.job(&id).map(|j| j.placement), Some(vec!["n2".to_owned()]));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_reconnects_while_the_store_cannot_commit_keeps_its_job() -> TestResult {
    let mut c = Cluster::start(2).await?;
    let id = c.submit(1, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    let node = c.job(&id).ok_or("job")?.placement[0].clone();
    // The store fails every commit from now on (a full disk that stays full).
    c.faults.fail_next_commits(u32::MAX);
    // Its agent's stream breaks and it comes back, unchanged, with its worker.
    c.reconnect(&node, 100).await?;
    for _ in 0..400 {
        c.round().await?;
    }
    let agent = c.agent(&node);
    assert!(
        agent.registered,
        "an unchanged node is answered without a commit"
    );
    assert_eq!(
        agent.stops_seen, 0,
        "no stop while nothing could be committed"
    );
    assert!(agent.running.contains_key(&(id.clone(), 1)));
    let job = c.job(&id).ok_or("job")?;
    assert_eq!((job.phase, job.attempt), (JobPhase::Running, 1));
    assert!(
        c.nodes().iter().all(|(_, s)| s == "Ready"),
        "{:?}",
        c.nodes()
    );
    // The store recovers; the job never noticed.
    c.faults.fail_next_commits(0);
    for _ in 0..40 {
        c.round().await?;
    }
    assert!(running_attempt(&c, &id, 1));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_store_rolled_back_under_a_restart_is_exposed_by_an_agent_and_never_served() -> TestResult
{
    let mut c = Cluster::start(2).await?;
    let id = c.submit(1, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    for _ in 0..40 {
        c.round().await?;
    }
    let store = c.memory.mark();
    let told = c.agent("n0").mark.clone().ok_or("n0 was told no mark")?;
    assert_eq!(told.store_id, store.store_id);
    assert!(
        told.seq >= 5 && told.seq <= store.seq,
        "told {told:?}, store at {store:?}: only durable commits are told"
    );
    // The data dir is replaced by an older copy of itself while the coordinator restarts:
    // the same store id, fewer commits.
    let memory = c.memory.clone();
    c.restart_on(memory.clone()).await?;
    memory.rewind_seq(told.seq - 3);
    let (commits, seq) = (memory.commits(), memory.mark().seq);
    c.reconnect("n0", 100).await?;
    let end = c.engine_end().await?;
    let Err(StoreError::Damaged { path, what }) = end else {
        return Err(format!("the engine should end with Damaged, not {end:?}").into());
    };
    assert_eq!(path, std::path::Path::new("memory"));
    let expected = format!(
        "it holds commit {seq} of store {}, but agent n0 was told of commit {}: the data dir \
         was replaced by an older copy (a rollback)",
        told.store_id, told.seq
    );
    assert_eq!(what, expected);
    assert_eq!(
        (memory.commits(), memory.mark().seq),
        (commits, seq),
        "nothing of that registration (nor anything after it) was committed"
    );
    let agent = c.agent("n0");
    agent.read_commands();
    let reason = agent
        .rejected
        .clone()
        .ok_or("n0's registration was not refused")?;
    assert!(reason.contains("rolled back"), "{reason}");
    assert!(!agent.registered, "{reason}");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_restored_store_is_a_new_store_and_an_agent_that_knew_the_old_one_joins_it() -> TestResult
{
    let mut c = Cluster::start(2).await?;
    let id = c.submit(1, 0).await?;
    c.until("attempt 1 running", |c| running_attempt(c, &id, 1))
        .await?;
    for _ in 0..40 {
        c.round().await?;
    }
    let told = c.agent("n0").mark.clone().ok_or("n0 was told no mark")?;
    // Restored from a backup (another store id), in one commit: far fewer than n0 was told.
    let restored = Memory::new();
    let store = restored.store();
    for record in c.memory.store().load_nodes()? {
        store.put_node(&record)?;
    }
    for job in c.memory.store().load_jobs()? {
        store.put_job(&job)?;
    }
    store.flush().await?;
    assert!(restored.mark().seq < told.seq, "{told:?}");
    c.restart_on(restored.clone()).await?;
    c.reconnect("n0", 100).await?;
    c.reconnect("n1", 101).await?;
    c.until("both nodes registered again", |c| {
        c.handle
            .snapshot()
            .nodes
            .iter()
            .all(|n| n.session.is_some())
    })
    .await?;
    for _ in 0..10 {
        c.round().await?;
    }
    let agent = c.agent("n0");
    assert!(agent.registered && agent.rejected.is_none());
    let mark = agent.mark.clone().ok_or("no mark")?;
    assert_eq!(
        mark.store_id,
        restored.mark().store_id,
        "the new store replaced the old mark"
    );
    assert!(mark.seq <= restored.mark().seq);
    assert!(
        !c.engine.is_finished(),
        "the coordinator serves the restored store"
    );
    Ok(())
}

/// The source of `node`'s cordon, if it is cordoned.
fn cordon_source(c: &Cluster, node: &str) -> Option<CordonSource> {
    c.node(node)
        .and_then(|n| n.record.cordon.as_ref().map(|c| c.source))
}

fn held_with_reason(c: &Cluster, id: &str) -> bool {
    c.job(id)
        .is_some_and(|j| j.phase == JobPhase::Pending && j.reason == JOBS_HELD)
}

async fn confirm(c: &Cluster) -> Result<RecoveryHold, vigil_coordinator::error::ControlError> {
    c.handle
        .ask(|reply| Event::ConfirmRecovery {
            actor: "alice (admin)".into(),
            reply,
        })
        .await
}

#[tokio::test(start_paused = true)]
async fn a_recovered_coordinator_holds_nodes_and_jobs_until_an_operator_confirms() -> TestResult {
    let memory = Memory::new();
    // Before the damage: two nodes known, and a job that waits (their agents are away).
    Cluster::start_on(memory.clone(), Config::default(), 2)
        .await?
        .shutdown()
        .await?;
    let mut c = Cluster::start_on(memory.clone(), Config::default(), 0).await?;
    let id = c.submit(1, 0).await?;
    assert_eq!(c.job(&id).map(|j| j.phase), Some(JobPhase::Pending));
    assert!(confirm(&c).await.is_err(), "no hold to confirm yet");
    c.shutdown().await?;

    // vigil-coordinator --recover: the store kept what was valid and says what it lost.
    let report = RecoveryReport {
        damage: "nodes tree: checksum mismatch".into(),
        lost: vec![
            "nodes/n7: checksum mismatch".into(),
            "jobs/j-9: unreadable".into(),
        ],
        lost_nodes: vec!["n7".into()],
        lost_jobs: vec!["j-9".into()],
        damaged_copy: "/var/lib/vigil/damaged".into(),
    };
    let mut c = Cluster::start_on(memory.recovered(report), Config::default(), 0).await?;
    let hold = c.handle.snapshot().recovery.clone().ok_or("a hold")?;
    assert!(hold.holds_jobs());
    assert_eq!(hold.lost.len(), 2);
    let stored: Option<RecoveryHold> = memory.store().load_cluster("recovery")?;
    assert_eq!(stored.as_ref(), Some(&hold), "committed before serving");
    assert!(
        c.metrics
            .encode()?
            .contains("\nvigil_store_recovery_hold 1\n")
    );
    for node in ["n0", "n1"] {
        assert_eq!(cordon_source(&c, node), Some(CordonSource::Recovery));
    }
    assert!(held_with_reason(&c, &id), "{:?}", c.job(&id));

    // The agents come back: their nodes stay cordoned, the job does not start.
    c.register("n0", 11).await?;
    c.register("n1", 12).await?;
    c.until("both nodes back, cordoned", |c| {
        c.nodes().iter().all(|(_, state)| state == "Cordoned")
    })
    .await?;
    // A node whose record was lost registers as new: cordoned too, and told why.
    c.register("n7", 13).await?;
    c.until("n7 cordoned", |c| {
        cordon_source(c, "n7") == Some(CordonSource::Recovery)
    })
    .await?;
    let n7 = c.node("n7").ok_or("n7")?;
    assert!(
        n7.events.iter().any(|e| e.kind == "recovery"),
        "{:?}",
        n7.events
    );
    // An operator reviews n0 and uncordons it: still no job before the confirmation.
    c.handle
        .ask(|reply| Event::Uncordon {
            node: "n0".into(),
            force: false,
            actor: "alice (admin)".into(),
            reply,
        })
        .await?;
    for _ in 0..40 {
        c.round().await?;
    }
    assert!(held_with_reason(&c, &id), "{:?}", c.job(&id));
    assert!(c.agents.iter().all(|a| a.log.is_empty()), "nothing started");

    // A restart during the hold keeps it: from the store, without --recover.
    c.shutdown().await?;
    let mut c = Cluster::start_on(memory.clone(), Config::default(), 0).await?;
    assert_eq!(
        c.handle
            .snapshot()
            .recovery
            .as_ref()
            .map(|h| h.holds_jobs()),
        Some(true)
    );
    for (i, node) in ["n0", "n1", "n7"].into_iter().enumerate() {
        c.register(node, 21 + i as u64).await?;
    }
    c.until("every agent back", |c| {
        c.handle
            .snapshot()
            .nodes
            .iter()
            .all(|n| n.session.is_some())
    })
    .await?;
    for _ in 0..40 {
        c.round().await?;
    }
    assert!(held_with_reason(&c, &id), "{:?}", c.job(&id));
    assert_eq!(cordon_source(&c, "n0"), None, "the review is kept");
    assert_eq!(cordon_source(&c, "n1"), Some(CordonSource::Recovery));

    // The operator confirms: the job starts on the uncordoned node; the others stay cordoned.
    let confirmed = confirm(&c).await?;
    assert_eq!(confirmed.confirmed_by.as_deref(), Some("alice (admin)"));
    c.until("the job running", |c| running_attempt(c, &id, 1))
        .await?;
    assert_eq!(c.job(&id).map(|j| j.placement), Some(vec!["n0".to_owned()]));
    for node in ["n1", "n7"] {
        assert_eq!(cordon_source(&c, node), Some(CordonSource::Recovery));
    }
    assert!(
        c.metrics
            .encode()?
            .contains("\nvigil_store_recovery_hold 0\n")
    );
    let again = confirm(&c)
        .await
        .err()
        .ok_or("a second confirm is refused")?;
    assert!(
        again
            .to_string()
            .contains("already confirmed by alice (admin)"),
        "{again}"
    );
    let stored: Option<RecoveryHold> = c.memory.store().load_cluster("recovery")?;
    assert_eq!(
        stored.and_then(|h| h.confirmed_by).as_deref(),
        Some("alice (admin)")
    );
    Ok(())
}
