//! The `status` screen: what an operator reads in two seconds.

use super::{Labelled, STATUS_LABEL_WIDTH, product_version};
use crate::model::{NodeSummary, Status};
use crate::table::{Table, format_ago, format_duration, sanitize};
use crate::term::Term;

/// The screen; with colour, counts above zero show their state's colour, and the cordoned and
/// degraded rows' reasons are cut to fit `term.width`.
pub fn status(s: &Status, now_ms: u64, term: Term) -> String {
    let mut out = Labelled::new(STATUS_LABEL_WIDTH);
    let c = &s.coordinator;
    // Which coordinator answered, when it says (highly available coordinators).
    let who = match &s.ha {
        Some(ha) if !ha.coordinator.is_empty() => format!("{}, {}, ", ha.coordinator, ha.role),
        _ => String::new(),
    };
    out.line(
        "coordinator",
        format!(
            "{}  ({who}{}, up {}, listening {})",
            c.url,
            product_version(&c.version),
            format_duration(c.uptime_ms),
            if c.listen_addr.is_empty() {
                "-"
            } else {
                &c.listen_addr
            },
        ),
    );
    if c.insecure {
        out.line(
            "security",
            "INSECURE: plaintext, nobody is authenticated (insecure = true)",
        );
    } else if !c.caller.is_empty() {
        out.line(
            "security",
            format!("mutual TLS, you are {}", sanitize(&c.caller)),
        );
    }
    if let Some(r) = &s.recovery {
        out.line_styled("state", &super::recovery::state_line(r, term));
    }
    if let Some(ha) = &s.ha {
        super::ha::ha_lines(&mut out, ha, now_ms, term);
        // A standby holds no cluster state until it is elected: zeros would read as an empty cluster.
        if ha.role == "standby" {
            out.line(
                "nodes",
                "unknown here: a standby holds no cluster state (ask the leader)",
            );
            return out.finish();
        }
    }
    let counts: Vec<String> = s
        .nodes_by_state
        .0
        .iter()
        .map(|(state, n)| {
            let state = sanitize(state);
            match n {
                0 => format!("{n} {state}"),
                _ => format!("{n} {}", term.paint(&state)),
            }
        })
        .collect();
    out.line_styled(
        "nodes",
        &format!("{} total: {}", s.nodes_total, counts.join(", ")),
    );
    out.line(
        "gpus",
        format!("{}/{} healthy", s.gpus_healthy, s.gpus_total),
    );
    if s.nodes_simulated > 0 {
        let noun = if s.nodes_simulated == 1 {
            "node reports"
        } else {
            "nodes report"
        };
        out.line(
            "simulated",
            format!(
                "{} {noun} SIMULATED GPUs (no real hardware)",
                s.nodes_simulated
            ),
        );
    }
    let fit = term.width.map(|w| w.saturating_sub(STATUS_LABEL_WIDTH));
    let mut rows = Table::without_headers().gap(2).fit(fit);
    for n in &s.cordoned {
        let (source, ago, reason) = match &n.cordon {
            Some(c) => (
                c.source.as_str(),
                format_ago(c.since_unix_ms, now_ms),
                format!("{:?}", c.reason),
            ),
            None => ("unknown", "-".to_string(), String::new()),
        };
        rows.push([n.name.clone(), source.to_string(), ago, reason]);
    }
    section(&mut out, "cordoned", &rows);
    let mut rows = Table::without_headers().gap(2).fit(fit).paint(term, &[1]);
    for n in &s.degraded {
        rows.push([
            n.name.clone(),
            n.condition.as_str().to_string(),
            first_reason(n),
        ]);
    }
    section(&mut out, "degraded", &rows);
    out.finish()
}

/// The first reason for the node's condition, quoted, or nothing when the server gave none.
fn first_reason(n: &NodeSummary) -> String {
    let first = n.condition_reasons.first().map(|r| format!("{r:?}"));
    match (first, n.condition_reasons.len()) {
        (Some(r), more @ 2..) => format!("{r} (+{} more)", more - 1),
        (Some(r), _) => r,
        (None, _) => String::new(),
    }
}

/// The rows under one label, aligned with each other, or `none`.
pub(super) fn section(out: &mut Labelled, label: &str, rows: &Table) {
    let lines = rows.lines();
    if lines.is_empty() {
        out.line(label, "none");
    }
    for (i, line) in lines.iter().enumerate() {
        out.line_styled(if i == 0 { label } else { "" }, line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Condition;
    use crate::model::fixtures::{cordoned_sim_node, ready_nvml_node, status_response};
    use vigil_proto::v1;

    const NOW: u64 = 1_000_000 + 12 * 60_000;

    fn status_fixture() -> Status {
        let mut s = status_response();
        s.degraded.clear();
        Status::from_proto(s, "http://127.0.0.1:7770")
    }

    fn status(s: &Status, now_ms: u64) -> String {
        super::status(s, now_ms, Term::PLAIN)
    }

    #[test]
    fn status_screen_matches_the_documented_layout() {
        assert_eq!(
            status(&status_fixture(), NOW),
            "coordinator  http://127.0.0.1:7770  (vigil 0.1.0, up 3m12s, listening 0.0.0.0:7770)\n\
             security     mutual TLS, you are alice (admin)\n\
             nodes        3 total: 1 Ready, 1 Degraded, 0 Validating, 1 Cordoned, 0 Unreachable, 0 Lost\n\
             gpus         16/24 healthy\n\
             simulated    3 nodes report SIMULATED GPUs (no real hardware)\n\
             cordoned     gpu-003  operator  12m ago  \"bad fan\"\n\
             degraded     none\n"
        );
    }

    #[test]
    fn status_without_simulated_or_cordoned_nodes_says_none() {
        let mut s = status_fixture();
        s.nodes_simulated = 0;
        s.cordoned.clear();
        let text = status(&s, NOW);
        assert!(!text.contains("simulated"));
        assert!(
            text.ends_with("cordoned     none\ndegraded     none\n"),
            "{text}"
        );
    }

    #[test]
    fn degraded_nodes_show_their_condition_and_first_reason() {
        let mut s = status_fixture();
        let mut auto = cordoned_sim_node();
        if let Some(c) = auto.cordon.as_mut() {
            c.source = v1::CordonSource::Auto as i32;
            c.reason = "gpu 7: Xid 79".into();
        }
        s.cordoned = vec![NodeSummary::from(auto)];
        let mut hot = NodeSummary::from(ready_nvml_node("gpu-010"));
        hot.condition = Condition::Degraded;
        hot.condition_reasons = vec!["gpu 1: thermal throttling".into(), "gpu 2: hot".into()];
        let mut quiet = NodeSummary::from(ready_nvml_node("n2"));
        quiet.condition = Condition::Unhealthy;
        s.degraded = vec![hot, quiet];
        let text = status(&s, NOW);
        assert!(
            text.ends_with(
                "cordoned     gpu-003  auto  12m ago  \"gpu 7: Xid 79\"\n\
                 degraded     gpu-010  Degraded   \"gpu 1: thermal throttling\" (+1 more)\n\
                 \x20            n2       Unhealthy\n"
            ),
            "{text}"
        );
        let value = serde_json::to_value(&s).expect("serializes");
        assert_eq!(value["degraded"][0]["name"], serde_json::json!("gpu-010"));
        assert_eq!(
            value["degraded"][0]["condition"],
            serde_json::json!("Degraded")
        );
    }

    #[test]
    fn several_cordoned_nodes_align_under_one_label() {
        let mut s = status_fixture();
        let mut other = NodeSummary::from(cordoned_sim_node());
        other.name = "n1".into();
        s.cordoned.push(other);
        let text = status(&s, NOW);
        assert!(text.contains("cordoned     gpu-003  operator  12m ago  \"bad fan\"\n"));
        assert!(text.contains("\n             n1       operator  12m ago  \"bad fan\"\n"));
    }

    #[test]
    fn colour_marks_counts_and_conditions_and_reasons_fit_the_terminal() {
        let term = Term {
            width: Some(50),
            color: true,
        };
        let text = super::status(&Status::from_proto(status_response(), "u"), NOW, term);
        assert!(
            text.contains("3 total: 1 \x1b[32mReady\x1b[0m, 1 \x1b[33mDegraded\x1b[0m, 0 Validating, 1 \x1b[31mCordoned\x1b[0m,"),
            "{text}"
        );
        assert!(
            text.contains("cordoned     gpu-003  operator  12m ago  \"bad fan\"\n"),
            "{text}"
        );
        assert!(
            text.contains("degraded     gpu-011  \x1b[33mDegraded\x1b[0m  \"gpu 2: thermal t…\n"),
            "{text}"
        );
    }
}
