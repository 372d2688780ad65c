//! The in-process cluster harness shared by `in_process.rs` (the core loop) and
//! `in_process_store.rs` (store marks and the recovery hold): the real engine, simulated agents
//! and the memory store in one paused-time runtime.
//!
//! A `SimAgent` speaks the engine's side of `AgentService.Connect` directly (`Event`s in,
//! `CoordinatorMessage`s out) and behaves like `vigil-agent`: it starts and stops workers on
//! command (idempotently), reports them in heartbeats with a growing step, and answers a stop
//! of a worker it does not run with `WorkerExited { stopped }`. Like `vigil-agent`, it keeps
//! the highest store mark it was told and registers with it.

// Each test file uses part of the harness.
#![allow(dead_code)]

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
use vigil_coordinator::node::{GpuRecord, Node};
use vigil_coordinator::state::Registration;
use vigil_coordinator::store::{Memory, MemoryFaults, StoreError, StoreMark};
use vigil_proto::v1;

pub(crate) type TestResult = Result<(), Box<dyn std::error::Error>>;

/// How far simulated time moves per round of the harness.
pub(crate) const ROUND: Duration = Duration::from_millis(50);

pub(crate) struct SimAgent {
    pub(crate) node: String,
    pub(crate) session: u64,
    pub(crate) rx: mpsc::Receiver<Result<v1::CoordinatorMessage, Status>>,
    /// Whether the coordinator answered its registration `Registered`.
    pub(crate) registered: bool,
    /// Why the coordinator refused its registration, if it did.
    pub(crate) rejected: Option<String>,
    /// The highest store mark the coordinator told it (Registered, Ack).
    pub(crate) mark: Option<StoreMark>,
    /// (job, attempt) -> (node rank, step).
    pub(crate) running: BTreeMap<(String, u64), (u32, u64)>,
    pub(crate) seq: u64,
    /// Stops to drop on the floor (a lost message) before obeying one.
    pub(crate) drop_stops: u32,
    pub(crate) stops_seen: u32,
    /// Starts received, and diagnostics answered (passed), in order.
    pub(crate) log: Vec<&'static str>,
    pub(crate) since_heartbeat: Duration,
}

pub(crate) struct Cluster {
    pub(crate) handle: EngineHandle,
    pub(crate) engine: JoinHandle<Result<(), StoreError>>,
    pub(crate) agents: Vec<SimAgent>,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) faults: MemoryFaults,
    pub(crate) memory: Memory,
    pub(crate) config: Config,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) elapsed: Duration,
}

/// An engine over `memory`, running: its handle, its stop switch, its task, its metrics.
pub(crate) type Running = (
    EngineHandle,
    watch::Sender<bool>,
    JoinHandle<Result<(), StoreError>>,
    Arc<Metrics>,
);

/// As `vigil-coordinator` starts one: the recovery hold committed before anything is served.
pub(crate) async fn spawn_engine(
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
    pub(crate) async fn start(nodes: usize) -> Result<Self, Box<dyn std::error::Error>> {
        Self::start_with(Config::default(), nodes).await
    }

    pub(crate) async fn start_with(
        config: Config,
        nodes: usize,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        Self::start_on(Memory::new(), config, nodes).await
    }

    /// A coordinator on `memory` (what an earlier one committed, if anything), and the agents
    /// of nodes `n0`.. `n{nodes - 1}` registered.
    pub(crate) async fn start_on(
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
    pub(crate) async fn shutdown(mut self) -> TestResult {
        self.stop.send(true).ok();
        (&mut self.engine).await??;
        Ok(())
    }

    pub(crate) async fn register(
        &mut self,
        node: &str,
        session: u64,
    ) -> Result<(), Box<dyn std::error::Error>> {
        self.register_running(node, session, BTreeMap::new()).await
    }

    /// `node`'s agent reconnects: a new session, reporting the workers it runs and the
    /// highest store mark it was told.
    pub(crate) async fn reconnect(&mut self, node: &str, session: u64) -> TestResult {
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
    pub(crate) async fn restart_on(&mut self, memory: Memory) -> TestResult {
        self.stop.send(true).ok();
        (&mut self.engine).await??;
        let (handle, stop, engine, metrics) = spawn_engine(&memory, &self.config).await?;
        (self.handle, self.stop, self.engine, self.metrics) = (handle, stop, engine, metrics);
        self.faults = memory.faults();
        self.memory = memory;
        Ok(())
    }

    /// Lets the engine run (time passes, no agent speaks) until it ends by itself; its result.
    pub(crate) async fn engine_end(
        &mut self,
    ) -> Result<Result<(), StoreError>, Box<dyn std::error::Error>> {
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

    pub(crate) async fn register_running(
        &mut self,
        node: &str,
        session: u64,
        running: BTreeMap<(String, u64), (u32, u64)>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        self.register_told(node, session, running, None).await
    }

    pub(crate) async fn register_told(
        &mut self,
        node: &str,
        session: u64,
        running: BTreeMap<(String, u64), (u32, u64)>,
        told: Option<StoreMark>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let (tx, rx) = mpsc::channel(1024);
        let reg = Registration {
            identity: vigil_core::identity::HostIdentity {
                machine_id: format!("machine-{node}"),
                boot_id: "boot-1".into(),
            },
            session,
            node: node.to_owned(),
            hostname: node.to_owned(),
            address: "127.0.0.1".into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
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
            fabric: Vec::new(),
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

    pub(crate) fn agent(&mut self, node: &str) -> &mut SimAgent {
        self.agents
            .iter_mut()
            .find(|a| a.node == node)
            .expect("a simulated agent of that name")
    }

    /// One round: time moves on, every agent reads its commands, answers them, heartbeats.
    pub(crate) async fn round(&mut self) -> TestResult {
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
    pub(crate) async fn until(&mut self, what: &str, cond: impl Fn(&Self) -> bool) -> TestResult {
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

    pub(crate) fn nodes(&self) -> Vec<(String, String)> {
        self.handle
            .snapshot()
            .nodes
            .iter()
            .map(|n| (n.record.name.clone(), n.display_state().to_string()))
            .collect()
    }

    pub(crate) fn jobs(&self) -> Vec<(String, JobPhase, u64, Vec<String>)> {
        self.handle
            .snapshot()
            .jobs
            .iter()
            .map(|j| (j.id.clone(), j.phase, j.attempt, j.placement.clone()))
            .collect()
    }

    pub(crate) fn job(&self, id: &str) -> Option<Job> {
        self.handle
            .snapshot()
            .jobs
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }

    pub(crate) fn node(&self, name: &str) -> Option<Node> {
        self.handle
            .snapshot()
            .nodes
            .iter()
            .find(|n| n.record.name == name)
            .cloned()
    }

    pub(crate) async fn submit(
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
    pub(crate) async fn xid(&mut self, node: &str, gpu: u32, xid: u32) -> TestResult {
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
    pub(crate) fn read_commands(&mut self) -> Vec<Event> {
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
                Some(v1::coordinator_message::Body::LeaseRenewed(_)) | None => continue,
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
    pub(crate) fn told(&mut self, store_id: String, seq: u64) {
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

    pub(crate) fn event(&mut self, kind: v1::agent_event::Kind) -> Event {
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
    pub(crate) fn heartbeat(&mut self) -> Event {
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
                ..v1::Heartbeat::default()
            },
        }
    }
}

pub(crate) fn running_attempt(c: &Cluster, id: &str, attempt: u64) -> bool {
    c.job(id).is_some_and(|j| {
        j.phase == JobPhase::Running
            && j.attempt == attempt
            && j.workers.values().all(|w| w.progress_step.is_some())
    })
}
