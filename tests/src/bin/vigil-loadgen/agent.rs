//! One simulated agent: its own TCP connection and `AgentService.Connect`
//! stream, Register with 8 simulated GPUs, heartbeats at the coordinator's
//! pace (full GPU samples or their telemetry alone by the real agent's rule,
//! `vigil_proto::heartbeat_form`), fake workers for StartWorker/StopWorkers, XIDs on request, and
//! reconnects with the real agent's backoff (`vigil_agent::backoff`: capped
//! exponential, full jitter, kept within the lease) whenever a session ends. Mutual TLS with its own node certificate
//! when the load test runs with `--tls`.
//!
//! Each agent keeps a lease across its sessions as the real agent's worker
//! supervisor does: renewed by every coordinator message, run out after the
//! coordinator's `lease_ms` of silence. A lease that ran out is counted
//! (`fenced`): on a real host its workers would have been stopped.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use vigil_proto::v1::agent_message::Body as AgentBody;
use vigil_proto::v1::agent_service_client::AgentServiceClient;
use vigil_proto::v1::command::Kind as CommandKind;
use vigil_proto::v1::coordinator_message::Body as CoordinatorBody;
use vigil_proto::v1::{
    AgentEvent, AgentMessage, CheckpointScan, GpuBackend, GpuInfo, GpuSample, Heartbeat, Register,
    WorkerExited, WorkerInfo, WorkerStarted, XidError, agent_event,
};
use vigil_tls::ClientTls;

use vigil_agent::backoff::{Backoff, lease_cap};
use vigil_agent::lease::{Lease, registered_wait};
use vigil_proto::heartbeat_form::{Sent, SessionSamples};

use crate::gpus::{gpu_uuid, inventory, sample_template};
use crate::stats::Histogram;

/// As the real agent: dialing, then the coordinator's answer to Register.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// As the real agent: a full queue drops the heartbeat instead of queueing it.
const OUTBOUND_QUEUE: usize = 16;
const FALLBACK_INTERVAL: Duration = Duration::from_secs(1);
const FALLBACK_LEASE: Duration = Duration::from_secs(8);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What the orchestrator asks one agent to do.
pub enum AgentCmd {
    /// Report XID `xid` on GPU `gpu` now; answers when the event was queued on the stream.
    Xid {
        gpu: u32,
        xid: u32,
        done: oneshot::Sender<Result<Instant, String>>,
    },
}

/// Waits for the StartWorker of one job attempt (fault-to-relaunch).
pub struct RelaunchWatch {
    pub job_id: String,
    pub attempt: u64,
    pub arrived: Option<oneshot::Sender<(Instant, String)>>,
}

/// Settings every agent shares.
pub struct AgentConfig {
    pub coordinator: String,
    /// Certificates made by `--make-certs`; plaintext without.
    pub tls_dir: Option<std::path::PathBuf>,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// Counters and clocks every agent task writes and the orchestrator reads.
#[derive(Default)]
pub struct Shared {
    /// Heartbeat send -> Ack{seq}, recorded while `recording`.
    pub lag: Histogram,
    pub recording: AtomicBool,
    pub hb_sent: AtomicU64,
    pub hb_acked: AtomicU64,
    /// Outbound queue full (the coordinator is not reading): heartbeat dropped.
    pub hb_dropped: AtomicU64,
    /// Acks for a later seq arrived first: the coordinator dropped this ack.
    pub hb_unacked: AtomicU64,
    /// Agents with a registered session right now.
    pub registered_now: AtomicUsize,
    pub registrations: AtomicU64,
    /// Sessions that ended after registering (stream error, lease, rejection).
    pub sessions_lost: AtomicU64,
    /// First end of a registered session since the last reset.
    pub first_loss: Mutex<Option<Instant>>,
    pub last_registered: Mutex<Option<Instant>>,
    pub heartbeat_interval_ms: AtomicU64,
    pub lease_ms: AtomicU64,
    /// Why sessions ended or failed, by kind.
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub relaunch: Mutex<Option<RelaunchWatch>>,
    /// StartWorker commands received, by (job, attempt): nodes that got one.
    pub started: Mutex<HashMap<(String, u64), Vec<String>>>,
    /// Leases that ran out: coordinator silence of a whole lease (workers fenced).
    pub fenced: AtomicU64,
    /// Leases renewed by a `LeaseRenewed` before `Registered` (the coordinator's contact).
    pub early_renewals: AtomicU64,
    /// While set, each session's first coordinator message records the silence since the
    /// agent last heard the coordinator (the reconnect storm's gap, per agent).
    pub recording_silence: AtomicBool,
    pub silence: Histogram,
}

impl Shared {
    fn count_error(&self, kind: &str) {
        if let Ok(mut e) = self.errors.lock() {
            *e.entry(kind.to_owned()).or_default() += 1;
        }
    }

    pub fn errors_snapshot(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// A fake worker: it "runs" until stopped, and its step grows each heartbeat.
struct FakeWorker {
    job_id: String,
    attempt: u64,
    node_rank: u32,
    step: u64,
    started_at_ms: u64,
}

/// State that survives reconnects (as a real agent's workers do).
struct Local {
    name: String,
    gpus: Vec<GpuInfo>,
    template: Vec<GpuSample>,
    workers: Vec<FakeWorker>,
    /// The lease, kept across sessions as the real agent's worker supervisor keeps it.
    lease: Option<Lease>,
}

impl Local {
    /// `seed`: the agent's index, which makes its GPU serials its own.
    fn new(name: String, seed: u64) -> Self {
        Self {
            gpus: inventory(&name, seed),
            template: sample_template(seed),
            name,
            workers: Vec::new(),
            lease: None,
        }
    }

    /// A session's Registered: the lease held so far is judged (and the silence it ended
    /// recorded), and a new one of `duration` begins.
    fn registered(&mut self, shared: &Shared, duration: Duration) {
        let now = Instant::now();
        if let Some(lease) = self.lease {
            self.judge(shared, lease, now);
            if shared.recording_silence.load(Ordering::Relaxed) {
                shared.silence.record(lease.silent_for(now));
            }
        }
        self.lease = Some(Lease::new(duration, now));
    }

    /// Any later coordinator message renews the lease.
    fn heard(&mut self, shared: &Shared) {
        let now = Instant::now();
        if let Some(mut lease) = self.lease {
            self.judge(shared, lease, now);
            lease.renew(now);
            self.lease = Some(lease);
        }
    }

    /// A lease that ran out before the coordinator spoke again is counted fenced.
    fn judge(&mut self, shared: &Shared, lease: Lease, now: Instant) {
        if lease.is_expired(now) {
            shared.fenced.fetch_add(1, Ordering::Relaxed);
            // The supervisor would have stopped them.
            self.workers.clear();
        }
    }

    fn worker_infos(&self) -> Vec<WorkerInfo> {
        let now = unix_ms();
        self.workers
            .iter()
            .map(|w| WorkerInfo {
                job_id: w.job_id.clone(),
                attempt: w.attempt,
                node_rank: w.node_rank,
                pid: 1,
                progress_step: Some(w.step),
                progress_at_unix_ms: now,
                started_at_unix_ms: w.started_at_ms,
                ..Default::default()
            })
            .collect()
    }

    /// The next heartbeat, its GPU part full or compact by the agent's rule (`samples`, this
    /// session's memory of it): hand the returned form to `samples.sent` once it is queued.
    fn heartbeat(&mut self, samples: &SessionSamples) -> (Heartbeat, Sent) {
        let now = unix_ms();
        for w in &mut self.workers {
            w.step += 1;
        }
        let mut gpus = self.template.clone();
        for g in &mut gpus {
            g.observed_at_unix_ms = now;
        }
        let mut hb = Heartbeat {
            sent_at_unix_ms: now,
            workers: self.worker_infos(),
            ..Heartbeat::default()
        };
        let sent = samples.fill(&mut hb, gpus);
        (hb, sent)
    }
}

/// How a session ended.
struct SessionEnd {
    registered: bool,
    kind: &'static str,
}

/// Runs one agent forever: sessions with backoff between them.
pub async fn run(
    index: usize,
    name: String,
    cfg: Arc<AgentConfig>,
    shared: Arc<Shared>,
    pacing: Arc<Semaphore>,
    mut cmds: mpsc::UnboundedReceiver<AgentCmd>,
) {
    let tls = match crate::tls::agent(cfg.tls_dir.as_ref(), &name) {
        Ok(t) => t,
        Err(e) => {
            crate::progress(format!("{name}: {e:#}"));
            shared.count_error("no certificate");
            return;
        }
    };
    let mut local = Local::new(name, index as u64);
    let mut rng = fastrand::Rng::new();
    let mut backoff = Backoff::new(cfg.initial_backoff, cfg.max_backoff);
    let mut ever_registered = false;
    loop {
        // Only the first connection of each agent is paced; reconnects are not.
        let permit = if ever_registered {
            None
        } else {
            pacing.clone().acquire_owned().await.ok()
        };
        let end = session(&cfg, &tls, &shared, &mut local, &mut cmds, permit).await;
        shared.count_error(end.kind);
        if end.registered {
            ever_registered = true;
            backoff.reset();
            shared.registered_now.fetch_sub(1, Ordering::SeqCst);
            shared.sessions_lost.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = shared.first_loss.lock() {
                first.get_or_insert_with(Instant::now);
            }
        }
        if end.kind == "orchestrator gone" {
            return;
        }
        // As the real agent: while the lease lives, dial again before it runs out.
        let cap = local
            .lease
            .and_then(|l| lease_cap(l.remaining(Instant::now()), cfg.initial_backoff));
        tokio::time::sleep(backoff.next_delay_within(&mut rng, cap)).await;
    }
}

/// The lease a coordinator message gives (`lease_ms`; unset: the agent's fallback).
fn lease_of(lease_ms: u64) -> Duration {
    match lease_ms {
        0 => FALLBACK_LEASE,
        ms => Duration::from_millis(ms),
    }
}

fn end(registered: bool, kind: &'static str) -> SessionEnd {
    SessionEnd { registered, kind }
}

/// The sending half: numbers messages; never waits (as the real agent).
struct Outbound {
    tx: mpsc::Sender<AgentMessage>,
    next_seq: u64,
}

impl Outbound {
    /// Ok(Some(seq)) sent, Ok(None) queue full, Err closed.
    fn push(&mut self, body: AgentBody) -> Result<Option<u64>, ()> {
        let seq = self.next_seq;
        match self.tx.try_send(AgentMessage {
            seq,
            body: Some(body),
        }) {
            Ok(()) => {
                self.next_seq += 1;
                Ok(Some(seq))
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(None),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    }

    fn event(&mut self, kind: agent_event::Kind) -> Result<Option<u64>, ()> {
        self.push(AgentBody::Event(AgentEvent {
            at_unix_ms: unix_ms(),
            kind: Some(kind),
        }))
    }
}

async fn session(
    cfg: &AgentConfig,
    tls: &ClientTls,
    shared: &Shared,
    local: &mut Local,
    cmds: &mut mpsc::UnboundedReceiver<AgentCmd>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> SessionEnd {
    let Ok(endpoint) = Endpoint::from_shared(vigil_tls::dial_url(&cfg.coordinator, tls)) else {
        return end(false, "invalid coordinator URL");
    };
    let endpoint = endpoint.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true);
    let dial = vigil_tls::connect(endpoint, tls);
    let channel = match tokio::time::timeout(CONNECT_TIMEOUT, dial).await {
        Ok(Ok(c)) => c,
        Ok(Err(_)) => return end(false, "connect failed"),
        Err(_) => return end(false, "connect timed out"),
    };
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(vigil_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(vigil_proto::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let mut out = Outbound { tx, next_seq: 1 };
    let register = Register {
        protocol_version: vigil_proto::PROTOCOL_VERSION,
        node_name: local.name.clone(),
        hostname: local.name.clone(),
        // Thousands of fake hosts on one machine: each its own machine-id, as real hosts have.
        machine_id: format!("loadgen-{}", local.name),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        gpu_backend: GpuBackend::Simulated.into(),
        gpus: local.gpus.clone(),
        workers: local.worker_infos(),
        sent_at_unix_ms: unix_ms(),
        // As the real agent.
        accepts_lease_renewal: true,
        ..Default::default()
    };
    if out.push(AgentBody::Register(register)).is_err() {
        return end(false, "stream closed before Register");
    }
    let registration = async {
        let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
        let first = inbound.message().await?;
        Ok::<_, tonic::Status>((inbound, first))
    };
    let (mut inbound, mut first) = match tokio::time::timeout(REGISTER_TIMEOUT, registration).await
    {
        Ok(Ok(pair)) => pair,
        Ok(Err(_)) => return end(false, "register RPC failed"),
        Err(_) => return end(false, "register timed out"),
    };
    // As the real agent: a lease renewal before Registered (the coordinator has the Register
    // queued) renews the lease, and Registered is awaited for three quarters of it.
    let mut renewed = false;
    if let Some(CoordinatorBody::LeaseRenewed(r)) = first.as_ref().and_then(|m| m.body.as_ref()) {
        let lease = lease_of(r.lease_ms);
        local.registered(shared, lease);
        shared.early_renewals.fetch_add(1, Ordering::Relaxed);
        renewed = true;
        let wait = registered_wait(lease, REGISTER_TIMEOUT);
        first = match tokio::time::timeout(wait, inbound.message()).await {
            Ok(Ok(m)) => m,
            Ok(Err(_)) => return end(false, "stream error before Registered"),
            Err(_) => return end(false, "register timed out after a lease renewal"),
        };
    }
    let registered = match first.and_then(|m| m.body) {
        Some(CoordinatorBody::Registered(r)) => r,
        Some(CoordinatorBody::Rejected(_)) => return end(false, "rejected"),
        _ => return end(false, "no Registered"),
    };
    drop(permit);
    let lease = lease_of(registered.lease_ms);
    if renewed {
        // The silence ended with the renewal (recorded then); Registered only renews.
        local.heard(shared);
    } else {
        local.registered(shared, lease);
    }
    let interval = match registered.heartbeat_interval_ms {
        0 => FALLBACK_INTERVAL,
        ms => Duration::from_millis(ms),
    };
    shared
        .heartbeat_interval_ms
        .store(registered.heartbeat_interval_ms, Ordering::Relaxed);
    shared
        .lease_ms
        .store(registered.lease_ms, Ordering::Relaxed);
    shared.registrations.fetch_add(1, Ordering::Relaxed);
    shared.registered_now.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut last) = shared.last_registered.lock() {
        *last = Some(Instant::now());
    }

    // As the real agent: full samples first, then telemetry alone while nothing changes.
    let mut samples = SessionSamples::new(registered.accepts_gpu_health_unchanged);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let lease_timer = tokio::time::sleep(lease);
    tokio::pin!(lease_timer);
    // Heartbeats awaiting their ack, oldest first (acks come in order).
    let mut pending: VecDeque<(u64, Instant)> = VecDeque::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let (hb, form) = local.heartbeat(&samples);
                match out.push(AgentBody::Heartbeat(hb)) {
                    Ok(Some(seq)) => {
                        samples.sent(form);
                        shared.hb_sent.fetch_add(1, Ordering::Relaxed);
                        pending.push_back((seq, Instant::now()));
                    }
                    Ok(None) => {
                        shared.hb_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(()) => return end(true, "stream closed"),
                }
            }
            cmd = cmds.recv() => match cmd {
                Some(AgentCmd::Xid { gpu, xid, done }) => {
                    let kind = agent_event::Kind::Xid(XidError {
                        gpu_index: gpu,
                        xid,
                        gpu_uuid: gpu_uuid(&local.name, gpu),
                    });
                    let at = Instant::now();
                    let answer = match out.event(kind) {
                        Ok(Some(_)) => Ok(at),
                        Ok(None) => Err("outbound queue full".to_owned()),
                        Err(()) => Err("stream closed".to_owned()),
                    };
                    done.send(answer).ok();
                }
                None => return end(true, "orchestrator gone"),
            },
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return end(true, "stream closed by coordinator"),
                    Err(_) => return end(true, "stream error"),
                };
                lease_timer.as_mut().reset(Instant::now() + lease);
                local.heard(shared);
                match msg.body {
                    Some(CoordinatorBody::Ack(ack)) => {
                        let now = Instant::now();
                        while let Some(&(seq, sent)) = pending.front() {
                            if seq > ack.seq {
                                break;
                            }
                            pending.pop_front();
                            if seq == ack.seq {
                                shared.hb_acked.fetch_add(1, Ordering::Relaxed);
                                if shared.recording.load(Ordering::Relaxed) {
                                    shared.lag.record(now - sent);
                                }
                            } else {
                                shared.hb_unacked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Some(CoordinatorBody::Command(command)) => {
                        if handle_command(shared, local, &mut out, command.kind).is_err() {
                            return end(true, "stream closed");
                        }
                    }
                    Some(CoordinatorBody::Rejected(_)) => return end(true, "rejected mid-session"),
                    Some(CoordinatorBody::Registered(_) | CoordinatorBody::LeaseRenewed(_)) | None => {}
                }
            }
            () = &mut lease_timer => return end(true, "lease expired"),
        }
    }
}

fn handle_command(
    shared: &Shared,
    local: &mut Local,
    out: &mut Outbound,
    kind: Option<CommandKind>,
) -> Result<(), ()> {
    match kind {
        Some(CommandKind::StartWorker(start)) => {
            let arrived = Instant::now();
            if let Ok(mut watch) = shared.relaunch.lock()
                && let Some(w) = watch.as_mut()
                && w.job_id == start.job_id
                && w.attempt == start.attempt
                && let Some(tx) = w.arrived.take()
            {
                tx.send((arrived, local.name.clone())).ok();
            }
            if let Ok(mut started) = shared.started.lock() {
                started
                    .entry((start.job_id.clone(), start.attempt))
                    .or_default()
                    .push(local.name.clone());
            }
            // An older attempt of the same job is replaced, as the real agent does.
            local
                .workers
                .retain(|w| w.job_id != start.job_id || w.attempt > start.attempt);
            if !local
                .workers
                .iter()
                .any(|w| w.job_id == start.job_id && w.attempt == start.attempt)
            {
                local.workers.push(FakeWorker {
                    job_id: start.job_id.clone(),
                    attempt: start.attempt,
                    node_rank: start.node_rank,
                    step: 0,
                    started_at_ms: unix_ms(),
                });
            }
            out.event(agent_event::Kind::WorkerStarted(WorkerStarted {
                job_id: start.job_id,
                attempt: start.attempt,
                pid: 1,
                log_path: String::new(),
            }))?;
        }
        Some(CommandKind::StopWorkers(stop)) => {
            let mut stopped: Vec<u64> = local
                .workers
                .iter()
                .filter(|w| w.job_id == stop.job_id && w.attempt <= stop.attempt)
                .map(|w| w.attempt)
                .collect();
            local
                .workers
                .retain(|w| w.job_id != stop.job_id || w.attempt > stop.attempt);
            let reason = if stopped.is_empty() {
                stopped.push(stop.attempt);
                "already gone".to_owned()
            } else {
                "stopped by the coordinator".to_owned()
            };
            for attempt in stopped {
                out.event(agent_event::Kind::WorkerExited(WorkerExited {
                    job_id: stop.job_id.clone(),
                    attempt,
                    exit_code: None,
                    signal: Some(15),
                    stopped: true,
                    reason: reason.clone(),
                    log_path: String::new(),
                    log_tail: String::new(),
                }))?;
            }
        }
        // A relaunch's checkpoint scan: these fake jobs write no checkpoints.
        Some(CommandKind::ScanCheckpoints(scan)) => {
            out.event(agent_event::Kind::CheckpointScan(CheckpointScan {
                job_id: scan.job_id,
                attempt: scan.attempt,
                newest: None,
                error: String::new(),
                rejected: Vec::new(),
            }))?;
        }
        // Diagnostics, log reads, remediation and preflights are not part of the load test
        // (its job specs have no [preflight]).
        Some(
            CommandKind::RunDiagnostics(_)
            | CommandKind::ReadLog(_)
            | CommandKind::Remediate(_)
            | CommandKind::CaptureEvidence(_)
            | CommandKind::RunPreflight(_),
        )
        | None => {}
    }
    Ok(())
}
