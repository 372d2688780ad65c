//! A hung attempt's evidence, per node: what each worker process was doing (Python stacks where
//! py-spy was installed; the kernel's view besides), its last output, the fabric counters that
//! rose during the attempt, and the node the evidence points at. Shared by `job show` (the
//! latest hung attempt) and `job report` (every one).

use crate::model::JobDetail;
use crate::model::job::{AttemptRecord, NodeEvidence};
use crate::table::sanitize;

/// At most this many lines of one stack or log tail are shown; `-o json` has them whole.
const MAX_LINES: usize = 12;

fn indented(out: &mut String, indent: &str, text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    let skipped = lines.len().saturating_sub(MAX_LINES);
    if skipped > 0 {
        out.push_str(&format!(
            "{indent}... ({skipped} lines above; -o json has them)\n"
        ));
    }
    for line in &lines[skipped..] {
        out.push_str(indent);
        out.push_str(&sanitize(line));
        out.push('\n');
    }
}

fn node_section(out: &mut String, e: &NodeEvidence) {
    out.push_str(&format!("  {}\n", sanitize(&e.node)));
    if !e.error.is_empty() {
        out.push_str(&format!("    capture: {}\n", sanitize(&e.error)));
    }
    for p in &e.processes {
        let wchan = if p.wchan.is_empty() { "-" } else { &p.wchan };
        out.push_str(&format!(
            "    pid {} {}: {}, waiting in {}\n",
            p.pid,
            sanitize(&p.comm),
            sanitize(&p.state),
            sanitize(wchan)
        ));
        if !p.python_stacks.is_empty() {
            indented(out, "      | ", &p.python_stacks);
        } else if !p.kernel_stack.is_empty() {
            indented(out, "      kernel: ", &p.kernel_stack);
        }
    }
    for d in &e.fabric {
        out.push_str(&format!(
            "    fabric {} {}: link_downed +{}, link_error_recovery +{}, carrier_changes +{}, symbol_error +{}, port_rcv_errors +{}, port_xmit_discards +{}\n",
            sanitize(&d.port),
            sanitize(&d.state),
            d.link_downed,
            d.link_error_recovery,
            d.carrier_changes,
            d.symbol_error,
            d.port_rcv_errors,
            d.port_xmit_discards
        ));
    }
    if !e.log_tail.is_empty() {
        out.push_str("    last output:\n");
        indented(out, "      ", &e.log_tail);
    }
}

/// Whether an attempt has a section: evidence, or a suspect (whose evidence may be past the
/// coordinator's bounds on what it stores).
fn has_section(a: &AttemptRecord) -> bool {
    !a.evidence.is_empty() || !a.suspect.is_empty()
}

/// One attempt's evidence; empty when it has none and points nowhere.
pub fn attempt_evidence(a: &AttemptRecord) -> String {
    if !has_section(a) {
        return String::new();
    }
    let mut out = format!("HANG EVIDENCE of attempt {}\n", a.attempt);
    if !a.suspect.is_empty() {
        out.push_str(&format!("  points at {}\n", sanitize(&a.suspect)));
    }
    for e in &a.evidence {
        node_section(&mut out, e);
    }
    out
}

/// The latest attempt with evidence (`job show`); empty when none has any.
pub fn latest(d: &JobDetail) -> String {
    d.attempts
        .iter()
        .rev()
        .find(|a| has_section(a))
        .map(attempt_evidence)
        .unwrap_or_default()
}

/// Every attempt's evidence, oldest first (`job report`).
pub fn all(d: &JobDetail) -> String {
    d.attempts
        .iter()
        .map(attempt_evidence)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::job::{FabricDelta, ProcessEvidence};

    fn attempt() -> AttemptRecord {
        AttemptRecord {
            attempt: 2,
            nodes: vec!["n1".into(), "n2".into()],
            started_at_unix_ms: 0,
            ended_at_unix_ms: 0,
            outcome: "failed".into(),
            reason: "no progress".into(),
            culprit_node: String::new(),
            resumed_from: String::new(),
            resumed_from_step: None,
            last_step: None,
            triage: Default::default(),
            exit_code: None,
            signal: None,
            log_tail: String::new(),
            crash_loop: String::new(),
            evidence: vec![NodeEvidence {
                node: "n2".into(),
                captured_at_unix_ms: 1,
                processes: vec![ProcessEvidence {
                    pid: 42,
                    comm: "python3".into(),
                    state: "S (sleeping)".into(),
                    wchan: "futex_wait_queue".into(),
                    kernel_stack: "[<0>] futex_wait\n".into(),
                    python_stacks: String::new(),
                }],
                log_tail: (1..=20).map(|i| format!("step {i}\n")).collect(),
                fabric: vec![FabricDelta {
                    port: "mlx5_0/1".into(),
                    state: "DOWN".into(),
                    link_downed: 1,
                    link_error_recovery: 0,
                    symbol_error: 0,
                    port_rcv_errors: 0,
                    port_xmit_discards: 0,
                    carrier_changes: 0,
                }],
                error: String::new(),
            }],
            suspect: "n2: port mlx5_0/1 is DOWN".into(),
            preflight: Vec::new(),
        }
    }

    #[test]
    fn evidence_shows_each_process_the_fabric_and_the_last_lines() {
        let text = attempt_evidence(&attempt());
        for needle in [
            "HANG EVIDENCE of attempt 2\n",
            "  points at n2: port mlx5_0/1 is DOWN\n",
            "    pid 42 python3: S (sleeping), waiting in futex_wait_queue\n",
            "      kernel: [<0>] futex_wait\n",
            "    fabric mlx5_0/1 DOWN: link_downed +1,",
            "      ... (8 lines above; -o json has them)\n      step 9\n",
            "      step 20\n",
        ] {
            assert!(text.contains(needle), "no {needle:?} in:\n{text}");
        }
        let mut suspect_only = attempt();
        suspect_only.evidence.clear();
        assert_eq!(
            attempt_evidence(&suspect_only),
            "HANG EVIDENCE of attempt 2\n  points at n2: port mlx5_0/1 is DOWN\n",
            "its evidence past the coordinator's bounds, the suspect still shows"
        );
        let mut none = suspect_only;
        none.suspect.clear();
        assert_eq!(attempt_evidence(&none), "");
    }
}
