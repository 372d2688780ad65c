//! Job helpers for end-to-end tests: a fake-trainer job spec and readers of
//! `clusterctl -o json job show`.

use anyhow::Result;
use serde_json::Value;

use crate::{Cluster, FAST_LIVENESS, LONG, bin, wait_for};

/// A 2-node job (1 spare) running the fake trainer: a step every 40 ms, a
/// marker checkpoint every 10 steps, plus `extra_env` and `extra` TOML.
pub fn spec(
    cluster: &Cluster,
    nodes: u32,
    spares: u32,
    extra_env: &str,
    extra: &str,
) -> Result<String> {
    spec_in(cluster.dir.path(), nodes, spares, extra_env, extra)
}

/// [`spec`] for a cluster whose shared directory is `dir` (workdir and checkpoints under it).
pub fn spec_in(
    dir: &std::path::Path,
    nodes: u32,
    spares: u32,
    extra_env: &str,
    extra: &str,
) -> Result<String> {
    let trainer = bin("fake-trainer")?;
    let work = dir.join("work");
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&work)?;
    Ok(format!(
        r#"name = "e2e"
nodes = {nodes}
gpus_per_node = 8
command = ["{trainer}"]
workdir = "{work}"
spare_nodes = {spares}
env = {{ FAKE_STEP_MS = "40", FAKE_CKPT_EVERY = "10", FAKE_CKPT_DIR = "{ckpt}", FAKE_CKPT_LAYOUT = "marker"{extra_env} }}
[checkpoint]
dir = "{ckpt}"
layout = "marker"
[restart]
max_restarts = 3
backoff = "0s"
stop_grace = "2s"
[progress]
hang_timeout = "3s"
{extra}"#,
        trainer = trainer.display(),
        work = work.display(),
        ckpt = ckpt.display(),
    ))
}

pub fn state(job: &Value) -> &str {
    job["job"]["state"].as_str().unwrap_or("")
}

pub fn attempt(job: &Value) -> u64 {
    job["job"]["attempt"].as_u64().unwrap_or(0)
}

pub fn attempts(job: &Value) -> Vec<Value> {
    job["attempts"].as_array().cloned().unwrap_or_default()
}

pub fn workers_running(job: &Value, n: usize) -> bool {
    let w = job["workers"].as_array().cloned().unwrap_or_default();
    w.len() == n
        && w.iter()
            .all(|w| w["state"] == "running" && w["progress_step"].as_u64().is_some())
}

pub fn start(nodes: usize) -> Result<Cluster> {
    let cluster = Cluster::start(FAST_LIVENESS, nodes)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", nodes))?;
    Ok(cluster)
}
