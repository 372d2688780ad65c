//! The name rule: what a node (and a coordinator of an HA group) may be called.
//!
//! The agent checks its own name before it registers, the coordinator checks every
//! registration and every name an operator sends, and its HA config checks `ha.name`: one
//! rule, so a name the agent accepts is never refused on the wire. The same holds for a host
//! identity (machine-id, boot id; [`check_host_id`]).

use std::fmt;

/// Names end up in DNS-like places (labels, hostnames, etcd keys), hence the DNS label limit.
pub const MAX_NODE_NAME: usize = 63;

/// The rule in words, for the fix part of an error.
pub const NODE_NAME_RULE: &str =
    "1-63 letters, digits, '-', '.' or '_', starting with a letter or digit";

/// What is wrong with a name; `Display` says it in a few words, without the name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameProblem {
    Empty,
    /// Longer than [`MAX_NODE_NAME`] bytes.
    TooLong {
        bytes: usize,
    },
    /// The first character is not an ASCII letter or digit (`.a` reads as a hidden file,
    /// `-a` as a flag).
    BadStart(char),
    /// A character outside `[A-Za-z0-9._-]`.
    BadChar(char),
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameProblem::Empty => write!(f, "is empty"),
            NameProblem::TooLong { bytes } => {
                write!(f, "is {bytes} bytes long (at most {MAX_NODE_NAME})")
            }
            NameProblem::BadStart(c) => write!(f, "starts with {c:?}, not a letter or digit"),
            NameProblem::BadChar(c) => write!(f, "contains {c:?}"),
        }
    }
}

/// Checks `name` against the rule: 1 to [`MAX_NODE_NAME`] bytes of `[A-Za-z0-9._-]`, a letter or
/// digit first. The first problem found, in that order.
pub fn check_node_name(name: &str) -> Result<(), NameProblem> {
    let Some(first) = name.chars().next() else {
        return Err(NameProblem::Empty);
    };
    if name.len() > MAX_NODE_NAME {
        return Err(NameProblem::TooLong { bytes: name.len() });
    }
    if !first.is_ascii_alphanumeric() {
        return Err(NameProblem::BadStart(first));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        Some(bad) => Err(NameProblem::BadChar(bad)),
        None => Ok(()),
    }
}

/// `name` follows the rule (see [`check_node_name`]).
pub fn valid_node_name(name: &str) -> bool {
    check_node_name(name).is_ok()
}

/// A host identity (a machine-id: 32 hex digits; a boot id: a UUID), with room for an override.
pub const MAX_HOST_ID: usize = 64;

/// What is wrong with a machine-id or boot id, in a few words; empty is allowed (an agent that
/// predates host identity sends none).
pub fn check_host_id(id: &str) -> Result<(), String> {
    if id.len() > MAX_HOST_ID {
        return Err(format!(
            "is {} bytes long (at most {MAX_HOST_ID})",
            id.len()
        ));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(format!(
            "contains {c:?} (only letters, digits, '.', '_' and '-')"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_like_names_are_valid() {
        let longest = "x".repeat(MAX_NODE_NAME);
        for ok in ["gpu-001", "a", "node.rack-1", "A_1", "9", longest.as_str()] {
            assert_eq!(check_node_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn an_empty_name_is_refused() {
        assert_eq!(check_node_name(""), Err(NameProblem::Empty));
    }

    #[test]
    fn a_name_over_63_bytes_is_refused_even_when_63_characters() {
        let long = "x".repeat(MAX_NODE_NAME + 1);
        assert_eq!(
            check_node_name(&long),
            Err(NameProblem::TooLong { bytes: 64 })
        );
        let wide = format!("{}é", "x".repeat(MAX_NODE_NAME - 1));
        assert!(matches!(
            check_node_name(&wide),
            Err(NameProblem::TooLong { .. })
        ));
    }

    #[test]
    fn a_name_must_start_with_a_letter_or_digit() {
        for bad in [".a", "-a", "_a", "../etc"] {
            assert!(
                matches!(check_node_name(bad), Err(NameProblem::BadStart(_))),
                "{bad}"
            );
        }
        assert_eq!(check_node_name("ü"), Err(NameProblem::BadStart('ü')));
    }

    #[test]
    fn a_name_holds_only_letters_digits_dots_dashes_and_underscores() {
        assert_eq!(check_node_name("a/b"), Err(NameProblem::BadChar('/')));
        assert_eq!(check_node_name("a b"), Err(NameProblem::BadChar(' ')));
        assert_eq!(check_node_name("a\0b"), Err(NameProblem::BadChar('\0')));
        assert!(!valid_node_name("nöde"));
    }

    #[test]
    fn problems_read_as_the_end_of_a_sentence() {
        assert_eq!(NameProblem::Empty.to_string(), "is empty");
        assert_eq!(
            NameProblem::TooLong { bytes: 70 }.to_string(),
            "is 70 bytes long (at most 63)"
        );
        assert_eq!(NameProblem::BadChar('/').to_string(), "contains '/'");
    }
}
