//! The `nodes` table, kubectl-style.

use crate::model::{DrainResult, NodeSummary};
use crate::table::{Table, format_age, sanitize};
use crate::term::Term;

/// `7/8`, with ` sim` when the GPUs are simulated so nobody mistakes them for hardware.
fn gpu_count(n: &NodeSummary) -> String {
    let sim = if n.simulated { " sim" } else { "" };
    format!("{}/{}{sim}", n.gpus_healthy, n.gpus_total)
}

fn heartbeat_age(n: &NodeSummary) -> String {
    n.last_heartbeat_age_ms
        .map_or_else(|| "-".to_string(), format_age)
}

/// The cordon reason if the node is cordoned, its held cordon if the breaker holds one, else
/// a drain an administrator set in Slurm, else the first reason for its condition.
fn reason(n: &NodeSummary) -> String {
    match (&n.cordon, &n.held_cordon, &n.slurm_drain) {
        (Some(c), _, _) => c.reason.clone(),
        (None, Some(h), _) => format!("{HELD}: {}", h.evidence),
        (None, None, Some(d)) => format!("drained in slurm: {}", d.reason),
        (None, None, None) => n.condition_reasons.first().cloned().unwrap_or_default(),
    }
}

/// How a held cordon reads in `nodes` and `node`.
pub const HELD: &str = "cordon held: breaker open";

pub fn nodes(list: &[NodeSummary], term: Term) -> String {
    if list.is_empty() {
        return "no nodes registered (start vigil-agent on a GPU host)\n".to_string();
    }
    let mut t = Table::with_headers(&[
        "NAME",
        "STATE",
        "CONDITION",
        "AVAILABILITY",
        "SCHEDULING",
        "GPUS",
        "LAST-HEARTBEAT",
        "REASON",
    ])
    .fit(term.width)
    .paint(term, &[1, 2, 3, 4]);
    for n in list {
        t.push([
            n.name.clone(),
            n.state.clone(),
            n.condition.as_str().to_string(),
            n.availability.as_str().to_string(),
            n.scheduling.as_str().to_string(),
            gpu_count(n),
            heartbeat_age(n),
            reason(n),
        ]);
    }
    t.render()
}

/// `node X drained: cordoned (reason); restarting 2 job(s) elsewhere from their last
/// checkpoint: j-1, j-7`, or `...; no jobs were running on it`.
pub fn drained(d: &DrainResult, reason: &str) -> String {
    let reason = d.node.cordon.as_ref().map_or(reason, |c| c.reason.as_str());
    let jobs = if d.jobs_restarted.is_empty() {
        "no jobs were running on it".to_string()
    } else {
        format!(
            "restarting {} job(s) elsewhere from their last checkpoint: {}",
            d.jobs_restarted.len(),
            d.jobs_restarted.join(", ")
        )
    };
    format!(
        "{}\n",
        sanitize(&format!(
            "node {} drained: cordoned ({reason}); {jobs}",
            d.node.name
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{cordoned_sim_node, ready_nvml_node};

    #[test]
    fn nodes_table_marks_simulated_gpus_and_missing_heartbeats() {
        let mut degraded = NodeSummary::from(ready_nvml_node("gpu-011"));
        degraded.state = "Degraded".into();
        degraded.condition = crate::model::Condition::Degraded;
        degraded.condition_reasons = vec!["gpu 2: thermal throttling".into(), "other".into()];
        let list = vec![
            NodeSummary::from(cordoned_sim_node()),
            NodeSummary::from(ready_nvml_node("gpu-010")),
            degraded,
        ];
        assert_eq!(
            nodes(&list, Term::PLAIN),
            "NAME      STATE      CONDITION   AVAILABILITY   SCHEDULING    GPUS      LAST-HEARTBEAT   REASON\n\
             gpu-003   Cordoned   Degraded    Ready          Cordoned      7/8 sim   0.4s             bad fan\n\
             gpu-010   Ready      Healthy     Ready          Schedulable   8/8       -\n\
             gpu-011   Degraded   Degraded    Ready          Schedulable   8/8       -                gpu 2: thermal throttling\n"
        );
    }

    #[test]
    fn drain_names_the_restarted_jobs_or_says_there_were_none() {
        let mut d = DrainResult {
            node: NodeSummary::from(cordoned_sim_node()),
            jobs_restarted: vec!["j-1".into(), "j-7".into()],
        };
        assert_eq!(
            drained(&d, "asked"),
            "node gpu-003 drained: cordoned (bad fan); restarting 2 job(s) elsewhere from their last checkpoint: j-1, j-7\n"
        );
        d.jobs_restarted.clear();
        d.node.cordon = None;
        assert_eq!(
            drained(&d, "asked"),
            "node gpu-003 drained: cordoned (asked); no jobs were running on it\n"
        );
    }
}
