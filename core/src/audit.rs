//! The audit trail: every change an operator asks for is recorded, with who asked and how
//! it ended, in the history of the node or job it concerns (kind `audit`), so `clusterctl
//! events` and `clusterctl node`/`job show` answer "who did this".

use std::fmt;

use crate::node::NodeEvent;
use crate::state::{ClusterState, Effect, Now, record};

/// What an operator's call was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    Node(&'a str),
    Job(&'a str),
    /// The cluster as a whole (the recovery hold): logged; its record is the change itself.
    Cluster,
}

impl fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Node(n) => write!(f, "node {n}"),
            Subject::Job(j) => write!(f, "job {j}"),
            Subject::Cluster => f.write_str("the cluster"),
        }
    }
}

/// How a call ended, in words for the trail.
pub fn outcome<T, E: fmt::Display>(result: &Result<T, E>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("refused: {e}"),
    }
}

impl ClusterState {
    /// Records `actor`'s `what` on `subject` (a job's record is persisted with the job);
    /// nothing for a node or job that does not exist (the caller got NotFound, and there is
    /// no history to put it in), nor for the cluster (the change records who made it, e.g. the
    /// recovery hold's `confirmed_by`; the shell logs every call).
    pub fn audit(
        &mut self,
        subject: Subject<'_>,
        actor: &str,
        what: &str,
        outcome: &str,
        now: Now,
    ) -> Vec<Effect> {
        let message = format!("{what} by {actor}: {outcome}");
        match subject {
            Subject::Node(name) => self.nodes.get_mut(name).map_or_else(Vec::new, |node| {
                let event = NodeEvent {
                    at_unix_ms: now.wall_ms,
                    kind: "audit".into(),
                    message,
                    gpu_index: None,
                };
                vec![record(node, event)]
            }),
            Subject::Job(id) => self.jobs.get_mut(id).map_or_else(Vec::new, |job| {
                job.event(now.wall_ms, "audit", message);
                vec![Effect::PersistJob(Box::new(job.clone()))]
            }),
            Subject::Cluster => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_as_words() {
        assert_eq!(outcome::<(), String>(&Ok(())), "ok");
        assert_eq!(
            outcome::<(), String>(&Err("node is busy".into())),
            "refused: node is busy"
        );
    }

    #[test]
    fn auditing_an_unknown_node_or_job_records_nothing() {
        let now = Now {
            mono: crate::time::Instant::ZERO,
            wall_ms: 1,
        };
        let mut state = ClusterState::load(
            Vec::new(),
            Vec::new(),
            Default::default(),
            Default::default(),
            now,
        );
        let node = state.audit(Subject::Node("nope"), "alice (admin)", "cordon", "ok", now);
        assert!(node.is_empty());
        let job = state.audit(Subject::Job("nope"), "alice (admin)", "cancel", "ok", now);
        assert!(job.is_empty());
    }
}
