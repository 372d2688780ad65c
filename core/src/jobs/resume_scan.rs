//! The checkpoint scan before a relaunch, pure. The coordinator resumes a job from the newest
//! complete checkpoint it was told about; a writer cut off from the coordinator (a partition, a
//! stalled agent) may have completed a newer one before its lease ran out, and resuming from the
//! older one throws that work away. So when attempt N > 1 starts, node rank 0 of the new gang
//! first scans the job's checkpoint directory (`ScanCheckpoints`, by the agent's completeness
//! rules), and no worker is started until it answers or `SCAN_BUDGET` passes:
//! - a newer complete checkpoint (a higher step) is adopted: the attempt resumes from it, with an
//!   event saying so;
//! - an older one, when the one reported is no longer complete on disk (a reused step directory
//!   rewritten since, a removed one): the newest complete one is resumed from, never a broken one;
//! - none at all (a directory not mounted on that node?), an error, or no answer in time: it
//!   resumes from the one reported, with an event saying so.
//!
//! With `[checkpoint] verify_command`, the agent verifies complete candidates newest first (at
//! most 3) and answers with the first that passed and the ones that failed (`rejected`); the
//! budget grows by three verifications. Each rejected checkpoint is marked bad
//! (`Job.bad_checkpoints`, with a `checkpoint-bad` event quoting the command's output) and never
//! resumed from again; a verified one is adopted even when older than the one reported (which
//! was rejected). When every candidate failed the job ends Failed, naming them: resuming from a
//! checkpoint known to be corrupt, or starting afresh, would only loop.
//!
//! Never after a rollback (a loss spike's, or an operator's `job restart --from-checkpoint`): the
//! checkpoints the rollback left behind are newer on purpose and must not be resumed from.
//! A scan is not persisted: a coordinator that restarts mid-scan starts the workers from the
//! checkpoint reported. Like every command, the scan is re-sent until answered.

use std::time::Duration;

use vigil_proto::v1;

use crate::commands::Sent;
use crate::job::{Checkpoint, Job, JobPhase};
use crate::state::{Effect, Now};
use crate::time::Instant;

/// How long the relaunch waits for the scan's answer before it starts without it.
pub const SCAN_BUDGET: Duration = Duration::from_secs(10);
/// Most candidates the agent verifies in one scan (the budget allows each its timeout).
pub const MAX_VERIFIED: u32 = 3;

/// How long `job`'s relaunch waits for its scan: [`SCAN_BUDGET`], plus [`MAX_VERIFIED`]
/// verifications when the spec has a verify_command.
pub fn budget(job: &Job) -> Duration {
    let c = &job.spec.checkpoint;
    if c.verify_command.is_empty() {
        SCAN_BUDGET
    } else {
        SCAN_BUDGET.saturating_add(c.verify_timeout.saturating_mul(MAX_VERIFIED))
    }
}

/// A scan the current attempt waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct Scan {
    pub attempt: u64,
    /// Node rank 0 of the attempt: it scans.
    pub node: String,
    pub deadline: Instant,
    pub sent: Option<Sent>,
}

/// Attempt `job.attempt` was just placed: scan first, if it is a relaunch.
pub(super) fn begin(job: &mut Job, now: Now) {
    job.resume_scan = None;
    let relaunch = job.attempt > 1;
    if !relaunch || job.rollback_attempt.is_some() || job.spec.checkpoint.dir.is_empty() {
        return;
    }
    if let Some(node) = job.placement.first() {
        job.resume_scan = Some(Scan {
            attempt: job.attempt,
            node: node.clone(),
            deadline: now.mono + budget(job),
            sent: None,
        });
    }
}

/// Does the current attempt still wait for its scan (its workers not yet started)?
pub fn pending(job: &Job) -> bool {
    job.phase == JobPhase::Running
        && job
            .resume_scan
            .as_ref()
            .is_some_and(|s| s.attempt == job.attempt)
}

/// The scan command for `job`.
pub(crate) fn command(job: &Job) -> v1::command::Kind {
    v1::command::Kind::ScanCheckpoints(v1::ScanCheckpoints {
        job_id: job.id.clone(),
        attempt: job.attempt,
        checkpoint_dir: job.spec.checkpoint.dir.clone(),
        checkpoint_layout: job.spec.checkpoint.layout.clone(),
        world_size: job.spec.nodes.saturating_mul(job.spec.gpus_per_node),
        verify_command: job.spec.checkpoint.verify_command.clone(),
        verify_timeout_ms: u64::try_from(job.spec.checkpoint.verify_timeout.as_millis())
            .unwrap_or(u64::MAX),
        workdir: job.spec.workdir.clone(),
        // As the workers get it: the spec's, then an operator's `job restart --env`.
        env: job
            .spec
            .env
            .iter()
            .chain(&job.env_override)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// `node` answered the scan of the current attempt.
pub(super) fn answered(
    job: &mut Job,
    node: &str,
    scan: &v1::CheckpointScan,
    now: Now,
    effects: &mut Vec<Effect>,
) {
    if !pending(job) || job.resume_scan.as_ref().is_none_or(|s| s.node != node) {
        return;
    }
    let verifying = !job.spec.checkpoint.verify_command.is_empty();
    for r in scan.rejected.iter().filter(|_| verifying) {
        mark_bad(job, node, r, now, effects);
    }
    if verifying && scan.newest.is_none() && !scan.rejected.is_empty() {
        all_rejected(job, node, scan, now, effects);
        return;
    }
    let known = Checkpoint::describe(job.checkpoint.as_ref());
    if !scan.error.is_empty() {
        let msg = format!(
            "checkpoint scan on {node} failed: {}; attempt {} resumes from {known}, the last one reported",
            scan.error, job.attempt
        );
        finish(job, msg, true, now, effects);
        return;
    }
    let found = scan.newest.as_ref();
    let (found, why) = match (found, verdict(job, found)) {
        (Some(found), Verdict::Newer) => (
            found,
            "that no agent had reported (its writer was cut off from the coordinator, or the job ended before it was seen)",
        ),
        (Some(found), Verdict::Verified) => (
            found,
            "that passed verify_command: the one reported failed it",
        ),
        (Some(found), Verdict::Older) => (
            found,
            "the newest complete one on disk: the one reported is no longer complete (rewritten or removed since)",
        ),
        (Some(found), Verdict::Bad) => {
            let msg = format!(
                "checkpoint scan on {node} found {} as the newest complete checkpoint, but it failed verify_command before; attempt {} resumes from {known}, the last one reported",
                found.path, job.attempt
            );
            finish(job, msg, true, now, effects);
            return;
        }
        (_, Verdict::Nothing) if job.checkpoint.is_some() => {
            let msg = format!(
                "checkpoint scan on {node} found no complete checkpoint in {} (is it mounted there?); attempt {} resumes from {known}, the last one reported",
                job.spec.checkpoint.dir, job.attempt
            );
            finish(job, msg, true, now, effects);
            return;
        }
        _ => {
            let msg = format!(
                "checkpoint scan on {node} found nothing newer than {known}; attempt {} resumes from it",
                job.attempt
            );
            finish(job, msg, false, now, effects);
            return;
        }
    };
    let adopted = Checkpoint {
        path: found.path.clone(),
        step: found.step,
        seen_at_ms: now.wall_ms,
        attempt: job.attempt.saturating_sub(1),
        save_ms: found.save_ms,
        completed_at_ms: found.completed_at_unix_ms,
    };
    crate::goodput::on_checkpoint(job, adopted.clone());
    job.checkpoint = Some(adopted);
    let resumed = job.checkpoint.clone();
    if let Some(a) = job.current_attempt_mut() {
        a.resumed_from = resumed;
    }
    crate::goodput::on_start(job);
    let msg = format!(
        "checkpoint scan on {node} found complete checkpoint {} (step {}) {why}; attempt {} resumes from it instead of {known}",
        found.path,
        found.step.map_or_else(|| "?".into(), |s| s.to_string()),
        job.attempt
    );
    finish(job, msg, true, now, effects);
}

/// What a scan's answer means for the checkpoint the job would resume from.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A complete checkpoint with a higher step: resume from it.
    Newer,
    /// The newest complete checkpoint is older than the one reported, which is therefore no
    /// longer complete (a reused step directory rewritten, a removed one): resume from it.
    Older,
    /// The one reported failed verify_command: resume from the one that passed, older or not.
    Verified,
    /// The same one, or one that cannot be ordered (no step, outside the directory): keep it.
    Same,
    /// Only one marked bad (it failed `verify_command` before).
    Bad,
    /// No complete checkpoint at all.
    Nothing,
}

fn verdict(job: &Job, found: Option<&v1::CheckpointSeen>) -> Verdict {
    let Some(found) = found else {
        return Verdict::Nothing;
    };
    if job.bad_checkpoints.contains(&found.path) {
        return Verdict::Bad;
    }
    let inside = std::path::Path::new(&found.path).starts_with(&job.spec.checkpoint.dir);
    if !inside {
        return Verdict::Same;
    }
    if job
        .checkpoint
        .as_ref()
        .is_some_and(|k| job.bad_checkpoints.contains(&k.path))
    {
        // The one reported was rejected: the verified one replaces it, older or not.
        return Verdict::Verified;
    }
    let Some(step) = found.step else {
        return Verdict::Same;
    };
    match job.checkpoint.as_ref() {
        None => Verdict::Newer,
        Some(known) if known.path == found.path => Verdict::Same,
        Some(known) => match known.step {
            Some(k) if step > k => Verdict::Newer,
            Some(k) if step < k => Verdict::Older,
            Some(_) => Verdict::Same,
            None => Verdict::Newer,
        },
    }
}

/// The scan is over: record it, and start the workers' clocks now (they start only now).
fn finish(job: &mut Job, msg: String, notable: bool, now: Now, effects: &mut Vec<Effect>) {
    job.resume_scan = None;
    for w in job.workers.values_mut() {
        w.progress_at_ms = now.wall_ms;
        w.progress_mono = now.mono;
    }
    if notable {
        job.event(now.wall_ms, "checkpoint", msg.clone());
    }
    effects.push(Effect::JobLog {
        job: job.id.clone(),
        message: msg,
        warn: false,
    });
    effects.push(Effect::PersistJob(Box::new(job.clone())));
}

/// Scans past their budget: the relaunch goes on without them.
pub(super) fn expire(job: &mut Job, now: Now, effects: &mut Vec<Effect>) {
    let Some(scan) = job.resume_scan.as_ref().filter(|_| pending(job)) else {
        return;
    };
    if now.mono < scan.deadline {
        return;
    }
    let msg = format!(
        "no checkpoint scan answer from {} within {} (an agent older than this coordinator ignores it); attempt {} resumes from {}, the last one reported",
        scan.node,
        humantime::format_duration(budget(job)),
        job.attempt,
        Checkpoint::describe(job.checkpoint.as_ref())
    );
    finish(job, msg, true, now, effects);
}

/// `r` failed the job's verify_command on `node`: never resume from it again.
fn mark_bad(
    job: &mut Job,
    node: &str,
    r: &v1::RejectedCheckpoint,
    now: Now,
    effects: &mut Vec<Effect>,
) {
    if !job.bad_checkpoints.insert(r.path.clone()) {
        return;
    }
    let output = r.output.trim();
    let msg = format!(
        "checkpoint {} (step {}) failed verify_command on {node} ({}); it is marked bad and never resumed from again; output: {}",
        r.path,
        r.step.map_or_else(|| "?".into(), |s| s.to_string()),
        r.why,
        if output.is_empty() { "(none)" } else { output }
    );
    job.event(now.wall_ms, "checkpoint-bad", msg.clone());
    effects.push(Effect::JobLog {
        job: job.id.clone(),
        message: msg,
        warn: true,
    });
}

/// Every candidate failed the verify_command: the job ends here. Resuming from a checkpoint
/// known to be corrupt would crash again, and a fresh start would throw the run away.
fn all_rejected(
    job: &mut Job,
    node: &str,
    scan: &v1::CheckpointScan,
    now: Now,
    effects: &mut Vec<Effect>,
) {
    job.resume_scan = None;
    let tried: Vec<String> = scan
        .rejected
        .iter()
        .map(|r| format!("{} ({})", r.path, r.why))
        .collect();
    let reason = format!(
        "no checkpoint passed verify_command on {node} before attempt {}: tried {}; fix or remove them (or the verify_command), then resubmit",
        job.attempt,
        tried.join(", ")
    );
    // Its workers were never started (the scan holds them back): nothing to stop.
    for w in job.workers.values_mut() {
        w.phase = crate::job::WorkerPhase::Stopped;
    }
    if let Some(a) = job.current_attempt_mut() {
        a.ended_at_ms = now.wall_ms;
        a.outcome = "failed".into();
        a.reason.clone_from(&reason);
    }
    super::attempt::fail_job(job, reason, "failed", now, effects);
    effects.push(Effect::PersistJob(Box::new(job.clone())));
}

#[cfg(test)]
#[path = "resume_scan_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "resume_verify_tests.rs"]
mod verify_tests;
