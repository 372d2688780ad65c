//! Jobs: the summary `jobs` lists, and one job's detail (attempts, checkpoint, workers, events).
//!
//! Field names are the protocol's (`JobSummary`, `JobDetail`, ...); an optional protocol field
//! is `null` when absent, never 0.

use serde::Serialize;
use vigil_proto::v1;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    pub id: String,
    pub name: String,
    /// Pending, Running, Restarting, Succeeded, Failed, Cancelling, Cancelled.
    pub state: String,
    /// Current (or last) attempt, from 1; 0 before the first start.
    pub attempt: u64,
    pub restarts: u32,
    pub max_restarts: u32,
    pub nodes: u32,
    pub gpus_per_node: u32,
    /// Nodes of the current attempt, by node rank.
    pub assigned_nodes: Vec<String>,
    pub last_checkpoint_step: Option<u64>,
    pub submitted_at_unix_ms: u64,
    /// What it waits for (Pending), why it restarts, or why it failed.
    pub reason: String,
    /// Lowest step reported by the workers of the current attempt.
    pub progress_step: Option<u64>,
    /// `vigil` (its own job) or `slurm` (a Slurm job vigil recorded, id `slurm:<id>`).
    pub source: String,
}

impl JobSummary {
    /// A Slurm job vigil recorded (docs/slurm.md), not one vigil runs.
    pub fn is_slurm(&self) -> bool {
        self.source == SLURM
    }
}

/// The `source` of a Slurm job.
pub const SLURM: &str = "slurm";

impl From<v1::JobSummary> for JobSummary {
    fn from(j: v1::JobSummary) -> Self {
        Self {
            id: j.id,
            name: j.name,
            state: j.state,
            attempt: j.attempt,
            restarts: j.restarts,
            max_restarts: j.max_restarts,
            nodes: j.nodes,
            gpus_per_node: j.gpus_per_node,
            assigned_nodes: j.assigned_nodes,
            last_checkpoint_step: j.last_checkpoint_step,
            submitted_at_unix_ms: j.submitted_at_unix_ms,
            reason: j.reason,
            progress_step: j.progress_step,
            source: if j.source.is_empty() {
                "vigil".to_owned()
            } else {
                j.source
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobList {
    pub jobs: Vec<JobSummary>,
}

impl From<v1::ListJobsResponse> for JobList {
    fn from(r: v1::ListJobsResponse) -> Self {
        Self {
            jobs: r.jobs.into_iter().map(JobSummary::from).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckpointRecord {
    pub path: String,
    pub step: Option<u64>,
    pub seen_at_unix_ms: u64,
    /// The attempt that wrote it.
    pub attempt: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptRecord {
    pub attempt: u64,
    pub nodes: Vec<String>,
    pub started_at_unix_ms: u64,
    /// 0 while it runs.
    pub ended_at_unix_ms: u64,
    /// running, stopping, failed, succeeded, cancelled.
    pub outcome: String,
    pub reason: String,
    /// The node blamed for the failure; empty when none.
    pub culprit_node: String,
    /// The checkpoint it resumed from; empty for a fresh start.
    pub resumed_from: String,
    pub resumed_from_step: Option<u64>,
    pub last_step: Option<u64>,
    /// Each node's triage verdict after an unexplained failure; `{}` when none.
    pub triage: std::collections::BTreeMap<String, String>,
    /// How the worker whose failure ended the attempt ended; `null` when no worker failed it.
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// That worker's last output (at most 2 KiB); empty when none.
    pub log_tail: String,
    /// The crash-loop judgement: `counts: <signature>`, `excused: <why>`, or empty before it.
    pub crash_loop: String,
    /// A hang's evidence, one entry per node that answered, in node order; `[]` otherwise.
    pub evidence: Vec<NodeEvidence>,
    /// The node the evidence points at, and why; empty when it points nowhere.
    pub suspect: String,
    /// The gang preflight before its workers: a line per round, then `verdict: ...`; `[]` when
    /// none ran.
    pub preflight: Vec<String>,
}

/// What a hung attempt's worker on one node was doing, captured before it was stopped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeEvidence {
    pub node: String,
    pub captured_at_unix_ms: u64,
    pub processes: Vec<ProcessEvidence>,
    /// The worker's last output (at most 4 KiB).
    pub log_tail: String,
    /// Fabric ports whose counters rose during the attempt, or that are down.
    pub fabric: Vec<FabricDelta>,
    /// Why nothing (or less) was captured; empty when it ran.
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessEvidence {
    pub pid: u32,
    pub comm: String,
    /// `S (sleeping)`, `D (disk sleep)`, ...
    pub state: String,
    pub wchan: String,
    pub kernel_stack: String,
    /// `py-spy dump` output; empty where py-spy is not installed.
    pub python_stacks: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FabricDelta {
    pub port: String,
    pub state: String,
    pub link_downed: u64,
    pub link_error_recovery: u64,
    pub symbol_error: u64,
    pub port_rcv_errors: u64,
    pub port_xmit_discards: u64,
    pub carrier_changes: u64,
}

impl From<v1::NodeEvidence> for NodeEvidence {
    fn from(e: v1::NodeEvidence) -> Self {
        Self {
            node: e.node,
            captured_at_unix_ms: e.captured_at_unix_ms,
            processes: e
                .processes
                .into_iter()
                .map(|p| ProcessEvidence {
                    pid: p.pid,
                    comm: p.comm,
                    state: p.state,
                    wchan: p.wchan,
                    kernel_stack: p.kernel_stack,
                    python_stacks: p.python_stacks,
                })
                .collect(),
            log_tail: e.log_tail,
            fabric: e
                .fabric
                .into_iter()
                .map(|d| FabricDelta {
                    port: d.port,
                    state: d.state,
                    link_downed: d.link_downed,
                    link_error_recovery: d.link_error_recovery,
                    symbol_error: d.symbol_error,
                    port_rcv_errors: d.port_rcv_errors,
                    port_xmit_discards: d.port_xmit_discards,
                    carrier_changes: d.carrier_changes,
                })
                .collect(),
            error: e.error,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerStatus {
    pub node: String,
    pub node_rank: u32,
    /// starting, running, exited, stopped, lost.
    pub state: String,
    pub exit_code: Option<i32>,
    pub progress_step: Option<u64>,
    /// When the step last changed; 0 before the first step.
    pub progress_at_unix_ms: u64,
    pub pid: u32,
    pub log_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobEvent {
    pub at_unix_ms: u64,
    pub kind: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobDetail {
    pub job: JobSummary,
    pub spec_toml: String,
    pub spare_nodes: Vec<String>,
    pub attempts: Vec<AttemptRecord>,
    /// The last complete checkpoint; `null` before the first.
    pub last_checkpoint: Option<CheckpointRecord>,
    /// Wall time between a failure being detected and the next attempt running.
    pub lost_ms: u64,
    pub events: Vec<JobEvent>,
    pub workers: Vec<WorkerStatus>,
    pub workdir: String,
    pub checkpoint_dir: String,
    pub checkpoint_layout: String,
    /// Where the job's wall time went; `null` from a coordinator that does not account it.
    pub goodput: Option<super::Goodput>,
    /// Checkpoints that failed `[checkpoint] verify_command`: never resumed from again.
    pub bad_checkpoints: Vec<String>,
    /// A Slurm job's own record (source `slurm`); `null` for vigil's jobs.
    pub slurm: Option<SlurmJobInfo>,
}

/// What vigil recorded of a Slurm job beyond its runs (which are its `attempts`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlurmJobInfo {
    /// Slurm's job id.
    pub job_id: String,
    pub user: String,
    /// Slurm's state when last seen: RUNNING, PENDING, COMPLETED, ...
    pub slurm_state: String,
    /// Each requeue vigil sent for a hardware fault, oldest first.
    pub requeues: Vec<SlurmRequeue>,
    /// `null` while it is in Slurm's queue.
    pub finished_at_unix_ms: Option<u64>,
    /// Slurm's final state, or `left the queue`; empty while in the queue.
    pub outcome: String,
    /// vigil requeued it and it has not run since.
    pub awaiting_rerun: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlurmRequeue {
    pub at_unix_ms: u64,
    /// The faulty node.
    pub node: String,
    pub reason: String,
    /// When vigil cordoned the node; `null` when unknown.
    pub fault_at_unix_ms: Option<u64>,
    /// The run it ended (from 1).
    pub run: u64,
}

impl From<v1::SlurmJobInfo> for SlurmJobInfo {
    fn from(s: v1::SlurmJobInfo) -> Self {
        Self {
            job_id: s.job_id,
            user: s.user,
            slurm_state: s.slurm_state,
            requeues: s
                .requeues
                .into_iter()
                .map(|q| SlurmRequeue {
                    at_unix_ms: q.at_unix_ms,
                    node: q.node,
                    reason: q.reason,
                    fault_at_unix_ms: q.fault_at_unix_ms,
                    run: q.run,
                })
                .collect(),
            finished_at_unix_ms: s.finished_at_unix_ms,
            outcome: s.outcome,
            awaiting_rerun: s.awaiting_rerun,
        }
    }
}

impl JobDetail {
    /// Maps a job answer; `id` fills the summary if a server ever omits it.
    pub fn from_proto(d: v1::JobDetail, id: &str) -> Self {
        let summary = d.summary.unwrap_or_else(|| v1::JobSummary {
            id: id.to_string(),
            ..Default::default()
        });
        Self {
            job: summary.into(),
            spec_toml: d.spec_toml,
            spare_nodes: d.spare_nodes,
            attempts: d
                .attempts
                .into_iter()
                .map(|a| AttemptRecord {
                    attempt: a.attempt,
                    nodes: a.nodes,
                    started_at_unix_ms: a.started_at_unix_ms,
                    ended_at_unix_ms: a.ended_at_unix_ms,
                    outcome: a.outcome,
                    reason: a.reason,
                    culprit_node: a.culprit_node,
                    resumed_from: a.resumed_from,
                    resumed_from_step: a.resumed_from_step,
                    last_step: a.last_step,
                    triage: a.triage.into_iter().collect(),
                    exit_code: a.exit_code,
                    signal: a.signal,
                    log_tail: a.log_tail,
                    crash_loop: a.crash_loop,
                    evidence: a.evidence.into_iter().map(NodeEvidence::from).collect(),
                    suspect: a.suspect,
                    preflight: a.preflight,
                })
                .collect(),
            last_checkpoint: d.last_checkpoint.map(|c| CheckpointRecord {
                path: c.path,
                step: c.step,
                seen_at_unix_ms: c.seen_at_unix_ms,
                attempt: c.attempt,
            }),
            lost_ms: d.lost_ms,
            events: d
                .events
                .into_iter()
                .map(|e| JobEvent {
                    at_unix_ms: e.at_unix_ms,
                    kind: e.kind,
                    message: e.message,
                })
                .collect(),
            workers: d
                .workers
                .into_iter()
                .map(|w| WorkerStatus {
                    node: w.node,
                    node_rank: w.node_rank,
                    state: w.state,
                    exit_code: w.exit_code,
                    progress_step: w.progress_step,
                    progress_at_unix_ms: w.progress_at_unix_ms,
                    pid: w.pid,
                    log_path: w.log_path,
                })
                .collect(),
            workdir: d.workdir,
            checkpoint_dir: d.checkpoint_dir,
            checkpoint_layout: d.checkpoint_layout,
            goodput: d.goodput.map(super::Goodput::from),
            bad_checkpoints: d.bad_checkpoints,
            slurm: d.slurm.map(SlurmJobInfo::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures;
    use serde_json::json;

    #[test]
    fn job_detail_json_has_the_documented_shape() {
        let detail = JobDetail::from_proto(fixtures::running_job(), "j-1");
        let value = serde_json::to_value(&detail).expect("serializes");
        assert_eq!(
            value["job"],
            json!({
                "id": "j-1",
                "name": "opt-demo",
                "state": "Running",
                "attempt": 2,
                "restarts": 1,
                "max_restarts": 50,
                "nodes": 2,
                "gpus_per_node": 8,
                "assigned_nodes": ["gpu-001", "gpu-004"],
                "last_checkpoint_step": 200,
                "submitted_at_unix_ms": 1_000_000,
                "reason": "",
                "progress_step": 230,
                "source": "vigil",
            })
        );
        assert_eq!(
            value["attempts"][0],
            json!({
                "attempt": 1,
                "nodes": ["gpu-001", "gpu-003"],
                "started_at_unix_ms": 1_010_000,
                "ended_at_unix_ms": 1_300_000,
                "outcome": "failed",
                "reason": "XID 79 (GPU has fallen off the bus)",
                "culprit_node": "gpu-003",
                "resumed_from": "",
                "resumed_from_step": null,
                "last_step": 260,
                "triage": {},
                "exit_code": null,
                "signal": null,
                "log_tail": "",
                "crash_loop": "excused: gpu-003 was cordoned automatically",
                "evidence": [],
                "suspect": "",
                "preflight": [],
            })
        );
        assert_eq!(
            value["attempts"][1]["preflight"],
            json!([
                "round 0: [gpu-001,gpu-004] passed",
                "verdict: passed on the whole gang"
            ])
        );
        assert_eq!(
            value["last_checkpoint"],
            json!({"path": "/ckpt/step_00000200", "step": 200, "seen_at_unix_ms": 1_200_000, "attempt": 1})
        );
        assert_eq!(
            value["workers"][1],
            json!({
                "node": "gpu-004",
                "node_rank": 1,
                "state": "running",
                "exit_code": null,
                "progress_step": null,
                "progress_at_unix_ms": 0,
                "pid": 0,
                "log_path": "",
            })
        );
        assert_eq!(
            value["events"][0],
            json!({"at_unix_ms": 1_000_000, "kind": "submitted", "message": "submitted from job.toml"})
        );
        let keys: Vec<&String> = value.as_object().expect("object").keys().collect();
        assert_eq!(keys.len(), 14, "{keys:?}");
        assert_eq!(value["slurm"], json!(null));
        assert_eq!(value["lost_ms"], json!(65_000));
        assert_eq!(value["bad_checkpoints"], json!([]));
        assert_eq!(value["spare_nodes"], json!(["gpu-009"]));
    }

    #[test]
    fn a_job_without_summary_or_checkpoint_keeps_the_id_and_nulls() {
        let detail = JobDetail::from_proto(v1::JobDetail::default(), "j-9");
        let value = serde_json::to_value(&detail).expect("serializes");
        assert_eq!(value["job"]["id"], json!("j-9"));
        assert_eq!(value["job"]["last_checkpoint_step"], json!(null));
        assert_eq!(value["job"]["progress_step"], json!(null));
        assert_eq!(value["last_checkpoint"], json!(null));
        assert_eq!(value["attempts"], json!([]));
    }
}
