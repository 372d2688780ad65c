//! What the reliability scenarios check after a fault: the checkpoints on the
//! shared file system (which attempt wrote each, when it completed), the
//! attempt a job resumed from, and the workers left running on each host.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::jobs::{attempts, workers_running};
use crate::netns::NetCluster;

/// One marker-layout checkpoint as found on disk.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub step: u64,
    pub path: std::path::PathBuf,
    /// The `COMPLETE` marker's mtime, unix ms; `None`: partial.
    pub completed_at_ms: Option<u64>,
    /// The attempt named in its data file (the fake trainer writes it).
    pub attempt: Option<u64>,
}

pub fn unix_ms() -> u64 {
    to_ms(SystemTime::now())
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Every `step_NNNNNNNN` checkpoint under `dir`, oldest step first.
pub fn checkpoints(dir: &Path) -> Result<Vec<Checkpoint>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let Some(step) = name.strip_prefix("step_").and_then(|s| s.parse().ok()) else {
            continue;
        };
        let completed_at_ms = std::fs::metadata(path.join("COMPLETE"))
            .and_then(|m| m.modified())
            .ok()
            .map(to_ms);
        let attempt = std::fs::read_to_string(path.join("model.bin"))
            .unwrap_or_default()
            .lines()
            .last()
            .and_then(|l| l.strip_prefix("written by attempt "))
            .and_then(|a| a.trim().parse().ok());
        out.push(Checkpoint {
            step,
            path: path.clone(),
            completed_at_ms,
            attempt,
        });
    }
    out.sort_by_key(|c| c.step);
    Ok(out)
}

/// The attempt record `n` (1-based) of a job detail.
pub fn attempt_record(job: &Value, n: u64) -> Result<Value> {
    let i = usize::try_from(n.saturating_sub(1))?;
    attempts(job)
        .get(i)
        .cloned()
        .with_context(|| format!("job has no attempt {n}: {job}"))
}

/// How strictly [`check_resume`] holds a relaunch to the newest checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// The newest complete checkpoint on disk when the attempt started.
    Newest,
    /// The checkpoint writer (node rank 0) itself failed or was cut off, so
    /// what it saved after its agent's last report is unknown to the
    /// coordinator: at least the checkpoint the coordinator had seen when the
    /// fault hit (nothing acknowledged is lost).
    AtLeast(u64),
}

/// The newest checkpoint step the coordinator has seen for the job (0: none).
pub fn known_checkpoint(job: &Value) -> u64 {
    job["job"]["last_checkpoint_step"].as_u64().unwrap_or(0)
}

/// Check that attempt `n` resumed from a complete checkpoint of an earlier
/// attempt, as new as `rule` demands; returns the steps lost (the last step
/// attempt `n - 1` reported minus the step resumed from).
pub fn check_resume(c: &NetCluster, job: &Value, n: u64, rule: Resume) -> Result<u64> {
    let new = attempt_record(job, n)?;
    let old = attempt_record(job, n - 1)?;
    let resumed = new["resumed_from_step"]
        .as_u64()
        .with_context(|| format!("attempt {n} did not resume from a checkpoint: {new}"))?;
    let started = new["started_at_unix_ms"]
        .as_u64()
        .context("no start time")?;
    let on_disk = checkpoints(&c.dir.path().join("ckpt"))?;
    let used = on_disk
        .iter()
        .find(|k| k.step == resumed)
        .with_context(|| format!("step {resumed} is not on disk: {on_disk:?}"))?;
    ensure!(
        used.completed_at_ms.is_some_and(|t| t <= started),
        "resumed from a checkpoint that was not complete when attempt {n} started: {used:?}"
    );
    ensure!(
        used.attempt.is_some_and(|a| a < n),
        "checkpoint {used:?} was not written by an earlier attempt"
    );
    let newest = on_disk
        .iter()
        .filter(|k| k.completed_at_ms.is_some_and(|t| t <= started))
        .filter(|k| k.attempt.is_some_and(|a| a < n))
        .map(|k| k.step)
        .max()
        .unwrap_or(0);
    match rule {
        Resume::Newest if resumed != newest => {
            bail!("attempt {n} resumed from step {resumed}, but step {newest} was complete")
        }
        Resume::AtLeast(known) if resumed < known => {
            bail!(
                "attempt {n} resumed from step {resumed}, older than step {known} the coordinator had seen"
            )
        }
        _ => {}
    }
    let last = old["last_step"].as_u64().unwrap_or(resumed);
    Ok(last.saturating_sub(resumed))
}

/// No checkpoint of an attempt before `n` completed after attempt `n` started (fencing).
pub fn check_fenced(c: &NetCluster, job: &Value, n: u64) -> Result<()> {
    let started = attempt_record(job, n)?["started_at_unix_ms"]
        .as_u64()
        .context("no start time")?;
    let late: Vec<Checkpoint> = checkpoints(&c.dir.path().join("ckpt"))?
        .into_iter()
        .filter(|k| k.attempt.is_some_and(|a| a < n))
        .filter(|k| k.completed_at_ms.is_some_and(|t| t > started))
        .collect();
    ensure!(
        late.is_empty(),
        "an old attempt wrote checkpoints after attempt {n} started: {late:?}"
    );
    Ok(())
}

/// The `VIGIL_ATTEMPT` of a running worker process.
pub fn attempt_of_pid(pid: u32) -> Option<u64> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"VIGIL_ATTEMPT="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
}

/// The attempts of every fake-trainer process on every host (one entry per process).
pub fn running_attempts(c: &NetCluster) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for h in &c.hosts {
        for pid in c.trainers(&h.name)? {
            out.push((h.name.clone(), attempt_of_pid(pid).unwrap_or(0)));
        }
    }
    out.sort();
    Ok(out)
}

/// Exactly `n` workers run on the cluster's hosts, all of attempt `attempt`: no worker of an
/// older attempt is left anywhere.
pub fn only_attempt_runs(c: &NetCluster, attempt: u64, n: usize) -> Result<()> {
    let workers = running_attempts(c)?;
    ensure!(
        workers.len() == n && workers.iter().all(|(_, a)| *a == attempt),
        "only {n} workers, of attempt {attempt}, may run anywhere: {workers:?}"
    );
    Ok(())
}

/// The job's node for `rank` in its current attempt.
pub fn node_of_rank(job: &Value, rank: usize) -> Result<String> {
    job["job"]["assigned_nodes"][rank]
        .as_str()
        .map(str::to_owned)
        .context("no assigned node")
}

/// The job's current attempt's nodes.
pub fn attempt_nodes(job: &Value, n: u64) -> Result<Vec<String>> {
    Ok(attempt_record(job, n)?["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Sleep, to let anything that should not happen have its chance.
pub fn settle(d: Duration) {
    std::thread::sleep(d);
}

/// Restarts so far.
pub fn restarts(job: &Value) -> u64 {
    job["job"]["restarts"].as_u64().unwrap_or(0)
}

/// Wait until the job runs `n` workers with progress and has a checkpoint of step 20 or later.
pub fn running(c: &NetCluster, id: &str, n: usize) -> Result<Value> {
    c.wait_job(id, "running with a checkpoint", |j| {
        workers_running(j, n)
            && j["job"]["last_checkpoint_step"]
                .as_u64()
                .is_some_and(|s| s >= 20)
    })
}

/// Complete checkpoints of attempts before `n` newer than the step attempt `n`
/// resumed from: saves the coordinator never heard of (their writer was cut off).
pub fn unreported(c: &NetCluster, job: &Value, n: u64) -> Result<usize> {
    let resumed = attempt_record(job, n)?["resumed_from_step"]
        .as_u64()
        .unwrap_or(0);
    Ok(checkpoints(&c.dir.path().join("ckpt"))?
        .iter()
        .filter(|k| k.step > resumed && k.completed_at_ms.is_some())
        .filter(|k| k.attempt.is_some_and(|a| a < n))
        .count())
}

/// The availabilities the coordinator moved `node` to, oldest first, from its
/// log's "node is Ready|Unreachable|Lost" lines: a state too brief for a
/// clusterctl poll to catch is still here.
pub fn availability_log(c: &NetCluster, node: &str) -> Vec<String> {
    let field = format!("node={node}");
    c.coordinator_log()
        .lines()
        .filter(|l| l.split_whitespace().any(|w| w == field))
        .filter_map(|l| {
            let (_, rest) = l.split_once("node is ")?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .collect()
}
