//! The `vigil.v1` protocol: the generated messages (see `proto/vigil/v1/*.proto`) and the wire
//! rules every side of it shares.
//!
//! Layout:
//! - `v1`: the generated messages, and (feature `grpc`) the tonic clients and servers.
//! - `compat`: the version-skew window (which releases work together) and how a refusal says it.
//! - `names`: the node-name rule the agent, the coordinator and its HA config apply, and the
//!   host-identity rule (machine-id, boot id).
//! - `node_state`: the display states (`Ready` ... `Lost`), their words and order.
//! - `fabric_port`: how to read a `FabricPort` (up or not, its name).
//! - `gpu_sample`: how to read a `GpuSample` (its faults, when its NVLinks count).
//! - `heartbeat_form`: when a heartbeat carries full GPU samples and when their telemetry
//!   only (the agent's and the load generator's rule), and how the coordinator merges it.
//! - `standby`: the `vigil-leader` metadata key, and (feature `grpc`) how a standby refuses a
//!   call and how a caller recognises that.
//!
//! Without `grpc` everything but the tonic-typed helpers is here: vigil-core uses the rules too.

/// Largest message either side accepts on any vigil stream or call.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Protocol revision carried in `Register.protocol_version`.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod compat;
pub mod fabric_port;
pub mod gpu_sample;
pub mod heartbeat_form;
pub mod names;
pub mod node_state;
pub mod standby;

pub use gpu_sample::{SampleFault, sample_faults};
pub use names::{
    MAX_HOST_ID, MAX_NODE_NAME, NODE_NAME_RULE, NameProblem, check_host_id, check_node_name,
    valid_node_name,
};
pub use node_state::NodeState;
pub use standby::{LEADER_METADATA, StandbyRefusal};
#[cfg(feature = "grpc")]
pub use standby::{standby_refusal, standby_status};

pub mod v1 {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/vigil.v1.rs"));
}
