//! Test fixtures shared by the model and rendering tests.

use vigil_proto::v1;

pub fn cordoned_sim_node() -> v1::NodeSummary {
    v1::NodeSummary {
        name: "gpu-003".into(),
        state: "Cordoned".into(),
        availability: v1::Availability::Ready as i32,
        scheduling: v1::Scheduling::Cordoned as i32,
        cordon: Some(v1::Cordon {
            reason: "bad fan".into(),
            source: v1::CordonSource::Operator as i32,
            since_unix_ms: 1_000_000,
        }),
        gpus_healthy: 7,
        gpus_total: 8,
        last_heartbeat_age_ms: Some(400),
        hostname: "host-3".into(),
        agent_version: "0.1.0".into(),
        gpu_backend: v1::GpuBackend::Simulated as i32,
        availability_since_unix_ms: 900_000,
        condition: v1::Condition::Degraded as i32,
        condition_reasons: vec!["gpu 7: 3 uncorrectable ECC errors".into()],
        held_cordon: None,
        needs_repair: false,
        slurm_drain_reason: String::new(),
    }
}

pub fn ready_nvml_node(name: &str) -> v1::NodeSummary {
    v1::NodeSummary {
        name: name.into(),
        state: "Ready".into(),
        availability: v1::Availability::Ready as i32,
        scheduling: v1::Scheduling::Schedulable as i32,
        cordon: None,
        gpus_healthy: 8,
        gpus_total: 8,
        last_heartbeat_age_ms: None,
        hostname: name.into(),
        agent_version: "0.1.0".into(),
        gpu_backend: v1::GpuBackend::Nvml as i32,
        availability_since_unix_ms: 0,
        condition: v1::Condition::Healthy as i32,
        condition_reasons: vec![],
        held_cordon: None,
        needs_repair: false,
        slurm_drain_reason: String::new(),
    }
}

/// A node whose automatic cordon the open cordon breaker holds: Unhealthy, not cordoned.
pub fn held_node() -> v1::NodeSummary {
    let evidence = "XID 79 (GPU has fallen off the bus) on GPU 0 (GPU-held-0)";
    v1::NodeSummary {
        state: "Degraded".into(),
        condition: v1::Condition::Unhealthy as i32,
        condition_reasons: vec![evidence.into()],
        gpus_healthy: 7,
        held_cordon: Some(v1::HeldCordon {
            node: "gpu-012".into(),
            rule: "xid".into(),
            evidence: evidence.into(),
            since_unix_ms: 1_000_000,
            message: format!(
                "cordon held: breaker open (1 automatic cordon in the last 10m, cap 1): {evidence}"
            ),
        }),
        ..ready_nvml_node("gpu-012")
    }
}

/// A node whose GPU 2 throttles: Degraded, still schedulable.
pub fn degraded_node() -> v1::NodeSummary {
    v1::NodeSummary {
        state: "Degraded".into(),
        condition: v1::Condition::Degraded as i32,
        condition_reasons: vec![
            "gpu 2: thermal throttling".into(),
            "gpu 5: temperature 88C above 85C".into(),
        ],
        last_heartbeat_age_ms: Some(1_200),
        ..ready_nvml_node("gpu-011")
    }
}

/// Three nodes: one Ready, one cordoned by an operator, one Degraded.
pub fn status_response() -> v1::StatusResponse {
    v1::StatusResponse {
        coordinator_version: "0.1.0".into(),
        insecure: false,
        caller: "alice (admin)".into(),
        ha: None,
        recovery: None,
        started_at_unix_ms: 1,
        uptime_ms: 192_000,
        listen_addr: "0.0.0.0:7770".into(),
        nodes_by_state: vec![
            v1::StateCount {
                state: "Ready".into(),
                count: 1,
            },
            v1::StateCount {
                state: "Degraded".into(),
                count: 1,
            },
            v1::StateCount {
                state: "Cordoned".into(),
                count: 1,
            },
        ],
        nodes_total: 3,
        gpus_healthy: 16,
        gpus_total: 24,
        cordoned: vec![cordoned_sim_node()],
        nodes_simulated: 3,
        degraded: vec![degraded_node()],
    }
}

/// One coordinator on its SQLite store: the HA section says so and nothing more.
pub fn ha_single() -> v1::HaStatus {
    v1::HaStatus {
        store: "sqlite".into(),
        role: "leader".into(),
        quorum: true,
        ..Default::default()
    }
}

fn etcd_member(endpoint: &str, is_leader: bool) -> v1::EtcdMember {
    v1::EtcdMember {
        endpoint: endpoint.into(),
        healthy: true,
        is_leader,
        version: "3.5.17".into(),
        db_size_bytes: 20 << 20,
        raft_term: 7,
        error: String::new(),
    }
}

fn coordinator(name: &str, leader: bool, started_at_unix_ms: u64) -> v1::CoordinatorInfo {
    v1::CoordinatorInfo {
        name: name.into(),
        url: format!("https://{name}.example:7770"),
        leader,
        version: "0.1.0".into(),
        started_at_unix_ms,
    }
}

/// Two coordinators on a healthy three-member etcd; coord-2 leads (for the last 12 minutes)
/// and answered.
pub fn ha_etcd_healthy() -> v1::HaStatus {
    v1::HaStatus {
        store: "etcd".into(),
        coordinator: "coord-2".into(),
        role: "leader".into(),
        leader: "coord-2".into(),
        leader_url: "https://coord-2.example:7770".into(),
        term: 41,
        leader_since_unix_ms: 1_000_000,
        coordinators: vec![
            coordinator("coord-1", false, 100_000),
            coordinator("coord-2", true, 40_000),
        ],
        etcd: vec![
            etcd_member("https://etcd-1.example:2379", true),
            etcd_member("https://etcd-2.example:2379", false),
            etcd_member("https://etcd-3.example:2379", false),
        ],
        quorum: true,
        etcd_error: String::new(),
        leader_changes: 2,
    }
}

/// etcd lost two of its three members: no quorum, so no coordinator leads.
pub fn ha_etcd_no_quorum() -> v1::HaStatus {
    let down = |endpoint: &str| v1::EtcdMember {
        endpoint: endpoint.into(),
        healthy: false,
        error: "connection refused".into(),
        ..Default::default()
    };
    v1::HaStatus {
        store: "etcd".into(),
        coordinator: "coord-1".into(),
        role: "standby".into(),
        leader: String::new(),
        leader_url: String::new(),
        term: 41,
        leader_since_unix_ms: 0,
        coordinators: vec![coordinator("coord-1", false, 100_000)],
        etcd: vec![
            etcd_member("https://etcd-1.example:2379", false),
            down("https://etcd-2.example:2379"),
            down("https://etcd-3.example:2379"),
        ],
        quorum: false,
        etcd_error: "no quorum: 1 of 3 members healthy".into(),
        leader_changes: 3,
    }
}

/// A job waiting for nodes: never started, no checkpoint.
pub fn pending_job() -> v1::JobSummary {
    v1::JobSummary {
        id: "j-2".into(),
        name: "bert-large".into(),
        state: "Pending".into(),
        attempt: 0,
        restarts: 0,
        max_restarts: 3,
        nodes: 4,
        gpus_per_node: 8,
        assigned_nodes: vec![],
        last_checkpoint_step: None,
        submitted_at_unix_ms: 1_600_000,
        reason: "waiting for 4 schedulable nodes (2 Ready)".into(),
        progress_step: None,
        source: "vigil".into(),
    }
}

/// A Slurm job vigil recorded: requeued once by vigil for XID 79 on gpu-003, running again.
pub fn slurm_job() -> v1::JobDetail {
    v1::JobDetail {
        summary: Some(v1::JobSummary {
            id: "slurm:4711".into(),
            name: "llm-pretrain".into(),
            state: "RUNNING".into(),
            attempt: 2,
            restarts: 1,
            nodes: 2,
            assigned_nodes: vec!["gpu-001".into(), "gpu-004".into()],
            submitted_at_unix_ms: 1_000_000,
            source: "slurm".into(),
            ..Default::default()
        }),
        attempts: vec![
            v1::AttemptRecord {
                attempt: 1,
                nodes: vec!["gpu-001".into(), "gpu-003".into()],
                started_at_unix_ms: 1_000_000,
                ended_at_unix_ms: 1_300_000,
                outcome: "requeued".into(),
                reason: "vigil: XID 79 (GPU has fallen off the bus) on GPU 3".into(),
                culprit_node: "gpu-003".into(),
                ..Default::default()
            },
            v1::AttemptRecord {
                attempt: 2,
                nodes: vec!["gpu-001".into(), "gpu-004".into()],
                started_at_unix_ms: 1_302_000,
                outcome: "running".into(),
                ..Default::default()
            },
        ],
        lost_ms: 3_000,
        goodput: Some(v1::Goodput {
            wall_ms: 720_000,
            productive_ms: 717_000,
            lost_ms: 3_000,
            ettr: 717_000.0 / 720_000.0,
            detection_ms: 1_000,
            waiting_ms: 2_000,
            failures: vec![v1::FailureCost {
                attempt: 1,
                kind: "node_unhealthy".into(),
                reason: "vigil: XID 79 (GPU has fallen off the bus) on GPU 3".into(),
                culprit_node: "gpu-003".into(),
                fault_at_unix_ms: 1_299_000,
                detection_ms: 1_000,
                waiting_ms: 2_000,
                ..Default::default()
            }],
            ..Default::default()
        }),
        slurm: Some(v1::SlurmJobInfo {
            job_id: "4711".into(),
            user: "alice".into(),
            slurm_state: "RUNNING".into(),
            requeues: vec![v1::SlurmRequeue {
                at_unix_ms: 1_299_500,
                node: "gpu-003".into(),
                reason: "vigil: XID 79 (GPU has fallen off the bus) on GPU 3".into(),
                fault_at_unix_ms: Some(1_299_000),
                run: 1,
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Where `running_job`'s 12 minutes went: one XID failure, 60 steps recomputed.
fn running_job_goodput() -> v1::Goodput {
    let seg = |phase: &str, from: u64, to: u64, attempt| v1::TimelineSegment {
        phase: phase.into(),
        from_unix_ms: from,
        to_unix_ms: to,
        attempt,
    };
    v1::Goodput {
        wall_ms: 720_000,
        productive_ms: 555_000,
        lost_ms: 165_000,
        ettr: 555.0 / 720.0,
        queued_ms: 10_000,
        detection_ms: 2_000,
        teardown_ms: 8_000,
        waiting_ms: 65_000,
        startup_ms: 20_000,
        recomputation_ms: 60_000,
        failures: vec![v1::FailureCost {
            attempt: 1,
            kind: "node_unhealthy".into(),
            reason: "node gpu-003 unhealthy: XID 79 (GPU has fallen off the bus)".into(),
            culprit_node: "gpu-003".into(),
            fault_at_unix_ms: 1_290_000,
            detection_ms: 2_000,
            teardown_ms: 8_000,
            waiting_ms: 65_000,
            startup_ms: 15_000,
            recomputation_ms: 60_000,
            steps_lost: Some(60),
        }],
        timeline: vec![
            seg("queued", 1_000_000, 1_010_000, 1),
            seg("startup", 1_010_000, 1_015_000, 1),
            seg("productive", 1_015_000, 1_290_000, 1),
            seg("detection", 1_290_000, 1_292_000, 1),
            seg("teardown", 1_292_000, 1_300_000, 1),
            seg("waiting", 1_300_000, 1_365_000, 2),
            seg("startup", 1_365_000, 1_380_000, 2),
            seg("recomputation", 1_380_000, 1_440_000, 2),
            seg("productive", 1_440_000, 1_720_000, 2),
        ],
        mtbf_ms: Some(635_000),
        checkpoint_save_ms: Some(4_000),
        checkpoint_interval_ms: Some(10_000),
        suggested_checkpoint_interval_ms: Some(71_274),
    }
}

/// Attempt 2 of a two-node job, resumed from step 200 after gpu-003 failed in attempt 1.
pub fn running_job() -> v1::JobDetail {
    v1::JobDetail {
        summary: Some(v1::JobSummary {
            id: "j-1".into(),
            name: "opt-demo".into(),
            state: "Running".into(),
            attempt: 2,
            restarts: 1,
            max_restarts: 50,
            nodes: 2,
            gpus_per_node: 8,
            assigned_nodes: vec!["gpu-001".into(), "gpu-004".into()],
            last_checkpoint_step: Some(200),
            submitted_at_unix_ms: 1_000_000,
            reason: String::new(),
            progress_step: Some(230),
            source: "vigil".into(),
        }),
        spec_toml: "name = \"opt-demo\"\nnodes = 2\n".into(),
        spare_nodes: vec!["gpu-009".into()],
        attempts: vec![
            v1::AttemptRecord {
                attempt: 1,
                nodes: vec!["gpu-001".into(), "gpu-003".into()],
                started_at_unix_ms: 1_010_000,
                ended_at_unix_ms: 1_300_000,
                outcome: "failed".into(),
                reason: "XID 79 (GPU has fallen off the bus)".into(),
                culprit_node: "gpu-003".into(),
                resumed_from: String::new(),
                resumed_from_step: None,
                last_step: Some(260),
                triage: Default::default(),
                crash_loop: "excused: gpu-003 was cordoned automatically".into(),
                ..Default::default()
            },
            v1::AttemptRecord {
                attempt: 2,
                nodes: vec!["gpu-001".into(), "gpu-004".into()],
                started_at_unix_ms: 1_365_000,
                ended_at_unix_ms: 0,
                outcome: "running".into(),
                reason: String::new(),
                culprit_node: String::new(),
                resumed_from: "/ckpt/step_00000200".into(),
                resumed_from_step: Some(200),
                last_step: Some(230),
                triage: Default::default(),
                preflight: vec![
                    "round 0: [gpu-001,gpu-004] passed".into(),
                    "verdict: passed on the whole gang".into(),
                ],
                ..Default::default()
            },
        ],
        last_checkpoint: Some(v1::CheckpointRecord {
            path: "/ckpt/step_00000200".into(),
            step: Some(200),
            seen_at_unix_ms: 1_200_000,
            attempt: 1,
        }),
        lost_ms: 65_000,
        bad_checkpoints: Vec::new(),
        slurm: None,
        goodput: Some(running_job_goodput()),
        events: running_job_events(),
        workers: vec![
            v1::WorkerStatus {
                node: "gpu-001".into(),
                node_rank: 0,
                state: "running".into(),
                exit_code: None,
                progress_step: Some(230),
                progress_at_unix_ms: 1_419_500,
                pid: 4242,
                log_path: "/var/lib/vigil/logs/j-1.2.log".into(),
            },
            v1::WorkerStatus {
                node: "gpu-004".into(),
                node_rank: 1,
                state: "running".into(),
                ..Default::default()
            },
        ],
        workdir: "/shared/runs/opt-demo".into(),
        checkpoint_dir: "/ckpt".into(),
        checkpoint_layout: "marker".into(),
    }
}

/// `running_job`'s events: submitted, a checkpoint every 10 s from step 20 to 200, the XID
/// that failed attempt 1, the restart, attempt 2's start.
fn running_job_events() -> Vec<v1::JobEvent> {
    let event = |at_unix_ms, kind: &str, message: &str| v1::JobEvent {
        at_unix_ms,
        kind: kind.into(),
        message: message.into(),
    };
    let mut events = vec![event(1_000_000, "submitted", "submitted from job.toml")];
    events.extend((2..=20u64).map(|k| {
        event(
            1_000_000 + k * 10_000,
            "checkpoint",
            &format!(
                "complete checkpoint /ckpt/step_{:08} (step {})",
                k * 10,
                k * 10
            ),
        )
    }));
    events.extend([
        event(
            1_292_000,
            "failed",
            "attempt 1 failed: node gpu-003 unhealthy: XID 79 (GPU has fallen off the bus)",
        ),
        event(1_300_000, "restart", "attempt 1 failed on gpu-003: XID 79"),
        event(1_365_000, "started", "attempt 2 on gpu-001, gpu-004"),
    ]);
    events
}

/// What `events` shows of `running_job`'s story: the job's events with their nodes, and the
/// node events between them (the XID, the cordon).
pub fn cluster_events() -> Vec<v1::ClusterEvent> {
    let mut events: Vec<v1::ClusterEvent> = running_job_events()
        .into_iter()
        .map(|e| v1::ClusterEvent {
            node: match e.kind.as_str() {
                "checkpoint" => "gpu-001".into(),
                "failed" => "gpu-003".into(),
                _ => String::new(),
            },
            at_unix_ms: e.at_unix_ms,
            kind: e.kind,
            job: "j-1".into(),
            message: e.message,
        })
        .collect();
    let node_event = |at_unix_ms, kind: &str, message: &str| v1::ClusterEvent {
        at_unix_ms,
        kind: kind.into(),
        node: "gpu-003".into(),
        job: String::new(),
        message: message.into(),
    };
    events.extend([
        node_event(
            1_290_000,
            "xid",
            "Xid 79 on GPU 3: GPU has fallen off the bus",
        ),
        node_event(
            1_291_000,
            "cordon",
            "cordoned: XID 79 (GPU has fallen off the bus)",
        ),
    ]);
    events.sort_by_key(|e| e.at_unix_ms);
    events
}

/// An unconfirmed recovery hold: two records lost, the node gpu-003 waiting for review.
pub fn recovery_hold() -> v1::RecoveryHold {
    v1::RecoveryHold {
        since_unix_ms: 1_000_000,
        damage: "nodes tree: checksum mismatch".into(),
        lost: vec![
            "nodes/gpu-007: checksum mismatch".into(),
            "jobs/j-9: unreadable".into(),
        ],
        lost_nodes: vec!["gpu-007".into()],
        lost_jobs: vec!["j-9".into()],
        damaged_copy: "/var/lib/vigil/damaged-1".into(),
        confirmed_by: String::new(),
        confirmed_at_unix_ms: None,
        nodes_held: vec!["gpu-003".into()],
        jobs_held: 1,
    }
}
