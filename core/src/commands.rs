//! Commands follow the state: what the state still needs done on agents is derived from it at
//! the end of every step and tick, and re-sent with backoff until an agent's report confirms
//! it. A lost message (a full queue, a stream that broke, a coordinator that crashed between
//! its commit and its send) delays; it never strands a job. Agents apply every command
//! idempotently: a repeated start answers with the running worker, a repeated stop of a worker
//! already gone answers `WorkerExited { stopped }`.
//!
//! What is derived:
//! - a relaunch's checkpoint scan not yet answered: `ScanCheckpoints` to node rank 0
//!   (`resume_scan`);
//! - the members of a gang preflight's current round not yet answered: `RunPreflight`
//!   (`preflight`);
//! - a worker of a Running attempt not yet reported (`Starting`): `StartWorker`, once no scan
//!   and no preflight is pending;
//! - a worker of a Stopping attempt not yet confirmed dead: `StopWorkers`;
//! - a worker an agent reports that is no current attempt's on that node: `StopWorkers`;
//! - a node's pending remediation step, once no job holds the node: `Remediate`
//!   (`remediation_steps`).
//!
//! Only connected nodes are sent anything; a node that reconnects is sent what is due at once.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::job::{Job, JobPhase, WorkerPhase};
use crate::jobs::{preflight, resume_scan, start_command, stop_command};
use crate::state::{ClusterState, Effect};
use crate::time::{Instant, Now};

/// The first re-send waits this long; each later one twice as long as the one before.
pub const FIRST_RESEND: Duration = Duration::from_secs(1);
/// The longest wait between two sends of one command.
pub const MAX_RESEND: Duration = Duration::from_secs(8);

/// When a command last went out, on which session, and how often it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub session: u64,
    pub at: Instant,
    pub sends: u32,
}

impl Sent {
    /// Whether a command last sent as `self` is due again on `session` at `now`.
    pub fn due(this: Option<Sent>, session: u64, now: Instant) -> bool {
        match this {
            None => true,
            Some(s) if s.session != session => true,
            Some(s) => now >= s.at + backoff(s.sends),
        }
    }

    pub(crate) fn next(this: Option<Sent>, session: u64, now: Instant) -> Sent {
        let sends = match this {
            Some(s) if s.session == session => s.sends.saturating_add(1),
            _ => 1,
        };
        Sent {
            session,
            at: now,
            sends,
        }
    }
}

/// How long after its `sends`-th send a command is sent again.
pub fn backoff(sends: u32) -> Duration {
    let doublings = sends.saturating_sub(1).min(16);
    FIRST_RESEND.saturating_mul(1 << doublings).min(MAX_RESEND)
}

/// What a worker still needs, if anything.
enum Want {
    Start,
    Stop,
}

fn want(job: &Job, phase: WorkerPhase) -> Option<Want> {
    match job.phase {
        JobPhase::Running
            if phase == WorkerPhase::Starting
                && !resume_scan::pending(job)
                && !preflight::pending(job) =>
        {
            Some(Want::Start)
        }
        JobPhase::Stopping if !phase.is_dead() => Some(Want::Stop),
        _ => None,
    }
}

impl ClusterState {
    /// The commands due at `now` (see the module doc); marks them sent. `only`: just those of
    /// these jobs, and the strays of this node if one is named (what a step changed: its
    /// commands go out at once, at a cost that does not grow with the cluster); `None`:
    /// everything (every tick).
    pub fn commands(
        &mut self,
        now: Now,
        only: Option<(&BTreeSet<String>, Option<&str>)>,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let ids: Vec<String> = match only {
            Some((ids, _)) => ids.iter().cloned().collect(),
            None => self.jobs.keys().cloned().collect(),
        };
        let nodes = &self.nodes;
        for id in ids {
            let Some(job) = self.jobs.get_mut(&id).filter(|j| j.phase.holds_nodes()) else {
                continue;
            };
            if resume_scan::pending(job)
                && let Some(scan) = job.resume_scan.as_mut()
                && let Some(session) = nodes.get(&scan.node).and_then(|n| n.session)
                && Sent::due(scan.sent, session, now.mono)
            {
                scan.sent = Some(Sent::next(scan.sent, session, now.mono));
                let node = scan.node.clone();
                effects.push(Effect::Command {
                    node,
                    kind: resume_scan::command(job),
                });
            }
            effects.extend(preflight::commands(job, nodes, now));
            let due: Vec<(String, u64, Want)> = job
                .workers
                .iter()
                .filter_map(|(node, w)| {
                    let session = nodes.get(node)?.session?;
                    let want = want(job, w.phase)?;
                    Sent::due(w.sent, session, now.mono).then(|| (node.clone(), session, want))
                })
                .collect();
            for (node, session, want) in due {
                let kind = match want {
                    Want::Start => start_command(job, nodes, &node),
                    Want::Stop => Some(stop_command(
                        &job.id,
                        job.attempt,
                        &job.reason,
                        job.spec.restart.stop_grace,
                    )),
                };
                let Some(kind) = kind else { continue };
                if let Some(w) = job.workers.get_mut(&node) {
                    w.sent = Some(Sent::next(w.sent, session, now.mono));
                }
                effects.push(Effect::Command { node, kind });
            }
        }
        match only {
            None => {
                effects.extend(self.stop_strays(now, None));
                effects.extend(self.remediation_commands(now));
            }
            Some((_, Some(node))) => effects.extend(self.stop_strays(now, Some(node))),
            Some((_, None)) => {}
        }
        effects
    }

    /// Stop what agents report running that is no current attempt's on their node (`only`:
    /// on that node alone).
    fn stop_strays(&mut self, now: Now, only: Option<&str>) -> Vec<Effect> {
        let mut effects = Vec::new();
        let mut seen = BTreeSet::new();
        // One node (a registration, a heartbeat): looked up, not searched for among them all,
        // or every registration of a reconnect storm would cost a pass over the cluster.
        let nodes: Box<dyn Iterator<Item = (&String, &crate::node::Node)>> = match only {
            Some(o) => Box::new(self.nodes.get_key_value(o).into_iter()),
            None => Box::new(self.nodes.iter()),
        };
        for (name, node) in nodes {
            let Some(session) = node.session else {
                continue;
            };
            for w in node.workers.iter() {
                let current = self.jobs.get(&w.job_id).is_some_and(|j| {
                    j.phase.holds_nodes()
                        && j.attempt == w.attempt
                        && j.workers
                            .get(name)
                            .is_some_and(|mine| !mine.phase.is_dead())
                });
                if current {
                    continue;
                }
                let key = (name.clone(), w.job_id.clone(), w.attempt);
                let sent = self.stray_stops.get(&key).copied();
                seen.insert(key.clone());
                if !Sent::due(sent, session, now.mono) {
                    continue;
                }
                let grace = self
                    .jobs
                    .get(&w.job_id)
                    .map_or(crate::jobspec::DEFAULT_STOP_GRACE, |j| {
                        j.spec.restart.stop_grace
                    });
                self.stray_stops
                    .insert(key, Sent::next(sent, session, now.mono));
                effects.push(Effect::Command {
                    node: name.clone(),
                    kind: stop_command(&w.job_id, w.attempt, "attempt is not current", grace),
                });
            }
        }
        // Forget strays no agent reports any more.
        self.stray_stops
            .retain(|k, _| seen.contains(k) || only.is_some_and(|o| o != k.0));
        effects
    }
}
