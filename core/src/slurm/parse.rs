//! What `sinfo` and `squeue` print, in the formats the coordinator asks for, read into
//! [`SlurmNode`]s and [`SlurmJob`]s. Their output is input: a line that does not parse is
//! skipped and counted, never a panic.

use std::collections::BTreeMap;

use super::hostlist;
use super::{JobState, SlurmJob, SlurmNode};

/// `sinfo --noheader --Node --format=` this: name, long state, reason (last: it may hold `|`).
pub const SINFO_FORMAT: &str = "%N|%T|%E";
/// `squeue --noheader --states=all --format=` this: job id, long state, reason, user, node
/// list, name (last: it may hold `|`).
pub const SQUEUE_FORMAT: &str = "%i|%T|%r|%u|%N|%j";

/// Slurm's nodes from `sinfo` output (a node in several partitions is listed once), and how
/// many lines did not parse.
pub fn sinfo(text: &str) -> (Vec<SlurmNode>, usize) {
    let mut nodes = BTreeMap::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.splitn(3, '|');
        let (Some(name), Some(state), Some(reason)) = (fields.next(), fields.next(), fields.next())
        else {
            bad += 1;
            continue;
        };
        let state = state.trim().to_ascii_lowercase();
        let reason = reason.trim();
        nodes.insert(
            name.trim().to_owned(),
            SlurmNode {
                name: name.trim().to_owned(),
                drained: state.contains("drain"),
                reason: if reason == "none" {
                    String::new()
                } else {
                    reason.to_owned()
                },
                state,
            },
        );
    }
    (nodes.into_values().collect(), bad)
}

/// Slurm's jobs from `squeue` output, and how many lines did not parse.
pub fn squeue(text: &str) -> (Vec<SlurmJob>, usize) {
    let mut jobs = Vec::new();
    let mut bad = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.splitn(6, '|');
        let mut next = || fields.next();
        let (Some(id), Some(state), Some(reason), Some(user), Some(nodes), Some(name)) =
            (next(), next(), next(), next(), next(), next())
        else {
            bad += 1;
            continue;
        };
        let Some(nodes) = hostlist::expand(nodes) else {
            bad += 1;
            continue;
        };
        let id = id.trim();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
            bad += 1;
            continue;
        }
        jobs.push(SlurmJob {
            id: id.to_owned(),
            state: JobState::parse(state.trim()),
            state_text: state.trim().to_owned(),
            reason: reason.trim().to_owned(),
            nodes,
            name: name.trim().to_owned(),
            user: user.trim().to_owned(),
        });
    }
    (jobs, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinfo_lines_become_nodes_once_each_with_their_drain_reason() {
        let text = "n1|idle|none\nn2|drained|vigil: XID 79 on GPU 3\nn2|drained|vigil: XID 79 on \
                    GPU 3\nn3|draining|fan | loud\nbroken line\n";
        let (nodes, bad) = sinfo(text);
        assert_eq!(bad, 1);
        let names: Vec<_> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n1", "n2", "n3"]);
        assert!(!nodes[0].drained);
        assert_eq!(nodes[0].reason, "");
        assert!(nodes[1].drained);
        assert_eq!(nodes[2].reason, "fan | loud");
    }

    #[test]
    fn squeue_lines_become_jobs_with_expanded_nodes() {
        let text = "7|RUNNING|None|alice|n[1-2]|train | v2\n8|PENDING|BeginTime|bob||x\n\
                    9_2|COMPLETING|None|bob|n3|y\nx|RUNNING|None|bob|n1|z\n\
                    10|RUNNING|None|bob|n[1-|z\n11|COMPLETED|None|bob|n1|z\n";
        let (jobs, bad) = squeue(text);
        assert_eq!(bad, 2);
        assert_eq!(jobs.len(), 4);
        assert_eq!(jobs[0].nodes, ["n1", "n2"]);
        assert_eq!(
            (jobs[0].name.as_str(), jobs[0].user.as_str()),
            ("train | v2", "alice")
        );
        assert_eq!(jobs[3].state, JobState::Finished);
        assert_eq!(jobs[3].state_text, "COMPLETED");
        assert_eq!(jobs[0].state, JobState::Running);
        assert_eq!(jobs[1].state, JobState::Pending);
        assert!(jobs[1].nodes.is_empty());
        assert_eq!(jobs[1].reason, "BeginTime");
        assert_eq!(jobs[2].id, "9_2");
        assert_eq!(jobs[2].state, JobState::Other);
    }
}
