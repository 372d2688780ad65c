//! A job as the coordinator keeps it (persisted whole, as JSON): spec,
//! intent (where attempt N runs), and what agents observed.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::jobspec::JobSpec;

/// How many history entries a job keeps.
pub const MAX_JOB_EVENTS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    /// Waiting for enough eligible nodes (see `reason`).
    Pending,
    /// Attempt `attempt` runs (or is starting) on `placement`.
    Running,
    /// Attempt `attempt` failed; its workers are being stopped on every node
    /// before anything else happens. `after_stop` says what comes next.
    Stopping,
    /// Stopped; waiting for the backoff before attempt N+1.
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobPhase {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobPhase::Succeeded | JobPhase::Failed | JobPhase::Cancelled
        )
    }

    /// Does the job hold its nodes (placement and spares)?
    pub fn holds_nodes(self) -> bool {
        matches!(
            self,
            JobPhase::Running | JobPhase::Stopping | JobPhase::Restarting
        )
    }
}

/// What a stopping attempt turns into once every worker is confirmed dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AfterStop {
    Restart,
    Fail,
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerPhase {
    /// StartWorker sent, no WorkerStarted yet.
    Starting,
    Running,
    /// Exited by itself (see `exit_code`).
    Exited,
    /// StopWorkers sent; waiting for confirmation.
    Stopping,
    /// Confirmed dead after a stop.
    Stopped,
    /// The node is Lost: its lease has expired, so the worker is dead.
    Lost,
}

impl WorkerPhase {
    pub fn is_dead(self) -> bool {
        matches!(
            self,
            WorkerPhase::Exited | WorkerPhase::Stopped | WorkerPhase::Lost
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerPhase::Starting => "starting",
            WorkerPhase::Running => "running",
            WorkerPhase::Exited => "exited",
            WorkerPhase::Stopping => "stopping",
            WorkerPhase::Stopped => "stopped",
            WorkerPhase::Lost => "lost",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Worker {
    pub node_rank: u32,
    pub phase: WorkerPhase,
    pub pid: u32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub progress_step: Option<u64>,
    /// When the step last changed (or the attempt started), unix ms.
    pub progress_at_ms: u64,
    /// When progress was last heard, on the monotonic clock: what hang detection measures
    /// from. Not persisted: a coordinator that starts re-arms it (`ClusterState::rearm_clocks`).
    #[serde(skip)]
    pub progress_mono: crate::time::Instant,
    pub log_path: String,
    /// Recent (unix ms, step) changes, for the step rate (not stored: a
    /// restarted coordinator measures afresh).
    /// When its start or stop command last went out (`commands`); not persisted.
    #[serde(skip)]
    pub sent: Option<crate::commands::Sent>,
    #[serde(skip)]
    pub rate_samples: std::collections::VecDeque<(crate::time::Instant, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub path: String,
    pub step: Option<u64>,
    pub seen_at_ms: u64,
    pub attempt: u64,
    /// How long the save took, as the agent measured it from the files'
    /// modification times (first file to completion marker).
    #[serde(default)]
    pub save_ms: Option<u64>,
    /// When the save completed, as the agent read it from the files (the newest modification
    /// time); the checkpoint interval is measured between these, not between arrivals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at_ms: Option<u64>,
}

impl Checkpoint {
    /// `checkpoint PATH (step N)`, or `a fresh start` for none: what an attempt resumes from.
    pub fn describe(c: Option<&Checkpoint>) -> String {
        c.map_or_else(
            || "a fresh start".to_owned(),
            |c| {
                format!(
                    "checkpoint {} (step {})",
                    c.path,
                    c.step.map_or_else(|| "?".into(), |s| s.to_string())
                )
            },
        )
    }
}

/// How many complete checkpoints a job remembers (for the checkpoint
/// interval and for choosing one to roll back to).
pub const MAX_CHECKPOINT_HISTORY: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u64,
    pub nodes: Vec<String>,
    pub started_at_ms: u64,
    pub ended_at_ms: u64,
    /// running, stopping, failed, succeeded, cancelled
    pub outcome: String,
    pub reason: String,
    pub culprit_node: String,
    pub resumed_from: Option<Checkpoint>,
    pub last_step: Option<u64>,
    /// Goodput marks (see `goodput`): when the fault behind this attempt's
    /// end happened (unix ms, 0 while it runs or when it succeeded), and
    /// when the coordinator detected it.
    #[serde(default)]
    pub fault_at_ms: u64,
    #[serde(default)]
    pub detected_at_ms: u64,
    /// crash, hang, node_lost, node_unhealthy, worker_gone, drain, cancelled.
    #[serde(default, with = "crate::kinds::stored")]
    pub failure_kind: Option<crate::kinds::FailureKind>,
    /// When a worker of this attempt first reported a step.
    #[serde(default)]
    pub first_progress_at_ms: Option<u64>,
    /// The step an earlier attempt had reached: steps up to it are recomputed.
    #[serde(default)]
    pub catch_up_step: Option<u64>,
    /// When every worker got past `catch_up_step`.
    #[serde(default)]
    pub caught_up_at_ms: Option<u64>,
    /// Triage verdicts per node, after an unexplained failure (see `triage`).
    #[serde(default)]
    pub triage: BTreeMap<String, crate::triage::Verdict>,
    /// How the failing worker ended (a crash), for crash-loop signatures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_end: Option<crate::jobs::crash_loop::WorkerEnd>,
    /// Whether this failure counts toward a crash loop, judged once triage is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_loop: Option<crate::jobs::crash_loop::Judged>,
    /// A hang's evidence as the previous release kept it, inside the job record: read from
    /// old records, never written (evidence is stored apart now, see `evidence`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<crate::jobs::evidence::NodeEvidence>,
    /// One note per node that answered a hang's capture, by node; the evidence itself is
    /// stored apart, one record per node (see `evidence`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evidence_from: BTreeMap<String, crate::jobs::evidence::EvidenceNote>,
    /// The node the hang's evidence points at, and why ("n2: port mlx5_0/1 is DOWN");
    /// empty when it points nowhere.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub suspect: String,
    /// The gang preflight that ran before this attempt's workers (see `preflight`), once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preflight: Option<crate::jobs::preflight::Preflight>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at_ms: u64,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub seq: u64,
    pub spec: JobSpec,
    pub spec_toml: String,
    pub phase: JobPhase,
    /// What it waits for, why it restarts, or why it failed.
    pub reason: String,
    /// Current (or last) attempt; 0 before the first start.
    pub attempt: u64,
    /// Nodes of the current attempt, by node rank.
    pub placement: Vec<String>,
    /// Nodes held for fast replacement.
    pub spares: Vec<String>,
    pub restarts: u32,
    pub attempts: Vec<Attempt>,
    /// Workers of the current attempt, by node.
    pub workers: BTreeMap<String, Worker>,
    pub checkpoint: Option<Checkpoint>,
    pub submitted_at_ms: u64,
    pub after_stop: Option<AfterStop>,
    /// Backoff deadline before the next attempt, unix ms.
    pub restart_at_ms: Option<u64>,
    /// When the restart backoff ends, on the monotonic clock (`restart_at_ms` is its record
    /// for display). Re-armed from the record when a coordinator starts.
    #[serde(skip)]
    pub restart_at: Option<crate::time::Instant>,
    /// When the current failure was detected, for the time lost to failures.
    pub failed_at_ms: Option<u64>,
    /// When the fault behind the current failure was observed (by an agent
    /// where known), for the fault-to-relaunch latency.
    #[serde(default)]
    pub fault_at_ms: Option<u64>,
    /// What kind of failure the current one is (crash, hang, node_lost, ...).
    #[serde(default, with = "crate::kinds::stored")]
    pub failure_kind: Option<crate::kinds::FailureKind>,
    pub lost_ms: u64,
    /// The highest step any attempt reached (every worker past it).
    #[serde(default)]
    pub high_water_step: Option<u64>,
    /// Complete checkpoints seen, oldest first, at most `MAX_CHECKPOINT_HISTORY`.
    #[serde(default)]
    pub checkpoints: Vec<Checkpoint>,
    /// Checkpoint paths that failed `[checkpoint] verify_command` before a relaunch: never
    /// resumed from again (not when reported, not by a rollback, not by a later scan), even
    /// if the trainer rewrites the directory later.
    #[serde(default)]
    pub bad_checkpoints: BTreeSet<String>,
    /// When the job reached a terminal state.
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    /// The triage of the last unexplained failure; the next attempt waits for it.
    #[serde(default)]
    pub triage: Option<crate::triage::Triage>,
    /// Nodes of the current attempt slower than the gang, and since when.
    /// Since when each node has been slower than its gang (monotonic; not persisted: a
    /// coordinator that starts watches stragglers afresh).
    #[serde(skip)]
    pub slow_since: BTreeMap<String, crate::time::Instant>,
    /// Nodes flagged as stragglers in the current attempt.
    #[serde(default)]
    pub stragglers: std::collections::BTreeSet<String>,
    /// Node rank 0's recent training metrics (see `training_health`).
    #[serde(default)]
    pub loss_history: std::collections::VecDeque<crate::training_health::Report>,
    /// The attempt that starts from a rolled-back checkpoint: checkpoints
    /// completed before it started (newer, from the spike) are ignored.
    #[serde(default)]
    pub rollback_attempt: Option<u64>,
    /// Nodes the next placement must not use (a straggler swapped out).
    #[serde(default)]
    pub avoid: std::collections::BTreeSet<String>,
    /// Operator-approved environment (`clusterctl job restart --env`), over the spec's.
    #[serde(default)]
    pub env_override: BTreeMap<String, String>,
    pub events: Vec<JobEvent>,
    /// The checkpoint scan the current attempt waits for before its workers start (see
    /// `resume_scan`; not stored).
    #[serde(skip)]
    pub resume_scan: Option<crate::jobs::resume_scan::Scan>,
    /// The gang preflight of the current (or last) attempt (see `preflight`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preflight: Option<crate::jobs::preflight::Preflight>,
    /// Events not yet announced to `clusterctl events` watchers (not stored).
    #[serde(skip)]
    pub unannounced: Vec<JobEvent>,
}

impl Job {
    pub fn event(&mut self, at_ms: u64, kind: &str, message: String) {
        if self.events.len() >= MAX_JOB_EVENTS {
            self.events.remove(0);
        }
        let event = JobEvent {
            at_ms,
            kind: kind.to_owned(),
            message,
        };
        if self.unannounced.len() < MAX_JOB_EVENTS {
            self.unannounced.push(event.clone());
        }
        self.events.push(event);
    }

    pub fn current_attempt_mut(&mut self) -> Option<&mut Attempt> {
        let n = self.attempt;
        self.attempts.iter_mut().rev().find(|a| a.attempt == n)
    }

    /// The lowest step any worker of the current attempt reported.
    pub fn progress_step(&self) -> Option<u64> {
        self.workers.values().filter_map(|w| w.progress_step).min()
    }

    pub fn phase_name(&self) -> &'static str {
        match self.phase {
            JobPhase::Pending => "Pending",
            JobPhase::Running => "Running",
            JobPhase::Stopping if self.after_stop == Some(AfterStop::Cancel) => "Cancelling",
            JobPhase::Stopping => "Restarting",
            JobPhase::Restarting => "Restarting",
            JobPhase::Succeeded => "Succeeded",
            JobPhase::Failed => "Failed",
            JobPhase::Cancelled => "Cancelled",
        }
    }
}
