//! The terminal clusterctl prints to: colour and line width (only on a TTY), writing as output
//! arrives, and Ctrl-C for the commands that run until it.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};
use vigil_proto::NodeState;

const GREEN: &str = "\x1b[32m";
const YELLOW: &str = "\x1b[33m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

/// How text views may be styled: tests, pipes and files get `Term::PLAIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Term {
    /// Columns a line must fit in, by truncating its last, wide column (REASON, MESSAGE);
    /// `None`: never truncate.
    pub width: Option<usize>,
    /// Colour state words (Ready green, Degraded yellow, Cordoned red, ...).
    pub color: bool,
}

impl Term {
    /// No colour and no truncation.
    pub const PLAIN: Self = Self {
        width: None,
        color: false,
    };

    /// Colour and width for stdout: only when it is a terminal; no colour when `NO_COLOR` is
    /// set (non-empty) or `TERM=dumb`; the width from `COLUMNS`, else from `stty size`.
    pub fn detect() -> Self {
        if !stdout_is_terminal() {
            return Self::PLAIN;
        }
        Self {
            width: columns(std::env::var("COLUMNS").ok().as_deref()).or_else(stty_columns),
            color: color_allowed(std::env::var_os("NO_COLOR"), std::env::var_os("TERM")),
        }
    }

    /// `word` in its state's colour when colouring (the caller has sanitized it).
    pub fn paint(self, word: &str) -> String {
        match color_of(word) {
            Some(code) if self.color => format!("{code}{word}{RESET}"),
            _ => word.to_string(),
        }
    }
}

pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

fn color_allowed(no_color: Option<OsString>, term: Option<OsString>) -> bool {
    no_color.is_none_or(|v| v.is_empty()) && term.is_none_or(|t| t != "dumb")
}

/// A usable `COLUMNS` value.
fn columns(value: Option<&str>) -> Option<usize> {
    value?.trim().parse().ok().filter(|&w| w > 0)
}

/// The controlling terminal's width as `stty size` reports it; `None` without one.
fn stty_columns() -> Option<usize> {
    let tty = std::fs::File::open("/dev/tty").ok()?;
    let out = std::process::Command::new("stty")
        .arg("size")
        .stdin(tty)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    columns(text.split_whitespace().nth(1))
}

/// The colour of an operator-facing state word, if it has one. Node states first, matched
/// exhaustively so a state the protocol adds gets a colour here.
fn color_of(word: &str) -> Option<&'static str> {
    if let Some(state) = NodeState::parse(word) {
        return Some(match state {
            NodeState::Ready => GREEN,
            NodeState::Degraded | NodeState::Validating | NodeState::Unreachable => YELLOW,
            NodeState::Cordoned | NodeState::Lost => RED,
        });
    }
    match word {
        "Healthy" | "Schedulable" | "Running" | "Succeeded" => Some(GREEN),
        "Draining" | "Pending" | "Restarting" | "Cancelling" => Some(YELLOW),
        "Failed" | "Unhealthy" | "Lemon" | "NONE" | "RECOVERED" => Some(RED),
        _ => None,
    }
}

/// Writes `text` to stdout now (streaming commands); `Ok(false)` when the reader has gone
/// (`| head`), which ends the command quietly.
pub fn write_now(text: &str) -> Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(anyhow::Error::from(e).context("writing to stdout")),
    }
}

/// Ctrl-C (SIGINT), caught from creation on, so a command that runs until it exits 0.
pub struct Interrupt {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupt {
    pub fn catch() -> Result<Self> {
        Ok(Self {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("cannot catch Ctrl-C")?,
        })
    }

    /// Resolves at the next Ctrl-C.
    pub async fn wait(&mut self) {
        #[cfg(unix)]
        self.signal.recv().await;
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_and_dumb_terminals_turn_colour_off() {
        assert!(color_allowed(None, Some("xterm-256color".into())));
        assert!(color_allowed(Some("".into()), None));
        assert!(!color_allowed(Some("1".into()), None));
        assert!(!color_allowed(None, Some("dumb".into())));
    }

    #[test]
    fn columns_must_be_a_positive_number() {
        assert_eq!(columns(Some("120")), Some(120));
        assert_eq!(columns(Some(" 80\n")), Some(80));
        assert_eq!(columns(Some("0")), None);
        assert_eq!(columns(Some("wide")), None);
        assert_eq!(columns(None), None);
    }

    #[test]
    fn state_words_are_painted_only_when_colouring() {
        let color = Term {
            width: None,
            color: true,
        };
        assert_eq!(color.paint("Ready"), "\x1b[32mReady\x1b[0m");
        assert_eq!(color.paint("Degraded"), "\x1b[33mDegraded\x1b[0m");
        assert_eq!(color.paint("Cordoned"), "\x1b[31mCordoned\x1b[0m");
        assert_eq!(color.paint("gpu-001"), "gpu-001");
        assert_eq!(Term::PLAIN.paint("Lost"), "Lost");
    }
}
