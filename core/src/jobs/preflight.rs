//! The gang preflight, pure: a job's `[preflight] command` (an all-reduce bandwidth check run
//! through torchrun, say) runs on the whole gang before an attempt's workers start — before
//! every attempt after the first (`when = "restart"`, the default) or before every attempt
//! (`when = "always"`). The workers are held back (as for the checkpoint scan) until it ends:
//! - it passes on the gang: the workers start at once;
//! - it fails or times out: vigil narrows it down round by round on groups of the gang and its
//!   spares (`preflight_plan`), each group run with the job's environment computed for the group
//!   (`VIGIL_NNODES`, `VIGIL_NODE_RANK`, `MASTER_ADDR`, `PET_*` of the group). Nodes proven bad
//!   (failed alone, or beside nodes that passed elsewhere) are cordoned (rule `preflight`, their
//!   output as evidence) and the attempt is placed again without them, at once and without
//!   counting as a restart; a new placement made only of nodes this preflight cleared skips the
//!   next one. With too few nodes left the job waits Pending, as for any shortage;
//! - it failed everywhere, alone and in groups: the command itself is probably broken, and
//!   cordoning the cluster for it would be worse than useless: the job fails, saying so;
//! - no node could be singled out, or nodes gave no answer (an agent older than this
//!   coordinator ignores the command): nothing is cordoned and the attempt starts anyway.
//!
//! Each round's commands follow the state (`commands`): re-sent until answered, one
//! `(job, attempt, round)` at a time per node. A round ends when every member answered, or
//! at its deadline (`timeout` plus [`ANSWER_SLACK`], on the monotonic clock). Every decision
//! is a job event; the rounds are kept on the attempt for `clusterctl job show`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use vigil_proto::v1;

use super::preflight_plan::{self as plan, Outcome, Run};
pub use super::preflight_record::*;
use crate::commands::Sent;
use crate::job::{Job, JobPhase, WorkerPhase};
use crate::state::{ClusterState, Effect, Now};

/// Does the current attempt still wait for its preflight (its workers not yet started)?
pub fn pending(job: &Job) -> bool {
    job.phase == JobPhase::Running
        && job
            .preflight
            .as_ref()
            .is_some_and(|p| p.attempt == job.attempt && !p.done())
}

/// Attempt `job.attempt` was just placed: run the preflight first, if the spec asks for one.
pub(super) fn begin(job: &mut Job, now: Now) {
    let spec = &job.spec.preflight;
    let due = match spec.when {
        When::Always => true,
        When::Restart => job.attempt > 1,
    };
    let previous = job.preflight.take();
    if spec.is_off() || !due {
        return;
    }
    let cleared_just_now = previous.as_ref().is_some_and(|p| {
        p.attempt + 1 == job.attempt && job.placement.iter().all(|n| p.cleared.contains(n))
    });
    if cleared_just_now {
        let msg = format!(
            "preflight skipped for attempt {}: every node of it ({}) passed the preflight of attempt {} just now",
            job.attempt,
            job.placement.join(","),
            job.attempt - 1
        );
        job.event(now.wall_ms, "preflight", msg);
        return;
    }
    let deadline = spec.timeout.saturating_add(ANSWER_SLACK);
    job.preflight = Some(Preflight {
        attempt: job.attempt,
        pool: job.placement.clone(),
        rounds: vec![Round {
            round: 0,
            groups: vec![group(job.placement.clone())],
        }],
        started_at_ms: now.wall_ms,
        verdict: String::new(),
        cleared: BTreeSet::new(),
        bad: BTreeSet::new(),
        deadline_ms: now.wall_ms.saturating_add(super::ms(deadline)),
        deadline: now.mono + deadline,
    });
    let msg = format!(
        "preflight round 0 before attempt {}: the whole gang ({})",
        job.attempt,
        job.placement.join(",")
    );
    job.event(now.wall_ms, "preflight", msg);
}

fn group(nodes: Vec<String>) -> Group {
    Group {
        nodes,
        results: BTreeMap::new(),
        sent: BTreeMap::new(),
    }
}

/// The preflight commands due for `job` (members of the current round not yet answered, on
/// their session's backoff); marks them sent.
pub(crate) fn commands(
    job: &mut Job,
    nodes: &BTreeMap<String, crate::node::Node>,
    now: Now,
) -> Vec<Effect> {
    if !pending(job) {
        return Vec::new();
    }
    let mut due: Vec<(String, Vec<String>, usize, u64)> = Vec::new();
    if let Some(round) = job.preflight.as_ref().and_then(Preflight::current) {
        for g in &round.groups {
            for (rank, n) in g.nodes.iter().enumerate() {
                let Some(session) = nodes.get(n).and_then(|node| node.session) else {
                    continue;
                };
                if !g.results.contains_key(n)
                    && Sent::due(g.sent.get(n).copied(), session, now.mono)
                {
                    due.push((n.clone(), g.nodes.clone(), rank, session));
                }
            }
        }
    }
    let mut effects = Vec::new();
    for (node, members, rank, session) in due {
        let kind = run_command(job, nodes, &members, rank);
        if let Some(g) = job
            .preflight
            .as_mut()
            .and_then(|p| p.rounds.last_mut())
            .and_then(|r| r.groups.iter_mut().find(|g| g.nodes.contains(&node)))
        {
            let sent = g.sent.get(&node).copied();
            g.sent
                .insert(node.clone(), Sent::next(sent, session, now.mono));
        }
        effects.push(Effect::Command { node, kind });
    }
    effects
}

/// The `RunPreflight` of the member at `rank` of `members`.
fn run_command(
    job: &Job,
    nodes: &BTreeMap<String, crate::node::Node>,
    members: &[String],
    rank: usize,
) -> v1::command::Kind {
    let round = job
        .preflight
        .as_ref()
        .and_then(Preflight::current)
        .map_or(0, |r| r.round);
    let mut env = super::launch::env_for(job, nodes, members, rank);
    env.insert(ROUND_VAR.into(), round.to_string());
    v1::command::Kind::RunPreflight(v1::RunPreflight {
        job_id: job.id.clone(),
        attempt: job.attempt,
        round,
        command: job.spec.preflight.command.clone(),
        workdir: job.spec.workdir.clone(),
        env: env.into_iter().collect(),
        timeout_ms: super::ms(job.spec.preflight.timeout),
    })
}

/// What a finished preflight leads to (carried out by `ClusterState::preflight_advance`).
enum Decision {
    /// Another round was planned: nothing else to do.
    Continue,
    /// Start the workers (`msg` says why), cordoning `bad` spares first.
    Start { msg: String, warn: bool },
    /// Cordon `bad` and place the attempt again without them.
    Replace,
    /// The command is broken: fail the job.
    Fail(String),
}

impl ClusterState {
    /// `node` answered a preflight command.
    pub fn preflight_result(
        &mut self,
        node: &str,
        r: &v1::PreflightResult,
        now: Now,
    ) -> Vec<Effect> {
        let Some(job) = self.jobs.get_mut(&r.job_id).filter(|j| pending(j)) else {
            return Vec::new();
        };
        let Some(p) = job.preflight.as_mut().filter(|p| p.attempt == r.attempt) else {
            return Vec::new();
        };
        let Some(g) = p
            .rounds
            .last_mut()
            .filter(|round| round.round == r.round)
            .and_then(|round| {
                round
                    .groups
                    .iter_mut()
                    .find(|g| g.nodes.iter().any(|n| n == node))
            })
            .filter(|g| !g.results.contains_key(node))
        else {
            return Vec::new();
        };
        g.results.insert(
            node.to_owned(),
            NodeResult {
                passed: r.passed,
                why: r.why.clone(),
                duration_ms: r.duration_ms,
                output: if r.passed {
                    String::new()
                } else {
                    tail(&r.output, MAX_OUTPUT_KEPT)
                },
            },
        );
        let complete = p.round_complete();
        let id = r.job_id.clone();
        if complete {
            return self.preflight_advance(&id, now);
        }
        vec![Effect::PersistJob(Box::new(job.clone()))]
    }

    /// Rounds past their deadline end with the answers they have.
    pub fn preflight_tick(&mut self, now: Now) -> Vec<Effect> {
        let expired: Vec<String> = self
            .jobs
            .values()
            .filter(|j| pending(j))
            .filter(|j| j.preflight.as_ref().is_some_and(|p| now.mono >= p.deadline))
            .map(|j| j.id.clone())
            .collect();
        let mut effects = Vec::new();
        for id in expired {
            effects.extend(self.preflight_advance(&id, now));
        }
        effects
    }

    /// The current round of `id`'s preflight is over: plan the next or decide.
    fn preflight_advance(&mut self, id: &str, now: Now) -> Vec<Effect> {
        let mut effects = Vec::new();
        let Some(job) = self.jobs.get_mut(id) else {
            return effects;
        };
        if let Some(msg) = job.preflight.as_ref().and_then(round_summary) {
            job.event(now.wall_ms, "preflight", msg);
        }
        let decision = decide(job, now);
        let bad: Vec<(String, String)> = job
            .preflight
            .as_ref()
            .map(|p| {
                let k = plan::learn(&p.runs(), job.spec.nodes == 1);
                k.bad
                    .into_iter()
                    .filter(|(n, _)| p.bad.contains(n))
                    .collect()
            })
            .unwrap_or_default();
        let attempt = job.attempt;
        match decision {
            Decision::Continue => {}
            Decision::Start { msg, warn } => {
                job.event(now.wall_ms, "preflight", msg.clone());
                effects.push(Effect::JobLog {
                    job: id.to_owned(),
                    message: msg,
                    warn,
                });
                start_workers(job, now);
            }
            Decision::Replace => {
                let names: Vec<&str> = bad.iter().map(|(n, _)| n.as_str()).collect();
                let msg = format!(
                    "preflight found {} bad (cordoned); attempt {attempt} ends before its workers start, and the next is placed without {}",
                    names.join(","),
                    if names.len() == 1 { "it" } else { "them" }
                );
                job.event(now.wall_ms, "preflight", msg.clone());
                effects.push(Effect::JobLog {
                    job: id.to_owned(),
                    message: msg.clone(),
                    warn: true,
                });
                replace(job, &msg, now);
            }
            Decision::Fail(reason) => {
                for w in job.workers.values_mut() {
                    w.phase = WorkerPhase::Stopped;
                }
                if let Some(a) = job.current_attempt_mut() {
                    a.ended_at_ms = now.wall_ms;
                    a.outcome = "failed".into();
                    a.reason.clone_from(&reason);
                }
                super::attempt::fail_job(job, reason, "failed", now, &mut effects);
            }
        }
        // A finished preflight's rounds move to its attempt's record; the job keeps the verdict
        // and the nodes it cleared (for the next placement), stored once.
        if let Some(mut done) = job.preflight.take_if(|p| p.done()) {
            let rounds = std::mem::take(&mut done.rounds);
            let mut full = done.clone();
            full.rounds = rounds;
            if let Some(rec) = job.current_attempt_mut() {
                rec.preflight = Some(full);
            }
            job.preflight = Some(done);
        }
        effects.push(Effect::PersistJob(Box::new(job.clone())));
        // The cordons are persisted before the job's next attempt is placed.
        let mut cordons = Vec::new();
        for (node, evidence) in bad {
            let reason = format!("preflight of job {id} attempt {attempt}: {evidence}");
            cordons.extend(self.auto_cordon(
                &node,
                reason,
                crate::kinds::CordonRule::Preflight,
                now,
            ));
        }
        cordons.extend(effects);
        cordons
    }
}

/// Plan the next round, or conclude (setting the record's verdict, cleared and bad nodes).
fn decide(job: &mut Job, now: Now) -> Decision {
    let solo = job.spec.nodes == 1;
    let spares = job.spares.clone();
    let timeout = job.spec.preflight.timeout.saturating_add(ANSWER_SLACK);
    let placement = job.placement.clone();
    let Some(p) = job.preflight.as_mut() else {
        return Decision::Continue;
    };
    let runs = p.runs();
    let gang_passed = runs.first().and_then(|r| r.first()).and_then(Run::verdict) == Some(true);
    if gang_passed {
        p.cleared = placement.iter().cloned().collect();
        p.verdict = "passed on the whole gang".into();
        return Decision::Start {
            msg: format!(
                "preflight passed on the whole gang ({})",
                placement.join(",")
            ),
            warn: false,
        };
    }
    if p.rounds.len() == 1 {
        // Round 1 tests the spares too, as replacements.
        for s in spares {
            if !p.pool.contains(&s) {
                p.pool.push(s);
            }
        }
    }
    let within = u32::try_from(p.rounds.len()).unwrap_or(u32::MAX) < plan::max_rounds(p.pool.len());
    let next = if within {
        plan::plan(&p.pool, &runs, solo)
    } else {
        Vec::new()
    };
    if !next.is_empty() {
        let round = u32::try_from(p.rounds.len()).unwrap_or(u32::MAX);
        let shown: Vec<String> = next.iter().map(|g| format!("[{}]", g.join(","))).collect();
        p.rounds.push(Round {
            round,
            groups: next.into_iter().map(group).collect(),
        });
        p.deadline = now.mono + timeout;
        p.deadline_ms = now.wall_ms.saturating_add(super::ms(timeout));
        let msg = format!("preflight round {round}: groups {}", shown.join(" "));
        job.event(now.wall_ms, "preflight", msg);
        return Decision::Continue;
    }
    let k = plan::learn(&runs, solo);
    p.cleared = k.cleared.clone();
    let answered = runs
        .iter()
        .flatten()
        .any(|r| r.outcomes.values().any(|o| *o != Outcome::Silent));
    if !answered {
        p.verdict = "no answer".into();
        let silent: Vec<String> = k.silent.iter().cloned().collect();
        return Decision::Start {
            msg: format!(
                "preflight got no answer from {} within {} (an agent older than this coordinator ignores it); attempt {} starts without it",
                silent.join(","),
                humantime::format_duration(timeout),
                job.attempt
            ),
            warn: true,
        };
    }
    if !k.any_pass {
        let first = runs
            .iter()
            .flatten()
            .flat_map(|r| r.outcomes.iter())
            .find_map(|(n, o)| match o {
                Outcome::Failed { why, output } => {
                    Some(format!("{n}: {why}; output: {}", output.trim()))
                }
                _ => None,
            })
            .unwrap_or_default();
        p.verdict = "failed everywhere".into();
        return Decision::Fail(format!(
            "preflight failed on every node, alone and in groups, before attempt {}: the command itself is probably broken, so no node was cordoned ({first}); fix [preflight] command and resubmit",
            job.attempt
        ));
    }
    p.bad = k.bad.keys().cloned().collect();
    if p.bad.is_empty() {
        p.verdict = "inconclusive".into();
        let silent = if k.silent.is_empty() {
            String::new()
        } else {
            format!(
                " ({} gave no answer)",
                k.silent.iter().cloned().collect::<Vec<_>>().join(",")
            )
        };
        return Decision::Start {
            msg: format!(
                "preflight failed on the gang but singled out no node after {} rounds{silent}; nothing is cordoned and attempt {} starts anyway",
                p.rounds.len(),
                job.attempt
            ),
            warn: true,
        };
    }
    let shown: Vec<String> = p.bad.iter().cloned().collect();
    p.verdict = format!("bad: {}", shown.join(","));
    if placement.iter().any(|n| p.bad.contains(n)) {
        return Decision::Replace;
    }
    Decision::Start {
        msg: format!(
            "preflight found spare {} bad (cordoned); the gang passed apart from it and attempt {} starts",
            shown.join(","),
            job.attempt
        ),
        warn: true,
    }
}

/// The preflight is over and passed: the workers start now (their clocks with them).
fn start_workers(job: &mut Job, now: Now) {
    for w in job.workers.values_mut() {
        w.progress_at_ms = now.wall_ms;
        w.progress_mono = now.mono;
    }
}

/// The attempt never started its workers: end it and let the scheduler place the next one at
/// once, without the bad nodes (cordoned; `avoid` too, should a cordon be held back).
fn replace(job: &mut Job, msg: &str, now: Now) {
    for w in job.workers.values_mut() {
        w.phase = WorkerPhase::Stopped;
    }
    if let Some(a) = job.current_attempt_mut() {
        a.ended_at_ms = now.wall_ms;
        a.outcome = "preflight".into();
        a.reason = msg.to_owned();
    }
    if let Some(p) = job.preflight.as_ref() {
        job.avoid.extend(p.bad.iter().cloned());
    }
    job.workers.clear();
    job.phase = JobPhase::Restarting;
    job.reason = msg.to_owned();
    job.after_stop = None;
    job.restart_at = Some(now.mono);
    job.restart_at_ms = Some(now.wall_ms);
}

/// A coordinator that starts re-arms each running round's deadline from its record.
pub(super) fn rearm(job: &mut Job, now: Now) {
    let timeout = job.spec.preflight.timeout.saturating_add(ANSWER_SLACK);
    if let Some(p) = job.preflight.as_mut().filter(|p| !p.done()) {
        let left = Duration::from_millis(p.deadline_ms.saturating_sub(now.wall_ms)).min(timeout);
        p.deadline = now.mono + left;
    }
}

#[cfg(test)]
#[path = "preflight_tests.rs"]
mod tests;
