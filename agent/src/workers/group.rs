//! Process groups: signalling a worker's whole group, and telling when it is truly gone.
//!
//! Each worker leads its own process group, so one `killpg` reaches everything
//! a training script started (dataloader workers, `torchrun` children). A group
//! counts as gone when no member is left but zombies: orphans are reparented to
//! init, and an init that is slow to reap them must not stall a report.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;

/// How often a dying group is checked.
pub const POLL: Duration = Duration::from_millis(20);

/// Sends `signal` to every process of group `pgid`; false when the group is already gone.
pub fn signal_group(pgid: i32, signal: Signal) -> bool {
    // killpg(0) is the caller's own group, and 1 is init's: never a worker's.
    if pgid <= 1 {
        return false;
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => true,
        Err(Errno::ESRCH) => false,
        Err(e) => {
            tracing::warn!(pgid, signal = %signal, error = %e, "cannot signal process group");
            true
        }
    }
}

/// True while group `pgid` has a member that is not a zombie.
pub fn group_alive(pgid: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    match killpg(Pid::from_raw(pgid), None) {
        Err(Errno::ESRCH) => false,
        // Exists (EPERM: it belongs to someone else, still alive).
        Ok(()) | Err(_) => live_member_in_proc(pgid).unwrap_or(true),
    }
}

/// Scans /proc for a non-zombie member of `pgid`; None where /proc cannot tell.
fn live_member_in_proc(pgid: i32) -> Option<bool> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let live = |s: &Stat| s.pgrp == pgid && s.live();
        if read_stat(pid).as_ref().is_some_and(live) {
            return Some(true);
        }
    }
    Some(false)
}

/// The fields of `/proc/<pid>/stat` the agent needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub pgrp: i32,
    /// Clock ticks after boot: with the pid, identifies a process across pid reuse.
    pub start_time: u64,
}

impl Stat {
    /// Running or sleeping: not a zombie, not dead.
    pub fn live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// The start time of process `pid` (see [`Stat::start_time`]); `None` when there is none.
pub fn start_time(pid: u32) -> Option<u64> {
    read_stat(i32::try_from(pid).ok()?).map(|s| s.start_time)
}

pub fn read_stat(pid: i32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The command name (field 2) may hold spaces and parentheses; fields resume after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Waits up to `timeout` for the group to be gone; false if members remain.
pub async fn wait_gone(pgid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !group_alive(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parses_past_a_command_name_with_spaces_and_parens() {
        let line =
            "4242 (py (worker) 1) S 1 4240 4240 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 987654 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                pgrp: 4240,
                start_time: 987_654
            })
        );
        assert_eq!(parse_stat("1 (init) S 0"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn this_process_is_alive_and_its_start_time_is_stable() {
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        let first = read_stat(pid);
        assert!(first.is_some_and(|s| s.state != 'Z'));
        assert_eq!(
            first.map(|s| s.start_time),
            read_stat(pid).map(|s| s.start_time)
        );
    }

    #[test]
    fn no_group_below_2_is_ever_signalled() {
        // 0 would be this test's own group: the test survives to assert.
        assert!(!signal_group(0, Signal::SIGKILL));
        assert!(!signal_group(1, Signal::SIGKILL));
        assert!(!signal_group(-5, Signal::SIGKILL));
        assert!(!group_alive(0));
    }

    #[test]
    fn a_group_that_never_existed_is_gone() {
        // Above the kernel's pid_max ceiling (2^22): no such group can exist.
        assert!(!group_alive(5_000_000));
        assert!(!signal_group(5_000_000, Signal::SIGTERM));
    }
}
