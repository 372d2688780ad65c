//! The stable JSON model of `clusterctl -o json`, mapped from the vigil.v1 prost types.
//!
//! Field names here are a contract (tests and docs parse them), so they are spelled out
//! rather than derived from the protocol: a renamed proto field must not change the JSON.
//! One file per area: `enums` (proto enums as words), `node`, `status`.

mod enums;
#[cfg(test)]
pub mod fixtures;
mod node;
mod status;

pub use enums::GpuBackend;
pub use node::{GpuSample, NodeDetail, NodeList, NodeSummary};
pub use status::Status;
