//! The one word an operator reads first about a node: `NodeSummary.state` and
//! `StateCount.state` on the wire, the `state` label of `vigil_nodes`.
//!
//! The coordinator decides which state a node is in (vigil-core's `Node::display_state`);
//! the words and their order live here, so the coordinator's counts, its metrics and
//! clusterctl's `status` list the same states in the same order.

use std::fmt;

/// A node's display state. A newer coordinator may send a word this enum does not know:
/// readers keep such words as text ([`NodeState::parse`] gives `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeState {
    /// Reachable, schedulable and healthy.
    Ready,
    /// Reachable and schedulable, with warning signs.
    Degraded,
    /// Cordoned while its burn-in runs.
    Validating,
    /// Reachable but cordoned (by an operator or by the health policy).
    Cordoned,
    /// Heartbeats missing past `unreachable_after`.
    Unreachable,
    /// Unreachable past `lost_after`: its work was restarted elsewhere.
    Lost,
}

impl NodeState {
    /// Every state, in the order `clusterctl status` lists them; `state as usize` indexes it.
    pub const ALL: [NodeState; 6] = [
        NodeState::Ready,
        NodeState::Degraded,
        NodeState::Validating,
        NodeState::Cordoned,
        NodeState::Unreachable,
        NodeState::Lost,
    ];

    /// The word on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "Ready",
            NodeState::Degraded => "Degraded",
            NodeState::Validating => "Validating",
            NodeState::Cordoned => "Cordoned",
            NodeState::Unreachable => "Unreachable",
            NodeState::Lost => "Lost",
        }
    }

    /// The state a wire word names; `None` for a word this build does not know.
    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == word)
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So a state compares with the word read off the wire (`state == "Ready"`).
impl PartialEq<&str> for NodeState {
    fn eq(&self, word: &&str) -> bool {
        self.as_str() == *word
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_are_listed_in_status_order() {
        let words: Vec<&str> = NodeState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            words,
            [
                "Ready",
                "Degraded",
                "Validating",
                "Cordoned",
                "Unreachable",
                "Lost"
            ]
        );
    }

    #[test]
    fn a_state_indexes_its_place_in_the_list() {
        for (i, state) in NodeState::ALL.into_iter().enumerate() {
            assert_eq!(state as usize, i, "{state}");
        }
    }

    #[test]
    fn every_word_parses_back_to_its_state() {
        for state in NodeState::ALL {
            assert_eq!(NodeState::parse(state.as_str()), Some(state));
            assert_eq!(state.to_string(), state.as_str());
            assert_eq!(state, state.as_str());
        }
    }

    #[test]
    fn an_unknown_or_differently_cased_word_is_not_a_state() {
        assert_eq!(NodeState::parse("Quarantined"), None);
        assert_eq!(NodeState::parse("ready"), None);
        assert_eq!(NodeState::parse(""), None);
    }
}
