//! `ControlService`: what clusterctl asks. Reads come from the engine's
//! snapshot; changes go through the engine and return once persisted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::warn;
use vigil_proto::v1;

use vigil_tls::Role;

use crate::access::{Caller, authorize};
use crate::agent_service::valid_node_name;
use crate::api::slurm_job_view;
use crate::config::MAX_DIAGNOSTICS_TIMEOUT;
use crate::control_streams::{self, EventStream, LogStream};
use crate::engine::{EngineHandle, Event};
use crate::error::ControlError;
use crate::health::Condition;
use crate::job_view;
use crate::metrics::Metrics;
use crate::metrics::security::CallLabel;
use crate::metrics::unix_ms;
use crate::node::{Node, NodeState};
use crate::node_view::{detail, diagnostics, millis, summary};

use crate::limits::MAX_OPERATOR_REASON as MAX_REASON;

pub struct ControlService {
    engine: EngineHandle,
    metrics: Arc<Metrics>,
    diagnostics_timeout: Duration,
    started: Instant,
    started_unix_ms: u64,
    listen_addr: SocketAddr,
    insecure: bool,
    /// The coordinators and etcd, with HA; `None`: a single coordinator (SQLite).
    ha: Option<Arc<crate::ha::HaView>>,
    /// With `[slurm]`: the drains administrators set in Slurm (the Slurm adapter holds the
    /// sender); `None` without `[slurm]`.
    slurm_drains: Option<crate::slurm::AdminDrains>,
}

impl ControlService {
    /// Status shows the coordinators and etcd's health (see `ha`).
    pub fn with_ha(mut self, ha: Option<Arc<crate::ha::HaView>>) -> Self {
        self.ha = ha;
        self
    }

    /// `nodes` and `node` show the drains administrators set in Slurm (see `slurm`).
    pub fn with_slurm_drains(mut self, drains: Option<crate::slurm::AdminDrains>) -> Self {
        self.slurm_drains = drains;
        self
    }

    /// `summary` with the Slurm drain an administrator set on the node, if any.
    fn with_slurm_drain(&self, mut summary: v1::NodeSummary) -> v1::NodeSummary {
        if let Some(drains) = &self.slurm_drains
            && let Some(reason) = drains.borrow().get(&summary.name)
        {
            summary.slurm_drain_reason.clone_from(reason);
        }
        summary
    }

    pub fn new(
        engine: EngineHandle,
        metrics: Arc<Metrics>,
        listen_addr: SocketAddr,
        diagnostics_timeout: Duration,
        insecure: bool,
    ) -> Self {
        Self {
            engine,
            metrics,
            diagnostics_timeout,
            started: Instant::now(),
            started_unix_ms: unix_ms(SystemTime::now()),
            listen_addr,
            insecure,
            ha: None,
            slurm_drains: None,
        }
    }

    /// A node as an operator's call leaves it (with its held cordon, if any).
    fn summary(&self, node: &Node) -> v1::NodeSummary {
        let snap = self.engine.snapshot();
        summary(node, snap.held(&node.record.name), self.engine.now().mono)
    }

    /// The caller, if their role allows `call`; a refusal is logged and counted.
    fn allow<T>(&self, request: &Request<T>, needed: Role, call: &str) -> Result<Caller, Status> {
        authorize(request, needed, call).map_err(|e| {
            warn!(call, error = %e, "refused clusterctl call");
            self.metrics
                .security
                .calls_denied
                .get_or_create(&CallLabel {
                    call: call.to_owned(),
                })
                .inc();
            Status::from(e)
        })
    }
}

fn check_name(name: &str) -> Result<(), ControlError> {
    if valid_node_name(name) {
        Ok(())
    } else {
        Err(ControlError::InvalidArgument(
            crate::limits::node_name_error("node name", name),
        ))
    }
}

#[tonic::async_trait]
impl v1::control_service_server::ControlService for ControlService {
    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        let caller = self.allow(&request, Role::Viewer, "status")?;
        let snap = self.engine.snapshot();
        let now = self.engine.now().mono;
        let mut counts = [0u32; NodeState::ALL.len()];
        for n in &snap.nodes {
            counts[n.display_state() as usize] += 1;
        }
        let total = |f: fn(&Node) -> u32| snap.nodes.iter().map(f).sum::<u32>();
        Ok(Response::new(v1::StatusResponse {
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_unix_ms: self.started_unix_ms,
            uptime_ms: millis(self.started.elapsed()),
            listen_addr: self.listen_addr.to_string(),
            nodes_by_state: NodeState::ALL
                .iter()
                .zip(counts)
                .map(|(s, count)| v1::StateCount {
                    state: s.as_str().to_owned(),
                    count,
                })
                .collect(),
            nodes_total: u32::try_from(snap.nodes.len()).unwrap_or(u32::MAX),
            gpus_healthy: total(Node::gpus_healthy),
            gpus_total: total(Node::gpus_total),
            cordoned: snap
                .nodes
                .iter()
                .filter(|n| n.cordoned())
                .map(|n| self.with_slurm_drain(summary(n, snap.held(&n.record.name), now)))
                .collect(),
            nodes_simulated: total(|n| u32::from(n.record.simulated)),
            degraded: snap
                .nodes
                .iter()
                .filter(|n| !n.cordoned() && n.condition != Condition::Healthy)
                .map(|n| summary(n, snap.held(&n.record.name), now))
                .collect(),
            insecure: self.insecure,
            caller: caller.actor,
            ha: Some(match &self.ha {
                Some(view) => view.status(),
                None => crate::ha::view::single_status(self.started_unix_ms),
            }),
            recovery: crate::recovery_view::of(&snap),
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        self.allow(&request, Role::Viewer, "nodes")?;
        let snap = self.engine.snapshot();
        let now = self.engine.now().mono;
        Ok(Response::new(v1::ListNodesResponse {
            nodes: snap
                .nodes
                .iter()
                .map(|n| self.with_slurm_drain(summary(n, snap.held(&n.record.name), now)))
                .collect(),
        }))
    }

    async fn get_node(
        &self,
        request: Request<v1::GetNodeRequest>,
    ) -> Result<Response<v1::NodeDetail>, Status> {
        self.allow(&request, Role::Viewer, "node")?;
        let name = request.into_inner().name;
        check_name(&name)?;
        let snap = self.engine.snapshot();
        let node = snap
            .nodes
            .iter()
            .find(|n| n.record.name == name)
            .ok_or(ControlError::State(crate::state::StateError::UnknownNode(
                name,
            )))?;
        let mut detail = detail(node, snap.held(&node.record.name), self.engine.now().mono);
        detail.summary = detail.summary.map(|s| self.with_slurm_drain(s));
        Ok(Response::new(detail))
    }

    async fn cordon(
        &self,
        request: Request<v1::CordonRequest>,
    ) -> Result<Response<v1::NodeSummary>, Status> {
        let caller = self.allow(&request, Role::Admin, "cordon")?;
        let v1::CordonRequest { name, reason } = request.into_inner();
        check_name(&name)?;
        let reason = reason.trim().to_owned();
        if reason.is_empty() {
            return Err(ControlError::InvalidArgument(
                "reason is empty: say why the node is cordoned (clusterctl cordon NAME --reason TEXT)".into(),
            )
            .into());
        }
        if reason.len() > MAX_REASON {
            return Err(ControlError::InvalidArgument(format!(
                "reason is {} bytes; keep it under {MAX_REASON}",
                reason.len()
            ))
            .into());
        }
        let node = self
            .engine
            .ask(|reply| Event::Cordon {
                node: name,
                reason,
                actor: caller.actor,
                reply,
            })
            .await?;
        Ok(Response::new(self.summary(&node)))
    }

    async fn uncordon(
        &self,
        request: Request<v1::UncordonRequest>,
    ) -> Result<Response<v1::NodeSummary>, Status> {
        let caller = self.allow(&request, Role::Admin, "uncordon")?;
        let v1::UncordonRequest { name, force } = request.into_inner();
        check_name(&name)?;
        let node = self
            .engine
            .ask(|reply| Event::Uncordon {
                node: name,
                force,
                actor: caller.actor,
                reply,
            })
            .await?;
        Ok(Response::new(self.summary(&node)))
    }

    async fn submit_job(
        &self,
        request: Request<v1::SubmitJobRequest>,
    ) -> Result<Response<v1::JobDetail>, Status> {
        let caller = self.allow(&request, Role::Admin, "job submit")?;
        if self.slurm_drains.is_some() {
            return Err(Status::failed_precondition(
                "this coordinator runs with [slurm]: Slurm runs the jobs and vigil launches \
                 nothing; submit with sbatch (docs/slurm.md)",
            ));
        }
        let v1::SubmitJobRequest { spec_toml, source } = request.into_inner();
        let job = self
            .engine
            .ask(|reply| Event::SubmitJob {
                spec_toml,
                source,
                actor: caller.actor,
                reply,
            })
            .await?;
        Ok(Response::new(job_view::detail(&job)))
    }

    async fn list_jobs(
        &self,
        request: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        self.allow(&request, Role::Viewer, "jobs")?;
        let snap = self.engine.snapshot();
        let mut jobs: Vec<_> = snap.jobs.iter().collect();
        jobs.sort_by_key(|j| j.seq);
        let mut slurm: Vec<_> = snap.slurm_jobs.jobs.values().collect();
        slurm.sort_by_key(|r| r.runs.first().map(|run| run.started_ms));
        Ok(Response::new(v1::ListJobsResponse {
            jobs: jobs
                .into_iter()
                .map(job_view::summary)
                .chain(slurm.into_iter().map(slurm_job_view::summary))
                .collect(),
        }))
    }

    async fn get_job(
        &self,
        request: Request<v1::GetJobRequest>,
    ) -> Result<Response<v1::JobDetail>, Status> {
        self.allow(&request, Role::Viewer, "job show")?;
        let id = request.into_inner().id;
        crate::limits::check_job_id_arg(&id).map_err(ControlError::InvalidArgument)?;
        let snap = self.engine.snapshot();
        if let Some(record) = slurm_job_view::find(&snap.slurm_jobs, &id) {
            let now = self.engine.now().wall_ms;
            return Ok(Response::new(slurm_job_view::detail_at(record, now)));
        }
        let job = snap
            .jobs
            .iter()
            .find(|j| j.id == id)
            .ok_or(ControlError::State(crate::state::StateError::UnknownJob(
                id.clone(),
            )))?;
        let mut detail = job_view::detail(job);
        if job.attempts.iter().any(|a| !a.evidence_from.is_empty()) {
            match self.engine.evidence(&id).await {
                Ok(stored) => job_view::add_evidence(&mut detail, stored),
                // The job is shown without it: its history still names the suspect.
                Err(e) => warn!(job = %id, error = %e, "cannot read the job's hang evidence"),
            }
        }
        Ok(Response::new(detail))
    }

    async fn cancel_job(
        &self,
        request: Request<v1::CancelJobRequest>,
    ) -> Result<Response<v1::JobDetail>, Status> {
        let caller = self.allow(&request, Role::Admin, "job cancel")?;
        let id = request.into_inner().id;
        crate::limits::check_job_id_arg(&id).map_err(ControlError::InvalidArgument)?;
        slurm_job_view::refuse(&id, "scancel")?;
        let job = self
            .engine
            .ask(|reply| Event::CancelJob {
                id,
                actor: caller.actor,
                reply,
            })
            .await?;
        Ok(Response::new(job_view::detail(&job)))
    }

    async fn list_lemons(
        &self,
        request: Request<v1::ListLemonsRequest>,
    ) -> Result<Response<v1::ListLemonsResponse>, Status> {
        self.allow(&request, Role::Viewer, "nodes --lemons")?;
        let snap = self.engine.snapshot();
        let now_ms = crate::metrics::unix_ms(std::time::SystemTime::now());
        Ok(Response::new(crate::lemon_view::listing(
            &snap.lemons,
            now_ms,
        )))
    }

    async fn clear_lemon(
        &self,
        request: Request<v1::ClearLemonRequest>,
    ) -> Result<Response<v1::ListLemonsResponse>, Status> {
        let caller = self.allow(&request, Role::Admin, "uncordon --clear-lemon")?;
        let subject = request.into_inner().subject;
        if subject.is_empty() || subject.len() > 256 {
            return Err(ControlError::InvalidArgument(
                "lemon subject must be a node name, host/NAME, gpu/SERIAL or a GPU serial (1-256 characters)".into(),
            )
            .into());
        }
        let cleared = self
            .engine
            .ask(|reply| Event::ClearLemon {
                subject,
                actor: caller.actor,
                reply,
            })
            .await?;
        let snap = self.engine.snapshot();
        let now_ms = crate::metrics::unix_ms(std::time::SystemTime::now());
        Ok(Response::new(crate::lemon_view::cleared(
            &snap.lemons,
            &cleared,
            now_ms,
        )))
    }

    async fn restart_job(
        &self,
        request: Request<v1::RestartJobRequest>,
    ) -> Result<Response<v1::JobDetail>, Status> {
        let caller = self.allow(&request, Role::Admin, "job restart")?;
        let r = request.into_inner();
        slurm_job_view::refuse(&r.id, "scontrol requeue")?;
        let (id, from_step) = (r.id, r.from_checkpoint_step);
        let env = r.env.into_iter().collect();
        let job = self
            .engine
            .ask(|reply| Event::RestartJob {
                id,
                from_step,
                env,
                actor: caller.actor,
                reply,
            })
            .await?;
        Ok(Response::new(job_view::detail(&job)))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.allow(&request, Role::Viewer, "events")?;
        let req = request.into_inner();
        if !req.node.is_empty() {
            check_name(&req.node)?;
        }
        Ok(Response::new(control_streams::watch_events(
            &self.engine,
            self.metrics.clone(),
            req,
        )))
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        let caller = self.allow(&request, Role::Admin, "drain")?;
        let v1::DrainRequest { name, reason } = request.into_inner();
        check_name(&name)?;
        let reason = match reason.trim() {
            "" => "drained by operator".to_owned(),
            r if r.len() > MAX_REASON => {
                return Err(ControlError::InvalidArgument(format!(
                    "reason is {} bytes; keep it under {MAX_REASON}",
                    r.len()
                ))
                .into());
            }
            r => r.to_owned(),
        };
        let (node, jobs) = self
            .engine
            .ask(|reply| Event::Drain {
                node: name,
                reason,
                actor: caller.actor,
                reply,
            })
            .await?;
        Ok(Response::new(v1::DrainResponse {
            node: Some(self.summary(&node)),
            jobs_restarted: jobs,
        }))
    }

    type JobLogsStream = LogStream;

    async fn job_logs(
        &self,
        request: Request<v1::JobLogsRequest>,
    ) -> Result<Response<Self::JobLogsStream>, Status> {
        self.allow(&request, Role::Viewer, "job logs")?;
        let stream =
            control_streams::job_logs(&self.engine, self.metrics.clone(), request.into_inner())?;
        Ok(Response::new(stream))
    }

    async fn diagnose(
        &self,
        request: Request<v1::DiagnoseRequest>,
    ) -> Result<Response<v1::DiagnosticsRecord>, Status> {
        let caller = self.allow(&request, Role::Admin, "diagnose")?;
        let v1::DiagnoseRequest { name, timeout_ms } = request.into_inner();
        check_name(&name)?;
        let timeout = match timeout_ms {
            0 => self.diagnostics_timeout,
            ms => Duration::from_millis(ms),
        };
        if timeout > MAX_DIAGNOSTICS_TIMEOUT {
            return Err(ControlError::InvalidArgument(format!(
                "timeout {}s is longer than the 1h limit",
                timeout.as_secs()
            ))
            .into());
        }
        let node = name.clone();
        let record = self
            .engine
            .ask(|reply| Event::Diagnose {
                node,
                timeout,
                actor: caller.actor,
                reply,
            })
            .await?;
        Ok(Response::new(diagnostics(&name, &record)))
    }

    async fn get_recovery(
        &self,
        request: Request<v1::GetRecoveryRequest>,
    ) -> Result<Response<v1::RecoveryResponse>, Status> {
        self.allow(&request, Role::Viewer, "recovery")?;
        let snap = self.engine.snapshot();
        Ok(Response::new(v1::RecoveryResponse {
            hold: crate::recovery_view::of(&snap),
        }))
    }

    async fn confirm_recovery(
        &self,
        request: Request<v1::ConfirmRecoveryRequest>,
    ) -> Result<Response<v1::RecoveryResponse>, Status> {
        let caller = self.allow(&request, Role::Admin, "recovery confirm")?;
        let hold = self
            .engine
            .ask(|reply| Event::ConfirmRecovery {
                actor: caller.actor,
                reply,
            })
            .await?;
        let snap = self.engine.snapshot();
        Ok(Response::new(v1::RecoveryResponse {
            hold: Some(crate::recovery_view::hold(&hold, &snap)),
        }))
    }

    async fn get_breaker(
        &self,
        request: Request<v1::GetBreakerRequest>,
    ) -> Result<Response<v1::BreakerStatus>, Status> {
        self.allow(&request, Role::Viewer, "breaker")?;
        let snap = self.engine.snapshot();
        let status = crate::breaker_view::status(&snap.breaker, snap.nodes.len());
        Ok(Response::new(status))
    }

    async fn forget_node(
        &self,
        request: Request<v1::ForgetNodeRequest>,
    ) -> Result<Response<v1::NodeSummary>, Status> {
        let caller = self.allow(&request, Role::Admin, "node forget")?;
        let v1::ForgetNodeRequest { name } = request.into_inner();
        check_name(&name)?;
        let node = self
            .engine
            .ask(|reply| Event::ForgetNode {
                node: name,
                actor: caller.actor,
                reply,
            })
            .await?;
        Ok(Response::new(self.summary(&node)))
    }

    async fn reset_breaker(
        &self,
        request: Request<v1::ResetBreakerRequest>,
    ) -> Result<Response<v1::BreakerStatus>, Status> {
        let caller = self.allow(&request, Role::Admin, "breaker reset")?;
        let breaker = self
            .engine
            .ask(|reply| Event::ResetBreaker {
                actor: caller.actor,
                reply,
            })
            .await?;
        let known = self.engine.snapshot().nodes.len();
        Ok(Response::new(crate::breaker_view::status(&breaker, known)))
    }
}
