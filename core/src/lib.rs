//! vigil-core: every decision vigil makes, pure.
//!
//! State + input + now -> new state + effects. Nothing here reads a clock, touches a store or a
//! socket, or logs: the coordinator's engine feeds inputs in, commits what changed, and only then
//! carries out the effects (sends commands, logs, counts). The crate depends on no async runtime,
//! no gRPC, no store and no logging crate, so the compiler keeps it that way.
//!
//! Layout:
//! - `time`: `Now { mono, wall_ms }` and the monotonic `Instant` every deadline is measured on.
//! - `config`: the settings decisions read (liveness, GPU health); the rest of each policy's
//!   settings lives beside the policy (`lemons`, `triage`, `burn_in`, `stragglers`).
//! - `step`: the interface, `step(state, input, now)` and `tick(state, now)`, which own the
//!   order of every policy; `commands`: what agents must still do, derived from the state.
//! - `state`: `ClusterState`, `Effect`, `StateError`.
//! - `nodes/`: `node` (persisted record, observed availability), `transitions` (register,
//!   heartbeat, cordon), `liveness` (silence -> Ready / Unreachable / Lost), `xid` (NVIDIA's
//!   catalog, shipped as data), `health` (GPU-health policy), `lemons` + `lemon_watch` (the
//!   failure ledger and its cordons), `burn_in`, `breaker` (the cap on automatic cordons),
//!   `remediation` (the ladder: GPU reset, reboot, needs-repair), `identity` (one node name, one
//!   host: its machine-id binding).
//! - `jobs/`: `spec` (the TOML spec), `job` (the persisted record), the attempt state machine and
//!   gang scheduler (`requests`, `schedule`, `attempt`, `reports`, `launch`), `goodput`,
//!   `triage`, `stragglers`, `training_health`, `rollback`.
//! - `input/`: `limits` (every bound on agent and operator input), `validate` (every agent
//!   message), `assigned` (reports about work not assigned to the reporting node).
//! - `audit`: who changed what, in the node's or job's history.
//! - `slurm/`: vigil's node decisions carried into Slurm (drain, resume, requeue, hold
//!   release), the `sinfo`/`squeue` output they read, and vigil's records of the Slurm jobs it
//!   saw (runs, requeues, outcome, goodput).
//! - `recovery`: the hold after a start from a damaged store (nodes cordoned for review, no job
//!   started until an operator confirms).

pub mod audit;
pub mod commands;
pub mod config;
pub mod input;
pub mod jobs;
pub mod kinds;
pub mod nodes;
pub mod recovery;
pub mod slurm;
pub mod state;
pub mod step;
#[cfg(test)]
pub mod test_utils;
pub mod time;

// Each policy keeps its path from before the folders, so `vigil_core::node`,
// `vigil_core::jobspec`, ... (and `crate::node` here) read as before.
pub use input::{limits, validate};
pub use jobs::spec as jobspec;
pub use jobs::{goodput, job, rollback, stragglers, training_health, triage};
pub use nodes::{
    breaker, burn_in, counter_window, fabric, gpu_counters, health, identity, lemon_watch, lemons,
    liveness, node, remediation, xid,
};

pub use recovery::RecoveryHold;
pub use state::{ClusterState, Effect, Ignored, Registration, StateError};
pub use step::{Answer, AuditSubject, Input, step, tick, tick_heard_until};
pub use time::{Instant, Now};
