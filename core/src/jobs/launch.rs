//! What a worker is started and stopped with: the `StartWorker` and `StopWorkers` commands and
//! the worker's environment.

use std::collections::BTreeMap;

use vigil_proto::v1;

use super::ms;
use crate::health::Condition;
use crate::job::Job;
use crate::node::Node;

pub(crate) fn stop_command(
    job_id: &str,
    attempt: u64,
    reason: &str,
    grace: std::time::Duration,
) -> v1::command::Kind {
    v1::command::Kind::StopWorkers(v1::StopWorkers {
        job_id: job_id.to_owned(),
        attempt,
        reason: reason.to_owned(),
        grace_ms: ms(grace),
    })
}

/// The `StartWorker` of `node`'s worker in `job`'s current attempt (`None`: not placed there).
pub(crate) fn start_command(
    job: &Job,
    nodes: &BTreeMap<String, Node>,
    node: &str,
) -> Option<v1::command::Kind> {
    let rank = job.placement.iter().position(|n| n == node)?;
    Some(v1::command::Kind::StartWorker(v1::StartWorker {
        job_id: job.id.clone(),
        attempt: job.attempt,
        node_rank: u32::try_from(rank).unwrap_or(u32::MAX),
        nnodes: u32::try_from(job.placement.len()).unwrap_or(u32::MAX),
        command: job.spec.command.clone(),
        workdir: job.spec.workdir.clone(),
        env: worker_env(job, nodes, rank).into_iter().collect(),
        checkpoint_dir: if rank == 0 {
            job.spec.checkpoint.dir.clone()
        } else {
            String::new()
        },
        checkpoint_layout: job.spec.checkpoint.layout.clone(),
        stop_grace_ms: ms(job.spec.restart.stop_grace),
    }))
}

/// The environment of one worker: the spec's env, then vigil's variables and
/// the launcher conventions (torchrun's PET_*, Lightning/DeepSpeed's NODE_RANK).
pub fn worker_env(
    job: &Job,
    nodes: &BTreeMap<String, Node>,
    rank: usize,
) -> BTreeMap<String, String> {
    env_for(job, nodes, &job.placement, rank)
}

/// The environment of the member at `rank` of `placement` (the gang, or a preflight's group:
/// NNODES, ranks and the master are the group's).
pub(super) fn env_for(
    job: &Job,
    nodes: &BTreeMap<String, Node>,
    placement: &[String],
    rank: usize,
) -> BTreeMap<String, String> {
    let mut env = job.spec.env.clone();
    env.extend(job.env_override.clone());
    let nnodes = placement.len().to_string();
    let master = placement
        .first()
        .and_then(|n| nodes.get(n))
        .map_or_else(|| "127.0.0.1".to_owned(), |n| n.record.address.clone());
    let port = job.spec.master_port.to_string();
    let gpus = placement
        .get(rank)
        .and_then(|n| nodes.get(n))
        .map(|n| {
            n.record
                .gpus
                .iter()
                .filter(|g| n.health.gpu_worst(g.index) != Condition::Unhealthy)
                .take(job.spec.gpus_per_node as usize)
                .map(|g| g.index.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let r = rank.to_string();
    let vars = [
        ("VIGIL_JOB_ID", job.id.clone()),
        ("VIGIL_ATTEMPT", job.attempt.to_string()),
        ("VIGIL_NNODES", nnodes.clone()),
        ("VIGIL_NODE_RANK", r.clone()),
        ("CUDA_VISIBLE_DEVICES", gpus),
        ("MASTER_ADDR", master.clone()),
        ("MASTER_PORT", port.clone()),
        ("NODE_RANK", r.clone()),
        ("GROUP_RANK", r.clone()),
        ("PET_NNODES", nnodes),
        ("PET_NODE_RANK", r),
        ("PET_MASTER_ADDR", master),
        ("PET_MASTER_PORT", port),
        ("PET_NPROC_PER_NODE", job.spec.gpus_per_node.to_string()),
    ];
    env.extend(vars.into_iter().map(|(k, v)| (k.to_owned(), v)));
    match &job.checkpoint {
        Some(c) => env.insert("VIGIL_RESUME_FROM".into(), c.path.clone()),
        None => env.remove("VIGIL_RESUME_FROM"),
    };
    env
}
