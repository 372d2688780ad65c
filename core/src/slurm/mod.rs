//! vigil's node decisions carried into Slurm, decided here, purely: which Slurm node to drain
//! or resume and which Slurm job to requeue or release from its requeue hold. The coordinator's
//! Slurm adapter reads Slurm (`sinfo`, `squeue`), calls [`plan`], and runs the actions it
//! returns (`scontrol`); nothing here runs a process.
//!
//! Reconcile, don't remember: what Slurm should look like is derived each round from vigil's
//! nodes and from what Slurm shows. A drain is vigil's when its reason starts with
//! [`REASON_PREFIX`], so a coordinator restart forgets nothing, and a drain an administrator set
//! (any other reason) is never lifted. The one memory, the jobs vigil requeued whose requeue
//! hold it must still clear, is derived from vigil's durable records of Slurm jobs (`jobs`).
//!
//! Layout: `hostlist` (Slurm's compressed node lists), `parse` (`sinfo`/`squeue` output),
//! `jobs` (vigil's record of each Slurm job it saw: runs, requeues, outcome), `goodput` (a
//! Slurm job's productive and lost time), `state` (the ledger in the cluster state: the
//! adapter's inputs).

use std::collections::{BTreeMap, BTreeSet};

use crate::nodes::node::{Availability, CordonSource, Node, NodeEvent};
use crate::state::{ClusterState, Effect, Now, record};

pub mod goodput;
pub mod hostlist;
pub mod jobs;
pub mod parse;
mod state;

/// Every drain reason vigil sets starts with this; it is how a drain is known to be vigil's.
pub const REASON_PREFIX: &str = "vigil: ";
/// Longest reason vigil sets, in bytes: Slurm keeps reasons in full (the Slurm test sets a
/// 307-byte one and reads it back whole), so this cut is vigil's, to keep `sinfo` and
/// `scontrol show node` lines readable; the prefix survives it.
pub const MAX_REASON_BYTES: usize = 128;
/// The reason a `Lost` node is drained with.
pub const LOST_REASON: &str = "vigil: agent lost";
/// The pending reason Slurm gives a requeued job until its `BeginTime` (about two minutes
/// after the requeue).
pub const HOLD_REASON: &str = "BeginTime";

/// Why vigil wants a node out of Slurm's scheduling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainCause {
    /// vigil cordoned it on evidence (an XID, ECC errors, a lemon, a failed diagnostic): a
    /// hardware fault, so the jobs on it are requeued.
    Fault(String),
    /// An operator cordoned it in vigil: Slurm drains it, running jobs finish.
    Operator(String),
    /// Its agent is `Lost`: nothing watches its GPUs.
    Lost,
}

impl DrainCause {
    /// The reason Slurm shows: [`REASON_PREFIX`], the cause, cut to [`MAX_REASON_BYTES`] on a
    /// character boundary, on one line.
    pub fn reason(&self) -> String {
        let text = match self {
            Self::Fault(r) | Self::Operator(r) => format!("{REASON_PREFIX}{r}"),
            Self::Lost => LOST_REASON.to_owned(),
        };
        let mut text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if text.len() > MAX_REASON_BYTES {
            let mut end = MAX_REASON_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    }

    fn requeues(&self) -> bool {
        matches!(self, Self::Fault(_) | Self::Lost)
    }
}

/// What vigil wants of one node in Slurm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Drained, for this cause.
    Drained(DrainCause),
    /// Schedulable: vigil's own drain, if Slurm still shows one, is lifted.
    Schedulable,
    /// Neither: vigil does not know (a node cordoned for review after a recovered store may
    /// have been cordoned for a fault that the store lost), so Slurm is left as it is.
    AsIs,
}

/// What vigil wants of `node` in Slurm. An unreachable node is not drained until it is
/// `Lost`; a node cordoned for review after a recovered store is neither drained (that would
/// drain the whole Slurm cluster for a vigil bookkeeping hold) nor resumed.
pub fn want(node: &Node) -> Want {
    if node.availability == Availability::Lost {
        return Want::Drained(DrainCause::Lost);
    }
    let Some(cordon) = node.record.cordon.as_ref() else {
        return Want::Schedulable;
    };
    match cordon.source {
        CordonSource::Auto => Want::Drained(DrainCause::Fault(cordon.reason.clone())),
        CordonSource::Operator => Want::Drained(DrainCause::Operator(cordon.reason.clone())),
        CordonSource::Recovery => Want::AsIs,
    }
}

/// One vigil node as the plan sees it: its Slurm name and what vigil wants of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub slurm_name: String,
    pub want: Want,
}

/// One Slurm node as `sinfo` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmNode {
    pub name: String,
    /// Slurm's long state, lowercase (`idle`, `allocated`, `drained`, `draining`, `down*`).
    pub state: String,
    /// Drained or draining (jobs keep off it).
    pub drained: bool,
    /// Slurm's reason; empty when none.
    pub reason: String,
}

impl SlurmNode {
    /// vigil set this node's drain (its reason is vigil's).
    pub fn drained_by_vigil(&self) -> bool {
        self.drained && self.reason.starts_with(REASON_PREFIX)
    }

    /// An administrator (or another tool, NHC) drained it: vigil shows it, never lifts it.
    pub fn drained_by_admin(&self) -> bool {
        self.drained && !self.drained_by_vigil()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Pending,
    /// Completing, configuring, suspended, requeued, ...: nothing to do yet.
    Other,
    /// Ended (`squeue --states=all` lists ended jobs until Slurm's `MinJobAge`).
    Finished,
}

impl JobState {
    pub fn parse(s: &str) -> Self {
        match s {
            "RUNNING" => Self::Running,
            "PENDING" => Self::Pending,
            "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "NODE_FAIL" | "OUT_OF_MEMORY"
            | "BOOT_FAIL" | "DEADLINE" | "PREEMPTED" | "REVOKED" | "SPECIAL_EXIT" => Self::Finished,
            _ => Self::Other,
        }
    }
}

/// One Slurm job as `squeue` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmJob {
    /// `123`, or `123_4` for an array task.
    pub id: String,
    pub state: JobState,
    /// Slurm's state as it printed it (`RUNNING`, `COMPLETED`, ...).
    pub state_text: String,
    /// Why it pends (`BeginTime`, `Resources`, ...); `None` otherwise.
    pub reason: String,
    pub nodes: Vec<String>,
    /// The job's name and its user's (may be empty).
    pub name: String,
    pub user: String,
}

/// What the adapter carries out, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `scontrol update NodeName=node State=DRAIN Reason=reason`.
    Drain { node: String, reason: String },
    /// `scontrol update NodeName=node State=RESUME`: only ever for vigil's own drain.
    Resume { node: String },
    /// `scontrol requeue job`: a hardware fault hit `node`, one of its nodes.
    Requeue {
        job: String,
        node: String,
        reason: String,
    },
    /// `scontrol update JobId=job StartTime=now`: the requeue hold lifted, so the job runs
    /// again at once on healthy nodes.
    Release { job: String },
}

/// This round's actions: drains first (so the scheduler keeps requeued jobs off the faulty
/// node), then requeues, hold releases, and resumes.
pub fn plan(
    intents: &[Intent],
    nodes: &[SlurmNode],
    jobs: &[SlurmJob],
    requeued: &BTreeSet<String>,
) -> Vec<Action> {
    let slurm: BTreeMap<&str, &SlurmNode> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut drains = Vec::new();
    let mut resumes = Vec::new();
    let mut faulty: BTreeMap<&str, String> = BTreeMap::new();
    for intent in intents {
        let Some(node) = slurm.get(intent.slurm_name.as_str()) else {
            continue;
        };
        match &intent.want {
            Want::Drained(cause) => {
                let reason = cause.reason();
                if cause.requeues() {
                    faulty.insert(node.name.as_str(), reason.clone());
                }
                if !node.drained {
                    drains.push(Action::Drain {
                        node: node.name.clone(),
                        reason,
                    });
                }
            }
            Want::Schedulable if node.drained_by_vigil() => resumes.push(Action::Resume {
                node: node.name.clone(),
            }),
            Want::Schedulable | Want::AsIs => {}
        }
    }
    let mut actions = drains;
    actions.extend(requeues(jobs, &faulty, requeued));
    actions.extend(resumes);
    actions
}

/// Requeues of running jobs on faulty nodes, and releases of the holds of jobs vigil requeued
/// (`requeued`: those that have not run since, see [`jobs::Ledger::awaiting_rerun`]). A job
/// vigil requeued still shows running where it ran until Slurm has stopped it: it is not
/// requeued twice.
fn requeues(
    jobs: &[SlurmJob],
    faulty: &BTreeMap<&str, String>,
    requeued: &BTreeSet<String>,
) -> Vec<Action> {
    let mut actions = Vec::new();
    for job in jobs {
        let hit = job
            .nodes
            .iter()
            .find_map(|n| faulty.get_key_value(n.as_str()));
        let mine = requeued.contains(&job.id);
        match (job.state, hit) {
            (JobState::Running, Some((node, reason))) if !mine => {
                actions.push(Action::Requeue {
                    job: job.id.clone(),
                    node: (*node).to_owned(),
                    reason: reason.clone(),
                });
            }
            (JobState::Pending, _) if mine && job.reason == HOLD_REASON => {
                actions.push(Action::Release {
                    job: job.id.clone(),
                });
            }
            _ => {}
        }
    }
    actions
}

/// The kind of the node history entries the Slurm adapter adds.
pub const EVENT_KIND: &str = "slurm";

impl ClusterState {
    /// Puts what the Slurm adapter did on `node` in its history (kind [`EVENT_KIND`]), so
    /// `clusterctl node` and `events` tell a Slurm job's requeue beside the XID that caused it;
    /// nothing for a node vigil does not know.
    pub fn slurm_record(&mut self, node: &str, message: String, now: Now) -> Vec<Effect> {
        let Some(n) = self.nodes.get_mut(node) else {
            return Vec::new();
        };
        let event = NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: EVENT_KIND.into(),
            message,
            gpu_index: None,
        };
        vec![record(n, event)]
    }
}

/// The Slurm name of vigil node `name`: the config's table where it names it, else the same.
pub fn slurm_name<'a>(table: &'a BTreeMap<String, String>, name: &'a str) -> &'a str {
    table.get(name).map_or(name, String::as_str)
}

#[cfg(test)]
pub(crate) mod tests;
