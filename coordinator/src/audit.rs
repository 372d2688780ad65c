//! The audit trail: every change an operator asks for is recorded, with who asked and how
//! it ended, in the history of the node or job it concerns (kind `audit`), so `clusterctl
//! events` and `clusterctl node`/`job show` answer "who did this".

use crate::node::NodeEvent;
use crate::state::{ClusterState, Effect, Now, record};

/// How a call ended, in words for the trail.
pub fn outcome<T, E: std::fmt::Display>(result: &Result<T, E>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(e) => format!("refused: {e}"),
    }
}

impl ClusterState {
    /// Records `actor`'s `what` on node `name`; nothing for a node that does not exist
    /// (the caller got NotFound, and there is no history to put it in).
    pub fn audit_node(
        &mut self,
        name: &str,
        actor: &str,
        what: &str,
        outcome: &str,
        now: Now,
    ) -> Vec<Effect> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Vec::new();
        };
        let event = NodeEvent {
            at_unix_ms: now.wall_ms,
            kind: "audit".into(),
            message: format!("{what} by {actor}: {outcome}"),
            gpu_index: None,
        };
        vec![record(node, event)]
    }

    /// Records `actor`'s `what` on job `id`, persisted with the job.
    pub fn audit_job(
        &mut self,
        id: &str,
        actor: &str,
        what: &str,
        outcome: &str,
        now: Now,
    ) -> Vec<Effect> {
        let Some(job) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        job.event(
            now.wall_ms,
            "audit",
            format!("{what} by {actor}: {outcome}"),
        );
        vec![Effect::PersistJob(Box::new(job.clone()))]
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
            mono: tokio::time::Instant::now(),
            wall_ms: 1,
        };
        let mut state = ClusterState::load(
            Vec::new(),
            Vec::new(),
            Default::default(),
            Default::default(),
            now,
        );
        assert!(
            state
                .audit_node("nope", "alice (admin)", "cordon", "ok", now)
                .is_empty()
        );
        assert!(
            state
                .audit_job("nope", "alice (admin)", "cancel", "ok", now)
                .is_empty()
        );
    }
}
