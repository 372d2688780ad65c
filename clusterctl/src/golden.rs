//! Golden files: the table and JSON output of `status` (with and without its HA section, and
//! recovered from a damaged store), `recovery`, `nodes`, `jobs`, `job show` (a vigil job and a
//! Slurm job), `job report`
//! and `events` for the fixtures, at a fixed `now`, without colour or terminal width, compared with
//! `tests/golden/*`. `UPDATE_GOLDEN=1 cargo test -p clusterctl golden` rewrites them (review
//! the diff).

use std::path::PathBuf;

use serde::Serialize;
use vigil_proto::v1;

use crate::commands::{json_document, json_line};
use crate::model::fixtures::{
    cluster_events, cordoned_sim_node, degraded_node, ha_etcd_healthy, ha_etcd_no_quorum,
    ha_single, held_node, pending_job, ready_nvml_node, recovery_hold, running_job, slurm_job,
    status_response,
};
use crate::model::{ClusterEvent, JobDetail, JobList, NodeList, RecoveryView, Status};
use crate::render;
use crate::term::Term;

/// Twelve minutes after the fixtures' first timestamps.
const NOW: u64 = 1_000_000 + 12 * 60_000;

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        if let Err(e) = std::fs::write(&path, actual) {
            panic!("cannot write {}: {e}", path.display());
        }
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e} (UPDATE_GOLDEN=1 cargo test -p clusterctl golden writes it)",
            path.display()
        )
    });
    assert!(
        actual == expected,
        "{} differs (if intended, rerun with UPDATE_GOLDEN=1 and review the diff)\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

fn check_both<T: Serialize>(name: &str, model: &T, text: &str) {
    check(&format!("{name}.txt"), text);
    match json_document(model) {
        Ok(json) => check(&format!("{name}.json"), &json),
        Err(e) => panic!("{name}: {e:#}"),
    }
}

#[test]
fn golden_status() {
    let status = Status::from_proto(status_response(), "http://127.0.0.1:7770");
    check_both(
        "status",
        &status,
        &render::status(&status, NOW, Term::PLAIN),
    );
}

/// `status` with the HA section: one coordinator on SQLite, two on a healthy etcd, and etcd
/// without quorum (no leader).
#[test]
fn golden_status_ha() {
    for (name, ha) in [
        ("status_ha_single", ha_single()),
        ("status_ha_etcd", ha_etcd_healthy()),
        ("status_ha_no_quorum", ha_etcd_no_quorum()),
    ] {
        // The URL clusterctl asked: the answering coordinator's.
        let url = match ha.coordinator.as_str() {
            "" | "coordinator" => "https://coord-1.example:7770".to_owned(),
            name => format!("https://{name}.example:7770"),
        };
        let response = v1::StatusResponse {
            ha: Some(ha),
            ..status_response()
        };
        let status = Status::from_proto(response, &url);
        check_both(name, &status, &render::status(&status, NOW, Term::PLAIN));
    }
}

/// `status` of a coordinator recovered from a damaged store, and `recovery`.
#[test]
fn golden_recovery() {
    let response = v1::StatusResponse {
        recovery: Some(recovery_hold()),
        ..status_response()
    };
    let status = Status::from_proto(response, "http://127.0.0.1:7770");
    check_both(
        "status_recovered",
        &status,
        &render::status(&status, NOW, Term::PLAIN),
    );
    let view = RecoveryView::from(v1::RecoveryResponse {
        hold: Some(recovery_hold()),
    });
    check_both(
        "recovery",
        &view,
        &render::recovery(&view, NOW, Term::PLAIN),
    );
}

#[test]
fn golden_nodes() {
    let list = NodeList::from(v1::ListNodesResponse {
        nodes: vec![
            cordoned_sim_node(),
            ready_nvml_node("gpu-010"),
            degraded_node(),
            held_node(),
        ],
    });
    check_both("nodes", &list, &render::nodes(&list.nodes, Term::PLAIN));
}

#[test]
fn golden_jobs() {
    let list = JobList::from(v1::ListJobsResponse {
        jobs: running_job()
            .summary
            .into_iter()
            .chain([pending_job()])
            .chain(slurm_job().summary)
            .collect(),
    });
    check_both("jobs", &list, &render::jobs(&list.jobs, NOW, Term::PLAIN));
}

#[test]
fn golden_job_show() {
    let detail = JobDetail::from_proto(running_job(), "j-1");
    check_both(
        "job_show",
        &detail,
        &render::job_detail(&detail, NOW, Term::PLAIN),
    );
}

/// A Slurm job vigil recorded (`job show slurm:4711`): runs, vigil's requeue, goodput.
#[test]
fn golden_slurm_job_show() {
    let detail = JobDetail::from_proto(slurm_job(), "slurm:4711");
    check_both(
        "slurm_job_show",
        &detail,
        &render::job_detail(&detail, NOW, Term::PLAIN),
    );
}

#[test]
fn golden_job_report() {
    let detail = JobDetail::from_proto(running_job(), "j-1");
    check("job_report.txt", &render::job_report(&detail, Term::PLAIN));
}

/// `events`: the checkpoints folded into one line in the text, every event in the JSON Lines.
#[test]
fn golden_events() {
    let events: Vec<ClusterEvent> = cluster_events().into_iter().map(Into::into).collect();
    let columns = render::EventColumns::fit(&events, false);
    check(
        "events.txt",
        &(columns.header() + &columns.lines(&events, Term::PLAIN)),
    );
    let json: String = events
        .iter()
        .map(|e| json_line(e).unwrap_or_else(|e| panic!("events: {e:#}")))
        .collect();
    check("events.jsonl", &json);
}
