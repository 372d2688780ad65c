//! The stable JSON model of `clusterctl -o json`, mapped from the vigil.v1 prost types.
//!
//! Field names here are a contract (tests and docs parse them), so they are spelled out
//! rather than derived from the protocol: a renamed proto field must not change the JSON.
//! One file per area: `enums` (proto enums as words), `node`, `sample` (one GPU's health
//! sample), `health` (conditions, events, diagnostics), `status`, `ha` (its coordinators and
//! etcd members), `job`
//! (job summaries and details), `goodput` (where a job's time went), `ops` (drain, streamed events and log chunks),
//! `recovery` (the hold after a start from a damaged store), `breaker` (the cordon circuit
//! breaker and a node's held cordon).

mod breaker;
mod enums;
#[cfg(test)]
pub mod fixtures;
mod goodput;
mod ha;
mod health;
pub mod job;
mod lemons;
pub mod node;
mod ops;
mod recovery;
mod sample;
mod status;

pub use breaker::Breaker;
#[cfg(test)]
pub use enums::Condition;
pub use enums::GpuBackend;
pub use goodput::Goodput;
#[cfg(test)]
pub use goodput::{FailureCost, TimelineSegment};
pub use ha::Ha;
pub use health::DiagnoseResult;
pub use job::JobEvent;
pub use job::{JobDetail, JobList, JobSummary, SlurmJobInfo};
#[cfg(test)]
pub use lemons::Lemon;
pub use lemons::LemonList;
pub use node::{NodeDetail, NodeList, NodeSummary};
pub use ops::{ClusterEvent, DrainResult, LogChunk};
pub use recovery::{Recovery, RecoveryView};
pub use sample::GpuSample;
pub use status::Status;
