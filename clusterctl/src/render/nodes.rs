//! The `nodes` table, kubectl-style.

use crate::model::NodeSummary;
use crate::table::{Table, format_age};

/// `7/8`, with ` sim` when the GPUs are simulated so nobody mistakes them for hardware.
fn gpu_count(n: &NodeSummary) -> String {
    let sim = if n.simulated { " sim" } else { "" };
    format!("{}/{}{sim}", n.gpus_healthy, n.gpus_total)
}

fn heartbeat_age(n: &NodeSummary) -> String {
    n.last_heartbeat_age_ms
        .map_or_else(|| "-".to_string(), format_age)
}

pub fn nodes(list: &[NodeSummary]) -> String {
    if list.is_empty() {
        return "no nodes registered (start vigil-agent on a GPU host)\n".to_string();
    }
    let mut t = Table::with_headers(&[
        "NAME",
        "STATE",
        "AVAILABILITY",
        "SCHEDULING",
        "GPUS",
        "LAST-HEARTBEAT",
        "REASON",
    ]);
    for n in list {
        t.push([
            n.name.clone(),
            n.state.clone(),
            n.availability.as_str().to_string(),
            n.scheduling.as_str().to_string(),
            gpu_count(n),
            heartbeat_age(n),
            n.cordon
                .as_ref()
                .map(|c| c.reason.clone())
                .unwrap_or_default(),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{cordoned_sim_node, ready_nvml_node};

    #[test]
    fn nodes_table_marks_simulated_gpus_and_missing_heartbeats() {
        let list = vec![
            NodeSummary::from(cordoned_sim_node()),
            NodeSummary::from(ready_nvml_node("gpu-010")),
        ];
        assert_eq!(
            nodes(&list),
            "NAME      STATE      AVAILABILITY   SCHEDULING    GPUS      LAST-HEARTBEAT   REASON\n\
             gpu-003   Cordoned   Ready          Cordoned      7/8 sim   0.4s             bad fan\n\
             gpu-010   Ready      Ready          Schedulable   8/8       -\n"
        );
    }
}
