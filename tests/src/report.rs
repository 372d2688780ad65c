//! The reliability report: each fault-injection scenario records what it
//! measured (detection and recovery times, what was lost, what restarted) as
//! one JSON line in the file named by `VIGIL_RELIABILITY_REPORT`, and
//! `reliability-table` renders those lines as the table in docs/reliability.md.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// Names the JSON-lines file scenarios append their rows to (unset: print only).
pub const REPORT_ENV: &str = "VIGIL_RELIABILITY_REPORT";

/// What one scenario measured.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Position in the table (the order).
    pub order: u32,
    pub scenario: String,
    pub fault: String,
    /// Fault to the coordinator acting on it (cordon, `Lost`, attempt failed); `None`: nothing to detect.
    pub detection: Option<Duration>,
    /// Fault to the next attempt running with progress reported; `None`: nothing restarted.
    pub recovery: Option<Duration>,
    /// Job restarts the fault caused.
    pub restarts: u64,
    /// Training steps lost (last step reported by the failed attempt minus the step resumed from).
    pub lost_steps: Option<u64>,
    /// In words: what was lost, what was restarted, what was checked.
    pub outcome: String,
}

impl Row {
    pub fn to_json(&self) -> Value {
        let secs = |d: Option<Duration>| d.map(|d| (d.as_secs_f64() * 1000.0).round() / 1000.0);
        json!({
            "order": self.order,
            "scenario": self.scenario,
            "fault": self.fault,
            "detection_s": secs(self.detection),
            "recovery_s": secs(self.recovery),
            "restarts": self.restarts,
            "lost_steps": self.lost_steps,
            "outcome": self.outcome,
        })
    }

    /// Print the row (shown with `--nocapture`) and append it to the report file, if any.
    pub fn record(&self) -> Result<()> {
        let line = self.to_json().to_string();
        println!("reliability: {line}");
        if let Some(path) = std::env::var_os(REPORT_ENV) {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {REPORT_ENV}={path:?}"))?;
            // One write per row, so rows from parallel tests never interleave.
            f.write_all(format!("{line}\n").as_bytes())?;
        }
        Ok(())
    }
}

/// The markdown table of `rows` (JSON lines as [`Row::record`] writes them), in order.
pub fn render(text: &str) -> Result<String> {
    let mut rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a report row: {l}")))
        .collect::<Result<_>>()?;
    rows.sort_by_key(|r| r["order"].as_u64().unwrap_or(u64::MAX));
    let secs = |v: &Value| v.as_f64().map_or("—".to_owned(), |s| format!("{s:.2} s"));
    let cell = |v: &Value| v.as_str().unwrap_or("").replace('|', "\\|");
    let mut out = String::from(
        "| # | scenario | fault injected | detection | recovery | restarts | steps lost | what happened |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for r in &rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["order"],
            cell(&r["scenario"]),
            cell(&r["fault"]),
            secs(&r["detection_s"]),
            secs(&r["recovery_s"]),
            r["restarts"],
            r["lost_steps"]
                .as_u64()
                .map_or("0".to_owned(), |n| n.to_string()),
            cell(&r["outcome"]),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_render_in_order_with_times_in_seconds() {
        let a = Row {
            order: 2,
            scenario: "b".into(),
            detection: Some(Duration::from_millis(1234)),
            ..Row::default()
        };
        let b = Row {
            order: 1,
            scenario: "a|x".into(),
            restarts: 1,
            lost_steps: Some(7),
            ..Row::default()
        };
        let text = format!("{}\n{}\n", a.to_json(), b.to_json());
        let table = render(&text).expect("render");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].starts_with("| 1 | a\\|x |"), "{}", lines[2]);
        assert!(lines[2].contains("| 1 | 7 |"), "{}", lines[2]);
        assert!(lines[3].contains("| 1.23 s | — |"), "{}", lines[3]);
        assert!(render("not json\n").is_err());
    }
}
