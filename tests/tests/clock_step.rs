//! A step of one host's wall clock changes no decision (DESIGN.md, "Time": every deadline is on
//! the monotonic clock; wall time is for records and display). Real binaries and a healthy
//! 2-node fake-trainer job whose `hang_timeout` an hour's step would trip many times over;
//! libfaketime steps the wall clock of the coordinator (scenario A), or of one agent and the
//! workers it starts (scenario B), an hour ahead, another hour ahead, and back, while the test
//! watches every node's availability and the job. Skipped with one line where libfaketime is
//! not installed; `.ci/run` sets `VIGIL_REQUIRE_FAKETIME=1`, so CI runs them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use vigil_tests::faketime::{self, FakeWallClock, unix_secs};
use vigil_tests::jobs::{attempt, attempts, spec, state, workers_running};
use vigil_tests::{Cluster, FAST_LIVENESS, LONG, clusterctl, nodes, now, wait_for};

/// Far below the hour of a step, five of the job's steps.
const HANG_TIMEOUT: &str = "5s";
/// A training step a second, the pace of real training. Not the harness's 40 ms: a step
/// reported every 40 ms refreshes a wall-clock progress time so soon after a clock step that a
/// hang check on the wall clock would trip only if a tick happened to land in between.
const STEP_MS: &str = "1000";
/// Each clock position, held past `hang_timeout` and the liveness deadlines (`lost_after` 3 s,
/// agent lease 2 s): two steps forward, each a fresh chance for a wall-clock deadline to trip,
/// then back to the real time (a step back of two hours).
const POSITIONS: [(&str, i64); 3] = [("+1h", 3600), ("+2h", 7200), ("+0", 0)];
const HOLD: Duration = Duration::from_secs(7);
/// Polling pace while holding.
const POLL: Duration = Duration::from_millis(200);

/// Whose wall clock is stepped.
#[derive(Clone, Copy)]
enum Stepped {
    Coordinator,
    Agent(&'static str),
}

#[test]
fn a_step_of_the_coordinator_wall_clock_changes_no_decision() -> Result<()> {
    run(Stepped::Coordinator)
}

#[test]
fn a_step_of_an_agent_wall_clock_changes_no_decision() -> Result<()> {
    run(Stepped::Agent("node-1"))
}

fn run(stepped: Stepped) -> Result<()> {
    let Some(lib) = faketime::available() else {
        return Ok(());
    };
    // Declared before the cluster, so it outlives the processes it cleans up after.
    let mut clock = FakeWallClock::new(lib)?;
    clock.check()?;
    let cluster = start(stepped, &mut clock)?;
    let id = cluster.submit(&job_spec(&cluster)?)?;
    let job = cluster.wait_job(&id, "both workers running, a checkpoint taken", |j| {
        workers_running(j, 2) && j["job"]["last_checkpoint_step"].as_u64().is_some()
    })?;

    let mut watch = Watch::new(stepped, worker_pids(&job));
    watch.observe(&cluster, &id, "before")?;
    for (offset, skew) in POSITIONS {
        clock.set(offset)?;
        let held = now();
        while held.elapsed() < HOLD {
            watch.observe(&cluster, &id, offset)?;
            std::thread::sleep(POLL);
        }
        watch.proves_the_clock_moved(offset, skew)?;
    }
    let job = cluster.job(&id)?;
    println!("{}", watch.summary());
    let problems = watch.problems(&job);
    ensure!(
        problems.is_empty(),
        "stepping the {} wall clock to {:?} changed decisions:\n  {}",
        stepped.name(),
        POSITIONS.map(|(offset, _)| offset),
        problems.join("\n  "),
    );
    Ok(())
}

impl Stepped {
    fn name(self) -> String {
        match self {
            Self::Coordinator => "coordinator's".to_owned(),
            Self::Agent(node) => format!("agent {node}'s"),
        }
    }
}

/// The harness's 2-node fake-trainer job, at [`STEP_MS`] a step with [`HANG_TIMEOUT`], and a
/// checkpoint every 2 steps so the first comes soon.
fn job_spec(cluster: &Cluster) -> Result<String> {
    let mut text = spec(cluster, 2, 0, "", "")?;
    for (from, to) in [
        (
            "hang_timeout = \"3s\"",
            format!("hang_timeout = \"{HANG_TIMEOUT}\""),
        ),
        (
            "FAKE_STEP_MS = \"40\"",
            format!("FAKE_STEP_MS = \"{STEP_MS}\""),
        ),
        (
            "FAKE_CKPT_EVERY = \"10\"",
            "FAKE_CKPT_EVERY = \"2\"".to_owned(),
        ),
    ] {
        ensure!(
            text.contains(from),
            "the harness's job spec has no {from}: {text}"
        );
        text = text.replace(from, &to);
    }
    Ok(text)
}

/// Two agents and a coordinator; the stepped one on `clock`.
fn start(stepped: Stepped, clock: &mut FakeWallClock) -> Result<Cluster> {
    let cluster = match stepped {
        Stepped::Coordinator => {
            let cluster = Cluster::start_env(FAST_LIVENESS, 2, &clock.env())?;
            clock.preloaded_into(cluster.coordinator.child.id());
            cluster
        }
        Stepped::Agent(node) => {
            let mut cluster = Cluster::start(FAST_LIVENESS, 1)?;
            cluster.add_agent_env(node, &clock.env())?;
            clock.preloaded_into(cluster.agent(node)?.child.id());
            cluster
        }
    };
    wait_for("both agents Ready", LONG, || cluster.all("Ready", 2))?;
    Ok(cluster)
}

/// The current attempt's worker pids, by node.
fn worker_pids(job: &Value) -> BTreeMap<String, u64> {
    workers(job)
        .iter()
        .filter_map(|w| Some((w["node"].as_str()?.to_owned(), w["pid"].as_u64()?)))
        .collect()
}

fn workers(job: &Value) -> Vec<Value> {
    job["workers"].as_array().cloned().unwrap_or_default()
}

/// Everything seen while the clock was stepped.
struct Watch {
    stepped: Stepped,
    pids: BTreeMap<String, u64>,
    /// Every availability each node showed.
    availability: BTreeMap<String, BTreeSet<String>>,
    /// Every cordon seen, by node.
    cordons: BTreeMap<String, BTreeSet<String>>,
    /// Every (state, attempt) the job showed, in the order first seen.
    phases: Vec<(String, u64)>,
    /// Each worker's steps, in the order seen, by node.
    steps: BTreeMap<String, Vec<u64>>,
    /// Each worker's pids, by node.
    seen_pids: BTreeMap<String, BTreeSet<u64>>,
    /// The lowest step of the job's workers at the end of each clock position.
    lowest_step: Vec<(String, u64)>,
    /// How far the stepped process's wall clock read ahead of ours (s), per clock position.
    skews: BTreeMap<String, Vec<i64>>,
}

impl Watch {
    fn new(stepped: Stepped, pids: BTreeMap<String, u64>) -> Self {
        Self {
            stepped,
            pids,
            availability: BTreeMap::new(),
            cordons: BTreeMap::new(),
            phases: Vec::new(),
            steps: BTreeMap::new(),
            seen_pids: BTreeMap::new(),
            lowest_step: Vec::new(),
            skews: BTreeMap::new(),
        }
    }

    /// One look at the nodes, the job, and the stepped process's wall clock.
    fn observe(&mut self, cluster: &Cluster, id: &str, offset: &str) -> Result<()> {
        let url = cluster.url();
        for (name, node) in nodes(&url)? {
            let availability = node["availability"].as_str().unwrap_or("?").to_owned();
            self.availability
                .entry(name.clone())
                .or_default()
                .insert(availability);
            if !node["cordon"].is_null() {
                self.cordons
                    .entry(name)
                    .or_default()
                    .insert(node["cordon"].to_string());
            }
        }
        let job = cluster.job(id)?;
        let phase = (state(&job).to_owned(), attempt(&job));
        if !self.phases.contains(&phase) {
            self.phases.push(phase);
        }
        for w in workers(&job) {
            let node = w["node"].as_str().unwrap_or("?").to_owned();
            if let Some(step) = w["progress_step"].as_u64() {
                let steps = self.steps.entry(node.clone()).or_default();
                if steps.last() != Some(&step) {
                    steps.push(step);
                }
            }
            // 0: not known yet (a worker still starting).
            if let Some(pid) = w["pid"].as_u64().filter(|pid| *pid != 0) {
                self.seen_pids.entry(node).or_default().insert(pid);
            }
        }
        let lowest = workers(&job)
            .iter()
            .filter_map(|w| w["progress_step"].as_u64())
            .min()
            .unwrap_or(0);
        match self.lowest_step.last_mut() {
            Some((o, step)) if o == offset => *step = lowest,
            _ => self.lowest_step.push((offset.to_owned(), lowest)),
        }
        let real = i64::try_from(unix_secs(SystemTime::now())).unwrap_or(i64::MAX);
        if let Some(stamp_ms) = self.stamp(cluster, &job)? {
            let skew = i64::try_from(stamp_ms / 1000).unwrap_or(i64::MAX) - real;
            self.skews.entry(offset.to_owned()).or_default().push(skew);
        }
        Ok(())
    }

    /// A wall-clock time the stepped process itself wrote (unix ms): for the coordinator, when
    /// it saw a worker's step change; for an agent, when it read its GPUs.
    fn stamp(&self, cluster: &Cluster, job: &Value) -> Result<Option<u64>> {
        Ok(match self.stepped {
            Stepped::Coordinator => workers(job)
                .iter()
                .filter_map(|w| w["progress_at_unix_ms"].as_u64())
                .max(),
            Stepped::Agent(node) => {
                let detail = clusterctl(&cluster.url(), &["-o", "json", "node", node])?.json()?;
                detail["samples"]
                    .as_array()
                    .context("node detail has no samples array")?
                    .iter()
                    .filter_map(|s| s["observed_at_unix_ms"].as_u64())
                    .max()
            }
        })
    }

    /// The stepped process read the time `skew` seconds ahead of ours at `offset`, so the test
    /// tested something.
    fn proves_the_clock_moved(&self, offset: &str, skew: i64) -> Result<()> {
        let seen = self.skews.get(offset).cloned().unwrap_or_default();
        ensure!(
            seen.iter().any(|s| (s - skew).abs() < 60),
            "the {} wall clock never read {skew} s ahead at offset {offset}: skews seen {seen:?} \
             (is libfaketime preloaded into it?)",
            self.stepped.name(),
        );
        Ok(())
    }

    /// What a clock step must not have done.
    fn problems(&self, job: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        for (node, seen) in &self.availability {
            if seen.iter().any(|a| a != "Ready") {
                problems.push(format!(
                    "node {node} left Ready: availability seen {seen:?}"
                ));
            }
        }
        if self.availability.len() != 2 {
            problems.push(format!("nodes seen: {:?}", self.availability.keys()));
        }
        for (node, cordons) in &self.cordons {
            problems.push(format!("node {node} was cordoned: {cordons:?}"));
        }
        let steady = [("Running".to_owned(), 1)];
        if self.phases != steady {
            problems.push(format!(
                "the job left Running in attempt 1: (state, attempt) seen {:?}",
                self.phases
            ));
        }
        let restarts = job["job"]["restarts"].as_u64().unwrap_or(u64::MAX);
        if restarts != 0 || attempts(job).len() != 1 {
            let ended: Vec<String> = attempts(job)
                .iter()
                .filter(|a| a["outcome"] != "running")
                .map(|a| {
                    let text = |key: &str| a[key].as_str().unwrap_or("?").to_owned();
                    format!(
                        "attempt {} {}: {}",
                        a["attempt"],
                        text("outcome"),
                        text("reason")
                    )
                })
                .collect();
            problems.push(format!(
                "the job restarted {restarts} time(s): {}",
                ended.join("; ")
            ));
        }
        for (node, steps) in &self.steps {
            if steps.windows(2).any(|w| w[1] < w[0]) {
                problems.push(format!("{node}'s worker went back in steps: {steps:?}"));
            }
        }
        if self.lowest_step.windows(2).any(|w| w[1].1 <= w[0].1) {
            problems.push(format!(
                "progress stalled: the lowest step at the end of each clock position {:?}",
                self.lowest_step
            ));
        }
        for (node, pids) in &self.seen_pids {
            let before = self.pids.get(node);
            if pids.len() != 1 || pids.iter().next() != before {
                problems.push(format!(
                    "{node}'s worker was replaced: pid {before:?} before, {pids:?} seen"
                ));
            }
        }
        problems
    }

    fn summary(&self) -> String {
        format!(
            "stepped: {} wall clock; availability seen: {:?}; (state, attempt) seen: {:?}; \
             lowest step at the end of each clock position: {:?}; worker pids before {:?}, seen \
             {:?}; its clock's skew (s) per position: {:?}",
            self.stepped.name(),
            self.availability,
            self.phases,
            self.lowest_step,
            self.pids,
            self.seen_pids,
            self.skews,
        )
    }
}
