//! Evidence from hung attempts, pure: when an attempt is declared hung, every node of it is
//! asked to capture what its worker is doing before the stop (`capture_commands`, sent ahead of
//! the stops); each node's answer is kept with the attempt (`hang_evidence`), shown by
//! `clusterctl job show` and `job report`, and read for a suspect: a rank stuck in a collective
//! whose peer is on a node whose fabric went wrong during the attempt points at that node.
//!
//! An agent that predates the capture ignores it: the attempt simply has no evidence.

use serde::{Deserialize, Serialize};
use vigil_proto::v1;

use crate::job::{Job, JobPhase};
use crate::kinds::FailureKind;
use crate::state::{ClusterState, Effect, Now};

/// Bounds on what one node's evidence keeps (the agent sends less; a foreign agent may not).
const MAX_PROCESSES: usize = 32;
const MAX_FABRIC: usize = 64;
const MAX_TEXT: usize = 16 * 1024;

/// One process of a hung worker, as its agent saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    pub comm: String,
    pub state: String,
    pub wchan: String,
    pub kernel_stack: String,
    #[serde(default)]
    pub python_stacks: String,
}

/// How a fabric port's counters rose during the attempt on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricDeltaRecord {
    pub port: String,
    pub state: String,
    pub link_downed: u64,
    pub link_error_recovery: u64,
    pub symbol_error: u64,
    pub port_rcv_errors: u64,
    pub port_xmit_discards: u64,
    pub carrier_changes: u64,
}

impl FabricDeltaRecord {
    /// What went wrong on this port, in words; `None` when only error counters rose a little.
    pub fn fault(&self) -> Option<String> {
        let down = !matches!(self.state.as_str(), "ACTIVE" | "up");
        let flaps = self.link_downed + self.link_error_recovery + self.carrier_changes;
        match (down, flaps) {
            (true, _) => Some(format!("port {} is {}", self.port, self.state)),
            (false, n) if n > 0 => Some(format!(
                "port {} flapped {n} times during the attempt",
                self.port
            )),
            _ => None,
        }
    }
}

/// One node's evidence of a hung attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvidence {
    pub node: String,
    pub at_ms: u64,
    pub processes: Vec<ProcessRecord>,
    pub log_tail: String,
    pub fabric: Vec<FabricDeltaRecord>,
    /// Why nothing (or less) was captured; empty when it ran.
    pub error: String,
}

fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl NodeEvidence {
    pub fn from_event(node: &str, at_ms: u64, e: &v1::HangEvidence) -> Self {
        Self {
            node: node.to_owned(),
            at_ms,
            processes: e
                .processes
                .iter()
                .take(MAX_PROCESSES)
                .map(|p| ProcessRecord {
                    pid: p.pid,
                    comm: bounded(&p.comm),
                    state: bounded(&p.state),
                    wchan: bounded(&p.wchan),
                    kernel_stack: bounded(&p.kernel_stack),
                    python_stacks: bounded(&p.python_stacks),
                })
                .collect(),
            log_tail: bounded(&e.log_tail),
            fabric: e
                .fabric
                .iter()
                .take(MAX_FABRIC)
                .map(|d| FabricDeltaRecord {
                    port: bounded(&d.port),
                    state: bounded(&d.state),
                    link_downed: d.link_downed,
                    link_error_recovery: d.link_error_recovery,
                    symbol_error: d.symbol_error,
                    port_rcv_errors: d.port_rcv_errors,
                    port_xmit_discards: d.port_xmit_discards,
                    carrier_changes: d.carrier_changes,
                })
                .collect(),
            error: bounded(&e.error),
        }
    }
}

/// The captures to send for `job`'s current attempt: one per node whose worker still runs.
/// Pushed before the attempt's stops, so that each agent captures before it stops.
pub(super) fn capture_commands(job: &Job, effects: &mut Vec<Effect>) {
    for (node, w) in &job.workers {
        if w.phase.is_dead() {
            continue;
        }
        effects.push(Effect::Command {
            node: node.clone(),
            kind: v1::command::Kind::CaptureEvidence(v1::CaptureEvidence {
                job_id: job.id.clone(),
                attempt: job.attempt,
            }),
        });
    }
}

impl ClusterState {
    /// A node's answer to a capture: kept with its attempt; a fabric fault in it makes that
    /// node the hang's suspect.
    pub fn hang_evidence(&mut self, node: &str, e: &v1::HangEvidence, now: Now) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(job) = self.jobs.get_mut(&e.job_id) else {
            return effects;
        };
        let hung = job.phase != JobPhase::Running;
        let Some(a) = job
            .attempts
            .iter_mut()
            .find(|a| a.attempt == e.attempt && a.nodes.iter().any(|n| n == node))
        else {
            return effects;
        };
        let evidence = NodeEvidence::from_event(node, now.wall_ms, e);
        let fault = evidence.fabric.iter().find_map(FabricDeltaRecord::fault);
        a.evidence.retain(|x| x.node != node);
        a.evidence.push(evidence);
        a.evidence.sort_by(|x, y| x.node.cmp(&y.node));
        let mut message = format!(
            "evidence of the hung attempt {} captured on {node}",
            e.attempt
        );
        if let Some(fault) = fault.filter(|_| hung && a.failure_kind == Some(FailureKind::Hang)) {
            let suspect = format!("{node}: {fault}");
            message = format!("{message}; suspect {suspect} (a stuck collective waits on it)");
            if a.suspect.is_empty() {
                a.suspect = suspect;
                // The next attempt takes a spare in its place, where the job holds one (without
                // one it runs on the same nodes rather than wait): its fabric is not cordoned
                // (a flap or two may be below the cordon rules), but this job has hung on it.
                let replaceable = job.spares.iter().any(|s| !job.avoid.contains(s));
                if replaceable && job.placement.iter().any(|n| n == node) {
                    job.avoid.insert(node.to_owned());
                    message = format!("{message}; the next attempt takes a spare in its place");
                }
            }
        }
        job.event(now.wall_ms, "evidence", message.clone());
        effects.push(Effect::JobLog {
            job: job.id.clone(),
            message,
            warn: false,
        });
        effects.push(Effect::PersistJob(Box::new(job.clone())));
        effects
    }
}

#[cfg(test)]
#[path = "evidence_tests.rs"]
mod tests;
