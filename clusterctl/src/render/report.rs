//! Goodput: the lines `job show` adds, and `job report`, a job's post-mortem timeline.

use super::{DETAIL_LABEL_WIDTH, Labelled, or_dash};
use crate::model::{Goodput, JobDetail};
use crate::table::{Table, format_elapsed, format_utc};
use crate::term::Term;

fn pct(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

fn opt_elapsed(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), format_elapsed)
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

/// `every 10.0s (save 0.7s); suggested 8.6s (Young, MTBF 54.0s)`.
pub fn checkpoint_advice(g: &Goodput) -> String {
    let now = match g.checkpoint_interval_ms {
        Some(ms) => format!("every {}", format_elapsed(ms)),
        None => "interval unknown (fewer than 2 checkpoints)".to_string(),
    };
    let save = opt_elapsed(g.checkpoint_save_ms);
    let suggested = match (g.suggested_checkpoint_interval_ms, g.mtbf_ms) {
        (Some(s), Some(m)) => format!(
            "suggested every {} (Young: sqrt(2 x save x MTBF {}))",
            format_elapsed(s),
            format_elapsed(m)
        ),
        (None, None) => "no suggestion until a failure is seen".to_string(),
        (None, Some(m)) => format!(
            "no suggestion: save time unknown (MTBF {})",
            format_elapsed(m)
        ),
        (Some(s), None) => format!("suggested every {}", format_elapsed(s)),
    };
    format!("{now} (save {save}); {suggested}")
}

/// The goodput lines of `job show`.
pub fn goodput_lines(out: &mut Labelled, g: Option<&Goodput>) {
    let Some(g) = g else {
        out.line("goodput", "-");
        return;
    };
    out.line("goodput", goodput_summary(g));
    out.line("lost to", lost_breakdown(g));
    out.line("checkpointing", checkpoint_advice(g));
}

/// `job report ID`: totals, the cost of each failure, and the timeline of
/// phases with the job's events in between.
pub fn job_report(d: &JobDetail, term: Term) -> String {
    let j = &d.job;
    let mut out = Labelled::new(DETAIL_LABEL_WIDTH);
    out.line("job", format!("{} ({})", j.id, or_dash(&j.name)));
    out.line("state", or_dash(&j.state));
    out.line("restarts", format!("{}/{}", j.restarts, j.max_restarts));
    let Some(g) = &d.goodput else {
        out.line("goodput", "- (the coordinator does not account goodput)");
        return out.finish();
    };
    out.line("goodput", goodput_summary(g));
    out.line("lost to", lost_breakdown(g));
    out.line("checkpointing", checkpoint_advice(g));
    out.push_str("\n");
    out.push_str(&failures_table(g, term));
    out.push_str("\n");
    out.push_str(&timeline_table(d, g, term));
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

fn timeline_table(d: &JobDetail, g: &Goodput, term: Term) -> String {
    let Some(start) = g.timeline.first().map(|s| s.from_unix_ms) else {
        return "TIMELINE: empty\n".to_string();
    };
    // Phases and events in time order; at the same instant a phase comes first.
    let mut rows: Vec<(u64, u8, [String; 4])> = Vec::new();
    for s in &g.timeline {
        let attempt = if s.attempt == 0 {
            String::new()
        } else {
            format!(" (attempt {})", s.attempt)
        };
        rows.push((
            s.from_unix_ms,
            0,
            [
                String::new(),
                format!("{}{attempt}", s.phase),
                format_elapsed(s.to_unix_ms.saturating_sub(s.from_unix_ms)),
                String::new(),
            ],
        ));
    }
    for e in &d.events {
        rows.push((
            e.at_unix_ms,
            1,
            [
                String::new(),
                String::new(),
                String::new(),
                format!("{}: {}", or_dash(&e.kind), e.message),
            ],
        ));
    }
    rows.sort_by_key(|(at, order, _)| (*at, *order));
    let mut t = Table::with_headers(&["TIME", "+", "PHASE", "FOR", "EVENT"]).fit(term.width);
    for (at, _, [_, phase, dur, event]) in rows {
        t.push([
            format_utc(at),
            format_elapsed(at.saturating_sub(start)),
            phase,
            dur,
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
}
