//! Cluster state: `ClusterState`, the `Effect`s a transition asks of the engine, and
//! `StateError`. The transitions live beside what they change: `nodes::transitions` (register,
//! heartbeat, cordon, ...) and `jobs`.
//!
//! Nothing here reads a clock, touches the store or a socket. The engine feeds
//! inputs, persists the `Persist` effects (flushed) and only then acts on the rest.

use std::collections::BTreeMap;

use vigil_proto::v1;

use crate::config::{HealthConfig, LivenessConfig};
use crate::health::Condition;
use crate::node::{Availability, Cordon, GpuRecord, Node, NodeEvent, NodeRecord};
use crate::xid::XidClass;

pub use crate::time::Now;

/// A validated registration of one agent session.
#[derive(Debug, Clone)]
pub struct Registration {
    pub session: u64,
    pub node: String,
    pub hostname: String,
    pub address: String,
    pub agent_version: String,
    pub simulated: bool,
    pub gpus: Vec<GpuRecord>,
    pub workers: Vec<v1::WorkerInfo>,
    pub identity: crate::identity::HostIdentity,
    /// The fabric ports the host watches, as read at registration (empty: none known).
    pub fabric: Vec<v1::FabricPort>,
}

/// Why an agent's message, or a report in it, changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// From a session that is not live (superseded by a newer registration of its node, or
    /// of an unknown node): the shell ends it.
    StaleSession,
    /// About work not assigned to the reporting node (see `input::assigned`).
    Unassigned(crate::input::assigned::Unassigned),
    /// The GPU part of a heartbeat that says GPU health is unchanged, from a session that has
    /// sent no full samples to read it against (the rest of the heartbeat is applied): the
    /// node's GPU state stays as it was. Once per session; the shell logs a warning.
    GpuTelemetryWithoutSamples,
}

/// What the engine must do after a transition, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Store this record. Every change of a turn is committed once, before any effect of
    /// that turn is carried out (one durability meaning, whatever the backend).
    Persist(NodeRecord),
    /// Another host (`session`) claims a node name bound to a host that lives: its
    /// registration is refused with `message` (and counted); nothing about the node changed.
    IdentityConflict {
        node: String,
        session: u64,
        message: String,
    },
    /// Session `session` of `node` may have its agent's lease renewed now, before its
    /// registration is stepped (`Input::Contact`): the node's silence starts again, so it
    /// cannot be `Lost` (its work given away) within `lost_after`, longer than the lease.
    LeaseRenewal {
        node: String,
        session: u64,
    },
    /// A newer session of the same node replaced this one: end its stream.
    CloseSession {
        node: String,
        session: u64,
    },
    /// A node's availability changed; the engine logs it and counts it.
    Availability {
        node: String,
        from: Option<Availability>,
        to: Availability,
        why: &'static str,
    },
    /// A node's cordon changed. `rule` names the health rule for automatic
    /// cordons ("manual" for an operator's); `observed_at_ms` is when the
    /// agent saw the evidence, for the fault-to-cordon latency.
    Cordoned {
        node: String,
        cordon: Cordon,
        rule: crate::kinds::CordonRule,
        observed_at_ms: Option<u64>,
    },
    Uncordoned {
        node: String,
        previous: Cordon,
    },
    /// Add to the node's history (stored; durable with the next flush).
    Record {
        node: String,
        event: NodeEvent,
    },
    /// The health policy changed its judgement of a node.
    Condition {
        node: String,
        from: Condition,
        to: Condition,
        reasons: Vec<String>,
    },
    /// Write this job and flush it before acting on anything that follows.
    PersistJob(Box<crate::job::Job>),
    /// Store one node's evidence of a hung attempt, apart from the job record (see
    /// `jobs::evidence`); keyed by (job, attempt, node), written again if the node answers again.
    PersistEvidence {
        job: String,
        attempt: u64,
        evidence: Box<crate::jobs::evidence::NodeEvidence>,
    },
    /// Delete the stored evidence of `nodes` for (job, attempt): beyond what the job keeps.
    DropEvidence {
        job: String,
        attempt: u64,
        nodes: Vec<String>,
    },
    /// Send a command to a node's agent (dropped if it is not connected:
    /// the job logic never relies on a command reaching an unreachable node).
    Command {
        node: String,
        kind: v1::command::Kind,
    },
    /// Attempt N+1 of a job started after a failure (for metrics).
    Restarted {
        job: String,
        kind: crate::kinds::FailureKind,
        /// From the failure's detection to this start.
        lost_ms: u64,
        /// From the fault's observation (by an agent, where known) to this start.
        fault_to_relaunch_ms: u64,
    },
    /// A stale agent message (a superseded session, an unknown node), or a report about work
    /// not assigned to its node: nothing changed for it; the shell counts it and, for a
    /// stale session, ends that session.
    Ignored {
        reason: String,
        why: Ignored,
    },
    /// An operator's request was refused; nothing changed.
    Refused(StateError),
    /// What a request produced, for the caller's answer.
    Answer(crate::step::Answer),
    /// One line for the log about a job's decision.
    JobLog {
        job: String,
        message: String,
        warn: bool,
    },
    /// Write this lemon record (a failure charged to a host or GPU, or an
    /// operator's clear) and flush it before acting on what follows.
    PersistLemon(Box<crate::lemons::LemonRecord>),
    /// Write the recovery hold (begun, or confirmed) and flush it before acting on what
    /// follows; the engine logs it.
    PersistRecovery(Box<crate::recovery::RecoveryHold>),
    /// Write the cordon breaker (see `breaker`) and flush it before acting on what follows.
    PersistBreaker(Box<crate::breaker::Breaker>),
    /// Write the ledger of Slurm jobs (see `slurm::jobs`); it changed.
    PersistSlurmJobs(Box<crate::slurm::jobs::Ledger>),
    /// The open cordon breaker held an automatic cordon of `node` (counted; logged).
    CordonHeld {
        node: String,
        rule: crate::kinds::CordonRule,
        evidence: String,
    },
    /// One line for the log about the cordon breaker (it opened, an operator reset it).
    BreakerLog {
        message: String,
        warn: bool,
    },
    /// A step of the remediation ladder ended (or needs-repair was entered): counted as
    /// `vigil_remediations_total{action, outcome}`, logged with `message`.
    Remediation {
        node: String,
        step: crate::remediation::Step,
        /// ok, failed, no_answer (agent steps); cordoned, held (needs-repair).
        outcome: &'static str,
        message: String,
    },
    /// An XID arrived (counted whatever its class).
    Xid {
        node: String,
        gpu: u32,
        xid: u32,
        class: XidClass,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("node \"{0}\" not found (clusterctl nodes lists known nodes)")]
    UnknownNode(String),
    #[error("message from a superseded session {session} of node \"{node}\"")]
    StaleSession { node: String, session: u64 },
    #[error(
        "node \"{node}\" was cordoned automatically ({reason}) and no diagnostics have passed since; \
         run `clusterctl diagnose {node}` until it passes, or uncordon with --force"
    )]
    NeedsDiagnostics { node: String, reason: String },
    #[error(
        "node \"{node}\" is refused service: {why}; once the hardware is fixed or replaced, run \
         `clusterctl uncordon {node} --clear-lemon`"
    )]
    Blocklisted { node: String, why: String },
    #[error(
        "node \"{node}\" needs repair ({evidence}); only an operator clears it, and diagnostics \
         passing do not: once the hardware is repaired or replaced, run \
         `clusterctl uncordon {node} --force`"
    )]
    NeedsRepair { node: String, evidence: String },
    #[error("no host or GPU \"{0}\" on the lemon list (clusterctl nodes --lemons lists them)")]
    UnknownLemon(String),
    #[error("job \"{0}\" not found (clusterctl jobs lists the jobs)")]
    UnknownJob(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("no recovery hold to confirm: {0}")]
    NoRecoveryHold(String),
}

#[derive(Debug, Clone)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, Node>,
    pub liveness: LivenessConfig,
    pub health: HealthConfig,
    pub jobs: BTreeMap<String, crate::job::Job>,
    pub next_job_seq: u64,
    /// Failures charged to hosts and GPUs (see `lemons`).
    pub lemons: crate::lemons::Ledger,
    pub triage: crate::triage::TriageConfig,
    pub burn_in: crate::burn_in::BurnInConfig,
    pub stragglers: crate::stragglers::StragglerConfig,
    /// What a hang's evidence may store (see `jobs::evidence`).
    pub evidence: crate::jobs::evidence::EvidenceConfig,
    /// Stops sent for workers that agents report and no current attempt owns, keyed by
    /// (node, job, attempt): re-sent with backoff until the agent stops reporting them.
    pub stray_stops: BTreeMap<(String, String, u64), crate::commands::Sent>,
    /// After a `--recover` start: nodes held for review, jobs until an operator confirms
    /// (see `recovery`). Persisted as a cluster-wide record; the engine loads it.
    pub recovery: Option<crate::recovery::RecoveryHold>,
    /// Caps automatic cordons (see `breaker`). Persisted as a cluster-wide record; the engine
    /// loads it.
    pub breaker: crate::breaker::Breaker,
    /// The remediation ladder's rules (see `remediation`); each node's ladder is on its record.
    pub remediation: crate::remediation::RemediationConfig,
    /// vigil's records of the Slurm jobs it saw on its nodes (`[slurm]`, see `slurm::jobs`).
    /// Persisted as a cluster-wide record; the engine loads it.
    pub slurm_jobs: crate::slurm::jobs::Ledger,
}

impl ClusterState {
    /// State after a (re)start: every stored node is `Unreachable` until its
    /// agent reconnects, and `Lost` if it has not within `lost_after`.
    pub fn load(
        records: Vec<NodeRecord>,
        events: Vec<(String, NodeEvent)>,
        liveness: LivenessConfig,
        health: HealthConfig,
        now: Now,
    ) -> Self {
        let mut nodes: BTreeMap<String, Node> = records
            .into_iter()
            .map(|r| (r.name.clone(), Node::from_record(r, now.mono, now.wall_ms)))
            .collect();
        for (name, event) in events {
            if let Some(node) = nodes.get_mut(&name) {
                node.push_event(event);
            }
        }
        Self {
            nodes,
            liveness,
            health,
            jobs: BTreeMap::new(),
            next_job_seq: 0,
            lemons: crate::lemons::Ledger::default(),
            triage: crate::triage::TriageConfig::default(),
            burn_in: crate::burn_in::BurnInConfig::default(),
            stragglers: crate::stragglers::StragglerConfig::default(),
            evidence: crate::jobs::evidence::EvidenceConfig::default(),
            stray_stops: BTreeMap::new(),
            recovery: None,
            breaker: crate::breaker::Breaker::default(),
            remediation: crate::remediation::RemediationConfig::default(),
            slurm_jobs: crate::slurm::jobs::Ledger::default(),
        }
    }

    /// Add the jobs loaded from the store.
    pub fn with_jobs(mut self, jobs: Vec<crate::job::Job>) -> Self {
        self.next_job_seq = jobs.iter().map(|j| j.seq).max().unwrap_or(0);
        self.jobs = jobs.into_iter().map(|j| (j.id.clone(), j)).collect();
        self
    }
}

/// Add `event` to the node's history and say so to the engine (which stores it).
pub(crate) fn record(node: &mut Node, event: NodeEvent) -> Effect {
    node.push_event(event.clone());
    Effect::Record {
        node: node.record.name.clone(),
        event,
    }
}
