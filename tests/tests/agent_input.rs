//! Hostile agent input against a real coordinator over real sockets: oversized, undecodable and
//! invalid messages are refused and counted, a flooding agent is throttled and flagged, reports
//! about work that is not the node's are ignored, and the real agents stay Ready throughout.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use vigil_proto::v1::{
    self, AgentMessage, CoordinatorMessage, agent_event::Kind, agent_message::Body,
    agent_service_client::AgentServiceClient, coordinator_message::Body as CBody,
};
use vigil_tests::{Cluster, LONG, clusterctl, http_get, metric, wait_for};

/// Fast liveness, and a low stream rate so a flood is quick to provoke.
const CONFIG: &str = r#"
[liveness]
heartbeat_interval = "200ms"
unreachable_after = "1s"
lost_after = "3s"
agent_lease = "2s"

[limits]
agent_messages_per_second = 20
agent_message_burst = 20
"#;

/// A message whose field 2 (`AgentMessage.register`, a length-delimited message) is sent as a
/// varint: valid protobuf framing, but not an `AgentMessage`.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAnAgentMessage {
    #[prost(uint64, tag = "2")]
    register: u64,
}

async fn channel(url: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?.connect().await?)
}

fn register(name: &str) -> AgentMessage {
    AgentMessage {
        seq: 1,
        body: Some(Body::Register(v1::Register {
            protocol_version: vigil_proto::PROTOCOL_VERSION,
            node_name: name.into(),
            hostname: name.into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            gpu_backend: v1::GpuBackend::Simulated as i32,
            gpus: Vec::new(),
            workers: Vec::new(),
            sent_at_unix_ms: 0,
            ..Default::default()
        })),
    }
}

/// Open a raw agent stream; returns its sender and the coordinator's first answer (or the
/// stream's error, as text).
async fn open(
    url: &str,
    first: AgentMessage,
) -> Result<(
    mpsc::Sender<AgentMessage>,
    Result<CoordinatorMessage, String>,
)> {
    let mut client = AgentServiceClient::new(channel(url).await?)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(vigil_proto::MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(1024);
    tx.send(first).await?;
    let mut inbound = client.connect(ReceiverStream::new(rx)).await?.into_inner();
    let answer = match tokio::time::timeout(LONG, inbound.next()).await {
        Ok(Some(Ok(m))) => Ok(m),
        Ok(Some(Err(s))) => Err(s.to_string()),
        Ok(None) => Err("stream ended".into()),
        Err(_) => bail!("no answer from the coordinator"),
    };
    // Keep reading (acks, commands) so the coordinator never blocks on this session.
    tokio::spawn(async move { while let Some(Ok(_)) = inbound.next().await {} });
    Ok((tx, answer))
}

fn registered(answer: &Result<CoordinatorMessage, String>) -> bool {
    matches!(
        answer,
        Ok(CoordinatorMessage {
            body: Some(CBody::Registered(_)),
            ..
        })
    )
}

fn rejected_reason(answer: &Result<CoordinatorMessage, String>) -> String {
    match answer {
        Ok(CoordinatorMessage {
            body: Some(CBody::Rejected(r)),
            ..
        }) => r.reason.clone(),
        other => format!("not rejected: {other:?}"),
    }
}

fn counter(cluster: &Cluster, series: &str) -> Result<f64> {
    let text = http_get(cluster.coordinator.metrics, "/metrics")?;
    metric(&text, series).with_context(|| format!("no {series} in /metrics"))
}

fn others_ready(cluster: &Cluster) -> Result<()> {
    let nodes = vigil_tests::nodes(&cluster.url())?;
    for name in ["node-0", "node-1"] {
        let state = &nodes[name]["availability"];
        if state != "Ready" {
            bail!("{name} is {state} while another agent misbehaves");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_agent_input_is_refused_counted_and_harms_no_other_agent() -> Result<()> {
    let cluster = Cluster::start(CONFIG, 2)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", 2))?;
    let url = cluster.url();

    // 1. Oversized: a registration of 5 MiB, over the 4 MiB message limit.
    let mut huge = register("huge");
    if let Some(Body::Register(r)) = &mut huge.body {
        r.hostname = "h".repeat(5 * 1024 * 1024);
    }
    let (_tx, answer) = open(&url, huge).await?;
    let reason = rejected_reason(&answer);
    assert!(reason.contains("too large"), "{reason}");
    others_ready(&cluster)?;

    // 2. Malformed: bytes that are not an AgentMessage at all.
    let mut grpc = tonic::client::Grpc::new(channel(&url).await?);
    grpc.ready().await?;
    let codec = tonic_prost::ProstCodec::<NotAnAgentMessage, CoordinatorMessage>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/vigil.v1.AgentService/Connect");
    let garbage = tokio_stream::iter(vec![NotAnAgentMessage { register: 7 }]);
    let mut answers = grpc
        .streaming(tonic::Request::new(garbage), path, codec)
        .await?
        .into_inner();
    let first = tokio::time::timeout(LONG, answers.next()).await?;
    let reason = match first {
        Some(Ok(m)) => rejected_reason(&Ok(m)),
        other => format!("{other:?}"),
    };
    assert!(reason.contains("failed to decode"), "{reason}");

    // 3. Invalid: a well-formed registration as a node name that escapes a path.
    let (_tx, answer) = open(&url, register("../../etc/passwd")).await?;
    let reason = rejected_reason(&answer);
    assert!(
        reason.contains("node_name") && reason.contains("63"),
        "{reason}"
    );
    let nodes = vigil_tests::nodes(&url)?;
    assert_eq!(nodes.len(), 2, "no node appeared: {:?}", nodes.keys());
    others_ready(&cluster)?;

    // 4. A registered agent reporting another job's work, then flooding its stream.
    let (tx, answer) = open(&url, register("flooder")).await?;
    assert!(registered(&answer), "{answer:?}");
    let exited = AgentMessage {
        seq: 2,
        body: Some(Body::Event(v1::AgentEvent {
            at_unix_ms: 1,
            kind: Some(Kind::WorkerExited(v1::WorkerExited {
                job_id: "someone-elses-1".into(),
                attempt: 1,
                exit_code: Some(1),
                ..Default::default()
            })),
        })),
    };
    tx.send(exited).await?;
    let bad_checkpoint = AgentMessage {
        seq: 3,
        body: Some(Body::Event(v1::AgentEvent {
            at_unix_ms: 1,
            kind: Some(Kind::Checkpoint(v1::CheckpointSeen {
                job_id: "someone-elses-1".into(),
                attempt: 1,
                path: "/ckpt/x/../../../etc".into(),
                step: Some(1),
                ..Default::default()
            })),
        })),
    };
    tx.send(bad_checkpoint).await?;
    let flood = tokio::spawn(async move {
        for seq in 4..400u64 {
            let hb = AgentMessage {
                seq,
                body: Some(Body::Heartbeat(v1::Heartbeat::default())),
            };
            if tx.send(hb).await.is_err() {
                break;
            }
        }
        tx
    });
    wait_for("the flood to be throttled", LONG, || {
        let n = counter(
            &cluster,
            "vigil_agent_messages_throttled_total{node=\"flooder\"}",
        )
        .unwrap_or(0.0);
        Ok((n >= 50.0).then_some(()))
    })?;
    others_ready(&cluster)?;
    let detail = clusterctl(&url, &["-o", "json", "node", "flooder"])?.json()?;
    let flagged = detail["events"].as_array().is_some_and(|a| {
        a.iter().any(|e| {
            e["kind"] == "throttled"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("20 messages/s"))
        })
    });
    assert!(flagged, "no throttled event on the node: {detail}");

    for (series, at_least) in [
        (
            "vigil_agent_messages_rejected_total{reason=\"oversized\"}",
            1.0,
        ),
        (
            "vigil_agent_messages_rejected_total{reason=\"malformed\"}",
            1.0,
        ),
        (
            "vigil_agent_messages_rejected_total{reason=\"invalid_register\"}",
            1.0,
        ),
        (
            "vigil_agent_messages_rejected_total{reason=\"invalid_event\"}",
            1.0,
        ),
        (
            "vigil_agent_reports_ignored_total{reason=\"unknown_job\"}",
            1.0,
        ),
    ] {
        let n = counter(&cluster, series)?;
        assert!(n >= at_least, "{series} = {n}");
    }
    let text = http_get(cluster.coordinator.metrics, "/metrics")?;
    assert_eq!(
        metric(
            &text,
            "vigil_node_availability_transitions_total{to=\"Unreachable\"}"
        )
        .unwrap_or(0.0),
        0.0,
        "no node went unreachable"
    );
    let log = cluster.coordinator.log_text();
    assert!(log.contains("agent stream throttled"), "{log}");
    assert!(log.contains("not assigned to its node"), "{log}");

    drop(flood.await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    others_ready(&cluster)?;
    Ok(())
}

#[test]
fn a_job_outside_the_agents_allowed_roots_is_refused_and_shows_why() -> Result<()> {
    let cluster = vigil_tests::jobs::start(1)?;
    // Operator input over the limits is refused by name before it touches state.
    let url = cluster.url();
    let out = clusterctl(&url, &["cordon", "../node-0", "--reason", "x"])?;
    assert!(
        !out.success() && out.stderr.contains("1-63"),
        "{}",
        out.stderr
    );
    let long_id = "j".repeat(300);
    let out = clusterctl(&url, &["job", "show", &long_id])?;
    assert!(
        !out.success() && out.stderr.contains("at most 128"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.len() < 1000,
        "the id is not echoed: {}",
        out.stderr.len()
    );
    let out = clusterctl(&url, &["cordon", "node-0", "--reason", &"r".repeat(2000)])?;
    assert!(
        !out.success() && out.stderr.contains("1024"),
        "{}",
        out.stderr
    );
    let huge_env = format!(", BIG = \"{}\"", "x".repeat(40 * 1024));
    let path = vigil_tests::write_file(
        cluster.dir.path(),
        "huge.toml",
        &vigil_tests::jobs::spec(&cluster, 1, 0, &huge_env, "")?,
    )?;
    let out = clusterctl(&url, &["job", "submit", &path.to_string_lossy()])?;
    assert!(
        !out.success() && out.stderr.contains("env is"),
        "{}",
        out.stderr
    );
    assert!(counter(&cluster, "vigil_job_specs_rejected_total")? >= 1.0);
    assert_eq!(cluster.node("node-0")?["state"], "Ready", "nothing changed");
    // The test agents allow only the cluster's own directory; its parent is outside.
    let outside = cluster
        .dir
        .path()
        .parent()
        .context("temp dir has a parent")?
        .display()
        .to_string();
    let work = cluster.dir.path().join("work").display().to_string();
    let spec = vigil_tests::jobs::spec(&cluster, 1, 0, "", "")?.replace(
        &format!("workdir = \"{work}\""),
        &format!("workdir = \"{outside}\""),
    );
    assert!(spec.contains(&format!("workdir = \"{outside}\"")), "{spec}");
    let id = cluster.submit(&spec)?;
    let job = cluster.wait_job(&id, "the refusal to show on the job", |j| {
        vigil_tests::jobs::attempts(j).iter().any(|a| {
            a["reason"]
                .as_str()
                .is_some_and(|r| r.contains("outside workers.allowed_roots"))
        })
    })?;
    let reason = vigil_tests::jobs::attempts(&job)[0]["reason"].to_string();
    assert!(
        reason.contains("workdir") && reason.contains(&outside),
        "{reason}"
    );
    let log = cluster.agents[0].log_text();
    assert!(log.contains("outside this node's limits"), "{log}");
    Ok(())
}

/// This release's version with the minor number moved by `by` (outside the window at 2).
fn release_off_by(by: i64) -> String {
    let this = vigil_proto::compat::this_release();
    let minor = this.minor.saturating_add_signed(by);
    format!("{}.{minor}.0", this.major)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_or_clusterctl_outside_the_version_window_is_refused_naming_both_versions()
-> Result<()> {
    let cluster = Cluster::start(CONFIG, 2)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", 2))?;
    let url = cluster.url();
    let this = env!("CARGO_PKG_VERSION");

    // An agent two minor versions ahead, and one that says no version at all.
    for (name, version) in [
        ("future", release_off_by(2)),
        ("nameless", "dev".to_owned()),
    ] {
        let mut reg = register(name);
        if let Some(Body::Register(r)) = &mut reg.body {
            r.agent_version.clone_from(&version);
        }
        let (_tx, answer) = open(&url, reg).await?;
        let rejected = match &answer {
            Ok(CoordinatorMessage {
                body: Some(CBody::Rejected(r)),
                ..
            }) => r.clone(),
            other => bail!("{name}: not rejected: {other:?}"),
        };
        assert!(
            rejected.reason.contains(&version) && rejected.reason.contains(this),
            "{name}: {}",
            rejected.reason
        );
        let fix = if name == "future" {
            "upgrade the coordinators to"
        } else {
            "install a released agent"
        };
        assert!(rejected.reason.contains(fix), "{}", rejected.reason);
        assert_eq!(rejected.retry_after_ms, 60_000, "{name} waits a minute");
    }
    // One minor behind is inside the window: registered.
    let mut old = register("previous");
    if let Some(Body::Register(r)) = &mut old.body {
        r.agent_version = release_off_by(-1);
    }
    let (_tx, answer) = open(&url, old).await?;
    assert!(registered(&answer), "{answer:?}");
    // Listed from the coordinator's next publication (100 ms).
    let nodes = wait_for("the previous release's agent listed", LONG, || {
        let nodes = vigil_tests::nodes(&url)?;
        Ok(nodes.contains_key("previous").then_some(nodes))
    })?;
    assert!(!nodes.contains_key("future") && !nodes.contains_key("nameless"));
    others_ready(&cluster)?;
    assert_eq!(
        counter(
            &cluster,
            "vigil_agent_messages_rejected_total{reason=\"version_skew\"}"
        )?,
        2.0
    );

    // A clusterctl two minor versions ahead: refused before its call does anything.
    let mut control = v1::control_service_client::ControlServiceClient::new(channel(&url).await?);
    let mut request = tonic::Request::new(v1::CordonRequest {
        name: "node-0".into(),
        reason: "from the future".into(),
    });
    request.metadata_mut().insert(
        vigil_proto::compat::CLIENT_VERSION_METADATA,
        release_off_by(2).parse()?,
    );
    let status = control
        .cordon(request)
        .await
        .expect_err("a far newer clusterctl is refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains(&release_off_by(2)) && status.message().contains(this),
        "{}",
        status.message()
    );
    assert_eq!(cluster.node("node-0")?["cordon"], serde_json::Value::Null);
    Ok(())
}
