//! How a standby coordinator refuses a call, and how a caller recognises that refusal.
//!
//! A coordinator that does not lead answers agents and clusterctl (every call but `Status`)
//! with FAILED_PRECONDITION and the leader's gRPC URL in the [`LEADER_METADATA`] response
//! metadata, empty while no coordinator leads. The agent and clusterctl follow that URL; any
//! other FAILED_PRECONDITION (uncordoning an auto-cordoned node) is the call's answer.

/// The response metadata key in which a standby names the leader's gRPC URL.
pub const LEADER_METADATA: &str = "vigil-leader";

/// A standby's refusal, as a caller reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyRefusal {
    /// The leader's URL; `None` while nobody leads (the metadata empty or absent).
    pub leader: Option<String>,
}

#[cfg(feature = "grpc")]
pub use grpc::{standby_refusal, standby_status};

#[cfg(feature = "grpc")]
mod grpc {
    use tonic::metadata::MetadataValue;
    use tonic::{Code, Status};

    use super::{LEADER_METADATA, StandbyRefusal};

    /// The refusal a standby sends: FAILED_PRECONDITION with `message`, and `leader_url`
    /// (empty while nobody leads) in [`LEADER_METADATA`].
    pub fn standby_status(message: impl Into<String>, leader_url: &str) -> Status {
        let mut status = Status::failed_precondition(message);
        if let Ok(v) = MetadataValue::try_from(leader_url) {
            status.metadata_mut().insert(LEADER_METADATA, v);
        }
        status
    }

    /// `Some` when `status` is a standby's refusal: FAILED_PRECONDITION with the leader
    /// metadata, or, from a coordinator that sends none, a message that says "standby".
    /// `None` for every other status, a FAILED_PRECONDITION of the request itself included.
    pub fn standby_refusal(status: &Status) -> Option<StandbyRefusal> {
        if status.code() != Code::FailedPrecondition {
            return None;
        }
        let header = status.metadata().get(LEADER_METADATA);
        if header.is_none() && !status.message().to_ascii_lowercase().contains("standby") {
            return None;
        }
        let leader = header
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned);
        Some(StandbyRefusal { leader })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn leader_of(status: &Status) -> Option<Option<String>> {
            standby_refusal(status).map(|r| r.leader)
        }

        #[test]
        fn a_standby_refusal_names_the_leader_in_the_metadata() {
            let s = standby_status("c2 is a standby; the leader is c1", "https://c1:7770");
            assert_eq!(s.code(), Code::FailedPrecondition);
            assert_eq!(
                s.metadata()
                    .get(LEADER_METADATA)
                    .and_then(|v| v.to_str().ok()),
                Some("https://c1:7770")
            );
            assert_eq!(leader_of(&s), Some(Some("https://c1:7770".to_owned())));
        }

        #[test]
        fn a_standby_without_a_leader_sends_the_key_empty() {
            let s = standby_status("c2 is a standby and no coordinator leads", "");
            assert_eq!(
                s.metadata()
                    .get(LEADER_METADATA)
                    .and_then(|v| v.to_str().ok()),
                Some("")
            );
            assert_eq!(leader_of(&s), Some(None));
        }

        #[test]
        fn a_blank_leader_url_counts_as_no_leader() {
            let s = standby_status("c2 is a standby", "  ");
            assert_eq!(leader_of(&s), Some(None));
        }

        #[test]
        fn a_refusal_without_metadata_is_a_standby_when_its_message_says_so() {
            let bare = Status::failed_precondition("Coordinator c1 is a STANDBY: no quorum");
            assert_eq!(leader_of(&bare), Some(None));
        }

        #[test]
        fn other_failed_preconditions_are_the_calls_answer() {
            let refusal = Status::failed_precondition("node gpu-7 was cordoned automatically");
            assert_eq!(leader_of(&refusal), None);
        }

        #[test]
        fn other_codes_are_never_a_standby_refusal() {
            let mut s = Status::not_found("standby");
            s.metadata_mut().insert(
                LEADER_METADATA,
                MetadataValue::from_static("https://c1:7770"),
            );
            assert_eq!(leader_of(&s), None);
        }
    }
}
