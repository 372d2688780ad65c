//! A rolled-back store ends the whole coordinator: an agent registering over gRPC with a mark
//! of this store beyond its last commit is refused, and `run` returns the damaged-store error
//! that makes `vigil-coordinator` exit 65.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vigil_coordinator::error::EXIT_DATAERR;
use vigil_coordinator::store::{Memory, StoreError};
use vigil_coordinator::{Config, CoordinatorError};
use vigil_proto::v1::agent_message::Body;
use vigil_proto::v1::agent_service_client::AgentServiceClient;
use vigil_proto::v1::coordinator_message::Body as Reply;
use vigil_proto::v1::{self, AgentMessage};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn register(node: &str, last_store_id: &str, last_store_seq: u64) -> AgentMessage {
    AgentMessage {
        seq: 1,
        body: Some(Body::Register(v1::Register {
            protocol_version: vigil_proto::PROTOCOL_VERSION,
            node_name: node.into(),
            hostname: node.into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            gpu_backend: v1::GpuBackend::Simulated as i32,
            last_store_id: last_store_id.into(),
            last_store_seq,
            ..Default::default()
        })),
    }
}

/// Opens an agent stream, sends `msg`, returns the coordinator's first answer.
async fn first_answer(
    url: &str,
    msg: AgentMessage,
) -> Result<Option<Reply>, Box<dyn std::error::Error>> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect()
        .await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg).await?;
    let mut inbound = AgentServiceClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = inbound.message().await?;
    drop(tx);
    Ok(first.and_then(|m| m.body))
}

#[tokio::test]
async fn an_agent_told_of_a_later_commit_stops_the_coordinator_with_exit_65() -> TestResult {
    let memory = Memory::new();
    let config = Config {
        insecure: true,
        ..Config::default()
    };
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", grpc.local_addr()?);
    let metrics = TcpListener::bind("127.0.0.1:0").await?;
    let (_shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vigil_coordinator::run(
        config,
        memory.store(),
        grpc,
        metrics,
        async move {
            shutdown_rx.await.ok();
        },
    ));
    // A node that knows this store up to where it is: accepted, told the store's mark.
    let first = first_answer(&url, register("n0", "", 0)).await?;
    let Some(Reply::Registered(registered)) = first else {
        return Err(format!("n0 should be registered: {first:?}").into());
    };
    let mark = memory.mark();
    assert_eq!(registered.store_id, mark.store_id);
    assert!(registered.store_seq >= 1 && registered.store_seq <= mark.seq);
    // One told of a commit this store never made: the store was rolled back.
    let told = mark.seq + 5;
    let first = first_answer(&url, register("n1", &mark.store_id, told)).await?;
    let Some(Reply::Rejected(rejected)) = first else {
        return Err(format!("n1 should be refused: {first:?}").into());
    };
    assert!(
        rejected.reason.contains("rolled back"),
        "{}",
        rejected.reason
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), server).await??;
    let Err(e) = ended else {
        return Err("run should end with an error".into());
    };
    assert!(e.is_damaged_store(), "{e}");
    assert_eq!(EXIT_DATAERR, 65);
    let CoordinatorError::Store(StoreError::Damaged { what, .. }) = &e else {
        return Err(format!("not a damaged store: {e}").into());
    };
    assert!(
        what.contains(&format!("agent n1 was told of commit {told}")),
        "{what}"
    );
    assert!(e.to_string().contains("restore"), "{e}");
    assert_eq!(
        memory.mark().seq,
        mark.seq,
        "n1's registration was not committed"
    );
    Ok(())
}
