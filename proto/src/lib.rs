//! Generated code for the `vigil.v1` protocol (see `proto/vigil/v1/*.proto`).

/// Largest message either side accepts on any vigil stream or call.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Protocol revision carried in `Register.protocol_version`.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod v1 {
    #![allow(clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/vigil.v1.rs"));
}
