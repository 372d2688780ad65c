//! The cordon circuit breaker: `clusterctl breaker status` and `breaker reset`.

use super::{Labelled, STATUS_LABEL_WIDTH};
use crate::model::Breaker;
use crate::table::{format_age, format_when};
use crate::term::Term;

/// `cap 2 nodes = max(1, min(max_nodes 50, floor(25% of 8 nodes)))`.
fn cap_line(b: &Breaker) -> String {
    format!(
        "{} node{} = max(1, min(max_nodes {}, floor({}% of {} nodes)))",
        b.cap,
        if b.cap == 1 { "" } else { "s" },
        b.max_nodes,
        b.max_fraction * 100.0,
        b.nodes_known
    )
}

/// `clusterctl breaker status`.
pub fn breaker(b: &Breaker, now_ms: u64, term: Term) -> String {
    let mut out = Labelled::new(STATUS_LABEL_WIDTH);
    let state = match (&b.opened_why, b.opened_at_unix_ms) {
        (_, Some(at)) if b.open => format!(
            "{} since {}: automatic cordons are held until `clusterctl breaker reset`",
            term.paint("OPEN"),
            format_when(at, now_ms)
        ),
        _ => "closed: automatic cordons are applied up to the cap".to_owned(),
    };
    out.line_styled("state", &state);
    if let Some(why) = b.opened_why.as_deref().filter(|_| b.open) {
        out.line("why", why);
    }
    out.line("cap", cap_line(b));
    out.line("window", format_age(b.window_ms));
    out.line(
        "counted",
        format!("{} automatic cordon(s) in the window", b.cordons.len()),
    );
    for c in &b.cordons {
        out.line(
            "",
            format!("{} at {}", c.node, format_when(c.at_unix_ms, now_ms)),
        );
    }
    if b.held.is_empty() {
        out.line("held", "none");
    } else {
        out.line("held", format!("{} node(s), not cordoned", b.held.len()));
    }
    for h in &b.held {
        out.line(
            "",
            format!(
                "{} ({}, since {}): {}",
                h.node,
                h.rule,
                format_when(h.since_unix_ms, now_ms),
                h.evidence
            ),
        );
    }
    let reset = match (&b.last_reset_by, b.last_reset_at_unix_ms) {
        (Some(by), Some(at)) => format!("by {by} {}", format_when(at, now_ms)),
        _ => "never".to_owned(),
    };
    out.line("last reset", reset);
    out.finish()
}

/// What `breaker reset` prints.
pub fn breaker_reset(b: &Breaker) -> String {
    let by = b.last_reset_by.as_deref().unwrap_or("you");
    crate::table::sanitize(&format!(
        "cordon breaker reset by {by}: {}; a fresh window begins (cap {}); held nodes are judged again on fresh evidence only",
        b.state, b.cap
    )) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::v1;

    const NOW: u64 = 1_000_000 + 12 * 60_000;

    fn open() -> Breaker {
        Breaker::from(v1::BreakerStatus {
            open: true,
            opened_at_unix_ms: Some(1_000_000),
            opened_why: "cordon breaker opened: a cordon of n2 would make 3 automatic cordons in 10m, past the cap of 2 nodes (25% of 8 nodes, max_nodes 50); holding further automatic cordons until clusterctl breaker reset".into(),
            cap: 2,
            max_fraction: 0.25,
            max_nodes: 50,
            nodes_known: 8,
            window_ms: 600_000,
            cordons: vec![
                v1::BreakerCordon {
                    node: "n0".into(),
                    at_unix_ms: 1_000_000,
                },
                v1::BreakerCordon {
                    node: "n1".into(),
                    at_unix_ms: 1_000_000,
                },
            ],
            held: vec![v1::HeldCordon {
                node: "n2".into(),
                rule: "xid".into(),
                evidence: "XID 79 (GPU has fallen off the bus) on GPU 0".into(),
                since_unix_ms: 1_000_000,
                message: String::new(),
            }],
            ..Default::default()
        })
    }

    #[test]
    fn status_shows_the_cap_what_was_counted_and_what_is_held() {
        assert_eq!(
            breaker(&open(), NOW, Term::PLAIN),
            "state        OPEN since 1970-01-01 00:16:40Z (12m ago): automatic cordons are held until `clusterctl breaker reset`\n\
             why          cordon breaker opened: a cordon of n2 would make 3 automatic cordons in 10m, past the cap of 2 nodes (25% of 8 nodes, max_nodes 50); holding further automatic cordons until clusterctl breaker reset\n\
             cap          2 nodes = max(1, min(max_nodes 50, floor(25% of 8 nodes)))\n\
             window       10m\n\
             counted      2 automatic cordon(s) in the window\n\
             \x20            n0 at 1970-01-01 00:16:40Z (12m ago)\n\
             \x20            n1 at 1970-01-01 00:16:40Z (12m ago)\n\
             held         1 node(s), not cordoned\n\
             \x20            n2 (xid, since 1970-01-01 00:16:40Z (12m ago)): XID 79 (GPU has fallen off the bus) on GPU 0\n\
             last reset   never\n"
        );
    }

    #[test]
    fn a_reset_says_who_closed_it() {
        let mut b = open();
        b.open = false;
        b.state = "closed";
        b.held.clear();
        b.last_reset_by = Some("alice (admin)".into());
        b.last_reset_at_unix_ms = Some(NOW);
        assert_eq!(
            breaker_reset(&b),
            "cordon breaker reset by alice (admin): closed; a fresh window begins (cap 2); held \
             nodes are judged again on fresh evidence only\n"
        );
        let text = breaker(&b, NOW, Term::PLAIN);
        assert!(text.starts_with("state        closed: "), "{text}");
        assert!(!text.contains("\nwhy "), "{text}");
        assert!(text.contains("\nheld         none\n"), "{text}");
    }
}
