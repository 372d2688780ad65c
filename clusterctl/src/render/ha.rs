//! The high-availability lines of `status`: the store, who leads (or that none does), and
//! small tables of the coordinators and the etcd members.

use super::{Labelled, STATUS_LABEL_WIDTH, or_dash, status::section};
use crate::model::Ha;
use crate::table::{Table, format_bytes, format_duration, format_when, sanitize};
use crate::term::Term;

/// Appends the HA lines to the status screen.
pub fn ha_lines(out: &mut Labelled, ha: &Ha, now_ms: u64, term: Term) {
    out.line("store", store(ha));
    if ha.is_etcd() || ha.role == "standby" {
        out.line_styled("leader", &leader(ha, now_ms, term));
    }
    let fit = term.width.map(|w| w.saturating_sub(STATUS_LABEL_WIDTH));
    if !ha.coordinators.is_empty() {
        let mut rows = Table::with_headers(&["NAME", "URL", "ROLE", "VERSION", "UP"]).gap(2);
        for c in &ha.coordinators {
            rows.push([
                c.name.clone(),
                or_dash(&c.url).to_string(),
                c.role.clone(),
                or_dash(&c.version).to_string(),
                match c.started_at_unix_ms {
                    0 => "-".to_string(),
                    at => format_duration(now_ms.saturating_sub(at)),
                },
            ]);
        }
        section(out, "coordinators", &rows);
    }
    if !ha.etcd.is_empty() {
        let mut rows = Table::with_headers(&[
            "ENDPOINT", "HEALTH", "LEADER", "VERSION", "DB", "TERM", "ERROR",
        ])
        .gap(2)
        .fit(fit)
        .paint(term, &[1]);
        for m in &ha.etcd {
            rows.push([
                m.endpoint.clone(),
                if m.healthy { "Healthy" } else { "Unhealthy" }.to_string(),
                if m.is_leader { "leader" } else { "-" }.to_string(),
                m.version.clone().unwrap_or_else(|| "-".into()),
                m.db_size_bytes.map_or_else(|| "-".into(), format_bytes),
                m.raft_term.map_or_else(|| "-".into(), |t| t.to_string()),
                m.error
                    .as_deref()
                    .map_or_else(|| "-".into(), |e| format!("{e:?}")),
            ]);
        }
        section(out, "etcd", &rows);
    }
}

/// `etcd (3 members, quorum ok)`, `etcd (3 members, 1 healthy, NO QUORUM)`,
/// `sqlite (single coordinator)`.
fn store(ha: &Ha) -> String {
    if !ha.is_etcd() {
        return match ha.store.as_str() {
            "sqlite" => "sqlite (single coordinator)".to_string(),
            // Coordinators before the SQLite store.
            "sled" => "sled (single coordinator)".to_string(),
            other => or_dash(other).to_string(),
        };
    }
    let members = ha.etcd.len();
    let healthy = ha.etcd.iter().filter(|m| m.healthy).count();
    let noun = if members == 1 { "member" } else { "members" };
    let health = if healthy == members {
        String::new()
    } else {
        format!(", {healthy} healthy")
    };
    let quorum = if ha.quorum { "quorum ok" } else { "NO QUORUM" };
    format!("etcd ({members} {noun}{health}, {quorum})")
}

/// `coord-2 (https://c2:7770), term 41, since TIME (12m ago)`, or `NONE: ...` (in red).
fn leader(ha: &Ha, now_ms: u64, term: Term) -> String {
    let Some(name) = &ha.leader else {
        let why = match (&ha.etcd_error, ha.quorum) {
            (Some(e), _) => format!("etcd: {e}"),
            (None, false) => "etcd has no quorum".to_string(),
            (None, true) => "no coordinator has won the election yet".to_string(),
        };
        return format!(
            "{}: no coordinator leads ({})",
            term.paint("NONE"),
            sanitize(&why)
        );
    };
    let mut text = sanitize(name);
    if let Some(url) = &ha.leader_url {
        text.push_str(&format!(" ({})", sanitize(url)));
    }
    text.push_str(&format!(", term {}", ha.term));
    if let Some(since) = ha.leader_since_unix_ms {
        text.push_str(&format!(", since {}", format_when(since, now_ms)));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{ha_etcd_healthy, ha_etcd_no_quorum};

    #[test]
    fn no_leader_is_red_and_unhealthy_members_too() {
        let color = Term {
            width: None,
            color: true,
        };
        let mut out = Labelled::new(STATUS_LABEL_WIDTH);
        ha_lines(&mut out, &Ha::from(ha_etcd_no_quorum()), 0, color);
        let text = out.finish();
        assert!(
            text.contains("leader       \x1b[31mNONE\x1b[0m: no coordinator leads (etcd: "),
            "{text}"
        );
        assert!(text.contains("\x1b[31mUnhealthy\x1b[0m"), "{text}");
    }

    #[test]
    fn a_healthy_cluster_names_its_leader_and_term() {
        let mut ha = Ha::from(ha_etcd_healthy());
        ha.leader_since_unix_ms = None;
        assert_eq!(
            leader(&ha, 0, Term::PLAIN),
            "coord-2 (https://coord-2.example:7770), term 41"
        );
        ha.etcd[1].healthy = false;
        ha.quorum = false;
        assert_eq!(store(&ha), "etcd (3 members, 2 healthy, NO QUORUM)");
    }
}
