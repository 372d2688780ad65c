//! Tests of agent message validation: each limit refused by name, good messages pass.

use super::*;

fn register(name: &str) -> v1::Register {
    v1::Register {
        protocol_version: vigil_proto::PROTOCOL_VERSION,
        node_name: name.into(),
        hostname: "h".into(),
        agent_version: "0.1.0".into(),
        gpu_backend: v1::GpuBackend::Simulated as i32,
        gpus: (0..8)
            .rev()
            .map(|i| v1::GpuInfo {
                index: i,
                uuid: format!("GPU-{i}"),
                ..Default::default()
            })
            .collect(),
        workers: Vec::new(),
        sent_at_unix_ms: 0,
        last_store_id: "memory-1".into(),
        last_store_seq: 7,
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        boot_id: "6f1e2d3c-0000-4000-8000-000000000001".into(),
        accepts_lease_renewal: true,
        fabric: Vec::new(),
    }
}

fn event(kind: Kind) -> v1::AgentMessage {
    v1::AgentMessage {
        seq: 1,
        body: Some(Body::Event(v1::AgentEvent {
            at_unix_ms: 1,
            kind: Some(kind),
        })),
    }
}

#[test]
fn a_good_registration_is_accepted_with_gpus_in_index_order() {
    let reg = validate_register(register("gpu-001"), 7, "10.0.0.7".into()).expect("valid");
    assert_eq!(reg.session, 7);
    assert!(reg.simulated);
    assert_eq!(
        reg.gpus.iter().map(|g| g.index).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
}

#[test]
fn bad_registrations_name_the_field() {
    let cases: Vec<(v1::Register, &str)> = vec![
        (register(""), "node_name"),
        (register("-bad"), "node_name"),
        (register("has space"), "node_name"),
        (register(&"x".repeat(64)), "node_name"),
        (
            v1::Register {
                protocol_version: 9,
                ..register("a")
            },
            "protocol_version",
        ),
        (
            v1::Register {
                gpu_backend: 0,
                ..register("a")
            },
            "gpu_backend",
        ),
        (
            v1::Register {
                hostname: "h".repeat(300),
                ..register("a")
            },
            "hostname",
        ),
        (
            v1::Register {
                last_store_id: "s".repeat(300),
                ..register("a")
            },
            "last_store_id",
        ),
        (
            v1::Register {
                gpus: (0..65)
                    .map(|i| v1::GpuInfo {
                        index: i,
                        ..Default::default()
                    })
                    .collect(),
                ..register("a")
            },
            "gpus",
        ),
        (
            v1::Register {
                gpus: vec![v1::GpuInfo::default(), v1::GpuInfo::default()],
                ..register("a")
            },
            "index 0 twice",
        ),
        (
            v1::Register {
                workers: vec![v1::WorkerInfo::default()],
                ..register("a")
            },
            "workers.job_id",
        ),
    ];
    for (reg, field) in cases {
        let err = validate_register(reg.clone(), 1, String::new()).expect_err(field);
        assert!(err.contains(field), "{err:?} should name {field}");
        let msg = v1::AgentMessage {
            seq: 1,
            body: Some(Body::Register(reg)),
        };
        let rejection = validate(&msg).expect_err(field);
        assert_eq!(rejection.reason, "invalid_register");
    }
}

#[test]
fn oversized_heartbeats_are_refused() {
    let too_many = v1::Heartbeat {
        gpus: vec![v1::GpuSample::default(); MAX_GPUS + 1],
        ..Default::default()
    };
    assert!(check_heartbeat(&too_many).is_err());
    let links = v1::Heartbeat {
        gpus: vec![v1::GpuSample {
            nvlinks: vec![v1::NvLinkStatus::default(); MAX_NVLINKS + 1],
            ..Default::default()
        }],
        ..Default::default()
    };
    let e = check_heartbeat(&links).expect_err("too many links");
    assert!(e.contains("nvlinks"), "{e}");
    assert!(check_heartbeat(&v1::Heartbeat::default()).is_ok());
}

#[test]
fn a_compact_heartbeat_carries_bounded_telemetry_and_no_samples() {
    let compact = v1::Heartbeat {
        gpu_health_unchanged: true,
        telemetry: vec![v1::GpuTelemetry::default(); 8],
        ..Default::default()
    };
    assert!(check_heartbeat(&compact).is_ok());
    let too_many = v1::Heartbeat {
        telemetry: vec![v1::GpuTelemetry::default(); MAX_GPUS + 1],
        ..compact.clone()
    };
    let e = check_heartbeat(&too_many).expect_err("too much telemetry");
    assert!(e.starts_with("heartbeat.telemetry"), "{e}");
    let both = v1::Heartbeat {
        gpus: vec![v1::GpuSample::default()],
        ..compact
    };
    let e = check_heartbeat(&both).expect_err("samples and the flag");
    assert!(e.contains("gpu_health_unchanged"), "{e}");
}

fn scan_rejecting(r: v1::RejectedCheckpoint) -> Kind {
    Kind::CheckpointScan(v1::CheckpointScan {
        job_id: "j-1".into(),
        attempt: 2,
        rejected: vec![r],
        ..Default::default()
    })
}

#[test]
fn events_with_escaping_or_oversized_fields_are_refused_by_name() {
    let cases = [
        (
            Kind::Checkpoint(v1::CheckpointSeen {
                job_id: "j-1".into(),
                attempt: 1,
                path: "/ckpt/j/../../etc/step_9".into(),
                step: Some(9),
                ..Default::default()
            }),
            "checkpoint.path",
        ),
        (
            Kind::Checkpoint(v1::CheckpointSeen {
                job_id: "j-1".into(),
                path: "relative/step_1".into(),
                ..Default::default()
            }),
            "checkpoint.path",
        ),
        (
            Kind::Xid(v1::XidError {
                gpu_index: 4096,
                xid: 79,
                gpu_uuid: String::new(),
            }),
            "xid.gpu_index",
        ),
        (
            Kind::WorkerExited(v1::WorkerExited {
                job_id: "j".repeat(MAX_JOB_ID + 1),
                ..Default::default()
            }),
            "worker_exited.job_id",
        ),
        (
            Kind::WorkerExited(v1::WorkerExited {
                job_id: "j-1".into(),
                log_tail: "x".repeat(MAX_LOG_TAIL + 1),
                ..Default::default()
            }),
            "worker_exited.log_tail",
        ),
        (
            Kind::Diagnostics(v1::DiagnosticsResult {
                output: "x".repeat(MAX_DIAGNOSTICS_OUTPUT + 1),
                ..Default::default()
            }),
            "diagnostics.output",
        ),
        (
            Kind::LogData(v1::LogData {
                data: "x".repeat(MAX_LOG_DATA + 1),
                ..Default::default()
            }),
            "log_data.data",
        ),
        (
            scan_rejecting(v1::RejectedCheckpoint {
                path: "/c/step_1".into(),
                output: "x".repeat(MAX_VERIFY_OUTPUT + 1),
                ..Default::default()
            }),
            "checkpoint_scan.rejected.output",
        ),
        (
            scan_rejecting(v1::RejectedCheckpoint {
                path: "/c/../etc".into(),
                ..Default::default()
            }),
            "checkpoint_scan.rejected.path",
        ),
        (
            scan_rejecting(v1::RejectedCheckpoint {
                path: "/c/step_1".into(),
                why: "x".repeat(MAX_TEXT + 1),
                ..Default::default()
            }),
            "checkpoint_scan.rejected.why",
        ),
        (
            Kind::CheckpointScan(v1::CheckpointScan {
                job_id: "j-1".into(),
                rejected: vec![v1::RejectedCheckpoint::default(); MAX_REJECTED + 1],
                ..Default::default()
            }),
            "checkpoint_scan.rejected lists 9",
        ),
        (
            Kind::RemediationResult(v1::RemediationResult {
                action: v1::RemediationAction::GpuReset as i32,
                output: "x".repeat(MAX_REMEDIATION_OUTPUT + 1),
                ..Default::default()
            }),
            "remediation_result.output",
        ),
        (
            Kind::RemediationResult(v1::RemediationResult {
                action: 99,
                ..Default::default()
            }),
            "remediation_result.action",
        ),
        (
            Kind::RemediationResult(v1::RemediationResult {
                action: v1::RemediationAction::Reboot as i32,
                gpu_index: 64,
                ..Default::default()
            }),
            "remediation_result.gpu_index",
        ),
    ];
    for (kind, field) in cases {
        let r = validate(&event(kind)).expect_err(field);
        assert_eq!(r.reason, "invalid_event");
        assert!(
            r.message.contains(field),
            "{} should name {field}",
            r.message
        );
    }
}

#[test]
fn ordinary_events_and_unknown_bodies_pass() {
    let ok = [
        Kind::Checkpoint(v1::CheckpointSeen {
            job_id: "j-1".into(),
            attempt: 2,
            path: "/ckpt/j/step_000200".into(),
            step: Some(200),
            ..Default::default()
        }),
        Kind::WorkerExited(v1::WorkerExited {
            job_id: "j-1".into(),
            log_path: "/var/lib/vigil-agent/logs/j-1.log".into(),
            log_tail: "x".repeat(4096),
            ..Default::default()
        }),
        Kind::Xid(v1::XidError {
            gpu_index: 3,
            xid: 79,
            gpu_uuid: "GPU-3".into(),
        }),
        Kind::RemediationResult(v1::RemediationResult {
            step_id: 1,
            action: v1::RemediationAction::GpuReset as i32,
            gpu_index: 2,
            ok: true,
            output: "x".repeat(MAX_REMEDIATION_OUTPUT),
            command: "nvidia-smi -r -i 2".into(),
        }),
    ];
    for kind in ok {
        validate(&event(kind)).expect("valid");
    }
    validate(&v1::AgentMessage::default()).expect("an empty body is ignored, not refused");
}

#[test]
fn fabric_ports_are_bounded_and_named_once() {
    let port = |device: &str| v1::FabricPort {
        kind: v1::FabricKind::Infiniband.into(),
        device: device.into(),
        port: 1,
        ..Default::default()
    };
    let mut reg = register("n1");
    reg.fabric = vec![port("mlx5_0"), port("mlx5_1")];
    assert_eq!(check_register(&reg), Ok(()));
    reg.fabric.push(port("mlx5_0"));
    let err = check_register(&reg).expect_err("a port twice");
    assert!(err.contains("fabric lists mlx5_0 port 1 twice"), "{err}");
    reg.fabric = (0..=MAX_FABRIC_PORTS)
        .map(|i| port(&format!("mlx5_{i}")))
        .collect();
    let err = check_register(&reg).expect_err("too many");
    assert!(err.starts_with("fabric"), "{err}");
    reg.fabric = vec![port(&"x".repeat(MAX_TEXT + 1))];
    let err = check_register(&reg).expect_err("long name");
    assert!(err.contains("fabric.device"), "{err}");
    let hb = v1::Heartbeat {
        fabric: (0..=MAX_FABRIC_PORTS)
            .map(|i| port(&format!("mlx5_{i}")))
            .collect(),
        ..Default::default()
    };
    let err = check_heartbeat(&hb).expect_err("too many");
    assert!(err.starts_with("heartbeat.fabric"), "{err}");
}
