//! One session with the coordinator: dial, register, then heartbeat while the lease holds.
//!
//! A session only ever ends in an error (the stream closed, the lease ran
//! out, the coordinator said no, it is a standby, its term is stale); [`crate::link`]
//! decides what happens next, and where.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};
use vigil_proto::compat;
use vigil_proto::heartbeat_form::SessionSamples;
use vigil_proto::v1::agent_message::Body as AgentBody;
use vigil_proto::v1::agent_service_client::AgentServiceClient;
use vigil_proto::v1::command::Kind as CommandKind;
use vigil_proto::v1::coordinator_message::Body as CoordinatorBody;
use vigil_proto::v1::{
    AgentEvent, AgentMessage, Command, CoordinatorMessage, Heartbeat, Register, Registered,
};

use crate::config::Coordinators;
use crate::diagnostics::Diagnostics;
use crate::events::EventSource;
use crate::gpu::{GpuError, GpuProbe, GpuSample};
use crate::lease::Lease;
use crate::metrics::Metrics;
use crate::store_mark::{self, StoreWitness};
use crate::term::{self, TermFence, Verdict};
use crate::workers::Workers;
use crate::{error_chain, unix_ms};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Covers opening the stream and the coordinator's answer to `Register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the agent waits before registering again with a coordinator outside its version
/// window: an operator installs another release, which takes minutes.
const VERSION_SKEW_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A wedged driver must not stall heartbeats (and with them the lease) for long.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Small: if the coordinator stops reading, stale heartbeats are dropped, not queued.
const OUTBOUND_QUEUE: usize = 16;
/// Used only if a coordinator leaves the pace unset (proto3 zero).
const FALLBACK_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// The design's default lease, for a coordinator that leaves it unset.
const FALLBACK_LEASE: Duration = Duration::from_secs(8);
/// Keeps a misconfigured coordinator from making the agent spin.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);

/// What every session of this agent shares.
pub struct SessionContext {
    /// Every coordinator this agent may dial; a session talks to one of them.
    pub coordinators: Coordinators,
    /// `None`: plaintext (insecure). Re-read at every connection.
    pub tls: Option<vigil_tls::TlsFiles>,
    /// The TLS client config kept while those files are unchanged, and with it the session
    /// ticket of the last connection: after a coordinator restart this agent resumes its
    /// session (no certificate signing or verification on either side) instead of a full
    /// handshake, which is what lets thousands of agents come back within their lease.
    pub tls_sessions: Arc<vigil_tls::ClientSessions>,
    pub node_name: String,
    pub hostname: String,
    /// This host's machine-id and boot id, sent in every `Register` (see `identity`).
    pub identity: crate::identity::HostIdentity,
    pub probe: Arc<dyn GpuProbe>,
    /// Reads the watched fabric ports for `Register` and every heartbeat.
    pub fabric: crate::fabric::FabricReader,
    /// Captures a hung attempt's evidence, and holds its stop until the capture ended.
    pub evidence: crate::evidence::Evidence,
    pub metrics: Metrics,
    /// Runs diagnostics the coordinator asks for; results come back as events.
    pub diagnostics: Arc<Diagnostics>,
    /// Runs remediation steps (the node's own reset and reboot commands); results come back
    /// as events.
    pub remediation: Arc<crate::remediation::Remediator>,
    /// Starts and stops job workers; lists them for Register and heartbeats.
    pub workers: Workers,
    /// `[workers] launch`: `false` refuses every StartWorker (Slurm runs the jobs).
    pub launch: bool,
    /// The highest coordinator term seen: messages below it are ignored.
    pub fence: Arc<TermFence>,
    /// The highest store mark the coordinator told: sent in every `Register`.
    pub store: Arc<StoreWitness>,
    /// The coordinator this agent is registered with, `None` between sessions.
    pub registration: watch::Sender<Option<Registration>>,
}

/// Whom a session registered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub url: String,
    /// `Registered.coordinator_name`; empty from a coordinator that predates it.
    pub name: String,
    pub term: u64,
}

impl std::fmt::Display for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.name.is_empty() {
            write!(f, "{} at term {}", self.url, self.term)
        } else {
            write!(f, "{} ({}) at term {}", self.name, self.url, self.term)
        }
    }
}

/// How a session ended; `registered` tells the reconnect loop to reset its backoff, and
/// `lease` (the workers' lease as the session last renewed it) how soon it must dial again.
pub struct SessionEnd {
    pub registered: bool,
    pub lease: Option<Lease>,
    pub cause: SessionError,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid coordinator URL")]
    Endpoint(#[source] tonic::transport::Error),
    #[error("cannot connect to the coordinator")]
    Connect(#[source] tonic::transport::Error),
    #[error("cannot use this node's TLS files")]
    Tls(#[source] vigil_tls::TlsError),
    #[error("no connection to the coordinator within {}", humantime::format_duration(*.0))]
    ConnectTimeout(Duration),
    #[error("coordinator refused the stream ({:?}: {})", .0.code(), .0.message())]
    Rpc(#[source] tonic::Status),
    /// FAILED_PRECONDITION from a standby; `leader` is its `vigil-leader` (absent or empty
    /// while nobody leads).
    #[error("coordinator is a standby: {message}")]
    Standby {
        message: String,
        leader: Option<String>,
    },
    #[error(
        "coordinator sent term {term}, below term {highest} already followed (a deposed \
         leader); if the coordinators' etcd was wiped, remove the agent's {} file",
        term::TERM_FILE
    )]
    StaleTerm { term: u64, highest: u64 },
    #[error(
        "no word from the coordinator for {} (half the lease): looking for the leader",
        humantime::format_duration(*.0)
    )]
    Silent(Duration),
    #[error("no answer to registration within {}", humantime::format_duration(*.0))]
    RegisterTimeout(Duration),
    #[error("coordinator rejected the registration: {0}")]
    Rejected(String),
    /// Rejected with a time to wait (another host holds this node's name): retrying sooner
    /// cannot help.
    #[error("coordinator refused the registration: {reason}")]
    Refused {
        reason: String,
        retry_after: Duration,
    },
    #[error("coordinator closed the stream")]
    Closed,
    #[error("stream from the coordinator failed ({:?}: {})", .0.code(), .0.message())]
    Stream(#[source] tonic::Status),
    #[error("lease expired: no word from coordinator for {}", humantime::format_duration(*.0))]
    LeaseExpired(Duration),
    #[error("coordinator broke the protocol: {0}")]
    Protocol(&'static str),
    #[error("cannot read the GPU inventory")]
    Gpu(#[source] GpuError),
    #[error("GPU probe task failed")]
    GpuTask(#[source] tokio::task::JoinError),
}

/// Runs one session to its end; drop the future to close the stream.
///
/// Events waiting in `events` (queued while no session was up) go out as
/// soon as the coordinator accepts the registration.
pub async fn run(ctx: &SessionContext, url: &str, events: &mut EventSource) -> SessionEnd {
    let mut registered = false;
    let mut lease = None;
    let cause = match run_until_error(ctx, url, events, &mut registered, &mut lease).await {
        Err(cause) => cause,
        Ok(never) => match never {},
    };
    ctx.metrics.connected.set(0);
    ctx.registration.send_replace(None);
    SessionEnd {
        registered,
        lease,
        cause,
    }
}

/// A standby's answer (the protocol's `standby_refusal`) names the leader; other errors stay
/// what they are.
pub fn classify_refusal(status: tonic::Status) -> SessionError {
    match vigil_proto::standby_refusal(&status) {
        Some(refusal) => SessionError::Standby {
            message: status.message().to_owned(),
            leader: refusal.leader,
        },
        None => SessionError::Rpc(status),
    }
}

async fn run_until_error(
    ctx: &SessionContext,
    url: &str,
    events: &mut EventSource,
    registered: &mut bool,
    lease_out: &mut Option<Lease>,
) -> Result<Infallible, SessionError> {
    let channel = dial(url, ctx.tls.as_ref(), &ctx.tls_sessions).await?;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(vigil_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(vigil_proto::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    let mut outbound = Outbound {
        tx,
        next_seq: 1,
        fabric_read: false,
        // Full samples until the coordinator says it reads the compact form.
        samples: SessionSamples::new(false),
    };
    // Re-read per session: a GPU that vanished since the last one must not be registered.
    let gpus = on_blocking_pool(&ctx.probe, |p| p.inventory())
        .await?
        .map_err(SessionError::Gpu)?;
    let gpu_count = gpus.len();
    let fabric = ctx
        .fabric
        .read_bounded(SAMPLE_TIMEOUT)
        .await
        .unwrap_or_default();
    // Ports found now, or devices named: from now on an empty read means they are gone.
    outbound.fabric_read = !fabric.is_empty() || ctx.fabric.configured();
    let told = ctx.store.kept().await;
    outbound.push(AgentBody::Register(Register {
        protocol_version: vigil_proto::PROTOCOL_VERSION,
        node_name: ctx.node_name.clone(),
        hostname: ctx.hostname.clone(),
        machine_id: ctx.identity.machine_id.clone(),
        boot_id: ctx.identity.boot_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        gpu_backend: ctx.probe.backend().into(),
        gpus,
        workers: ctx.workers.list().await,
        sent_at_unix_ms: unix_ms(),
        last_store_seq: told.as_ref().map_or(0, |m| m.seq),
        last_store_id: told.map(|m| m.store_id).unwrap_or_default(),
        fabric,
        accepts_lease_renewal: true,
    }))?;
    let registration = async {
        let mut inbound = client
            .connect(ReceiverStream::new(rx))
            .await
            .map_err(classify_refusal)?
            .into_inner();
        let first = inbound
            .message()
            .await
            .map_err(|status| match classify_refusal(status) {
                SessionError::Rpc(status) => SessionError::Stream(status),
                standby => standby,
            })?;
        Ok::<_, SessionError>((inbound, first))
    };
    let (mut inbound, first) = tokio::time::timeout(REGISTER_TIMEOUT, registration)
        .await
        .map_err(|_| SessionError::RegisterTimeout(REGISTER_TIMEOUT))??;
    let mut first = first.ok_or(SessionError::Closed)?;
    if let Some(CoordinatorBody::LeaseRenewed(renewed)) = &first.body {
        // The coordinator has our Register queued (a reconnect storm after its restart): our
        // lease is renewed now, so keep waiting for Registered while it lives, rather than
        // dialing again (a new handshake, and the back of the queue).
        let wait = renew_before_registered(ctx, url, first.term, renewed.lease_ms, lease_out)?;
        first = tokio::time::timeout(wait, inbound.message())
            .await
            .map_err(|_| SessionError::RegisterTimeout(wait))?
            .map_err(SessionError::Stream)?
            .ok_or(SessionError::Closed)?;
    }
    let term = first.term;
    let accepted = match first.body {
        Some(CoordinatorBody::Registered(r)) => r,
        Some(CoordinatorBody::Rejected(r)) if r.retry_after_ms > 0 => {
            return Err(SessionError::Refused {
                reason: r.reason,
                retry_after: Duration::from_millis(r.retry_after_ms),
            });
        }
        Some(CoordinatorBody::Rejected(r)) => return Err(SessionError::Rejected(r.reason)),
        Some(CoordinatorBody::Ack(_) | CoordinatorBody::Command(_)) => {
            return Err(SessionError::Protocol("ack or command before registration"));
        }
        Some(CoordinatorBody::LeaseRenewed(_)) => {
            return Err(SessionError::Protocol(
                "a second lease renewal before registration",
            ));
        }
        None => return Err(SessionError::Protocol("first message is not Registered")),
    };
    // A coordinator outside this release's window: follow none of its orders (it may send
    // commands this agent reads otherwise); wait for an operator to upgrade one side.
    compat::check_coordinator(compat::this_release(), &accepted.coordinator_version).map_err(
        |skew| SessionError::Refused {
            reason: format!("this agent refuses coordinator {url}: {skew}"),
            retry_after: VERSION_SKEW_RETRY_AFTER,
        },
    )?;
    let verdict = ctx.fence.judge(term);
    if let Verdict::Stale { highest } = verdict {
        ctx.metrics.stale_term_messages.inc();
        warn!(
            coordinator = %url,
            coordinator_name = %accepted.coordinator_name,
            term,
            highest_term = highest,
            "coordinator {url} registered this node at term {term}, below term {highest} \
             already followed: a deposed leader; abandoning it"
        );
        return Err(SessionError::StaleTerm { term, highest });
    }
    follow(ctx, verdict, term).await;
    witness(ctx, &accepted.store_id, accepted.store_seq).await;
    if term::is_leader_change(verdict) {
        ctx.metrics.leader_changes.inc();
    }
    *registered = true;
    ctx.metrics.registrations.inc();
    ctx.metrics.connected.set(1);
    outbound.samples = SessionSamples::new(accepted.accepts_gpu_health_unchanged);
    let pace = Pace::from(&accepted);
    let registration = Registration {
        url: url.to_owned(),
        name: accepted.coordinator_name.clone(),
        term,
    };
    info!(
        coordinator = %url,
        coordinator_name = %accepted.coordinator_name,
        term,
        session_id = accepted.session_id,
        heartbeat_interval_ms = pace.heartbeat.as_millis() as u64,
        lease_ms = pace.lease.as_millis() as u64,
        coordinator_version = %accepted.coordinator_version,
        store_id = %accepted.store_id,
        store_seq = accepted.store_seq,
        gpus = gpu_count,
        "registered with coordinator {registration}"
    );
    ctx.registration.send_replace(Some(registration));
    // Several coordinators: a leader silent for half the lease may be paused or cut off
    // while its connection stays open; the others are asked who leads.
    let silence = ctx.coordinators.is_group().then_some(pace.lease / 2);
    heartbeat(ctx, events, outbound, inbound, pace, silence, lease_out).await
}

/// Adopts a newer term (written to the term file first); logs the change.
async fn follow(ctx: &SessionContext, verdict: Verdict, term: u64) {
    if let Verdict::Newer { previous } = verdict {
        ctx.fence.adopt(term).await;
        ctx.metrics.set_term(ctx.fence.highest());
        info!(
            term,
            previous_term = previous,
            "following the leader at term {term} (was {previous})"
        );
    }
}

/// Keeps the store mark a `Registered` or `Ack` told, when it is further on or a new store.
async fn witness(ctx: &SessionContext, store_id: &str, seq: u64) {
    let told = store_mark::Mark {
        store_id: store_id.to_owned(),
        seq,
    };
    if ctx.store.observe(told).await.adopts() {
        ctx.metrics.set_store_seq(seq);
    }
}

/// Connects to the coordinator, verifying it against the CA when TLS is configured (the
/// files are re-read here, so renewed certificates apply at the next connection; while they
/// are unchanged the config of the last connection is kept, to resume its session).
async fn dial(
    url: &str,
    tls: Option<&vigil_tls::TlsFiles>,
    sessions: &vigil_tls::ClientSessions,
) -> Result<Channel, SessionError> {
    let transport = match tls {
        Some(files) => vigil_tls::ClientTls::Tls {
            config: files
                .client_config_resuming(std::time::SystemTime::now(), sessions)
                .map_err(SessionError::Tls)?,
            server_name: None,
        },
        None => vigil_tls::ClientTls::Insecure,
    };
    let endpoint = Endpoint::from_shared(vigil_tls::dial_url(url, &transport))
        .map_err(SessionError::Endpoint)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    tokio::time::timeout(CONNECT_TIMEOUT, vigil_tls::connect(endpoint, &transport))
        .await
        .map_err(|_| SessionError::ConnectTimeout(CONNECT_TIMEOUT))?
        .map_err(SessionError::Connect)
}

/// The rhythm the coordinator asked for, with guards against unset or absurd values.
struct Pace {
    heartbeat: Duration,
    lease: Duration,
}

impl From<&Registered> for Pace {
    fn from(r: &Registered) -> Self {
        let or_fallback = |ms: u64, fallback: Duration, field: &str| {
            if ms == 0 {
                warn!(
                    field,
                    fallback_ms = fallback.as_millis() as u64,
                    "coordinator left a pace field unset; using the fallback"
                );
                fallback
            } else {
                Duration::from_millis(ms)
            }
        };
        Self {
            heartbeat: or_fallback(
                r.heartbeat_interval_ms,
                FALLBACK_HEARTBEAT_INTERVAL,
                "heartbeat_interval_ms",
            )
            .max(MIN_HEARTBEAT_INTERVAL),
            lease: or_fallback(r.lease_ms, FALLBACK_LEASE, "lease_ms"),
        }
    }
}

/// The sending half of the stream; numbers messages so acks can name them.
struct Outbound {
    /// The receiving end feeds the gRPC request stream.
    tx: mpsc::Sender<AgentMessage>,
    next_seq: u64,
    /// This session's heartbeats say the fabric is read (see `Heartbeat.fabric_read`).
    fabric_read: bool,
    /// What decides whether a heartbeat carries full GPU samples or only their telemetry
    /// (`vigil_proto::heartbeat_form`); new with every session.
    samples: SessionSamples,
}

impl Outbound {
    /// Never waits: a full queue means the coordinator is not reading, and the lease will tell.
    fn push(&mut self, body: AgentBody) -> Result<bool, SessionError> {
        let msg = AgentMessage {
            seq: self.next_seq,
            body: Some(body),
        };
        match self.tx.try_send(msg) {
            Ok(()) => {
                self.next_seq += 1;
                Ok(true)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Ok(false),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SessionError::Closed),
        }
    }

    fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }

    /// Sends `event`, or hands it back to `events` to go first next time.
    fn event(&mut self, events: &mut EventSource, event: AgentEvent) -> Result<(), SessionError> {
        match self.push(AgentBody::Event(event.clone())) {
            Ok(true) => Ok(()),
            Ok(false) => {
                events.put_back(event);
                Ok(())
            }
            Err(e) => {
                events.put_back(event);
                Err(e)
            }
        }
    }

    async fn heartbeat(&mut self, ctx: &SessionContext) -> Result<(), SessionError> {
        let gpus = sample(&ctx.probe).await;
        ctx.metrics.observe(&gpus);
        // A read that failed says nothing: no ports, and not "read" (so not "all gone").
        let (fabric, fabric_read) = match ctx.fabric.read_bounded(SAMPLE_TIMEOUT).await {
            Some(ports) => (ports, self.fabric_read),
            None => (Vec::new(), false),
        };
        ctx.metrics.observe_fabric(&fabric);
        let mut hb = Heartbeat {
            sent_at_unix_ms: unix_ms(),
            workers: ctx.workers.list().await,
            fabric,
            fabric_read,
            ..Heartbeat::default()
        };
        let form = self.samples.fill(&mut hb, gpus);
        let sent = self.push(AgentBody::Heartbeat(hb))?;
        if sent {
            self.samples.sent(form);
            ctx.metrics.heartbeats_sent.inc();
        } else {
            warn!("coordinator is not reading; heartbeat dropped");
        }
        Ok(())
    }
}

async fn heartbeat(
    ctx: &SessionContext,
    events: &mut EventSource,
    mut outbound: Outbound,
    mut inbound: Streaming<CoordinatorMessage>,
    pace: Pace,
    silence: Option<Duration>,
    lease_out: &mut Option<Lease>,
) -> Result<Infallible, SessionError> {
    // The session gives up at whichever comes first: the lease, or (several
    // coordinators) the silence limit.
    let give_up_after = silence.map_or(pace.lease, |s| s.min(pace.lease));
    let mut lease = Lease::new(pace.lease, Instant::now());
    ctx.workers.renew_lease(lease);
    *lease_out = Some(lease);
    let mut ticker = tokio::time::interval(pace.heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let changed = events.changed_signal();
    loop {
        tokio::select! {
            _ = ticker.tick() => outbound.heartbeat(ctx).await?,
            // GPU state changed (fault injected, XID, ECC event): events first,
            // then a fresh sample, without waiting for the next tick.
            () = changed.notified() => {
                while outbound.has_room() {
                    let Some(event) = events.try_next() else { break };
                    outbound.event(events, event)?;
                }
                outbound.heartbeat(ctx).await?;
                ticker.reset();
            }
            // While the stream is full, events wait in their queue instead.
            event = events.next(), if outbound.has_room() => outbound.event(events, event)?,
            msg = inbound.message() => {
                let msg = msg.map_err(SessionError::Stream)?.ok_or(SessionError::Closed)?;
                let verdict = ctx.fence.judge(msg.term);
                if let Verdict::Stale { highest } = verdict {
                    // No renewal, no command: a deposed leader's word counts for nothing.
                    ctx.metrics.stale_term_messages.inc();
                    let kind = message_kind(&msg);
                    warn!(
                        term = msg.term,
                        highest_term = highest,
                        message = kind,
                        "ignored a {kind} at term {}, below term {highest} already followed \
                         (a deposed leader); ending the session",
                        msg.term
                    );
                    return Err(SessionError::StaleTerm { term: msg.term, highest });
                }
                follow(ctx, verdict, msg.term).await;
                lease.renew(Instant::now());
                ctx.workers.renew_lease(lease);
                *lease_out = Some(lease);
                if let Some(CoordinatorBody::Ack(ack)) = &msg.body {
                    witness(ctx, &ack.store_id, ack.store_seq).await;
                }
                handle(ctx, msg)?;
            }
            () = tokio::time::sleep_until(lease.last_heard() + give_up_after) => {
                let silent = lease.silent_for(Instant::now());
                if !lease.is_expired(Instant::now()) {
                    warn!(
                        silent_for_ms = silent.as_millis() as u64,
                        lease_ms = pace.lease.as_millis() as u64,
                        "no word from the coordinator for {} (half the lease); ending the \
                         session to look for the leader (workers keep their lease)",
                        humantime::format_duration(silent)
                    );
                    return Err(SessionError::Silent(silent));
                }
                warn!(
                    silent_for_ms = silent.as_millis() as u64,
                    "lease expired: no word from coordinator for {}",
                    humantime::format_duration(silent)
                );
                return Err(SessionError::LeaseExpired(silent));
            }
        }
    }
}

/// A `LeaseRenewed` before `Registered`: renews the workers' lease (unless it comes from a
/// deposed leader) and says how long to wait for `Registered`: three quarters of the lease,
/// leaving the rest to dial again should it not come.
fn renew_before_registered(
    ctx: &SessionContext,
    url: &str,
    term: u64,
    lease_ms: u64,
    lease_out: &mut Option<Lease>,
) -> Result<Duration, SessionError> {
    if let Verdict::Stale { highest } = ctx.fence.judge(term) {
        ctx.metrics.stale_term_messages.inc();
        warn!(
            coordinator = %url,
            term,
            highest_term = highest,
            "ignored a lease renewal at term {term}, below term {highest} already followed (a \
             deposed leader); ending the session"
        );
        return Err(SessionError::StaleTerm { term, highest });
    }
    let duration = if lease_ms == 0 {
        FALLBACK_LEASE
    } else {
        Duration::from_millis(lease_ms)
    };
    let lease = Lease::new(duration, Instant::now());
    ctx.workers.renew_lease(lease);
    *lease_out = Some(lease);
    let wait = crate::lease::registered_wait(duration, REGISTER_TIMEOUT);
    info!(
        coordinator = %url,
        lease_ms = duration.as_millis() as u64,
        "coordinator {url} holds this node's registration in its queue and renewed the lease; \
         workers keep running, waiting up to {} for Registered",
        humantime::format_duration(wait)
    );
    Ok(wait)
}

/// What a coordinator message is, for log lines.
fn message_kind(msg: &CoordinatorMessage) -> &'static str {
    match &msg.body {
        Some(CoordinatorBody::LeaseRenewed(_)) => "lease renewal",
        Some(CoordinatorBody::Ack(_)) => "ack",
        Some(CoordinatorBody::Command(_)) => "command",
        Some(CoordinatorBody::Rejected(_)) => "rejection",
        Some(CoordinatorBody::Registered(_)) => "registration",
        None => "message",
    }
}

fn handle(ctx: &SessionContext, msg: CoordinatorMessage) -> Result<(), SessionError> {
    match msg.body {
        Some(CoordinatorBody::Ack(ack)) => debug!(seq = ack.seq, "ack"),
        Some(CoordinatorBody::Command(command)) => run_command(ctx, command),
        // A newer session of this node, or an operator, ended this one.
        Some(CoordinatorBody::Rejected(r)) => return Err(SessionError::Rejected(r.reason)),
        Some(CoordinatorBody::Registered(_)) => {
            warn!("coordinator repeated Registered mid-session; ignored");
        }
        // Renewed the lease, as every message does; nothing more to do.
        Some(CoordinatorBody::LeaseRenewed(_)) => debug!("lease renewal"),
        // A message kind from a newer revision of v1: it still renewed the lease.
        None => debug!("unknown coordinator message ignored"),
    }
    Ok(())
}

fn run_command(ctx: &SessionContext, command: Command) {
    match command.kind {
        Some(CommandKind::RunDiagnostics(r)) => {
            ctx.diagnostics.spawn(command.id, r.timeout_ms, r.command)
        }
        Some(CommandKind::StartWorker(start)) if !ctx.launch => warn!(
            job = %start.job_id,
            attempt = start.attempt,
            "refused to start a worker: [workers] launch = false (this agent only watches GPUs; \
             Slurm runs the jobs)"
        ),
        Some(CommandKind::StartWorker(start)) => {
            ctx.evidence.on_start(&start);
            ctx.workers.start_worker(start);
        }
        Some(CommandKind::StopWorkers(stop)) => ctx.evidence.stop(stop),
        Some(CommandKind::CaptureEvidence(capture)) => ctx.evidence.capture(capture),
        Some(CommandKind::ReadLog(read)) => ctx.workers.read_log(command.id, read),
        Some(CommandKind::ScanCheckpoints(scan)) => ctx.workers.scan_checkpoints(scan),
        Some(CommandKind::RunPreflight(run)) if !ctx.launch => warn!(
            job = %run.job_id,
            attempt = run.attempt,
            "refused to run a preflight: [workers] launch = false (this agent runs no job)"
        ),
        Some(CommandKind::RunPreflight(run)) => ctx.workers.run_preflight(run),
        Some(CommandKind::Remediate(step)) => ctx.remediation.spawn(step),
        None => warn!(
            command_id = command.id,
            "unknown command from a newer coordinator ignored; upgrade this agent"
        ),
    }
}

/// A failed sample still heartbeats (with no GPU data): silence would cost the node its lease.
async fn sample(probe: &Arc<dyn GpuProbe>) -> Vec<GpuSample> {
    let outcome =
        tokio::time::timeout(SAMPLE_TIMEOUT, on_blocking_pool(probe, |p| p.sample())).await;
    let error = match outcome {
        Ok(Ok(Ok(samples))) => return samples,
        Ok(Ok(Err(e))) => error_chain(&e),
        Ok(Err(e)) => error_chain(&e),
        Err(_) => format!(
            "no answer within {}",
            humantime::format_duration(SAMPLE_TIMEOUT)
        ),
    };
    warn!(%error, "GPU sample failed; heartbeat carries no GPU data");
    Vec::new()
}

/// NVML calls block in the driver; keep them off the async workers.
async fn on_blocking_pool<T: Send + 'static>(
    probe: &Arc<dyn GpuProbe>,
    f: fn(&dyn GpuProbe) -> Result<T, GpuError>,
) -> Result<Result<T, GpuError>, SessionError> {
    let probe = Arc::clone(probe);
    tokio::task::spawn_blocking(move || f(probe.as_ref()))
        .await
        .map_err(SessionError::GpuTask)
}
