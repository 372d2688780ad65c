//! The gRPC services of a coordinator that does not lead.
//!
//! Agents are refused with FAILED_PRECONDITION and the leader's URL in the
//! `vigil-leader` metadata; so is every clusterctl call but `Status`, which a
//! standby answers itself (who leads, the coordinators, etcd's health), since
//! it is the one call that must work while nobody leads.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use vigil_proto::{standby_status, v1};

use super::HaView;
use crate::access::authorize;
use vigil_tls::Role;

/// FAILED_PRECONDITION naming who leads, with their URL in `vigil-leader` (the protocol's
/// `standby_status`, which the agent and clusterctl read back with `standby_refusal`).
pub fn not_leader(view: &HaView) -> Status {
    let me = &view.me().name;
    let (message, url) = match view.leader() {
        Some(l) if !l.url.is_empty() => (
            format!(
                "coordinator {me} is a standby; the leader is {} at {} (term {}): connect there",
                l.name, l.url, l.term
            ),
            l.url,
        ),
        _ => (
            format!(
                "coordinator {me} is a standby and no coordinator leads right now (etcd \
                 unreachable or without quorum, or an election under way); retry shortly, and \
                 see `clusterctl status`"
            ),
            String::new(),
        ),
    };
    standby_status(message, &url)
}

#[derive(Clone)]
pub struct StandbyAgents {
    pub view: Arc<HaView>,
}

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for StandbyAgents {
    type ConnectStream = ReceiverStream<Result<v1::CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        _request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        Err(not_leader(&self.view))
    }
}

#[derive(Clone)]
pub struct StandbyControl {
    pub view: Arc<HaView>,
    pub listen: SocketAddr,
    pub insecure: bool,
    pub started: Instant,
    pub started_unix_ms: u64,
}

/// Every call but `Status`: sent to the leader. Written in the form
/// `async_trait` expands to, since that attribute runs before this macro does.
macro_rules! redirect {
    ($($name:ident($req:ty) -> $resp:ty;)*) => {
        $(
            fn $name<'life0, 'async_trait>(
                &'life0 self,
                _request: Request<$req>,
            ) -> std::pin::Pin<
                Box<dyn Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>,
            >
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                let status = not_leader(&self.view);
                Box::pin(async move { Err(status) })
            }
        )*
    };
}

#[tonic::async_trait]
impl v1::control_service_server::ControlService for StandbyControl {
    type WatchEventsStream = ReceiverStream<Result<v1::ClusterEvent, Status>>;
    type JobLogsStream = ReceiverStream<Result<v1::LogChunk, Status>>;

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let caller = authorize(&request, Role::Viewer, "status").map_err(Status::from)?;
        Ok(Response::new(v1::StatusResponse {
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_unix_ms: self.started_unix_ms,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            listen_addr: self.listen.to_string(),
            insecure: self.insecure,
            caller: caller.actor,
            ha: Some(self.view.status()),
            ..Default::default()
        }))
    }

    redirect! {
        list_nodes(v1::ListNodesRequest) -> v1::ListNodesResponse;
        get_node(v1::GetNodeRequest) -> v1::NodeDetail;
        cordon(v1::CordonRequest) -> v1::NodeSummary;
        uncordon(v1::UncordonRequest) -> v1::NodeSummary;
        diagnose(v1::DiagnoseRequest) -> v1::DiagnosticsRecord;
        submit_job(v1::SubmitJobRequest) -> v1::JobDetail;
        list_jobs(v1::ListJobsRequest) -> v1::ListJobsResponse;
        get_job(v1::GetJobRequest) -> v1::JobDetail;
        cancel_job(v1::CancelJobRequest) -> v1::JobDetail;
        watch_events(v1::WatchEventsRequest) -> Self::WatchEventsStream;
        drain(v1::DrainRequest) -> v1::DrainResponse;
        job_logs(v1::JobLogsRequest) -> Self::JobLogsStream;
        list_lemons(v1::ListLemonsRequest) -> v1::ListLemonsResponse;
        clear_lemon(v1::ClearLemonRequest) -> v1::ListLemonsResponse;
        restart_job(v1::RestartJobRequest) -> v1::JobDetail;
        get_recovery(v1::GetRecoveryRequest) -> v1::RecoveryResponse;
        confirm_recovery(v1::ConfirmRecoveryRequest) -> v1::RecoveryResponse;
        get_breaker(v1::GetBreakerRequest) -> v1::BreakerStatus;
        reset_breaker(v1::ResetBreakerRequest) -> v1::BreakerStatus;
        forget_node(v1::ForgetNodeRequest) -> v1::NodeSummary;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::view::{CoordinatorRecord, Leader};
    use vigil_proto::LEADER_METADATA;

    fn view() -> HaView {
        HaView::new(CoordinatorRecord {
            name: "c2".into(),
            url: "http://c2:7770".into(),
            version: "0".into(),
            started_at_unix_ms: 0,
        })
    }

    #[test]
    fn a_standby_names_the_leader_and_its_url() {
        let v = view();
        v.set_leader(Some(Leader {
            name: "c1".into(),
            url: "http://c1:7770".into(),
            term: 42,
            since_unix_ms: 1,
        }));
        let s = not_leader(&v);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(
            s.message()
                .contains("the leader is c1 at http://c1:7770 (term 42)"),
            "{}",
            s.message()
        );
        assert_eq!(
            s.metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("http://c1:7770")
        );
    }

    #[test]
    fn without_a_leader_the_hint_is_empty_and_says_why() {
        let s = not_leader(&view());
        assert!(
            s.message().contains("no coordinator leads"),
            "{}",
            s.message()
        );
        assert_eq!(
            s.metadata()
                .get(LEADER_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("")
        );
    }
}
