//! Jobs: the `jobs` table, one job in detail (`job show`), and the one-liners of submit and cancel.

use super::fold::{Foldable, Folded, fold};
use super::{DETAIL_LABEL_WIDTH, Labelled, or_dash};
use crate::model::{JobDetail, JobEvent, JobSummary, SlurmJobInfo};
use crate::table::{
    Table, format_age, format_ago, format_elapsed, format_utc, format_when, sanitize,
};
use crate::term::Term;

fn opt(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn node_list(nodes: &[String]) -> String {
    if nodes.is_empty() {
        "-".to_string()
    } else {
        nodes.join(",")
    }
}

/// `attempt` as a number, `-` before the first start.
fn attempt(n: u64) -> String {
    if n == 0 {
        "-".to_string()
    } else {
        n.to_string()
    }
}

fn age_since(unix_ms: u64, now_ms: u64) -> String {
    if unix_ms == 0 {
        "-".to_string()
    } else {
        format_age(now_ms.saturating_sub(unix_ms))
    }
}

pub fn jobs(list: &[JobSummary], now_ms: u64, term: Term) -> String {
    if list.is_empty() {
        return "no jobs (clusterctl job submit FILE submits one)\n".to_string();
    }
    let mut t = Table::with_headers(&[
        "ID",
        "NAME",
        "STATE",
        "ATTEMPT",
        "RESTARTS",
        "NODES",
        "STEP",
        "CHECKPOINT",
        "AGE",
        "REASON",
    ])
    .fit(term.width)
    .paint(term, &[2]);
    for j in list {
        t.push([
            j.id.clone(),
            j.name.clone(),
            or_dash(&j.state).to_string(),
            attempt(j.attempt),
            restarts(j),
            node_list(&j.assigned_nodes),
            opt(j.progress_step),
            opt(j.last_checkpoint_step),
            age_since(j.submitted_at_unix_ms, now_ms),
            j.reason.clone(),
        ]);
    }
    t.render()
}

/// Restarts so far out of the most allowed; a Slurm job's are vigil's requeues (Slurm has the
/// say on how many it gets).
pub(super) fn restarts(j: &JobSummary) -> String {
    if j.is_slurm() {
        format!("{} by vigil", j.restarts)
    } else {
        format!("{}/{}", j.restarts, j.max_restarts)
    }
}

/// `job j-1 submitted (opt-demo): Pending — waiting for 2 schedulable nodes`.
pub fn job_submitted(d: &JobDetail) -> String {
    let j = &d.job;
    let mut line = format!("job {} submitted ({}): {}", j.id, j.name, or_dash(&j.state));
    if j.state == "Pending" && !j.reason.is_empty() {
        line.push_str(&format!(" — {}", j.reason));
    }
    format!("{}\n", sanitize(&line))
}

/// `job j-1 cancelling`, or whatever state the coordinator answered.
pub fn job_cancelled(d: &JobDetail) -> String {
    let state = if d.job.state.is_empty() {
        "cancelling".to_string()
    } else {
        d.job.state.to_lowercase()
    };
    sanitize(&format!("job {} {state}", d.job.id)) + "\n"
}

/// The job's step, and how fresh it is: workers' steps reach the coordinator with the agents'
/// heartbeats (once a second by default), not at every step.
fn step(d: &JobDetail, now_ms: u64) -> String {
    let Some(step) = d.job.progress_step else {
        return "-".to_string();
    };
    let newest = d.workers.iter().map(|w| w.progress_at_unix_ms).max();
    match newest {
        Some(at) if at > 0 => format!(
            "{step} (as of {}; reported with each heartbeat, once a second by default)",
            format_ago(at, now_ms)
        ),
        _ => format!("{step} (reported with each heartbeat, once a second by default)"),
    }
}

pub fn job_detail(d: &JobDetail, now_ms: u64, term: Term) -> String {
    if let Some(s) = &d.slurm {
        return slurm_detail(d, s, now_ms, term);
    }
    let j = &d.job;
    let mut out = Labelled::new(DETAIL_LABEL_WIDTH);
    out.line("job", format!("{} ({})", j.id, or_dash(&j.name)));
    out.line("state", or_dash(&j.state));
    out.line("reason", or_dash(&j.reason));
    let placement = match (j.attempt, j.assigned_nodes.is_empty()) {
        (0, _) => "- (not started yet)".to_string(),
        (n, true) => format!("{n} (no nodes assigned)"),
        (n, false) => format!("{n} on {} (by node rank)", j.assigned_nodes.join(", ")),
    };
    out.line("attempt", placement);
    out.line(
        "gang",
        format!("{} nodes x {} GPUs", j.nodes, j.gpus_per_node),
    );
    out.line(
        "spares",
        if d.spare_nodes.is_empty() {
            "none".to_string()
        } else {
            d.spare_nodes.join(", ")
        },
    );
    out.line(
        "restarts",
        format!("{}/{} so far", j.restarts, j.max_restarts),
    );
    out.line("step", step(d, now_ms));
    let checkpoint = match &d.last_checkpoint {
        Some(c) => format!(
            "{} (step {}, seen {}, from attempt {})",
            c.path,
            opt(c.step),
            if c.seen_at_unix_ms == 0 {
                "-".to_string()
            } else {
                format_ago(c.seen_at_unix_ms, now_ms)
            },
            c.attempt
        ),
        None => "none yet".to_string(),
    };
    out.line("last checkpoint", checkpoint);
    if d.goodput.is_none() {
        // An older coordinator: only its own count, failure detected to relaunch.
        out.line("time lost", format_elapsed(d.lost_ms));
    }
    super::report::goodput_lines(&mut out, d.goodput.as_ref());
    out.line("submitted", format_when(j.submitted_at_unix_ms, now_ms));
    out.line("workdir", or_dash(&d.workdir));
    let checkpoints = if d.checkpoint_dir.is_empty() {
        "none (the spec has no [checkpoint])".to_string()
    } else {
        format!(
            "{} (layout {})",
            d.checkpoint_dir,
            or_dash(&d.checkpoint_layout)
        )
    };
    out.line("checkpoints", checkpoints);
    if !d.bad_checkpoints.is_empty() {
        out.line("bad checkpoints", d.bad_checkpoints.join(", "));
    }
    for section in [
        workers_table(d, now_ms),
        attempts_table(d, now_ms, term),
        last_output(d),
        super::evidence::latest(d),
        preflight(d),
        events_table(d, term),
    ] {
        if section.is_empty() {
            continue;
        }
        out.push_str("\n");
        out.push_str(&section);
    }
    out.finish()
}

/// The latest attempt's gang preflight, a line per round; empty when none ran.
fn preflight(d: &JobDetail) -> String {
    let Some(a) = d.attempts.iter().rev().find(|a| !a.preflight.is_empty()) else {
        return String::new();
    };
    let mut out = format!("PREFLIGHT of attempt {}\n", a.attempt);
    for line in &a.preflight {
        out.push_str(&format!("  {}\n", sanitize(line)));
    }
    out
}

/// A Slurm job vigil recorded: who runs it, its runs (as attempts), vigil's requeues, goodput.
fn slurm_detail(d: &JobDetail, s: &SlurmJobInfo, now_ms: u64, term: Term) -> String {
    let j = &d.job;
    let mut out = Labelled::new(DETAIL_LABEL_WIDTH);
    out.line("job", format!("{} ({})", j.id, or_dash(&j.name)));
    out.line(
        "source",
        format!(
            "slurm (user {}): Slurm runs it, vigil records it",
            or_dash(&s.user)
        ),
    );
    out.line("state", or_dash(&s.slurm_state));
    out.line("reason", or_dash(&j.reason));
    let runs = match j.assigned_nodes.as_slice() {
        [] => format!("{}", j.attempt),
        nodes => format!("{}, now on {}", j.attempt, nodes.join(", ")),
    };
    out.line("runs", runs);
    out.line("requeues", restarts(j));
    super::report::goodput_lines(&mut out, d.goodput.as_ref());
    out.line("first running", format_when(j.submitted_at_unix_ms, now_ms));
    if let Some(at) = s.finished_at_unix_ms {
        out.line(
            "ended",
            format!("{}, {}", or_dash(&s.outcome), format_when(at, now_ms)),
        );
    }
    for section in [attempts_table(d, now_ms, term), requeues_table(s, term)] {
        out.push_str("\n");
        out.push_str(&section);
    }
    out.finish()
}

fn requeues_table(s: &SlurmJobInfo, term: Term) -> String {
    if s.requeues.is_empty() {
        return "REQUEUES BY VIGIL: none\n".to_string();
    }
    let mut t =
        Table::with_headers(&["TIME", "RUN", "NODE", "FAULT-TO-REQUEUE", "REASON"]).fit(term.width);
    for q in &s.requeues {
        t.push([
            format_utc(q.at_unix_ms),
            q.run.to_string(),
            q.node.clone(),
            q.fault_at_unix_ms.map_or_else(
                || "-".to_string(),
                |f| format_elapsed(q.at_unix_ms.saturating_sub(f)),
            ),
            q.reason.clone(),
        ]);
    }
    format!("REQUEUES BY VIGIL\n{}", t.render())
}

fn workers_table(d: &JobDetail, now_ms: u64) -> String {
    if d.workers.is_empty() {
        return "WORKERS: none\n".to_string();
    }
    let mut t = Table::with_headers(&[
        "NODE",
        "RANK",
        "STATE",
        "EXIT",
        "STEP",
        "PROGRESS-AGE",
        "PID",
        "LOG",
    ]);
    for w in &d.workers {
        t.push([
            w.node.clone(),
            w.node_rank.to_string(),
            or_dash(&w.state).to_string(),
            w.exit_code
                .map_or_else(|| "-".to_string(), |c| c.to_string()),
            opt(w.progress_step),
            age_since(w.progress_at_unix_ms, now_ms),
            if w.pid == 0 {
                "-".to_string()
            } else {
                w.pid.to_string()
            },
            or_dash(&w.log_path).to_string(),
        ]);
    }
    format!("WORKERS\n{}", t.render())
}

fn attempts_table(d: &JobDetail, now_ms: u64, term: Term) -> String {
    if d.attempts.is_empty() {
        return "ATTEMPTS: none\n".to_string();
    }
    let mut t = Table::with_headers(&[
        "ATTEMPT",
        "NODES",
        "STARTED",
        "DURATION",
        "OUTCOME",
        "RESUMED-FROM",
        "LAST-STEP",
        "REASON",
    ])
    .fit(term.width);
    for a in &d.attempts {
        let end = if a.ended_at_unix_ms == 0 {
            now_ms
        } else {
            a.ended_at_unix_ms
        };
        let duration = if a.started_at_unix_ms == 0 {
            "-".to_string()
        } else {
            format_elapsed(end.saturating_sub(a.started_at_unix_ms))
        };
        let resumed = match (a.resumed_from_step, a.resumed_from.as_str()) {
            // The batch script picks a Slurm job's checkpoint: vigil does not know it.
            _ if d.slurm.is_some() => "-".to_string(),
            (Some(step), _) => format!("step {step}"),
            (None, "") => "fresh".to_string(),
            (None, path) => path.rsplit('/').next().unwrap_or(path).to_string(),
        };
        let reason = match (a.reason.as_str(), a.culprit_node.as_str()) {
            (reason, "") => reason.to_string(),
            ("", node) => format!("culprit: {node}"),
            (reason, node) => format!("{reason} (culprit: {node})"),
        };
        t.push([
            a.attempt.to_string(),
            node_list(&a.nodes),
            format_utc(a.started_at_unix_ms),
            duration,
            or_dash(&a.outcome).to_string(),
            resumed,
            opt(a.last_step),
            reason,
        ]);
    }
    format!("ATTEMPTS\n{}", t.render())
}

/// The last output of the worker whose failure ended the latest failed attempt: what a crash
/// loop (or any crash) says about itself. Empty when no attempt kept any.
fn last_output(d: &JobDetail) -> String {
    let Some(a) = d.attempts.iter().rev().find(|a| !a.log_tail.is_empty()) else {
        return String::new();
    };
    let how = match (a.exit_code, a.signal) {
        (_, Some(sig)) => format!(", killed by signal {sig}"),
        (Some(code), None) => format!(", exit code {code}"),
        (None, None) => String::new(),
    };
    let on = if a.culprit_node.is_empty() {
        String::new()
    } else {
        format!(" on {}", a.culprit_node)
    };
    let mut out = format!(
        "LAST OUTPUT of the worker that failed attempt {}{on}{how}
",
        a.attempt
    );
    for line in a.log_tail.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl Foldable for JobEvent {
    fn at_ms(&self) -> u64 {
        self.at_unix_ms
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn message(&self) -> &str {
        &self.message
    }
}

fn events_table(d: &JobDetail, term: Term) -> String {
    if d.events.is_empty() {
        return "EVENTS: none\n".to_string();
    }
    let mut t = Table::with_headers(&["TIME", "KIND", "MESSAGE"]).fit(term.width);
    for f in fold(&d.events) {
        let (e, message) = match f {
            Folded::One(e) => (e, e.message.clone()),
            Folded::Run { first, run } => (first, run.summary()),
        };
        t.push([
            format_utc(e.at_unix_ms),
            or_dash(&e.kind).to_string(),
            message,
        ]);
    }
    format!("EVENTS (newest last)\n{}", t.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::running_job;

    const NOW: u64 = 1_420_000;

    fn detail() -> JobDetail {
        JobDetail::from_proto(running_job(), "j-1")
    }

    #[test]
    fn jobs_table_shows_progress_checkpoint_and_placement() {
        let mut pending = detail().job;
        pending.id = "j-2".into();
        pending.state = "Pending".into();
        pending.attempt = 0;
        pending.restarts = 0;
        pending.assigned_nodes.clear();
        pending.progress_step = None;
        pending.last_checkpoint_step = None;
        pending.reason = "waiting for 2 schedulable nodes".into();
        assert_eq!(
            jobs(&[detail().job, pending], NOW, Term::PLAIN),
            "ID    NAME       STATE     ATTEMPT   RESTARTS   NODES             STEP   CHECKPOINT   AGE   REASON\n\
             j-1   opt-demo   Running   2         1/50       gpu-001,gpu-004   230    200          7m\n\
             j-2   opt-demo   Pending   -         0/50       -                 -      -            7m    waiting for 2 schedulable nodes\n"
        );
        assert!(jobs(&[], NOW, Term::PLAIN).starts_with("no jobs"));
    }

    #[test]
    fn job_detail_shows_attempts_workers_and_events() {
        let text = job_detail(&detail(), NOW, Term::PLAIN);
        assert!(
            text.starts_with(
                "job             j-1 (opt-demo)\nstate           Running\nreason          -\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("attempt         2 on gpu-001, gpu-004 (by node rank)\n"),
            "{text}"
        );
        assert!(text.contains("spares          gpu-009\n"), "{text}");
        assert!(text.contains("restarts        1/50 so far\n"), "{text}");
        assert!(
            text.contains(
                "last checkpoint /ckpt/step_00000200 (step 200, seen 3m ago, from attempt 1)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("step            230 (as of 0.5s ago; reported with each heartbeat, once a second by default)\n"),
            "{text}"
        );
        assert!(
            text.contains("checkpoints     /ckpt (layout marker)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "WORKERS\n\
                 NODE      RANK   STATE     EXIT   STEP   PROGRESS-AGE   PID    LOG\n\
                 gpu-001   0      running   -      230    0.5s           4242   /var/lib/vigil/logs/j-1.2.log\n\
                 gpu-004   1      running   -      -      -              -      -\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "ATTEMPTS\n\
                 ATTEMPT   NODES             STARTED                DURATION   OUTCOME   RESUMED-FROM   LAST-STEP   REASON\n\
                 1         gpu-001,gpu-003   1970-01-01 00:16:50Z   4m50s      failed    fresh          260         XID 79 (GPU has fallen off the bus) (culprit: gpu-003)\n\
                 2         gpu-001,gpu-004   1970-01-01 00:22:45Z   55.0s      running   step 200       230\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "EVENTS (newest last)\n\
                 TIME                   KIND         MESSAGE\n\
                 1970-01-01 00:16:40Z   submitted    submitted from job.toml\n\
                 1970-01-01 00:17:00Z   checkpoint   checkpoints step 20 … 200: 19, every 10.0s\n\
                 1970-01-01 00:21:32Z   failed       attempt 1 failed: node gpu-003 unhealthy: XID 79 (GPU has fallen off the bus)\n\
                 1970-01-01 00:21:40Z   restart      attempt 1 failed on gpu-003: XID 79\n\
                 1970-01-01 00:22:45Z   started      attempt 2 on gpu-001, gpu-004\n"
            ),
            "{text}"
        );
    }

    /// With goodput, `job show` states one lost time, goodput's: not also the coordinator's
    /// older count (failure detected to relaunch) under another name.
    #[test]
    fn job_show_states_the_lost_time_once() {
        let text = job_detail(&detail(), NOW, Term::PLAIN);
        let lost: Vec<&str> = text.lines().filter(|l| l.contains("lost")).collect();
        assert_eq!(
            lost,
            [
                "goodput         wall 12m00s = productive 9m15s (ETTR 77.1%) + lost 2m45s",
                "lost to         queued 10.0s, detection 2.0s, teardown 8.0s, waiting 1m05s, start-up 20.0s, recomputation 1m00s",
                "lost by cause   1 failure 2m30s + the first start 15.0s (queued, start-up)",
            ],
            "{text}"
        );
        let mut old = detail();
        old.goodput = None;
        let text = job_detail(&old, NOW, Term::PLAIN);
        assert!(text.contains("time lost       1m05s\n"), "{text}");
        assert!(text.contains("goodput         -\n"), "{text}");
    }

    #[test]
    fn job_show_names_bad_checkpoints_only_when_there_are_some() {
        let text = job_detail(&detail(), NOW, Term::PLAIN);
        assert!(!text.contains("bad checkpoints"), "{text}");
        let mut d = detail();
        d.bad_checkpoints = vec!["/ckpt/step_00000210".into(), "/ckpt/step_00000220".into()];
        let text = job_detail(&d, NOW, Term::PLAIN);
        assert!(
            text.contains("bad checkpoints /ckpt/step_00000210, /ckpt/step_00000220\n"),
            "{text}"
        );
    }

    #[test]
    fn submit_and_cancel_print_one_line() {
        let mut d = detail();
        assert_eq!(job_submitted(&d), "job j-1 submitted (opt-demo): Running\n");
        d.job.state = "Pending".into();
        d.job.reason = "waiting for 2 schedulable nodes".into();
        assert_eq!(
            job_submitted(&d),
            "job j-1 submitted (opt-demo): Pending — waiting for 2 schedulable nodes\n"
        );
        d.job.state = "Cancelling".into();
        assert_eq!(job_cancelled(&d), "job j-1 cancelling\n");
    }
}
