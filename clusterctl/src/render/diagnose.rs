//! The answer of `clusterctl diagnose NAME`: one verdict line, then the diagnostic's output.

use super::passed_or_failed;
use crate::model::DiagnoseResult;
use crate::table::{format_elapsed, sanitize};

/// Indent of the output lines under the verdict.
const OUTPUT_INDENT: &str = "    ";

pub fn diagnose(r: &DiagnoseResult) -> String {
    let d = &r.diagnostics;
    let mut out = format!(
        "diagnostics on {}: {} ({}) — {}\n",
        r.node,
        passed_or_failed(d.passed),
        format_elapsed(d.duration_ms),
        sanitize(if d.summary.is_empty() {
            "no summary"
        } else {
            &d.summary
        }),
    );
    let lines: Vec<String> = d
        .output
        .lines()
        .map(|line| sanitize(line).trim_end().to_string())
        .collect();
    let end = lines
        .iter()
        .rposition(|l| !l.is_empty())
        .map_or(0, |i| i + 1);
    if end == 0 {
        out.push_str(&format!("{OUTPUT_INDENT}(no output)\n"));
    }
    for line in &lines[..end] {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&format!("{OUTPUT_INDENT}{line}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::v1;

    fn result(passed: bool, output: &str) -> DiagnoseResult {
        DiagnoseResult::from_proto(
            v1::DiagnosticsRecord {
                node: "gpu-003".into(),
                passed,
                summary: if passed {
                    "all checks passed".into()
                } else {
                    "gpu 1: memory test failed".into()
                },
                output: output.into(),
                duration_ms: 1_500,
                command: "builtin NVML self-check".into(),
                finished_at_unix_ms: 1,
            },
            "gpu-003",
        )
    }

    #[test]
    fn the_verdict_comes_first_then_the_output_indented() {
        assert_eq!(
            diagnose(&result(
                false,
                "gpu 0: ok\r\n\ngpu 1: \x1b[31mFAIL\x1b[0m\n\n"
            )),
            "diagnostics on gpu-003: FAILED (1.5s) — gpu 1: memory test failed\n    gpu 0: ok\n\n    gpu 1:  [31mFAIL [0m\n"
        );
    }

    #[test]
    fn no_output_says_so() {
        assert_eq!(
            diagnose(&result(true, "")),
            "diagnostics on gpu-003: PASSED (1.5s) — all checks passed\n    (no output)\n"
        );
    }
}
