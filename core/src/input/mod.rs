//! What agents and operators send, checked before it reaches a decision: `limits` (every
//! bound), `validate` (every agent message), `assigned` (whether a report concerns work
//! assigned to the reporting node; `step` names the ones that do not as `Effect::Ignored`).

pub mod assigned;
pub mod limits;
pub mod validate;
