//! Kinds that decisions branch on, as enums: why an attempt ended (`FailureKind`) and which
//! rule cordoned a node (`CordonRule`). Each has one spelling (`as_str`), the one that metric
//! labels, `clusterctl` and stored records have always used, so stored jobs read back unchanged.

use serde::{Deserialize, Serialize};

/// Why an attempt of a job ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A worker exited non-zero (or was killed by a signal) on its own.
    Crash,
    /// No progress for `hang_timeout`.
    Hang,
    /// A node of the gang was Lost (silent past `lost_after`).
    NodeLost,
    /// A node of the gang was judged Unhealthy (an XID, a lost GPU, ...).
    NodeUnhealthy,
    /// An agent came back without the worker it was running, or its agent (or the worker's
    /// shim) stopped it unasked: the lease ran out, or the agent shut down.
    WorkerGone,
    /// An operator cancelled the job.
    Cancelled,
    /// An operator drained a node of the gang.
    Drain,
    /// An operator restarted the job (`clusterctl job restart`).
    OperatorRestart,
    /// A straggler was swapped for a spare at a checkpoint.
    StragglerSwap,
    /// Training health: the loss became NaN or infinite.
    LossNan,
    /// Training health: the loss spiked.
    LossSpike,
    /// Training health: the loss scale hit its floor.
    LossScaleFloor,
    /// A kind this version does not know (a record written by a newer one).
    #[serde(other)]
    Other,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Crash => "crash",
            FailureKind::Hang => "hang",
            FailureKind::NodeLost => "node_lost",
            FailureKind::NodeUnhealthy => "node_unhealthy",
            FailureKind::WorkerGone => "worker_gone",
            FailureKind::Cancelled => "cancelled",
            FailureKind::Drain => "drain",
            FailureKind::OperatorRestart => "operator_restart",
            FailureKind::StragglerSwap => "straggler_swap",
            FailureKind::LossNan => "loss_nan",
            FailureKind::LossSpike => "loss_spike",
            FailureKind::LossScaleFloor => "loss_scale_floor",
            FailureKind::Other => "other",
        }
    }

    /// No culprit a node reported: worth a triage of the gang.
    pub fn unexplained(self) -> bool {
        matches!(self, FailureKind::Crash | FailureKind::Hang)
    }

    /// An operator's (or a policy's) doing, not a fault: it costs time but says nothing about
    /// the cluster's failure rate (goodput's MTBF).
    pub fn by_choice(self) -> bool {
        matches!(
            self,
            FailureKind::Drain
                | FailureKind::Cancelled
                | FailureKind::OperatorRestart
                | FailureKind::StragglerSwap
        )
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure kind as stored: `""` while an attempt has not failed (the records' spelling
/// since before the enum).
pub mod stored {
    use super::FailureKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kind: &Option<FailureKind>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.map_or("", FailureKind::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<FailureKind>, D::Error> {
        let text = String::deserialize(d)?;
        if text.is_empty() {
            return Ok(None);
        }
        Ok(Some(parse(&text)))
    }

    fn parse(text: &str) -> FailureKind {
        use serde::de::IntoDeserializer;
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            text.into_deserializer();
        FailureKind::deserialize(de).unwrap_or(FailureKind::Other)
    }
}

/// Which rule cordoned a node (a metric label and a log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CordonRule {
    /// An operator's `clusterctl cordon`.
    Manual,
    /// A GPU-health finding; the finding's own rule (`xid`, `xid_recurrence`, `gpu_lost`, ...).
    Health(&'static str),
    /// Triage found the node failing diagnostics after an unexplained failure.
    Triage,
    /// The node is, or holds, a lemon.
    RepeatOffender,
    /// Burn-in before the node joins or rejoins.
    BurnIn,
    /// Slower than its gang.
    Straggler,
    /// The recovery hold: the state store was recovered, an operator reviews the node.
    Recovery,
    /// The remediation ladder: a node waiting for its step, or one that needs repair.
    Remediation,
    /// A job's gang preflight singled the node out (see `jobs::preflight`).
    Preflight,
}

impl CordonRule {
    pub fn as_str(self) -> &'static str {
        match self {
            CordonRule::Manual => "manual",
            CordonRule::Health(rule) => rule,
            CordonRule::Triage => "triage",
            CordonRule::RepeatOffender => "repeat_offender",
            CordonRule::BurnIn => "burn_in",
            CordonRule::Straggler => "straggler",
            CordonRule::Recovery => "recovery",
            CordonRule::Remediation => "remediation",
            CordonRule::Preflight => "preflight",
        }
    }
}

impl std::fmt::Display for CordonRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Rec {
        #[serde(with = "stored", default)]
        kind: Option<FailureKind>,
    }

    #[test]
    fn failure_kinds_keep_the_spelling_stored_records_use() {
        for kind in [
            FailureKind::Crash,
            FailureKind::NodeLost,
            FailureKind::OperatorRestart,
            FailureKind::LossScaleFloor,
        ] {
            let text = serde_json::to_string(&Rec { kind: Some(kind) }).expect("encodes");
            assert_eq!(text, format!("{{\"kind\":\"{}\"}}", kind.as_str()));
            let back: Rec = serde_json::from_str(&text).expect("decodes");
            assert_eq!(back.kind, Some(kind));
        }
        let none: Rec = serde_json::from_str(r#"{"kind":""}"#).expect("empty is none");
        assert_eq!(none.kind, None);
        assert_eq!(
            serde_json::to_string(&none).expect("encodes"),
            r#"{"kind":""}"#
        );
        let newer: Rec = serde_json::from_str(r#"{"kind":"cosmic_ray"}"#).expect("unknown");
        assert_eq!(newer.kind, Some(FailureKind::Other));
    }

    #[test]
    fn only_crashes_and_hangs_are_unexplained_and_operator_kinds_are_by_choice() {
        assert!(FailureKind::Crash.unexplained() && FailureKind::Hang.unexplained());
        assert!(!FailureKind::NodeLost.unexplained());
        assert!(FailureKind::Drain.by_choice() && !FailureKind::Crash.by_choice());
    }
}
