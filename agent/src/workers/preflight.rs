//! The coordinator's `RunPreflight`: this node's part of one round of a job's gang preflight.
//! The command runs as the job's user in its resolved workdir (as a checkpoint verification
//! does, [`super::verify`]), with the environment the coordinator computed for the group
//! (`VIGIL_NNODES`, `VIGIL_NODE_RANK`, `MASTER_ADDR`, ... of the group), in a process group of its
//! own killed whole at the timeout; the answer carries how it ended, how long it took and the
//! tail of its output. A command that cannot be started at all (no such program, a workdir
//! outside `workers.allowed_roots`) fails, with the reason: on this node it cannot pass.
//!
//! The coordinator re-sends the command until answered: each (job, attempt, round) runs once
//! ([`Runs`]), a repeat while it runs is ignored, and a repeat after it ended is answered again
//! with the same result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};
use vigil_proto::v1::{PreflightResult, RunPreflight};

use super::confine::Confinement;
use super::verify::Verifier;

/// A preflight's limit when the coordinator sends none, and its most.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Most rounds remembered (their results answer repeats); the oldest are forgotten first.
const MAX_REMEMBERED: usize = 64;
/// Most bytes of `why` (the coordinator's limit on a reason).
const MAX_WHY: usize = 1000;

/// One round's identity on this node.
pub type Key = (String, u64, u32);

/// The rounds this node ran or runs: `None` while running.
#[derive(Default)]
pub struct Runs {
    runs: HashMap<Key, (u64, Option<PreflightResult>)>,
    order: u64,
}

/// What to do with a `RunPreflight`.
pub enum Seen {
    /// New: run it.
    Run,
    /// Under way: nothing.
    Running,
    /// Done: answer again.
    Done(PreflightResult),
}

impl Runs {
    pub fn seen(&mut self, key: &Key) -> Seen {
        if let Some((_, result)) = self.runs.get(key) {
            return result.clone().map_or(Seen::Running, Seen::Done);
        }
        if self.runs.len() >= MAX_REMEMBERED
            && let Some(oldest) = self
                .runs
                .iter()
                .filter(|(_, (_, r))| r.is_some())
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
        {
            self.runs.remove(&oldest);
        }
        self.order += 1;
        self.runs.insert(key.clone(), (self.order, None));
        Seen::Run
    }

    pub fn finished(&mut self, key: &Key, result: PreflightResult) {
        if let Some(entry) = self.runs.get_mut(key) {
            entry.1 = Some(result);
        }
    }
}

pub fn key(cmd: &RunPreflight) -> Key {
    (cmd.job_id.clone(), cmd.attempt, cmd.round)
}

/// Run `cmd` to its end (or its timeout).
pub async fn run(confine: Arc<Confinement>, cmd: RunPreflight) -> PreflightResult {
    let started = tokio::time::Instant::now();
    let mut result = PreflightResult {
        job_id: cmd.job_id.clone(),
        attempt: cmd.attempt,
        round: cmd.round,
        passed: false,
        why: String::new(),
        duration_ms: 0,
        output: String::new(),
    };
    let c = Arc::clone(&confine);
    let c2 = cmd.clone();
    let prepared = tokio::task::spawn_blocking(move || runner(&c, &c2))
        .await
        .unwrap_or_else(|e| Err(format!("preflight task failed: {e}")));
    let outcome = match prepared {
        Ok(runner) => runner.run(None).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(Ok(())) => result.passed = true,
        Ok(Err(failed)) => {
            result.why = crate::diagnostics::truncate(failed.why, MAX_WHY);
            result.output = failed.output;
        }
        Err(e) => result.why = crate::diagnostics::truncate(e, MAX_WHY),
    }
    result.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if result.passed {
        info!(job_id = %cmd.job_id, attempt = cmd.attempt, round = cmd.round, duration_ms = result.duration_ms, "preflight passed");
    } else {
        warn!(job_id = %cmd.job_id, attempt = cmd.attempt, round = cmd.round, why = %result.why, "preflight failed");
    }
    result
}

/// How `cmd` runs: as the job's user, in its resolved workdir, with the group's env.
fn runner(confine: &Confinement, cmd: &RunPreflight) -> Result<Verifier, String> {
    if cmd.command.first().is_none_or(|p| p.trim().is_empty()) {
        return Err("the preflight command is empty".into());
    }
    let timeout = match Duration::from_millis(cmd.timeout_ms) {
        d if d.is_zero() => DEFAULT_TIMEOUT,
        d => d.min(MAX_TIMEOUT),
    };
    Verifier::confined(confine, &cmd.command, &cmd.workdir, &cmd.env, timeout)
}

/// Shared between the handle and the tasks that run preflights.
pub type Shared = Arc<Mutex<Runs>>;

#[cfg(test)]
mod tests {
    use nix::unistd::{Uid, User};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn cmd(root: &std::path::Path, script: &str, timeout_ms: u64, round: u32) -> RunPreflight {
        RunPreflight {
            job_id: "j-1".into(),
            attempt: 2,
            round,
            command: vec!["sh".into(), "-c".into(), script.into()],
            workdir: root.display().to_string(),
            env: [("VIGIL_NNODES".to_owned(), "2".to_owned())].into(),
            timeout_ms,
        }
    }

    fn confine(root: &std::path::Path) -> Result<Arc<Confinement>, Box<dyn std::error::Error>> {
        let me = User::from_uid(Uid::effective())?.ok_or("no passwd entry for this user")?;
        Ok(Arc::new(Confinement {
            run_as: Some(me.name),
            allowed_roots: vec![root.to_owned()],
        }))
    }

    #[tokio::test]
    async fn a_run_reports_its_exit_its_output_and_the_groups_environment() -> TestResult {
        let tmp = tempfile::tempdir()?;
        let c = confine(tmp.path())?;
        let ok = run(
            Arc::clone(&c),
            cmd(tmp.path(), "echo nnodes=$VIGIL_NNODES", 0, 0),
        )
        .await;
        assert!(ok.passed, "{ok:?}");
        assert_eq!((ok.job_id.as_str(), ok.attempt, ok.round), ("j-1", 2, 0));
        let bad = run(
            Arc::clone(&c),
            cmd(tmp.path(), "echo nnodes=$VIGIL_NNODES; exit 3", 0, 1),
        )
        .await;
        assert!(!bad.passed);
        assert_eq!(bad.why, "exited with code 3");
        assert!(bad.output.contains("nnodes=2"), "{bad:?}");
        Ok(())
    }

    #[tokio::test]
    async fn a_run_past_its_timeout_is_killed_and_fails_and_one_outside_the_roots_fails_too()
    -> TestResult {
        let tmp = tempfile::tempdir()?;
        let c = confine(tmp.path())?;
        let slow = run(
            Arc::clone(&c),
            cmd(tmp.path(), "echo waiting; sleep 30", 300, 0),
        )
        .await;
        assert!(!slow.passed);
        assert!(slow.why.starts_with("timed out after"), "{slow:?}");
        assert!(slow.duration_ms < 10_000, "killed at the timeout: {slow:?}");
        let mut outside = cmd(tmp.path(), "true", 0, 0);
        outside.workdir = "/".into();
        let refused = run(c, outside).await;
        assert!(
            !refused.passed && refused.why.contains("workdir"),
            "{refused:?}"
        );
        Ok(())
    }

    #[test]
    fn each_round_runs_once_and_a_repeat_after_it_ended_gets_the_same_answer() {
        let mut runs = Runs::default();
        let key: Key = ("j-1".into(), 2, 0);
        assert!(matches!(runs.seen(&key), Seen::Run));
        assert!(matches!(runs.seen(&key), Seen::Running));
        let result = PreflightResult {
            job_id: "j-1".into(),
            attempt: 2,
            passed: true,
            ..PreflightResult::default()
        };
        runs.finished(&key, result.clone());
        assert!(matches!(runs.seen(&key), Seen::Done(r) if r == result));
        for round in 1..=u32::try_from(MAX_REMEMBERED).unwrap_or(64) + 5 {
            let k: Key = ("j-1".into(), 2, round);
            runs.seen(&k);
            runs.finished(&k, result.clone());
        }
        assert!(
            runs.runs.len() <= MAX_REMEMBERED,
            "bounded: {}",
            runs.runs.len()
        );
    }
}
