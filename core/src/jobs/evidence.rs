//! Evidence from hung attempts, pure: when an attempt is declared hung, every node of it is
//! asked to capture what its worker is doing before the stop (`capture_commands`, sent ahead of
//! the stops); each node's answer (`hang_evidence`) is stored apart from the job, one record per
//! (job, attempt, node) (`Effect::PersistEvidence`), shown by `clusterctl job show` and
//! `job report`, and read for a suspect: a node whose fabric went wrong during the attempt, or
//! the one node whose workers are not in a collective while the rest of the gang waits in one
//! (`hang_signs`).
//!
//! The job record keeps only a note per node that answered (what its workers were doing, how
//! big its record is, whether it was stored) and the suspect: a 1,000-node hang writes 1,000
//! small records, not a growing job record 1,000 times. What is stored is bounded per attempt
//! (`[evidence] max_attempt_bytes`; nodes past it keep their note only) and per job (the newest
//! `keep_attempts` attempts with evidence; older records are deleted, `Effect::DropEvidence`).
//!
//! An agent that predates the capture ignores it: the attempt simply has no evidence.

use serde::{Deserialize, Serialize};
use vigil_proto::v1;

use super::hang_signs::{self, Doing};
use crate::job::{Job, JobPhase};
use crate::kinds::FailureKind;
use crate::state::{ClusterState, Effect, Now};

pub const DEFAULT_MAX_ATTEMPT_BYTES: u64 = 2 * 1024 * 1024;
pub const DEFAULT_KEEP_ATTEMPTS: u32 = 8;
/// Everything one `job show` returns must fit in a control message (4 MiB).
pub const MAX_ATTEMPT_BYTES: u64 = 3 * 1024 * 1024;

/// `[evidence]` in the coordinator's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvidenceConfig {
    /// Bytes of evidence stored per hung attempt, all nodes together; the nodes that answer
    /// after it is reached keep only their note in the job record.
    pub max_attempt_bytes: u64,
    /// Hung attempts per job whose evidence is kept; older ones' records are deleted.
    pub keep_attempts: u32,
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        Self {
            max_attempt_bytes: DEFAULT_MAX_ATTEMPT_BYTES,
            keep_attempts: DEFAULT_KEEP_ATTEMPTS,
        }
    }
}

impl EvidenceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_attempt_bytes > MAX_ATTEMPT_BYTES {
            return Err(format!(
                "evidence.max_attempt_bytes = {} is over {MAX_ATTEMPT_BYTES} (3 MiB): one attempt's \
                 evidence must fit in a clusterctl answer; lower it",
                self.max_attempt_bytes
            ));
        }
        if self.keep_attempts == 0 {
            return Err(
                "evidence.keep_attempts = 0: use 1 or more (the newest hung attempts \
                 whose evidence is kept), or max_attempt_bytes = 0 to store none"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What the job record keeps of one node's answer to a capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceNote {
    /// What its workers were doing (see `hang_signs`).
    pub doing: Doing,
    /// The size of its evidence (text bytes).
    pub bytes: u64,
    /// Whether its evidence is stored (false: past the attempt's bound, or deleted since).
    pub stored: bool,
    /// A fabric fault of the node during the attempt, in words; empty when none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fabric_fault: String,
}

/// Bounds on what one node's evidence keeps (the agent sends less; a foreign agent may not).
const MAX_PROCESSES: usize = 32;
const MAX_FABRIC: usize = 64;
const MAX_TEXT: usize = 16 * 1024;
/// Processes whose stacks are kept whole (up to `MAX_TEXT`); the others keep the first
/// `MAX_SHORT_TEXT` bytes of theirs. One node's record stays far below a store's limit on one
/// write (etcd takes 1.5 MiB at most): about 350 KiB at worst.
const MAX_FULL_STACKS: usize = 8;
const MAX_SHORT_TEXT: usize = 1024;
/// A name or state (a command, a `wchan`, a port).
const MAX_NAME: usize = 128;
/// The most one node's evidence can take (see `evidence_from_an_agent_is_bounded`).
pub const MAX_NODE_BYTES: u64 = 400 * 1024;

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
    bounded_to(s, MAX_TEXT)
}

fn bounded_to(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl NodeEvidence {
    /// About how many bytes it stores: its text, and a little per process and port.
    pub fn approx_bytes(&self) -> u64 {
        let processes: usize = self
            .processes
            .iter()
            .map(|p| {
                64 + p.comm.len()
                    + p.state.len()
                    + p.wchan.len()
                    + p.kernel_stack.len()
                    + p.python_stacks.len()
            })
            .sum();
        let fabric: usize = self
            .fabric
            .iter()
            .map(|d| 128 + d.port.len() + d.state.len())
            .sum();
        let total =
            64 + self.node.len() + self.log_tail.len() + self.error.len() + processes + fabric;
        u64::try_from(total).unwrap_or(u64::MAX)
    }

    pub fn from_event(node: &str, at_ms: u64, e: &v1::HangEvidence) -> Self {
        Self {
            node: node.to_owned(),
            at_ms,
            processes: e
                .processes
                .iter()
                .take(MAX_PROCESSES)
                .enumerate()
                .map(|(i, p)| {
                    let max = if i < MAX_FULL_STACKS {
                        MAX_TEXT
                    } else {
                        MAX_SHORT_TEXT
                    };
                    ProcessRecord {
                        pid: p.pid,
                        comm: bounded_to(&p.comm, MAX_NAME),
                        state: bounded_to(&p.state, MAX_NAME),
                        wchan: bounded_to(&p.wchan, MAX_NAME),
                        kernel_stack: bounded_to(&p.kernel_stack, max),
                        python_stacks: bounded_to(&p.python_stacks, max),
                    }
                })
                .collect(),
            log_tail: bounded(&e.log_tail),
            fabric: e
                .fabric
                .iter()
                .take(MAX_FABRIC)
                .map(|d| FabricDeltaRecord {
                    port: bounded_to(&d.port, MAX_NAME),
                    state: bounded_to(&d.state, MAX_NAME),
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

/// The job's attempt `attempt` that ran on `node`, by index.
fn attempt_on(job: &Job, attempt: u64, node: &str) -> Option<usize> {
    job.attempts
        .iter()
        .position(|a| a.attempt == attempt && a.nodes.iter().any(|n| n == node))
}

/// Makes `node` the suspect of attempt `index` (unless it has one) and, where the job holds a
/// spare, has the next attempt take the spare in its place; what was done, for the history.
fn name_suspect(job: &mut Job, index: usize, node: &str, why: String) -> Option<String> {
    let a = &mut job.attempts[index];
    if !a.suspect.is_empty() {
        return None;
    }
    a.suspect.clone_from(&why);
    let mut message = format!("suspect {why}");
    // The next attempt takes a spare in its place, where the job holds one (without one it
    // runs on the same nodes rather than wait): the node is not cordoned (a flap or two may be
    // below the cordon rules, a stuck data loader is no hardware fault), but this job has hung
    // on it.
    let replaceable = job.spares.iter().any(|s| !job.avoid.contains(s));
    if replaceable && job.placement.iter().any(|n| n == node) {
        job.avoid.insert(node.to_owned());
        message.push_str("; the next attempt takes a spare in its place");
    }
    Some(message)
}

/// The gang's reading of attempt `index` (see `hang_signs`): the one node not in a collective
/// while the others wait in one, if there is one.
fn odd_node(job: &Job, index: usize, all_in: bool) -> Option<(String, String)> {
    let a = &job.attempts[index];
    let answered: Vec<(&str, &Doing)> = a
        .evidence_from
        .iter()
        .map(|(n, note)| (n.as_str(), &note.doing))
        .collect();
    hang_signs::odd_one_out(&a.nodes, &answered, all_in)
}

/// Attempts of `job` whose evidence is stored, beyond the newest `keep`: their records are
/// deleted (the job record keeps its notes).
fn beyond_retention(job: &mut Job, keep: u32, effects: &mut Vec<Effect>) {
    let mut kept = 0u32;
    for a in job.attempts.iter_mut().rev() {
        if !a.evidence_from.values().any(|n| n.stored) {
            continue;
        }
        kept += 1;
        if kept <= keep {
            continue;
        }
        let nodes: Vec<String> = a
            .evidence_from
            .iter_mut()
            .filter(|(_, n)| n.stored)
            .map(|(node, n)| {
                n.stored = false;
                node.clone()
            })
            .collect();
        effects.push(Effect::DropEvidence {
            job: job.id.clone(),
            attempt: a.attempt,
            nodes,
        });
    }
}

impl ClusterState {
    /// A node's answer to a capture: stored apart from the job (within the attempt's bound,
    /// `evidence.max_attempt_bytes`), noted on the attempt, and read for a suspect: a node
    /// whose fabric failed during the attempt, or the one node whose workers are not in a
    /// collective while the others wait in one.
    pub fn hang_evidence(&mut self, node: &str, e: &v1::HangEvidence, now: Now) -> Vec<Effect> {
        let cfg = self.evidence;
        let mut effects = Vec::new();
        let Some(job) = self.jobs.get_mut(&e.job_id) else {
            return effects;
        };
        let Some(index) = attempt_on(job, e.attempt, node) else {
            return effects;
        };
        let hung = job.phase != JobPhase::Running
            && job.attempts[index].failure_kind == Some(FailureKind::Hang);
        let evidence = NodeEvidence::from_event(node, now.wall_ms, e);
        let fault = evidence.fabric.iter().find_map(FabricDeltaRecord::fault);
        let doing = hang_signs::doing(&evidence);
        let bytes = evidence.approx_bytes();
        let a = &mut job.attempts[index];
        let others: u64 = a
            .evidence_from
            .iter()
            .filter(|(n, x)| *n != node && x.stored)
            .map(|(_, x)| x.bytes)
            .sum();
        // A node that points somewhere (a fabric fault, workers not in a collective) is what an
        // operator reads first: stored past max_attempt_bytes, up to what `job show` can carry.
        let points = fault.is_some() || doing.odd();
        let limit = match cfg.max_attempt_bytes {
            0 => 0,
            _ if points => MAX_ATTEMPT_BYTES,
            max => max,
        };
        let stored = others.saturating_add(bytes) <= limit;
        let was_stored = a.evidence_from.get(node).is_some_and(|n| n.stored);
        a.evidence_from.insert(
            node.to_owned(),
            EvidenceNote {
                doing: doing.clone(),
                bytes,
                stored,
                fabric_fault: fault.clone().unwrap_or_default(),
            },
        );
        let mut message = format!(
            "evidence of the hung attempt {} captured on {node}: its workers are {}",
            e.attempt,
            doing.describe()
        );
        if !stored {
            message.push_str(&format!(
                "; not stored: the attempt's evidence would pass evidence.max_attempt_bytes ({} bytes)",
                cfg.max_attempt_bytes
            ));
        }
        let suspect = match fault.filter(|_| hung) {
            Some(fault) => Some((node.to_owned(), format!("{node}: {fault}"))),
            None if hung => odd_node(job, index, false),
            None => None,
        };
        let named = suspect.and_then(|(n, why)| name_suspect(job, index, &n, why));
        if let Some(named) = &named {
            message = format!("{message}; {named}");
        }
        if stored {
            effects.push(Effect::PersistEvidence {
                job: job.id.clone(),
                attempt: e.attempt,
                evidence: Box::new(evidence),
            });
            beyond_retention(job, cfg.keep_attempts, &mut effects);
        } else if was_stored {
            effects.push(Effect::DropEvidence {
                job: job.id.clone(),
                attempt: e.attempt,
                nodes: vec![node.to_owned()],
            });
        }
        // The job's history (200 entries) keeps the answers that matter; every answer is
        // logged, and the stop sums them all up (`judge_stopped`).
        if points || named.is_some() {
            job.event(now.wall_ms, "evidence", message.clone());
        }
        effects.push(Effect::JobLog {
            job: job.id.clone(),
            message,
            warn: false,
        });
        effects.push(Effect::PersistJob(Box::new(job.clone())));
        effects
    }
}

/// One line on what the gang's answers say: how many nodes answered, what their workers were
/// doing, how many are stored.
fn summary(job: &Job, index: usize) -> String {
    let a = &job.attempts[index];
    let notes = &a.evidence_from;
    let count = |f: fn(&Doing) -> bool| notes.values().filter(|n| f(&n.doing)).count();
    let stored = notes.values().filter(|n| n.stored).count();
    let mut line = format!(
        "evidence of the hung attempt {}: {} of {} nodes answered ({} waiting in a collective, \
         {} not, {} without Python stacks); {stored} stored",
        a.attempt,
        notes.len(),
        a.nodes.len(),
        count(|d| matches!(d, Doing::Collective(_))),
        count(Doing::odd),
        count(|d| *d == Doing::Unknown),
    );
    if stored < notes.len() {
        line.push_str(&format!(
            ", {} past evidence.max_attempt_bytes (their notes kept)",
            notes.len() - stored
        ));
    }
    line
}

/// Once a hung attempt has stopped on every node, every node had its chance to answer the
/// capture (an agent sends its evidence before it stops): one that did not counts as not in
/// a collective. Names the suspect, if the gang's evidence points at one now.
pub(super) fn judge_stopped(job: &mut Job, now: Now, effects: &mut Vec<Effect>) {
    let Some(index) = job.attempts.iter().rposition(|a| a.attempt == job.attempt) else {
        return;
    };
    let a = &job.attempts[index];
    if a.failure_kind != Some(FailureKind::Hang) || a.evidence_from.is_empty() {
        return;
    }
    let mut message = summary(job, index);
    let named = match odd_node(job, index, true) {
        Some((node, why)) if job.attempts[index].suspect.is_empty() => {
            name_suspect(job, index, &node, why)
        }
        _ => None,
    };
    if let Some(named) = named {
        message = format!("{message}; {named}");
    }
    job.event(now.wall_ms, "evidence", message.clone());
    effects.push(Effect::JobLog {
        job: job.id.clone(),
        message,
        warn: false,
    });
}

#[cfg(test)]
#[path = "evidence_tests.rs"]
mod tests;
