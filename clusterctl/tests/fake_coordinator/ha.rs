use std::time::Duration;

use serde_json::json;
use tonic::{Request, Response, Status};
use vigil_proto::v1::{self, control_service_server::ControlServiceServer};

use super::ops::FakeStream;
use super::{clusterctl, start_fake, stderr, stdout_json};

/// Nothing listens on ports 1 and 2 (they need root): connecting is refused at once.
const DEAD: &str = "http://127.0.0.1:1";
const DEAD_TOO: &str = "http://127.0.0.1:2";

/// A standby coordinator: answers `Status` (role standby, naming `leader_url` when not
/// empty) and refuses everything else with FAILED_PRECONDITION and `vigil-leader`.
struct Standby {
    leader_url: String,
}

impl Standby {
    fn status_response(&self) -> v1::StatusResponse {
        let leads = !self.leader_url.is_empty();
        v1::StatusResponse {
            coordinator_version: "0.1.0".into(),
            insecure: true,
            caller: "anonymous (insecure)".into(),
            listen_addr: "0.0.0.0:7770".into(),
            ha: Some(v1::HaStatus {
                store: "etcd".into(),
                coordinator: "coord-1".into(),
                role: "standby".into(),
                leader: if leads {
                    "coord-2".into()
                } else {
                    String::new()
                },
                leader_url: self.leader_url.clone(),
                term: 41,
                quorum: leads,
                etcd_error: if leads {
                    String::new()
                } else {
                    "no quorum: 1 of 3 members healthy".into()
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn refuse<T>(&self) -> Result<Response<T>, Status> {
        let message = if self.leader_url.is_empty() {
            "coordinator coord-1 is a standby and no coordinator leads (etcd has no quorum)"
        } else {
            "coordinator coord-1 is a standby; coord-2 leads"
        };
        Err(vigil_proto::standby_status(message, &self.leader_url))
    }
}

/// The whole impl, so `async_trait` sees the refusing methods after they are expanded.
macro_rules! standby_service {
    ($($method:ident: $req:ty => $resp:ty;)*) => {
        #[tonic::async_trait]
        impl v1::control_service_server::ControlService for Standby {
            async fn status(
                &self,
                _: Request<v1::StatusRequest>,
            ) -> Result<Response<v1::StatusResponse>, Status> {
                Ok(Response::new(self.status_response()))
            }

            $(
                async fn $method(&self, _: Request<$req>) -> Result<Response<$resp>, Status> {
                    self.refuse()
                }
            )*

            type WatchEventsStream = FakeStream<v1::ClusterEvent>;
            type JobLogsStream = FakeStream<v1::LogChunk>;
        }
    };
}

standby_service! {
    list_nodes: v1::ListNodesRequest => v1::ListNodesResponse;
    list_lemons: v1::ListLemonsRequest => v1::ListLemonsResponse;
    clear_lemon: v1::ClearLemonRequest => v1::ListLemonsResponse;
    get_node: v1::GetNodeRequest => v1::NodeDetail;
    cordon: v1::CordonRequest => v1::NodeSummary;
    uncordon: v1::UncordonRequest => v1::NodeSummary;
    diagnose: v1::DiagnoseRequest => v1::DiagnosticsRecord;
    submit_job: v1::SubmitJobRequest => v1::JobDetail;
    list_jobs: v1::ListJobsRequest => v1::ListJobsResponse;
    get_job: v1::GetJobRequest => v1::JobDetail;
    cancel_job: v1::CancelJobRequest => v1::JobDetail;
    restart_job: v1::RestartJobRequest => v1::JobDetail;
    get_recovery: v1::GetRecoveryRequest => v1::RecoveryResponse;
    confirm_recovery: v1::ConfirmRecoveryRequest => v1::RecoveryResponse;
    get_breaker: v1::GetBreakerRequest => v1::BreakerStatus;
    reset_breaker: v1::ResetBreakerRequest => v1::BreakerStatus;
    forget_node: v1::ForgetNodeRequest => v1::NodeSummary;
    drain: v1::DrainRequest => v1::DrainResponse;
    watch_events: v1::WatchEventsRequest => FakeStream<v1::ClusterEvent>;
    job_logs: v1::JobLogsRequest => FakeStream<v1::LogChunk>;
}

/// Serves a standby naming `leader_url` on 127.0.0.1:0 on `runtime`.
fn start_standby(runtime: &tokio::runtime::Runtime, leader_url: &str) -> String {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServiceServer::new(Standby {
                leader_url: leader_url.to_string(),
            }))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    url
}

fn list(urls: &[&str]) -> String {
    urls.join(",")
}

#[test]
fn every_command_goes_from_a_standby_to_its_leader() {
    let (rt, leader) = start_fake();
    let standby = start_standby(&rt, &leader);
    let both = list(&[&standby, &leader]);

    let nodes = stdout_json(&clusterctl(&both, &["-o", "json", "nodes"]));
    assert_eq!(nodes["nodes"][0]["name"], json!("gpu-003"));
    let cordoned = stdout_json(&clusterctl(
        &both,
        &["-o", "json", "cordon", "gpu-003", "--reason", "fan"],
    ));
    assert_eq!(cordoned["cordon"]["reason"], json!("fan"));
    // The coordinator's own refusals are final, through the standby too.
    let out = clusterctl(&both, &["node", "nope"]);
    assert_eq!(
        stderr(&out),
        "error: node \"nope\" not found (clusterctl nodes lists known nodes)\n"
    );
    // Streams: events, followed until the leader ends the stream, and job logs.
    let out = clusterctl(&both, &["events", "--follow"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Xid 79"));
    let out = clusterctl(&both, &["job", "logs", "j-1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from rank 1"));

    // The leader need not be listed: the standby's hint is followed, and --debug says so.
    let out = clusterctl(&standby, &["--debug", "-o", "json", "jobs"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "debug: {standby} is a standby; following its leader hint {leader} (not in --coordinator) with the same scheme and TLS settings"
        )),
        "{err}"
    );
}

#[test]
fn status_prefers_the_leader_a_standby_names() {
    let (rt, leader) = start_fake();
    let standby = start_standby(&rt, &leader);
    let status = stdout_json(&clusterctl(&standby, &["-o", "json", "status"]));
    assert_eq!(status["coordinator"]["url"], json!(leader));
    assert_eq!(status["ha"], json!(null));
}

#[test]
fn a_dead_address_is_passed_over() {
    let (_rt, leader) = start_fake();
    let out = clusterctl(&list(&[DEAD, &leader]), &["-o", "json", "nodes"]);
    assert_eq!(stdout_json(&out)["nodes"][1]["name"], json!("gpu-hot"));
    let status = stdout_json(&clusterctl(
        &list(&[DEAD, &leader]),
        &["-o", "json", "status"],
    ));
    assert_eq!(status["coordinator"]["url"], json!(leader));
}

#[test]
fn when_none_answers_one_line_names_each_address_and_why() {
    let started = std::time::SystemTime::now();
    let out = clusterctl(&list(&[DEAD, DEAD_TOO]), &["nodes"]);
    assert!(started.elapsed().unwrap_or_default() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "error: no coordinator answered: {DEAD}: connection refused; {DEAD_TOO}: connection refused; are the vigil-coordinators running?"
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let leaderless = start_standby(&rt, "");
    let out = clusterctl(
        &list(&[&leaderless, DEAD]),
        &["cordon", "n1", "--reason", "x"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.starts_with(&format!(
            "error: no coordinator answered: {leaderless}: standby, no leader (coordinator coord-1 is a standby and no coordinator leads (etcd has no quorum)); {DEAD}: connection refused; no coordinator leads"
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_leaderless_standby_still_answers_status() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let leaderless = start_standby(&rt, "");
    let out = clusterctl(&leaderless, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "leader       NONE: no coordinator leads (etcd: no quorum: 1 of 3 members healthy)\n"
        ),
        "{text}"
    );
    assert!(text.contains("(coord-1, standby, vigil 0.1.0"), "{text}");
    let status = stdout_json(&clusterctl(&leaderless, &["-o", "json", "status"]));
    assert_eq!(status["ha"]["role"], json!("standby"));
    assert_eq!(status["ha"]["leader"], json!(null));
    assert_eq!(status["ha"]["quorum"], json!(false));
}
