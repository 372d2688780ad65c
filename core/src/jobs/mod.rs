//! The job state machine and gang scheduler, pure: (cluster state, input,
//! now) -> new state + effects. Jobs start on exactly `nodes` eligible nodes,
//! fail gang-wide, are stopped everywhere before attempt N+1 starts, and
//! resume from their last complete checkpoint.
//!
//! Layout:
//! - `spec` (the TOML spec and its validation), `job` (the persisted record).
//! - The state machine, as `impl ClusterState` blocks and the functions they share:
//!   `requests` (submit, cancel, drain), `schedule` (the gang scheduler, which starts
//!   attempts), `attempt` (how an attempt fails, stops and ends; hangs), `reports` (what agents
//!   report about workers), `launch` (the start and stop commands, the worker's environment).
//! - Policies on top: `goodput`, `triage`, `crash_loop`, `stragglers`, `training_health`,
//!   `rollback`, `evidence` (what a hung attempt's workers were doing, captured before the stop),
//!   `hang_signs` (which node that evidence points at), `preflight` (a gang check before an
//!   attempt's workers start; its bisection in `preflight_plan`, its spec and records in
//!   `preflight_record`).

pub mod crash_loop;
pub mod evidence;
pub mod goodput;
pub mod hang_signs;
pub mod job;
pub mod preflight;
pub mod preflight_plan;
pub mod preflight_record;
pub mod resume_scan;
pub mod rollback;
pub mod spec;
pub mod stragglers;
pub mod training_health;
pub mod triage;

mod attempt;
mod launch;
mod reports;
mod requests;
mod schedule;

pub use launch::worker_env;
pub use schedule::eligible;

pub(crate) use launch::{start_command, stop_command};
// How an attempt is stopped, for the policies here that stop one (`rollback`, `stragglers`).
use attempt::{Failure, after_failure, stop_attempt};

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
