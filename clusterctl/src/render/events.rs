//! `events`: one line per event, `TIME  KIND  NODE/JOB  MESSAGE`, the same widths for the
//! backlog and for the lines streamed after it.

use super::fold::{Foldable, Folded, fold};
use crate::model::ClusterEvent;
use crate::table::{format_utc, sanitize, truncate};
use crate::term::Term;

const GAP: &str = "  ";

/// Width of a `format_utc` timestamp.
const TIME_WIDTH: usize = 20;

/// The longest kind the protocol names (`worker-exited`), so followed kinds line up.
const FOLLOW_KIND_WIDTH: usize = 13;

/// Room for a node name and a job id, so most followed lines line up with the backlog.
const FOLLOW_WHO_WIDTH: usize = 16;

/// The fewest characters of a truncated message kept, however narrow the terminal.
const MIN_MESSAGE: usize = 12;

/// Column widths, chosen from the backlog; a later, wider cell pushes its line's message right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventColumns {
    kind: usize,
    who: usize,
}

impl EventColumns {
    /// Widths that fit `backlog`; when `follow`ing, at least room for every known kind and a
    /// typical node or job name.
    pub fn fit(backlog: &[ClusterEvent], follow: bool) -> Self {
        let (min_kind, min_who) = if follow {
            (FOLLOW_KIND_WIDTH, FOLLOW_WHO_WIDTH)
        } else {
            ("KIND".len(), "NODE/JOB".len())
        };
        Self {
            kind: backlog
                .iter()
                .map(|e| sanitize(&e.kind).chars().count())
                .fold(min_kind, usize::max),
            who: backlog
                .iter()
                .map(|e| who(e).chars().count())
                .fold(min_who, usize::max),
        }
    }

    pub fn header(&self) -> String {
        self.row("TIME", "KIND", "NODE/JOB", "MESSAGE", Term::PLAIN)
    }

    /// One event; its message is cut to fit `term.width`.
    pub fn line(&self, e: &ClusterEvent, term: Term) -> String {
        self.row(
            &format_utc(e.at_unix_ms),
            &sanitize(if e.kind.is_empty() { "-" } else { &e.kind }),
            &who(e),
            &sanitize(&e.message),
            term,
        )
    }

    /// The backlog, each run of consecutive routine events (checkpoints) of one node and job
    /// folded into one line (`checkpoints step 40 … 3450: 345, every 1.0s`).
    pub fn lines(&self, backlog: &[ClusterEvent], term: Term) -> String {
        fold(backlog)
            .into_iter()
            .map(|f| match f {
                Folded::One(e) => self.line(e, term),
                Folded::Run { first, run } => self.row(
                    &format_utc(first.at_unix_ms),
                    &sanitize(&first.kind),
                    &who(first),
                    &run.summary(),
                    term,
                ),
            })
            .collect()
    }

    fn row(&self, time: &str, kind: &str, who: &str, message: &str, term: Term) -> String {
        let mut line = String::new();
        for (cell, width) in [(time, TIME_WIDTH), (kind, self.kind), (who, self.who)] {
            line.push_str(&format!("{cell:<width$}{GAP}"));
        }
        let message = match term.width {
            Some(width) => {
                let used = line.chars().count();
                truncate(message, width.saturating_sub(used).max(MIN_MESSAGE))
            }
            None => message.to_string(),
        };
        line.push_str(&message);
        format!("{}\n", line.trim_end())
    }
}

impl Foldable for ClusterEvent {
    fn at_ms(&self) -> u64 {
        self.at_unix_ms
    }
    fn kind(&self) -> &str {
        &self.kind
    }
    fn message(&self) -> &str {
        &self.message
    }
    fn same_source(&self, other: &Self) -> bool {
        self.node == other.node && self.job == other.job
    }
}

/// `node/job` when an event concerns both, else whichever it names, else `-`.
fn who(e: &ClusterEvent) -> String {
    let text = match (e.node.as_str(), e.job.as_str()) {
        ("", "") => "-".to_string(),
        (node, "") => node.to_string(),
        ("", job) => job.to_string(),
        (node, job) => format!("{node}/{job}"),
    };
    sanitize(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(at: u64, kind: &str, node: &str, job: &str, message: &str) -> ClusterEvent {
        ClusterEvent {
            at_unix_ms: at,
            kind: kind.into(),
            node: node.into(),
            job: job.into(),
            message: message.into(),
        }
    }

    fn backlog() -> Vec<ClusterEvent> {
        vec![
            event(
                1_000_000,
                "cordon",
                "gpu-003",
                "",
                "cordoned by operator: bad fan",
            ),
            event(
                1_060_000,
                "worker-exited",
                "gpu-001",
                "j-1",
                "rank 0 exited with 1",
            ),
            event(
                1_120_000,
                "submitted",
                "",
                "j-2",
                "submitted from\njob.toml",
            ),
        ]
    }

    #[test]
    fn the_backlog_is_aligned_like_a_table() {
        let events = backlog();
        let columns = EventColumns::fit(&events, false);
        let text: String = std::iter::once(columns.header())
            .chain(events.iter().map(|e| columns.line(e, Term::PLAIN)))
            .collect();
        assert_eq!(
            text,
            "TIME                  KIND           NODE/JOB     MESSAGE\n\
             1970-01-01 00:16:40Z  cordon         gpu-003      cordoned by operator: bad fan\n\
             1970-01-01 00:17:40Z  worker-exited  gpu-001/j-1  rank 0 exited with 1\n\
             1970-01-01 00:18:40Z  submitted      j-2          submitted from job.toml\n"
        );
    }

    #[test]
    fn followed_lines_keep_the_widths_and_messages_fit_the_terminal() {
        let columns = EventColumns::fit(&[], true);
        let e = event(
            1_000_000,
            "xid",
            "gpu-003",
            "",
            "Xid 79: GPU has fallen off the bus",
        );
        assert_eq!(
            columns.line(&e, Term::PLAIN),
            "1970-01-01 00:16:40Z  xid            gpu-003           Xid 79: GPU has fallen off the bus\n"
        );
        let narrow = Term {
            width: Some(70),
            color: false,
        };
        let line = columns.line(&e, narrow);
        assert_eq!(
            line,
            "1970-01-01 00:16:40Z  xid            gpu-003           Xid 79: GPU ha…\n"
        );
        assert_eq!(line.trim_end().chars().count(), 70);
        let long = event(0, "", "a-very-long-node-name-indeed", "", "m");
        assert_eq!(
            columns.line(&long, Term::PLAIN),
            "-                     -              a-very-long-node-name-indeed  m\n"
        );
    }
}
