//! `status --watch`: the status screen again every interval until Ctrl-C (exit code 0). On a
//! terminal the screen is cleared and redrawn; otherwise each snapshot follows a separator
//! line; `-o json` prints one JSON object per line. A failed refresh is reported and retried.

use std::time::Duration;

use anyhow::Result;
use tokio::time::MissedTickBehavior;

use crate::cli::Output;
use crate::client::Coordinator;
use crate::commands::{json_line, now_ms};
use crate::model::Status;
use crate::render;
use crate::table::{format_duration, format_elapsed, format_utc, sanitize};
use crate::term::{Interrupt, Term, stdout_is_terminal, write_now};

/// Cursor home, then clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

pub async fn status(c: &mut Coordinator, out: Output, interval: Duration) -> Result<()> {
    let mut interrupt = Interrupt::catch()?;
    let tty = stdout_is_terminal();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tokio::select! {
            () = interrupt.wait() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let answer = tokio::select! {
            () = interrupt.wait() => return Ok(()),
            answer = c.status() => answer,
        };
        let now = now_ms();
        let text = match (answer, out) {
            (Ok(s), Output::Json) => json_line(&Status::from_proto(s, c.url()))?,
            (Ok(s), Output::Table) => {
                let screen = render::status(&Status::from_proto(s, c.url()), now, Term::detect());
                frame(&screen, now, interval, tty, first)
            }
            (Err(e), Output::Table) if tty => {
                let screen = format!("error: {}\n", sanitize(&format!("{e:#}")));
                frame(&screen, now, interval, tty, first)
            }
            (Err(e), _) => {
                let line = sanitize(&format!("{e:#}"));
                eprintln!("error: {line} (retrying every {})", every(interval));
                continue;
            }
        };
        first = false;
        if !write_now(&text)? {
            return Ok(());
        }
    }
}

/// On a terminal: clear it, then a title line and the screen; otherwise the screen after a
/// `--- TIME ---` line, snapshots separated by a blank line.
fn frame(screen: &str, now_ms: u64, interval: Duration, tty: bool, first: bool) -> String {
    let when = format_utc(now_ms);
    if tty {
        format!(
            "{CLEAR}every {}: clusterctl status    {when}\n\n{screen}",
            every(interval)
        )
    } else {
        let gap = if first { "" } else { "\n" };
        format!("{gap}--- {when} ---\n{screen}")
    }
}

/// `2s`, `1m30s`, `0.5s`.
fn every(interval: Duration) -> String {
    let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    if ms % 1_000 == 0 {
        format_duration(ms)
    } else {
        format_elapsed(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_separated_or_redrawn() {
        let second = Duration::from_secs(2);
        assert_eq!(
            frame("S\n", 1_000, second, false, true),
            "--- 1970-01-01 00:00:01Z ---\nS\n"
        );
        assert_eq!(
            frame("S\n", 1_000, second, false, false),
            "\n--- 1970-01-01 00:00:01Z ---\nS\n"
        );
        assert_eq!(
            frame("S\n", 1_000, second, true, false),
            "\x1b[H\x1b[2Jevery 2s: clusterctl status    1970-01-01 00:00:01Z\n\nS\n"
        );
        assert_eq!(every(Duration::from_millis(500)), "0.5s");
        assert_eq!(every(Duration::from_secs(90)), "1m30s");
    }
}
