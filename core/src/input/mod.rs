//! What agents and operators send, checked before it reaches a decision: `limits` (every
//! bound) and `validate` (every agent message).

pub mod limits;
pub mod validate;
