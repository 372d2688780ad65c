//! The clusterctl binary against an in-process fake ControlService: JSON shapes, tables, error mapping.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use tonic::{Request, Response, Status};
use vigil_proto::v1::{self, control_service_server::ControlServiceServer};

/// The job rpcs' answers, and the job commands' tests.
#[path = "fake_coordinator/jobs.rs"]
mod jobs;

/// Highly available coordinators: a fake standby, leader hints, the address list.
#[path = "fake_coordinator/ha.rs"]
mod ha;

/// The cordon breaker's answers and the `breaker` commands' tests.
#[path = "fake_coordinator/breaker.rs"]
mod breaker;

/// The nodes the fake knows.
#[path = "fake_coordinator/nodes.rs"]
mod nodes;

/// Events, drain and job logs: the fake's answers and the commands' tests.
#[path = "fake_coordinator/ops.rs"]
mod ops;

use nodes::{auto_node, diagnostics, hot_node, not_found, sim_node};

struct Fake;

#[tonic::async_trait]
impl v1::control_service_server::ControlService for Fake {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let count = |state: &str, count| v1::StateCount {
            state: state.into(),
            count,
        };
        Ok(Response::new(v1::StatusResponse {
            insecure: true,
            caller: "anonymous (insecure)".into(),
            ha: None,
            coordinator_version: "0.1.0".into(),
            started_at_unix_ms: 1_700_000_000_000,
            uptime_ms: 192_000,
            listen_addr: "0.0.0.0:7770".into(),
            nodes_by_state: vec![count("Ready", 0), count("Cordoned", 1)],
            nodes_total: 1,
            gpus_healthy: 7,
            gpus_total: 8,
            cordoned: vec![sim_node(), auto_node()],
            nodes_simulated: 1,
            degraded: vec![hot_node()],
            recovery: Some(recovery_hold()),
        }))
    }

    async fn get_recovery(
        &self,
        _: Request<v1::GetRecoveryRequest>,
    ) -> Result<Response<v1::RecoveryResponse>, Status> {
        Ok(Response::new(v1::RecoveryResponse {
            hold: Some(recovery_hold()),
        }))
    }

    async fn get_breaker(
        &self,
        _: Request<v1::GetBreakerRequest>,
    ) -> Result<Response<v1::BreakerStatus>, Status> {
        Ok(Response::new(breaker::open()))
    }

    async fn reset_breaker(
        &self,
        _: Request<v1::ResetBreakerRequest>,
    ) -> Result<Response<v1::BreakerStatus>, Status> {
        Ok(Response::new(breaker::after_reset()))
    }

    async fn forget_node(
        &self,
        req: Request<v1::ForgetNodeRequest>,
    ) -> Result<Response<v1::NodeSummary>, Status> {
        match req.into_inner().name.as_str() {
            "gpu-003" => Ok(Response::new(sim_node())),
            other => Err(Status::not_found(format!("node \"{other}\" not found"))),
        }
    }

    async fn confirm_recovery(
        &self,
        _: Request<v1::ConfirmRecoveryRequest>,
    ) -> Result<Response<v1::RecoveryResponse>, Status> {
        Ok(Response::new(v1::RecoveryResponse {
            hold: Some(v1::RecoveryHold {
                confirmed_by: "anonymous (insecure)".into(),
                confirmed_at_unix_ms: Some(1_700_000_060_000),
                jobs_held: 0,
                ..recovery_hold()
            }),
        }))
    }

    async fn list_nodes(
        &self,
        _: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        Ok(Response::new(v1::ListNodesResponse {
            nodes: vec![sim_node(), hot_node()],
        }))
    }

    async fn list_lemons(
        &self,
        _: Request<v1::ListLemonsRequest>,
    ) -> Result<Response<v1::ListLemonsResponse>, Status> {
        Ok(Response::new(v1::ListLemonsResponse {
            lemons: vec![v1::Lemon {
                kind: "gpu".into(),
                id: "1650000000001".into(),
                node: "gpu-003".into(),
                failures: 3,
                failures_total: 3,
                kinds: "unhealthy x3".into(),
                last_failure_unix_ms: 1_700_000_000_000,
                last_detail: "XID 79 (GPU has fallen off the bus) on GPU 3".into(),
                blocklisted_at_unix_ms: Some(1_700_000_000_000),
                cleared_at_unix_ms: None,
            }],
            max_failures: 3,
            window_ms: 7 * 24 * 3_600_000,
        }))
    }

    async fn clear_lemon(
        &self,
        req: Request<v1::ClearLemonRequest>,
    ) -> Result<Response<v1::ListLemonsResponse>, Status> {
        Err(not_found(&req.into_inner().subject))
    }

    async fn get_node(
        &self,
        req: Request<v1::GetNodeRequest>,
    ) -> Result<Response<v1::NodeDetail>, Status> {
        match req.into_inner().name.as_str() {
            "gpu-003" => Ok(Response::new(v1::NodeDetail {
                summary: Some(sim_node()),
                gpus: vec![v1::GpuInfo {
                    index: 0,
                    uuid: "GPU-0".into(),
                    ..Default::default()
                }],
                last_samples: vec![v1::GpuSample {
                    index: 0,
                    power_w: Some(300.0),
                    remapped_rows_pending: Some(true),
                    nvlinks: vec![v1::NvLinkStatus {
                        link: 0,
                        active: true,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                workers: vec![],
                first_registered_unix_ms: 1,
                last_registered_unix_ms: 2,
                machine_id: "3f2a9c1d0b".into(),
                boot_id: String::new(),
                gpu_health: vec![v1::GpuHealth {
                    index: 0,
                    condition: v1::Condition::Healthy as i32,
                    reasons: vec![],
                }],
                events: vec![v1::NodeEvent {
                    at_unix_ms: 3,
                    kind: "registered".into(),
                    message: "agent 0.1.0 registered".into(),
                    gpu_index: None,
                }],
                last_diagnostics: Some(diagnostics("gpu-003", true, 0)),
                remediation: None,
                fabric: vec![v1::FabricPort {
                    kind: v1::FabricKind::Infiniband.into(),
                    device: "mlx5_0".into(),
                    port: 1,
                    state: "DOWN".into(),
                    phys_state: "Disabled".into(),
                    rate_mbps: Some(400_000),
                    link_downed: Some(3),
                    link_error_recovery: Some(0),
                    ..Default::default()
                }],
            })),
            "hangs" => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Err(Status::internal("too late"))
            }
            other => Err(not_found(other)),
        }
    }

    async fn cordon(
        &self,
        req: Request<v1::CordonRequest>,
    ) -> Result<Response<v1::NodeSummary>, Status> {
        let req = req.into_inner();
        if req.name != "gpu-003" {
            return Err(not_found(&req.name));
        }
        let mut node = sim_node();
        if let Some(c) = node.cordon.as_mut() {
            c.reason = req.reason;
        }
        Ok(Response::new(node))
    }

    async fn uncordon(
        &self,
        req: Request<v1::UncordonRequest>,
    ) -> Result<Response<v1::NodeSummary>, Status> {
        let req = req.into_inner();
        let mut node = match req.name.as_str() {
            "gpu-003" => sim_node(),
            "gpu-auto" if req.force => auto_node(),
            "gpu-auto" => {
                return Err(Status::failed_precondition(
                    "node gpu-auto was cordoned automatically and no diagnostics passed since; \
                     run `clusterctl diagnose gpu-auto` or use --force",
                ));
            }
            _ => return Err(Status::invalid_argument("node name must not be empty")),
        };
        node.cordon = None;
        node.scheduling = v1::Scheduling::Schedulable as i32;
        Ok(Response::new(node))
    }

    async fn diagnose(
        &self,
        req: Request<v1::DiagnoseRequest>,
    ) -> Result<Response<v1::DiagnosticsRecord>, Status> {
        let req = req.into_inner();
        match req.name.as_str() {
            "gpu-003" => Ok(Response::new(diagnostics("gpu-003", true, req.timeout_ms))),
            "gpu-auto" => Ok(Response::new(diagnostics(
                "gpu-auto",
                false,
                req.timeout_ms,
            ))),
            // Answers after clusterctl's usual 5 s request timeout.
            "slow" => {
                tokio::time::sleep(Duration::from_secs(6)).await;
                Ok(Response::new(diagnostics("slow", true, req.timeout_ms)))
            }
            other => Err(not_found(other)),
        }
    }

    async fn submit_job(
        &self,
        req: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::JobDetail>, Status> {
        jobs::submit(req.into_inner()).map(Response::new)
    }

    async fn list_jobs(
        &self,
        _: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        Ok(Response::new(jobs::list()))
    }

    async fn get_job(
        &self,
        req: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobDetail>, Status> {
        jobs::get(&req.into_inner().id).map(Response::new)
    }

    async fn cancel_job(
        &self,
        req: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::JobDetail>, Status> {
        jobs::cancel(&req.into_inner().id).map(Response::new)
    }

    async fn restart_job(
        &self,
        req: Request<v1::RestartJobRequest>,
    ) -> Result<Response<v1::JobDetail>, Status> {
        jobs::cancel(&req.into_inner().id).map(Response::new)
    }

    type WatchEventsStream = ops::FakeStream<v1::ClusterEvent>;

    async fn watch_events(
        &self,
        req: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Ok(Response::new(ops::watch_events(req.into_inner())))
    }

    async fn drain(
        &self,
        req: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        ops::drain(req.into_inner()).map(Response::new)
    }

    type JobLogsStream = ops::FakeStream<v1::LogChunk>;

    async fn job_logs(
        &self,
        req: Request<v1::JobLogsRequest>,
    ) -> Result<Response<Self::JobLogsStream>, Status> {
        ops::job_logs(req.into_inner()).map(Response::new)
    }
}

/// An unconfirmed recovery hold: one node record lost, gpu-003 waiting for review.
fn recovery_hold() -> v1::RecoveryHold {
    v1::RecoveryHold {
        since_unix_ms: 1_700_000_000_000,
        damage: "nodes tree: checksum mismatch".into(),
        lost: vec!["nodes/gpu-007: checksum mismatch".into()],
        lost_nodes: vec!["gpu-007".into()],
        lost_jobs: vec![],
        damaged_copy: "/var/lib/vigil/damaged-1700000000".into(),
        confirmed_by: String::new(),
        confirmed_at_unix_ms: None,
        nodes_held: vec!["gpu-003".into()],
        jobs_held: 1,
    }
}

/// Serves the fake on 127.0.0.1:0 for as long as the returned runtime lives.
fn start_fake() -> (tokio::runtime::Runtime, String) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServiceServer::new(Fake))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (runtime, url)
}

fn clusterctl(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .arg("--coordinator")
        .arg(url)
        .arg("--insecure")
        .args(args)
        .output()
        .expect("clusterctl runs")
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON document")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn json_output_has_the_documented_shapes() {
    let (_rt, url) = start_fake();
    let status = stdout_json(&clusterctl(&url, &["-o", "json", "status"]));
    assert_eq!(status["coordinator"]["url"], json!(url));
    assert_eq!(status["coordinator"]["listen_addr"], json!("0.0.0.0:7770"));
    assert_eq!(
        status["nodes_by_state"],
        json!({"Ready": 0, "Degraded": 0, "Validating": 0, "Cordoned": 1, "Unreachable": 0, "Lost": 0})
    );
    assert_eq!(status["cordoned"][0]["cordon"]["source"], json!("operator"));
    assert_eq!(status["cordoned"][1]["cordon"]["source"], json!("auto"));
    assert_eq!(status["degraded"][0]["name"], json!("gpu-hot"));
    assert_eq!(status["degraded"][0]["condition"], json!("Degraded"));

    let nodes = stdout_json(&clusterctl(&url, &["nodes", "-o", "json"]));
    assert_eq!(nodes["nodes"][0]["gpu_backend"], json!("simulated"));
    assert_eq!(nodes["nodes"][0]["simulated"], json!(true));
    assert_eq!(nodes["nodes"][0]["last_heartbeat_age_ms"], json!(400));
    assert_eq!(nodes["nodes"][0]["condition"], json!("Healthy"));
    assert_eq!(nodes["nodes"][0]["condition_reasons"], json!([]));
    assert_eq!(
        nodes["nodes"][1]["condition_reasons"],
        json!(["gpu 1: thermal throttling"])
    );

    let node = stdout_json(&clusterctl(&url, &["-o", "json", "node", "gpu-003"]));
    assert_eq!(node["node"]["name"], json!("gpu-003"));
    assert_eq!(node["gpus"][0]["uuid"], json!("GPU-0"));
    assert_eq!(node["samples"][0]["power_w"], json!(300.0));
    assert_eq!(node["samples"][0]["temperature_c"], json!(null));
    assert_eq!(node["workers"], json!([]));
    assert_eq!(node["samples"][0]["remapped_rows_pending"], json!(true));
    assert_eq!(node["samples"][0]["remapped_rows_failure"], json!(null));
    assert_eq!(node["samples"][0]["observed_at_unix_ms"], json!(null));
    assert_eq!(
        node["samples"][0]["nvlinks"],
        json!([{"link": 0, "active": true, "crc_errors": null, "replay_errors": null, "recovery_errors": null}])
    );
    assert_eq!(
        node["gpu_health"],
        json!([{"index": 0, "condition": "Healthy", "reasons": []}])
    );
    assert_eq!(
        node["events"],
        json!([{"at_unix_ms": 3, "kind": "registered", "message": "agent 0.1.0 registered", "gpu_index": null}])
    );
    assert_eq!(
        node["last_diagnostics"],
        json!({
            "passed": true,
            "summary": "all checks passed (timeout_ms=0)",
            "output": "checked 8 GPUs\n",
            "duration_ms": 1_500,
            "command": "builtin NVML self-check",
            "finished_at_unix_ms": 1_700_000_100_000_u64,
        })
    );

    let cordoned = stdout_json(&clusterctl(
        &url,
        &["-o", "json", "cordon", "gpu-003", "--reason", "fan"],
    ));
    assert_eq!(cordoned["cordon"]["reason"], json!("fan"));
    let uncordoned = stdout_json(&clusterctl(&url, &["-o", "json", "uncordon", "gpu-003"]));
    assert_eq!(uncordoned["cordon"], json!(null));
    assert_eq!(uncordoned["scheduling"], json!("Schedulable"));
}

#[test]
fn text_output_is_for_people() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 node reports SIMULATED GPUs"), "{text}");
    assert!(text.contains("gpu-003   operator"), "{text}");
    assert!(text.contains("gpu-auto  auto"), "{text}");
    assert!(
        text.contains("degraded     gpu-hot  Degraded  \"gpu 1: thermal throttling\"\n"),
        "{text}"
    );

    let out = clusterctl(&url, &["nodes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("NAME "), "{text}");
    assert!(text.contains("7/8 sim"), "{text}");
    assert!(text.contains("gpu 1: thermal throttling"), "{text}");

    let out = clusterctl(&url, &["node", "gpu-003"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("GPU HEALTH (SIMULATED)\n"), "{text}");
    assert!(text.contains("n/a pending"), "{text}");
    assert!(text.contains("1/1 up"), "{text}");
    assert!(text.contains("result          PASSED in 1.5s\n"), "{text}");
    assert!(
        text.contains("registered   -     agent 0.1.0 registered\n"),
        "{text}"
    );

    let out = clusterctl(&url, &["cordon", "gpu-003", "--reason", "bad fan"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "node gpu-003 cordoned: bad fan\n"
    );
    let out = clusterctl(&url, &["uncordon", "gpu-003"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "node gpu-003 uncordoned\n"
    );
}

#[test]
fn the_recovery_hold_shows_in_status_and_recovery_and_is_confirmed() {
    let (_rt, url) = start_fake();
    let status = stdout_json(&clusterctl(&url, &["-o", "json", "status"]));
    assert_eq!(status["recovery"]["confirmed"], json!(false));
    assert_eq!(status["recovery"]["confirmed_by"], json!(null));
    assert_eq!(status["recovery"]["nodes_held"], json!(["gpu-003"]));
    let out = clusterctl(&url, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "\nstate        RECOVERED from a damaged store at 2023-11-14 22:13:20Z, 1 record \
             lost; jobs held until `clusterctl recovery confirm`\n"
        ),
        "{text}"
    );

    let view = stdout_json(&clusterctl(&url, &["-o", "json", "recovery"]));
    assert_eq!(
        view["recovery"]["lost"],
        json!(["nodes/gpu-007: checksum mismatch"])
    );
    assert_eq!(view["recovery"]["jobs_held"], json!(1));
    let out = clusterctl(&url, &["recovery"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("lost nodes   gpu-007\n"), "{text}");
    assert!(
        text.contains("jobs held    1 job waiting for `clusterctl recovery confirm`\n"),
        "{text}"
    );

    let out = clusterctl(&url, &["recovery", "confirm"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "recovery confirmed by anonymous (insecure): jobs may be scheduled again; 1 node(s) stay \
         cordoned until each is reviewed and uncordoned (clusterctl uncordon NAME): gpu-003\n"
    );
    let confirmed = stdout_json(&clusterctl(&url, &["-o", "json", "recovery", "confirm"]));
    assert_eq!(confirmed["recovery"]["confirmed"], json!(true));
    assert_eq!(
        confirmed["recovery"]["confirmed_at_unix_ms"],
        json!(1_700_000_060_000_u64)
    );
}

#[test]
fn server_errors_become_one_line() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["node", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: node \"nope\" not found (clusterctl nodes lists known nodes)\n"
    );
    let out = clusterctl(&url, &["-o", "json", "uncordon", "other"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(stderr(&out), "error: node name must not be empty\n");
}

#[test]
fn a_hung_coordinator_times_out_within_seconds() {
    let (_rt, url) = start_fake();
    let started = std::time::SystemTime::now();
    let out = clusterctl(&url, &["node", "hangs"]);
    let took = started.elapsed().unwrap_or_default();
    assert_eq!(out.status.code(), Some(1));
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach coordinator at {url} (no answer within 5s)"
        )),
        "{err}"
    );
}

#[test]
fn diagnose_exit_code_follows_the_result() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["diagnose", "gpu-003", "--timeout", "1m30s"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "diagnostics on gpu-003: PASSED (1.5s) — all checks passed (timeout_ms=90000)\n    checked 8 GPUs\n"
    );
    assert!(out.stderr.is_empty());

    let out = clusterctl(&url, &["diagnose", "gpu-auto"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .starts_with("diagnostics on gpu-auto: FAILED (1.5s) — gpu 2: not found by NVML\n"),
    );
    assert_eq!(
        stderr(&out),
        "error: diagnostics failed on gpu-auto: gpu 2: not found by NVML\n"
    );

    let out = clusterctl(&url, &["-o", "json", "diagnose", "gpu-auto"]);
    assert_eq!(out.status.code(), Some(1));
    let record: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(record["node"], json!("gpu-auto"));
    assert_eq!(record["passed"], json!(false));
    assert_eq!(record["command"], json!("builtin NVML self-check"));

    let out = clusterctl(&url, &["-o", "json", "diagnose", "gpu-003"]);
    assert_eq!(
        stdout_json(&out)["summary"],
        json!("all checks passed (timeout_ms=0)")
    );
}

#[test]
fn diagnose_waits_longer_than_the_usual_request_timeout() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["diagnose", "slow", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
}

#[test]
fn uncordon_passes_force_and_keeps_the_servers_refusal() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["uncordon", "gpu-auto"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        stderr(&out),
        "error: node gpu-auto was cordoned automatically and no diagnostics passed since; \
         run `clusterctl diagnose gpu-auto` or use --force\n"
    );
    let out = clusterctl(&url, &["uncordon", "gpu-auto", "--force"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "node gpu-auto uncordoned (forced)\n"
    );
    let node = stdout_json(&clusterctl(
        &url,
        &["-o", "json", "uncordon", "--force", "gpu-auto"],
    ));
    assert_eq!(node["scheduling"], json!("Schedulable"));
}
