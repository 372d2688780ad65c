//! The lemon ledger as clusterctl sees it (`nodes --lemons`).

use vigil_proto::v1;

use crate::lemons::{Ledger, LemonRecord};

fn lemon(r: &LemonRecord, ledger: &Ledger, now_ms: u64) -> v1::Lemon {
    let last = r.incidents.last();
    v1::Lemon {
        kind: r.kind.as_str().to_owned(),
        id: r.id.clone(),
        node: r.node.clone(),
        failures: u32::try_from(r.recent(now_ms, &ledger.cfg).count()).unwrap_or(u32::MAX),
        failures_total: u32::try_from(r.incidents.len()).unwrap_or(u32::MAX),
        kinds: r.kinds(now_ms, &ledger.cfg),
        last_failure_unix_ms: last.map_or(0, |i| i.at_ms),
        last_detail: last.map_or_else(String::new, |i| i.detail.clone()),
        blocklisted_at_unix_ms: r.blocklisted_at_ms,
        cleared_at_unix_ms: r.cleared_at_ms,
    }
}

/// Lemons and suspects, worst first.
pub fn listing(ledger: &Ledger, now_ms: u64) -> v1::ListLemonsResponse {
    response(ledger, ledger.listing(now_ms).into_iter(), now_ms)
}

/// The records an operator just cleared.
pub fn cleared(ledger: &Ledger, records: &[LemonRecord], now_ms: u64) -> v1::ListLemonsResponse {
    response(ledger, records.iter(), now_ms)
}

fn response<'a>(
    ledger: &Ledger,
    records: impl Iterator<Item = &'a LemonRecord>,
    now_ms: u64,
) -> v1::ListLemonsResponse {
    v1::ListLemonsResponse {
        lemons: records.map(|r| lemon(r, ledger, now_ms)).collect(),
        max_failures: ledger.cfg.max_failures,
        window_ms: u64::try_from(ledger.cfg.window.as_millis()).unwrap_or(u64::MAX),
    }
}
