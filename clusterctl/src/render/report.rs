//! Goodput: the lines `job show` adds, and `job report`, a job's post-mortem timeline.

use super::fold::{Foldable, Folded, fold};
use super::{DETAIL_LABEL_WIDTH, Labelled, or_dash};
use crate::model::{Goodput, JobDetail};
use crate::table::{Table, format_elapsed, format_utc};
use crate::term::Term;

fn pct(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

/// `wall 1m00s = productive 42.0s (ETTR 70.0%) + lost 18.0s`.
pub fn goodput_summary(g: &Goodput) -> String {
    format!(
        "wall {} = productive {} (ETTR {}) + lost {}",
        format_elapsed(g.wall_ms),
        format_elapsed(g.productive_ms),
        pct(g.ettr),
        format_elapsed(g.lost_ms)
    )
}

/// `queued 0.0s, detection 1.0s, ...`: the lost phases in the order a failure goes through them.
pub fn lost_breakdown(g: &Goodput) -> String {
    [
        ("queued", g.queued_ms),
        ("detection", g.detection_ms),
        ("teardown", g.teardown_ms),
        ("waiting", g.waiting_ms),
        ("start-up", g.startup_ms),
        ("recomputation", g.recomputation_ms),
    ]
    .iter()
    .map(|(name, ms)| format!("{name} {}", format_elapsed(*ms)))
    .collect::<Vec<_>>()
    .join(", ")
}

/// `every 10.0s (save 0.7s); suggested every 8.6s (Young: sqrt(2 x save x MTBF 54.0s))`. No
/// suggestion until a save was timed at more than 0 (Young's formula gives 0 for a save of 0)
/// and a failure was seen.
pub fn checkpoint_advice(g: &Goodput) -> String {
    let now = match g.checkpoint_interval_ms {
        Some(ms) => format!("every {}", format_elapsed(ms)),
        None => "interval unknown (fewer than 2 checkpoints)".to_string(),
    };
    let save = match g.checkpoint_save_ms {
        Some(ms) if ms > 0 => format!("save {}", format_elapsed(ms)),
        Some(_) => "save not measured: its files' times were equal".to_string(),
        None => "save not measured".to_string(),
    };
    let measured = g.checkpoint_save_ms.is_some_and(|ms| ms > 0);
    let suggested = match (g.suggested_checkpoint_interval_ms, g.mtbf_ms) {
        (Some(s), Some(m)) if measured && s > 0 => format!(
            "suggested every {} (Young: sqrt(2 x save x MTBF {}))",
            format_elapsed(s),
            format_elapsed(m)
        ),
        (_, None) => "no suggestion until a failure is seen".to_string(),
        (_, Some(m)) => format!(
            "no suggestion until a save is measured (MTBF {})",
            format_elapsed(m)
        ),
    };
    format!("{now} ({save}); {suggested}")
}

/// `1 failure 16.0s + the first start 2.0s (queued, start-up)`: the lost time by cause, the
/// same total as `goodput`'s lost and the failures' costs (job report's FAILURES) summed.
pub fn lost_by_cause(g: &Goodput) -> String {
    let failures: u64 = g.failures.iter().map(|f| f.total_ms()).sum();
    let first = g.lost_ms.saturating_sub(failures);
    let n = g.failures.len();
    let plural = if n == 1 { "" } else { "s" };
    format!(
        "{n} failure{plural} {} + the first start {} (queued, start-up)",
        format_elapsed(failures),
        format_elapsed(first)
    )
}

/// The goodput lines of `job show`.
pub fn goodput_lines(out: &mut Labelled, g: Option<&Goodput>) {
    let Some(g) = g else {
        out.line("goodput", "-");
        return;
    };
    out.line("goodput", goodput_summary(g));
    out.line("lost to", lost_breakdown(g));
    out.line("lost by cause", lost_by_cause(g));
    out.line("checkpointing", checkpoint_advice(g));
}

/// `job report ID`: totals, the cost of each failure, and the timeline of
/// phases with the job's events in between.
pub fn job_report(d: &JobDetail, term: Term) -> String {
    let j = &d.job;
    let mut out = Labelled::new(DETAIL_LABEL_WIDTH);
    out.line("job", format!("{} ({})", j.id, or_dash(&j.name)));
    out.line("state", or_dash(&j.state));
    out.line("restarts", super::job::restarts(j));
    let Some(g) = &d.goodput else {
        out.line("goodput", "- (the coordinator does not account goodput)");
        return out.finish();
    };
    goodput_lines(&mut out, Some(g));
    out.push_str("\n");
    out.push_str(&failures_table(g, term));
    out.push_str("\n");
    out.push_str(&timeline_table(d, g, term));
    let evidence = super::evidence::all(d);
    if !evidence.is_empty() {
        out.push_str("\n");
        out.push_str(&evidence);
    }
    out.finish()
}

fn failures_table(g: &Goodput, term: Term) -> String {
    if g.failures.is_empty() {
        return "FAILURES: none\n".to_string();
    }
    let mut t = Table::with_headers(&[
        "ATTEMPT",
        "KIND",
        "CULPRIT",
        "FAULT-AT",
        "DETECT",
        "TEARDOWN",
        "WAIT",
        "START-UP",
        "RECOMPUTE",
        "TOTAL",
        "STEPS-LOST",
        "REASON",
    ])
    .fit(term.width);
    for f in &g.failures {
        t.push([
            f.attempt.to_string(),
            or_dash(&f.kind).to_string(),
            or_dash(&f.culprit_node).to_string(),
            format_utc(f.fault_at_unix_ms),
            format_elapsed(f.detection_ms),
            format_elapsed(f.teardown_ms),
            format_elapsed(f.waiting_ms),
            format_elapsed(f.startup_ms),
            format_elapsed(f.recomputation_ms),
            format_elapsed(f.total_ms()),
            f.steps_lost
                .map_or_else(|| "-".to_string(), |s| s.to_string()),
            f.reason.clone(),
        ]);
    }
    format!("FAILURES\n{}", t.render())
}

/// One row of the timeline: a phase, or one of the job's events.
struct Row {
    at: u64,
    /// 0 for a phase, 1 for an event: at the same instant a phase comes first.
    order: u8,
    phase: String,
    duration: String,
    kind: String,
    message: String,
}

impl Foldable for Row {
    fn at_ms(&self) -> u64 {
        self.at
    }
    /// Phases have no kind, so they are never folded and they end a run of events.
    fn kind(&self) -> &str {
        &self.kind
    }
    fn message(&self) -> &str {
        &self.message
    }
}

fn timeline_table(d: &JobDetail, g: &Goodput, term: Term) -> String {
    let Some(start) = g.timeline.first().map(|s| s.from_unix_ms) else {
        return "TIMELINE: empty\n".to_string();
    };
    let mut rows: Vec<Row> = Vec::new();
    for s in &g.timeline {
        let attempt = if s.attempt == 0 {
            String::new()
        } else {
            format!(" (attempt {})", s.attempt)
        };
        rows.push(Row {
            at: s.from_unix_ms,
            order: 0,
            phase: format!("{}{attempt}", s.phase),
            duration: format_elapsed(s.to_unix_ms.saturating_sub(s.from_unix_ms)),
            kind: String::new(),
            message: String::new(),
        });
    }
    for e in &d.events {
        rows.push(Row {
            at: e.at_unix_ms,
            order: 1,
            phase: String::new(),
            duration: String::new(),
            kind: or_dash(&e.kind).to_string(),
            message: e.message.clone(),
        });
    }
    rows.sort_by_key(|r| (r.at, r.order));
    let mut t = Table::with_headers(&["TIME", "+", "PHASE", "FOR", "EVENT"]).fit(term.width);
    for f in fold(&rows) {
        let (r, event) = match f {
            Folded::One(r) if r.order == 0 => (r, String::new()),
            Folded::One(r) => (r, format!("{}: {}", r.kind, r.message)),
            Folded::Run { first, run } => (first, run.summary()),
        };
        t.push([
            format_utc(r.at),
            format_elapsed(r.at.saturating_sub(start)),
            r.phase.clone(),
            r.duration.clone(),
            event,
        ]);
    }
    format!("TIMELINE\n{}", t.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::running_job;
    use crate::model::{FailureCost, TimelineSegment};

    fn goodput() -> Goodput {
        let seg = |phase: &str, from: u64, to: u64, attempt| TimelineSegment {
            phase: phase.into(),
            from_unix_ms: from,
            to_unix_ms: to,
            attempt,
        };
        Goodput {
            wall_ms: 60_000,
            productive_ms: 42_000,
            lost_ms: 18_000,
            ettr: 0.7,
            queued_ms: 0,
            detection_ms: 1_000,
            teardown_ms: 1_000,
            waiting_ms: 5_000,
            startup_ms: 6_000,
            recomputation_ms: 5_000,
            failures: vec![FailureCost {
                attempt: 1,
                kind: "crash".into(),
                reason: "worker on n2 (rank 1) exited with code 1".into(),
                culprit_node: "n2".into(),
                fault_at_unix_ms: 1_029_000,
                detection_ms: 1_000,
                teardown_ms: 1_000,
                waiting_ms: 5_000,
                startup_ms: 4_000,
                recomputation_ms: 5_000,
                steps_lost: Some(50),
            }],
            timeline: vec![
                seg("startup", 1_000_000, 1_002_000, 1),
                seg("productive", 1_002_000, 1_029_000, 1),
                seg("detection", 1_029_000, 1_030_000, 1),
            ],
            mtbf_ms: Some(54_000),
            checkpoint_save_ms: Some(700),
            checkpoint_interval_ms: Some(10_000),
            suggested_checkpoint_interval_ms: Some(8_695),
        }
    }

    #[test]
    fn the_summary_adds_up_and_names_every_lost_phase() {
        let g = goodput();
        assert_eq!(
            goodput_summary(&g),
            "wall 1m00s = productive 42.0s (ETTR 70.0%) + lost 18.0s"
        );
        assert_eq!(
            lost_breakdown(&g),
            "queued 0.0s, detection 1.0s, teardown 1.0s, waiting 5.0s, start-up 6.0s, recomputation 5.0s"
        );
        assert_eq!(
            checkpoint_advice(&g),
            "every 10.0s (save 0.7s); suggested every 8.6s (Young: sqrt(2 x save x MTBF 54.0s))"
        );
    }

    #[test]
    fn without_failures_there_is_no_suggestion() {
        let g = Goodput {
            mtbf_ms: None,
            suggested_checkpoint_interval_ms: None,
            checkpoint_interval_ms: None,
            ..goodput()
        };
        assert_eq!(
            checkpoint_advice(&g),
            "interval unknown (fewer than 2 checkpoints) (save 0.7s); no suggestion until a failure is seen"
        );
    }

    /// An agent that could not time its saves reports 0: Young's formula would say 0.0s.
    #[test]
    fn no_interval_is_suggested_from_a_save_time_of_zero() {
        let g = Goodput {
            checkpoint_save_ms: Some(0),
            suggested_checkpoint_interval_ms: Some(0),
            mtbf_ms: Some(3_300),
            checkpoint_interval_ms: Some(1_000),
            ..goodput()
        };
        assert_eq!(
            checkpoint_advice(&g),
            "every 1.0s (save not measured: its files' times were equal); no suggestion until a save is measured (MTBF 3.3s)"
        );
        let g = Goodput {
            checkpoint_save_ms: None,
            suggested_checkpoint_interval_ms: None,
            ..g
        };
        assert_eq!(
            checkpoint_advice(&g),
            "every 1.0s (save not measured); no suggestion until a save is measured (MTBF 3.3s)"
        );
    }

    /// The demo's job: lost 2.0s, of which its one failure cost 1.0s; job show and job report
    /// say so in the same words, and the parts add up to the lost total.
    #[test]
    fn the_lost_time_by_cause_adds_up_to_the_lost_total_in_every_view() {
        let mut g = goodput();
        g.wall_ms = 3_300;
        g.productive_ms = 1_300;
        g.lost_ms = 2_000;
        g.ettr = 1_300.0 / 3_300.0;
        (g.queued_ms, g.detection_ms, g.teardown_ms) = (0, 200, 100);
        (g.waiting_ms, g.startup_ms, g.recomputation_ms) = (300, 1_400, 0);
        g.failures[0] = FailureCost {
            detection_ms: 200,
            teardown_ms: 100,
            waiting_ms: 300,
            startup_ms: 400,
            recomputation_ms: 0,
            ..g.failures[0].clone()
        };
        let mut d = crate::model::JobDetail::from_proto(running_job(), "j-1");
        d.goodput = Some(g);
        let show = crate::render::job_detail(&d, 1_420_000, Term::PLAIN);
        let report = job_report(&d, Term::PLAIN);
        for text in [&show, &report] {
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("goodput") || l.starts_with("lost by cause"))
                .collect();
            assert_eq!(
                lines,
                [
                    "goodput         wall 3.3s = productive 1.3s (ETTR 39.4%) + lost 2.0s",
                    "lost by cause   1 failure 1.0s + the first start 1.0s (queued, start-up)",
                ],
                "{text}"
            );
        }
        assert!(
            report.contains("   1.0s    50   "),
            "FAILURES' total is the failure's part: {report}"
        );
    }

    #[test]
    fn the_report_interleaves_phases_and_events() {
        let mut d = crate::model::JobDetail::from_proto(running_job(), "j-1");
        d.events.clear();
        d.events.push(crate::model::JobEvent {
            at_unix_ms: 1_030_000,
            kind: "failed".into(),
            message: "attempt 1 failed".into(),
        });
        d.goodput = Some(goodput());
        let text = job_report(&d, Term::PLAIN);
        assert!(
            text.contains(
                "goodput         wall 1m00s = productive 42.0s (ETTR 70.0%) + lost 18.0s\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("FAILURES\nATTEMPT   KIND    CULPRIT"),
            "{text}"
        );
        assert!(
            text.contains("1         crash   n2        1970-01-01 00:17:09Z   1.0s     1.0s       5.0s   4.0s       5.0s        16.0s   50 "),
            "{text}"
        );
        let timeline = text.split("TIMELINE\n").nth(1).expect("a timeline");
        let lines: Vec<&str> = timeline.lines().collect();
        assert_eq!(lines.len(), 5, "{timeline}");
        assert!(lines[1].contains("startup (attempt 1)"), "{timeline}");
        assert!(lines[3].contains("detection (attempt 1)"), "{timeline}");
        assert!(lines[4].ends_with("failed: attempt 1 failed"), "{timeline}");
    }

    #[test]
    fn the_timeline_folds_checkpoints_between_phases_and_keeps_failures() {
        let mut d = crate::model::JobDetail::from_proto(running_job(), "j-1");
        d.goodput = Some(goodput());
        d.events = (0..30)
            .map(|i| crate::model::JobEvent {
                at_unix_ms: 1_003_000 + i * 800,
                kind: "checkpoint".into(),
                message: format!("complete checkpoint /c/step_{i} (step {})", 10 * i),
            })
            .chain([crate::model::JobEvent {
                at_unix_ms: 1_029_500,
                kind: "failed".into(),
                message: "attempt 1 failed".into(),
            }])
            .collect();
        let text = job_report(&d, Term::PLAIN);
        let timeline = text.split("TIMELINE\n").nth(1).expect("a timeline");
        let events: Vec<&str> = timeline
            .lines()
            .skip(1)
            .filter(|l| !l.contains("(attempt"))
            .map(|l| l.rsplit("   ").next().unwrap_or(l))
            .collect();
        assert_eq!(
            events,
            [
                "checkpoints step 0 … 290: 30, every 0.8s",
                "failed: attempt 1 failed"
            ],
            "{timeline}"
        );
    }
}
