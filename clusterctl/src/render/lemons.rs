//! `nodes --lemons`: hosts and GPUs with failures on record, lemons first.

use crate::model::LemonList;
use crate::table::{Table, format_ago, format_duration};
use crate::term::Term;

pub fn lemons(list: &LemonList, now_ms: u64, term: Term) -> String {
    let policy = if list.max_failures == 0 {
        "lemon detection off (lemons.max_failures = 0); failures are still recorded".to_string()
    } else {
        format!(
            "a host or GPU with {} failures within {} is a lemon (cordoned: repeat-offender)",
            list.max_failures,
            format_duration(list.window_ms)
        )
    };
    if list.lemons.is_empty() {
        return format!("no failures on record\n{policy}\n");
    }
    let mut t = Table::with_headers(&[
        "KIND",
        "ID",
        "NODE",
        "STATE",
        "FAILURES",
        "KINDS",
        "LAST",
        "LAST-DETAIL",
    ])
    .fit(term.width)
    .paint(term, &[3]);
    for l in &list.lemons {
        let state = match l.blocklisted_at_unix_ms {
            Some(_) => "Lemon",
            None => "Watched",
        };
        t.push([
            l.kind.clone(),
            l.id.clone(),
            l.node.clone(),
            state.to_string(),
            format!("{} ({} ever)", l.failures, l.failures_total),
            if l.kinds.is_empty() {
                "-".to_string()
            } else {
                l.kinds.clone()
            },
            if l.last_failure_unix_ms == 0 {
                "-".to_string()
            } else {
                format_ago(l.last_failure_unix_ms, now_ms)
            },
            l.last_detail.clone(),
        ]);
    }
    format!("{}{policy}\n", t.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Lemon;

    #[test]
    fn lemons_come_with_their_failures_and_the_policy() {
        let list = LemonList {
            lemons: vec![Lemon {
                kind: "gpu".into(),
                id: "1650000000001".into(),
                node: "gpu-003".into(),
                failures: 3,
                failures_total: 4,
                kinds: "unhealthy x3".into(),
                last_failure_unix_ms: 1_000_000,
                last_detail: "XID 79 (GPU has fallen off the bus) on GPU 3".into(),
                blocklisted_at_unix_ms: Some(1_000_000),
                cleared_at_unix_ms: None,
            }],
            max_failures: 3,
            window_ms: 7 * 24 * 3_600_000,
        };
        assert_eq!(
            lemons(&list, 1_060_000, Term::PLAIN),
            "KIND   ID              NODE      STATE   FAILURES     KINDS          LAST     LAST-DETAIL\n\
             gpu    1650000000001   gpu-003   Lemon   3 (4 ever)   unhealthy x3   1m ago   XID 79 (GPU has fallen off the bus) on GPU 3\n\
             a host or GPU with 3 failures within 7d00h is a lemon (cordoned: repeat-offender)\n"
        );
        let empty = LemonList {
            lemons: vec![],
            max_failures: 0,
            window_ms: 1,
        };
        assert!(
            lemons(&empty, 0, Term::PLAIN)
                .starts_with("no failures on record\nlemon detection off")
        );
    }
}
