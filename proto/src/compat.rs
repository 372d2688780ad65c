//! The version-skew rule every side applies: which releases of vigil work together.
//!
//! A rolling upgrade runs coordinators, agents and `clusterctl` of adjacent releases side by
//! side. The window: the same major version, and minor versions at most [`MINOR_WINDOW`]
//! apart, in either direction (coordinator 0.2 works with agents and `clusterctl` 0.1, 0.2 and
//! 0.3). Inside it everything works; outside it the side that notices refuses, naming both
//! versions and the upgrade order: coordinators first, then agents, then `clusterctl`, one
//! minor version at a time (docs/operations.md, "Upgrades").
//!
//! The coordinator checks each agent at registration (`Register.agent_version`) and each
//! `clusterctl` call (its [`CLIENT_VERSION_METADATA`] header); the agent checks the coordinator
//! it registered with (`Registered.coordinator_version`). Pure: no I/O, tested here.

use std::fmt;

/// How many minor versions apart two compatible releases may be.
pub const MINOR_WINDOW: u64 = 1;

/// gRPC metadata key on every `clusterctl` call: its version. A call without it comes from a
/// `clusterctl` that predates the key, release 0.1 ([`UNLABELLED_CLIENT`]).
pub const CLIENT_VERSION_METADATA: &str = "vigil-client-version";

/// The release a `clusterctl` call without [`CLIENT_VERSION_METADATA`] comes from.
pub const UNLABELLED_CLIENT: Version = Version {
    major: 0,
    minor: 1,
    patch: 0,
};

/// This build's version (the workspace's `version`).
pub fn this_release() -> Version {
    Version::parse(env!("CARGO_PKG_VERSION")).unwrap_or(UNLABELLED_CLIENT)
}

/// A release: `MAJOR.MINOR.PATCH`, with any `-pre` or `+build` suffix ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    /// Parse `MAJOR.MINOR.PATCH[-pre][+build]`; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let core = text.split(['-', '+']).next()?;
        let mut parts = core.split('.');
        let mut number = || -> Option<u64> {
            let p = parts.next()?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 9 {
                return None;
            }
            p.parse().ok()
        };
        let v = Self {
            major: number()?,
            minor: number()?,
            patch: number()?,
        };
        parts.next().is_none().then_some(v)
    }

    /// `MAJOR.MINOR`: a release line.
    pub fn line(&self) -> String {
        format!("{}.{}", self.major, self.minor)
    }

    /// Whether `other` is inside this release's window.
    pub fn works_with(&self, other: &Version) -> bool {
        self.major == other.major && self.minor.abs_diff(other.minor) <= MINOR_WINDOW
    }

    /// The oldest and newest release lines inside this release's window, as `0.1 to 0.3`.
    pub fn window(&self) -> String {
        let low = Version {
            minor: self.minor.saturating_sub(MINOR_WINDOW),
            ..*self
        };
        let high = Version {
            minor: self.minor + MINOR_WINDOW,
            ..*self
        };
        format!("{} to {}", low.line(), high.line())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The side of a pair that is not the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Agent,
    Clusterctl,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Agent => "agent",
            Peer::Clusterctl => "clusterctl",
        }
    }
}

/// Why two releases may not work together: the message names both versions, the window and
/// the upgrade that fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skew(pub String);

impl fmt::Display for Skew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The upgrade order, said the same way by every refusal.
pub const UPGRADE_ORDER: &str = "upgrade coordinators first, then agents, then clusterctl, \
    one minor version at a time (docs/operations.md, \"Upgrades\")";

/// Whether a coordinator of release `coordinator` works with a `peer` that says it is release
/// `peer_version` (as it sent it: a version that does not parse is refused, naming it).
pub fn check(coordinator: Version, peer: Peer, peer_version: &str) -> Result<(), Skew> {
    let who = peer.name();
    let Some(theirs) = Version::parse(peer_version) else {
        return Err(Skew(format!(
            "{who} version {:?} is not a release version (MAJOR.MINOR.PATCH); coordinator {coordinator} \
             works with {who}s {}: install a released {who}",
            peer_version.chars().take(64).collect::<String>(),
            coordinator.window(),
        )));
    };
    if coordinator.works_with(&theirs) {
        return Ok(());
    }
    let fix = if theirs < coordinator {
        format!("upgrade this {who} to {}", coordinator.line())
    } else {
        format!(
            "upgrade the coordinators to {} or later first, or install {who} {} here",
            Version {
                minor: theirs.minor.saturating_sub(MINOR_WINDOW),
                ..theirs
            }
            .line(),
            coordinator.line()
        )
    };
    Err(Skew(format!(
        "{who} {theirs} and coordinator {coordinator} are too far apart: coordinator \
         {coordinator} works with {who}s {}; {fix}. {UPGRADE_ORDER}",
        coordinator.window()
    )))
}

/// The agent's side: whether this agent (release `agent`) follows a coordinator that says it is
/// release `coordinator_version` (`Registered.coordinator_version`). The same window, and the
/// same words as the coordinator's refusal of the agent.
pub fn check_coordinator(agent: Version, coordinator_version: &str) -> Result<(), Skew> {
    match Version::parse(coordinator_version) {
        Some(coordinator) => check(coordinator, Peer::Agent, &agent.to_string()),
        None => Err(Skew(format!(
            "coordinator version {:?} is not a release version (MAJOR.MINOR.PATCH); agent \
             {agent} works with coordinators {}: install a released coordinator",
            coordinator_version.chars().take(64).collect::<String>(),
            agent.window(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).expect("a version")
    }

    #[test]
    fn parses_release_versions_and_ignores_suffixes() {
        assert_eq!(
            v("0.2.0"),
            Version {
                major: 0,
                minor: 2,
                patch: 0
            }
        );
        assert_eq!(v("1.12.3-rc.1"), v("1.12.3"));
        assert_eq!(v("1.12.3+deb12"), v("1.12.3"));
        for bad in [
            "",
            "test",
            "fake",
            "0.2",
            "0.2.0.1",
            "v0.2.0",
            "0..1",
            "0.x.1",
            "loadgen-0.2.0",
            " 0.2.0",
            "0.2.0 ",
            "99999999999.0.0",
        ] {
            assert_eq!(Version::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn window_is_one_minor_either_way_within_a_major() {
        let c = v("0.2.0");
        for ok in ["0.1.0", "0.1.9", "0.2.0", "0.2.7", "0.3.0", "0.3.4-rc1"] {
            assert!(check(c, Peer::Agent, ok).is_ok(), "{ok}");
        }
        for far in ["0.0.9", "0.4.0", "1.2.0", "1.1.0"] {
            assert!(check(c, Peer::Agent, far).is_err(), "{far}");
        }
        assert_eq!(v("0.0.3").window(), "0.0 to 0.1");
        assert_eq!(v("2.5.1").window(), "2.4 to 2.6");
    }

    #[test]
    fn an_old_peer_is_told_to_upgrade_itself() {
        let e = check(v("0.3.1"), Peer::Agent, "0.1.4").expect_err("too old");
        assert_eq!(
            e.0,
            "agent 0.1.4 and coordinator 0.3.1 are too far apart: coordinator 0.3.1 works with \
             agents 0.2 to 0.4; upgrade this agent to 0.3. \
             upgrade coordinators first, then agents, then clusterctl, one minor version at a \
             time (docs/operations.md, \"Upgrades\")"
        );
    }

    #[test]
    fn a_new_peer_is_told_the_coordinators_go_first() {
        let e = check(v("0.1.0"), Peer::Clusterctl, "0.3.0").expect_err("too new");
        assert!(e.0.starts_with("clusterctl 0.3.0 and coordinator 0.1.0 are too far apart"));
        assert!(
            e.0.contains(
                "upgrade the coordinators to 0.2 or later first, or install clusterctl 0.1 here"
            ),
            "{e}"
        );
        assert!(e.0.contains(UPGRADE_ORDER));
    }

    #[test]
    fn the_agent_judges_its_coordinator_by_the_same_window() {
        assert!(check_coordinator(v("0.2.0"), "0.1.3").is_ok());
        assert!(check_coordinator(v("0.2.0"), "0.3.0").is_ok());
        let e = check_coordinator(v("0.1.0"), "0.3.0").expect_err("too far");
        assert!(
            e.0.starts_with(
                "agent 0.1.0 and coordinator 0.3.0 are too far apart: coordinator 0.3.0 works \
                 with agents 0.2 to 0.4; upgrade this agent to 0.3."
            ),
            "{e}"
        );
        let e = check_coordinator(v("0.2.0"), "fake").expect_err("not a version");
        assert!(
            e.0.contains("coordinator version \"fake\" is not a release version"),
            "{e}"
        );
        assert!(
            e.0.contains("agent 0.2.0 works with coordinators 0.1 to 0.3"),
            "{e}"
        );
    }

    #[test]
    fn an_unparsable_version_is_named() {
        let e = check(v("0.2.0"), Peer::Agent, "fake").expect_err("not a version");
        assert!(
            e.0.contains("agent version \"fake\" is not a release version"),
            "{e}"
        );
        assert!(e.0.contains("agents 0.1 to 0.3"), "{e}");
    }

    #[test]
    fn this_release_parses_and_an_unlabelled_client_is_0_1() {
        assert_eq!(this_release().to_string(), env!("CARGO_PKG_VERSION"));
        assert!(this_release().works_with(&this_release()));
        assert_eq!(UNLABELLED_CLIENT.line(), "0.1");
    }
}
