//! Human-readable views of the JSON model, one file per command family.
//!
//! Every function here is pure: it takes the model, `now_ms` (the local wall clock, used
//! for "12m ago") and the `Term` (colour, width; `Term::PLAIN` in tests) and returns the text,
//! so tests pin the exact output.

mod breaker;
mod diagnose;
mod events;
mod evidence;
mod fold;
mod gpu;
mod ha;
mod job;
mod lemons;
mod logs;
mod node;
mod nodes;
mod recovery;
mod report;
mod status;

pub use breaker::{breaker, breaker_reset};
pub use diagnose::diagnose;
pub use events::EventColumns;
pub use job::{job_cancelled, job_detail, job_submitted, jobs};
pub use lemons::lemons;
pub use logs::LogPrinter;
pub use node::node_detail;
pub use nodes::{drained, nodes};
pub use recovery::{recovery, recovery_confirmed};
pub use report::job_report;
pub use status::status;

use crate::table::sanitize;

/// Width of the label column of `status` (values line up under the longest label).
const STATUS_LABEL_WIDTH: usize = 13;

/// Width of the label column of `node NAME`.
const DETAIL_LABEL_WIDTH: usize = 16;

/// Text built of `label   value` lines whose values line up, plus free-form sections.
struct Labelled {
    width: usize,
    text: String,
}

impl Labelled {
    fn new(width: usize) -> Self {
        Self {
            width,
            text: String::new(),
        }
    }

    fn line(&mut self, label: &str, value: impl AsRef<str>) {
        self.line_styled(label, &sanitize(value.as_ref()));
    }

    /// A line whose value is already sanitized (and may carry colour).
    fn line_styled(&mut self, label: &str, value: &str) {
        let width = self.width;
        self.text.push_str(&format!("{label:<width$}{value}\n"));
    }

    fn push_str(&mut self, text: &str) {
        self.text.push_str(text);
    }

    fn finish(self) -> String {
        self.text
    }
}

/// `vigil 0.1.0` whether or not the server's version string already names the product.
fn product_version(version: &str) -> String {
    if version.is_empty() {
        "vigil version unknown".to_string()
    } else if version.starts_with("vigil") {
        version.to_string()
    } else {
        format!("vigil {version}")
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn passed_or_failed(passed: bool) -> &'static str {
    if passed { "PASSED" } else { "FAILED" }
}
