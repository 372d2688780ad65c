//! The recovery hold: `clusterctl recovery`, its confirmation, and the `state` line of `status`.

use super::{Labelled, STATUS_LABEL_WIDTH};
use crate::model::{Recovery, RecoveryView};
use crate::table::{format_utc, format_when, sanitize};
use crate::term::Term;

/// `N record(s)`.
fn records(n: usize) -> String {
    if n == 1 {
        "1 record".to_owned()
    } else {
        format!("{n} records")
    }
}

/// The `state` line of `status`: loud while jobs are held, then who confirmed it.
pub fn state_line(r: &Recovery, term: Term) -> String {
    let at = format_utc(r.since_unix_ms);
    let lost = records(r.lost.len());
    match (&r.confirmed_by, r.confirmed_at_unix_ms) {
        (Some(by), at_ms) => {
            let when = at_ms.map_or_else(String::new, |t| format!(" at {}", format_utc(t)));
            let review = match r.nodes_held.len() {
                0 => String::new(),
                1 => "; 1 node still cordoned for review".to_owned(),
                n => format!("; {n} nodes still cordoned for review"),
            };
            sanitize(&format!(
                "recovered from a damaged store at {at} ({lost} lost), confirmed by {by}{when}{review}"
            ))
        }
        (None, _) => format!(
            "{} from a damaged store at {at}, {lost} lost; jobs held until `clusterctl recovery confirm`",
            term.paint("RECOVERED")
        ),
    }
}

/// `clusterctl recovery`: the hold, what was lost, what is still held.
pub fn recovery(view: &RecoveryView, now_ms: u64, term: Term) -> String {
    let Some(r) = &view.recovery else {
        return "no recovery: this coordinator's state store was never recovered; nothing is held\n"
            .to_owned();
    };
    let mut out = Labelled::new(STATUS_LABEL_WIDTH);
    out.line_styled("state", &state_line(r, term));
    out.line("since", format_when(r.since_unix_ms, now_ms));
    out.line("damage", &r.damage);
    out.line("lost", records(r.lost.len()));
    for line in &r.lost {
        out.line("", line);
    }
    list(&mut out, "lost nodes", &r.lost_nodes);
    list(&mut out, "lost jobs", &r.lost_jobs);
    if let Some(copy) = &r.damaged_copy {
        out.line("damaged copy", copy);
    }
    if r.nodes_held.is_empty() {
        out.line("nodes held", "none");
    } else {
        out.line(
            "nodes held",
            format!(
                "{} (cordoned for review: clusterctl node NAME, then clusterctl uncordon NAME)",
                r.nodes_held.join(", ")
            ),
        );
    }
    let jobs = if r.confirmed {
        "none (confirmed)".to_owned()
    } else {
        format!(
            "{} waiting for `clusterctl recovery confirm`",
            match r.jobs_held {
                1 => "1 job".to_owned(),
                n => format!("{n} jobs"),
            }
        )
    };
    out.line("jobs held", jobs);
    out.finish()
}

fn list(out: &mut Labelled, label: &str, items: &[String]) {
    out.line(
        label,
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        },
    );
}

/// What `recovery confirm` prints.
pub fn recovery_confirmed(view: &RecoveryView) -> String {
    let Some(r) = &view.recovery else {
        return "recovery confirmed\n".to_owned();
    };
    let by = r.confirmed_by.as_deref().unwrap_or("you");
    let nodes = match r.nodes_held.len() {
        0 => "no node is still cordoned by it".to_owned(),
        n => format!(
            "{n} node(s) stay cordoned until each is reviewed and uncordoned (clusterctl uncordon NAME): {}",
            r.nodes_held.join(", ")
        ),
    };
    sanitize(&format!(
        "recovery confirmed by {by}: jobs may be scheduled again; {nodes}"
    )) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_proto::v1;

    const NOW: u64 = 1_000_000 + 12 * 60_000;

    fn held() -> Recovery {
        Recovery::from(v1::RecoveryHold {
            since_unix_ms: 1_000_000,
            damage: "nodes tree: checksum mismatch".into(),
            lost: vec![
                "nodes/n7: checksum mismatch".into(),
                "jobs/j-9: unreadable".into(),
                "jobs/j-10: unreadable".into(),
            ],
            lost_nodes: vec!["n7".into()],
            lost_jobs: vec!["j-9".into(), "j-10".into()],
            damaged_copy: "/var/lib/vigil/damaged-1".into(),
            nodes_held: vec!["n0".into(), "n1".into()],
            jobs_held: 2,
            ..Default::default()
        })
    }

    #[test]
    fn the_screen_shows_what_was_lost_and_what_is_held() {
        let view = RecoveryView {
            recovery: Some(held()),
        };
        assert_eq!(
            recovery(&view, NOW, Term::PLAIN),
            "state        RECOVERED from a damaged store at 1970-01-01 00:16:40Z, 3 records lost; jobs held until `clusterctl recovery confirm`\n\
             since        1970-01-01 00:16:40Z (12m ago)\n\
             damage       nodes tree: checksum mismatch\n\
             lost         3 records\n\
             \x20            nodes/n7: checksum mismatch\n\
             \x20            jobs/j-9: unreadable\n\
             \x20            jobs/j-10: unreadable\n\
             lost nodes   n7\n\
             lost jobs    j-9, j-10\n\
             damaged copy /var/lib/vigil/damaged-1\n\
             nodes held   n0, n1 (cordoned for review: clusterctl node NAME, then clusterctl uncordon NAME)\n\
             jobs held    2 jobs waiting for `clusterctl recovery confirm`\n"
        );
        let none = RecoveryView { recovery: None };
        assert!(recovery(&none, NOW, Term::PLAIN).starts_with("no recovery: "));
    }

    #[test]
    fn once_confirmed_the_state_line_names_who_and_what_is_left_to_review() {
        let mut r = held();
        r.confirmed = true;
        r.confirmed_by = Some("alice (admin)".into());
        r.confirmed_at_unix_ms = Some(1_060_000);
        r.nodes_held = vec!["n1".into()];
        assert_eq!(
            state_line(&r, Term::PLAIN),
            "recovered from a damaged store at 1970-01-01 00:16:40Z (3 records lost), confirmed \
             by alice (admin) at 1970-01-01 00:17:40Z; 1 node still cordoned for review"
        );
        assert_eq!(
            recovery_confirmed(&RecoveryView {
                recovery: Some(r.clone())
            }),
            "recovery confirmed by alice (admin): jobs may be scheduled again; 1 node(s) stay \
             cordoned until each is reviewed and uncordoned (clusterctl uncordon NAME): n1\n"
        );
        let color = Term {
            width: None,
            color: true,
        };
        assert!(state_line(&held(), color).starts_with("\x1b[31mRECOVERED\x1b[0m from"));
    }
}
