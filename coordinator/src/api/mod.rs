//! The coordinator's gRPC surface: what agents and operators call, and the checks in front.
//!
//! Layout:
//! - `agent_service`: the `AgentService.Connect` stream, one task per agent session; it maps
//!   proto messages to engine events after validation (`vigil_core::validate`).
//! - `control_service`: the `ControlService` clusterctl talks to; `control_streams`: its
//!   long-lived streams (`events --follow`, `job logs`).
//! - `access`: who a request comes from and whether their role allows the call.
//! - `client_version`: the version-skew check in front of `ControlService` (clusterctl's release).
//! - `throttle`: the per-agent-stream rate limit (token buckets), pure.
//! - `node_view`, `job_view`, `lemon_view`, `recovery_view`, `breaker_view`: the protocol's
//!   views of nodes, jobs, the lemon ledger, the recovery hold and the cordon breaker;
//!   `slurm_job_view`: Slurm jobs (`[slurm]`) in the same job messages.

pub mod access;
pub mod agent_service;
pub mod breaker_view;
pub mod client_version;
pub mod control_service;
pub mod control_streams;
pub mod job_view;
pub mod lemon_view;
pub mod node_view;
pub mod recovery_view;
pub mod slurm_job_view;
pub mod throttle;
