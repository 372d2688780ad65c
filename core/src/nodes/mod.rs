//! Nodes: what the coordinator knows of each (the persisted record, observed availability),
//! and every policy that judges one or decides whether it may take work.
//!
//! Layout: `node` (the record and observed state), `register` (a registration: the name's
//! host, the GPU inventory), `transitions` (heartbeat, agent events, silence, cordon and
//! uncordon), `liveness` (silence -> Ready / Unreachable / Lost),
//! `xid` (NVIDIA's catalog, shipped as data), `health` (the GPU-health policy), `fabric` (the fabric ports' policy), `gpu_counters` (PCIe/NVLink error rates, the NVLinks in use), `counter_window` (a counter's rise in a window), `lemons` +
//! `lemon_watch` (the failure ledger and its cordons), `burn_in` (a diagnostic before a node
//! (re)joins), `breaker` (the cap on automatic cordons), `remediation` +
//! `remediation_steps` (the ladder: GPU reset, reboot, needs-repair), `identity` (one node name,
//! one host).

pub mod breaker;
pub mod burn_in;
pub mod counter_window;
pub mod fabric;
pub mod gpu_counters;
pub mod health;
pub mod identity;
pub mod lemon_watch;
pub mod lemons;
pub mod liveness;
pub mod node;
pub mod remediation;
mod remediation_steps;
pub mod xid;

mod register;
mod transitions;
