//! Highly available coordinators on etcd: one leads, the others stand by.
//!
//! - `config`: the `[ha]` section.
//! - `etcd`: connecting to etcd, and which of its errors are worth retrying.
//! - `election`: leader election (lease + transaction), the keepalive loop that
//!   keeps [`crate::leadership::Leadership`] valid, and presence of every coordinator.
//! - `metrics`: `vigil_leader`, `vigil_leader_changes_total`, etcd health, store latency.
//! - `view`: what `clusterctl status` and `/metrics` show about coordinators and etcd.
//! - `standby`: the gRPC services of a coordinator that does not lead: everyone
//!   is sent to the leader.
//! - `run`: a coordinator of the group: standby, campaign, lead, step down.
//! - `store`: the etcd backend, every write fenced on the term; it lives in
//!   [`crate::store::etcd`] beside the other backends, and is named here too.
//!
//! A coordinator that loses leadership does not go back to standing by in the
//! same process: it exits (code 75) and its service manager starts it again as
//! a standby, with nothing of the old term left in memory (the pattern of
//! Kubernetes' controller manager).

pub mod config;
pub mod election;
pub mod etcd;
pub mod metrics;
pub mod run;
pub mod standby;
pub mod view;

pub use crate::store::etcd as store;
pub use config::HaConfig;
pub use view::HaView;

/// EX_TEMPFAIL: leadership was lost; start again (as a standby).
pub const EXIT_LEADERSHIP_LOST: u8 = 75;
