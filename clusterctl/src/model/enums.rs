//! Protocol enums as the words the JSON model uses; unknown or unset values become `Unknown`.

use serde::Serialize;
use vigil_proto::v1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Availability {
    Ready,
    Unreachable,
    Lost,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scheduling {
    Schedulable,
    Cordoned,
    Draining,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CordonSource {
    Auto,
    Operator,
    /// The recovery hold: the state store was recovered, an operator reviews the node.
    Recovery,
    Unknown,
}

/// Health as the coordinator's policy judges it (of a node, or of one GPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Condition {
    Healthy,
    Degraded,
    Unhealthy,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuBackend {
    Nvml,
    Simulated,
    Unknown,
}

impl Availability {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Unreachable => "Unreachable",
            Self::Lost => "Lost",
            Self::Unknown => "Unknown",
        }
    }
}

impl Scheduling {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schedulable => "Schedulable",
            Self::Cordoned => "Cordoned",
            Self::Draining => "Draining",
            Self::Unknown => "Unknown",
        }
    }
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "Healthy",
            Self::Degraded => "Degraded",
            Self::Unhealthy => "Unhealthy",
            Self::Unknown => "Unknown",
        }
    }
}

impl CordonSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Operator => "operator",
            Self::Recovery => "recovery",
            Self::Unknown => "unknown",
        }
    }
}

impl From<i32> for Availability {
    fn from(raw: i32) -> Self {
        match v1::Availability::try_from(raw) {
            Ok(v1::Availability::Ready) => Self::Ready,
            Ok(v1::Availability::Unreachable) => Self::Unreachable,
            Ok(v1::Availability::Lost) => Self::Lost,
            _ => Self::Unknown,
        }
    }
}

impl From<i32> for Scheduling {
    fn from(raw: i32) -> Self {
        match v1::Scheduling::try_from(raw) {
            Ok(v1::Scheduling::Schedulable) => Self::Schedulable,
            Ok(v1::Scheduling::Cordoned) => Self::Cordoned,
            Ok(v1::Scheduling::Draining) => Self::Draining,
            _ => Self::Unknown,
        }
    }
}

impl From<i32> for CordonSource {
    fn from(raw: i32) -> Self {
        match v1::CordonSource::try_from(raw) {
            Ok(v1::CordonSource::Auto) => Self::Auto,
            Ok(v1::CordonSource::Operator) => Self::Operator,
            Ok(v1::CordonSource::Recovery) => Self::Recovery,
            _ => Self::Unknown,
        }
    }
}

impl From<i32> for Condition {
    fn from(raw: i32) -> Self {
        match v1::Condition::try_from(raw) {
            Ok(v1::Condition::Healthy) => Self::Healthy,
            Ok(v1::Condition::Degraded) => Self::Degraded,
            Ok(v1::Condition::Unhealthy) => Self::Unhealthy,
            _ => Self::Unknown,
        }
    }
}

impl From<i32> for GpuBackend {
    fn from(raw: i32) -> Self {
        match v1::GpuBackend::try_from(raw) {
            Ok(v1::GpuBackend::Nvml) => Self::Nvml,
            Ok(v1::GpuBackend::Simulated) => Self::Simulated,
            _ => Self::Unknown,
        }
    }
}
