//! The fake's jobs (one running after a restart, one pending) and the job commands' tests.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tonic::Status;
use vigil_proto::v1;

use super::{clusterctl, start_fake, stderr, stdout_json};

const NOW_ISH: u64 = 1_700_000_000_000;

fn running() -> v1::JobSummary {
    v1::JobSummary {
        id: "j-1".into(),
        name: "opt-demo".into(),
        state: "Running".into(),
        attempt: 2,
        restarts: 1,
        max_restarts: 50,
        nodes: 2,
        gpus_per_node: 8,
        assigned_nodes: vec!["gpu-001".into(), "gpu-004".into()],
        last_checkpoint_step: Some(200),
        submitted_at_unix_ms: NOW_ISH,
        reason: String::new(),
        progress_step: Some(230),
        source: "vigil".into(),
    }
}

fn pending(name: &str) -> v1::JobSummary {
    v1::JobSummary {
        id: "j-2".into(),
        name: name.into(),
        state: "Pending".into(),
        attempt: 0,
        restarts: 0,
        max_restarts: 3,
        assigned_nodes: vec![],
        last_checkpoint_step: None,
        progress_step: None,
        reason: "waiting for 2 schedulable nodes (1 Ready)".into(),
        ..running()
    }
}

fn detail(summary: v1::JobSummary) -> v1::JobDetail {
    v1::JobDetail {
        summary: Some(summary),
        spec_toml: "name = \"opt-demo\"\n".into(),
        slurm: None,
        spare_nodes: vec![],
        attempts: vec![v1::AttemptRecord {
            attempt: 1,
            nodes: vec!["gpu-001".into(), "gpu-003".into()],
            started_at_unix_ms: NOW_ISH + 1_000,
            ended_at_unix_ms: NOW_ISH + 61_000,
            outcome: "failed".into(),
            reason: "XID 79 (GPU has fallen off the bus)".into(),
            culprit_node: "gpu-003".into(),
            resumed_from: String::new(),
            resumed_from_step: None,
            last_step: Some(260),
            triage: Default::default(),
            ..Default::default()
        }],
        last_checkpoint: Some(v1::CheckpointRecord {
            path: "/ckpt/step_00000200".into(),
            step: Some(200),
            seen_at_unix_ms: NOW_ISH + 50_000,
            attempt: 1,
        }),
        lost_ms: 4_200,
        bad_checkpoints: Vec::new(),
        goodput: None,
        events: vec![v1::JobEvent {
            at_unix_ms: NOW_ISH,
            kind: "submitted".into(),
            message: "submitted from job.toml".into(),
        }],
        workers: vec![v1::WorkerStatus {
            node: "gpu-001".into(),
            node_rank: 0,
            state: "running".into(),
            exit_code: None,
            progress_step: Some(230),
            progress_at_unix_ms: NOW_ISH + 70_000,
            pid: 4242,
            log_path: "/var/lib/vigil/logs/j-1-2.log".into(),
        }],
        workdir: "/shared/runs/opt-demo".into(),
        checkpoint_dir: "/ckpt".into(),
        checkpoint_layout: "marker".into(),
    }
}

/// Refuses a gang of zero, naming the source, field and fix as the coordinator does.
pub fn submit(req: v1::SubmitJobRequest) -> Result<v1::JobDetail, Status> {
    if req.spec_toml.contains("nodes = 0") {
        return Err(Status::invalid_argument(format!(
            "{}: nodes = 0: must be at least 1 (the gang size), e.g. nodes = 2",
            req.source
        )));
    }
    // The job is named after where its spec came from, so tests see `source` arrive.
    Ok(detail(pending(&req.source)))
}

pub fn list() -> v1::ListJobsResponse {
    v1::ListJobsResponse {
        jobs: vec![running(), pending("bert")],
    }
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("job {id:?} not found (clusterctl jobs lists jobs)"))
}

pub fn get(id: &str) -> Result<v1::JobDetail, Status> {
    match id {
        "j-1" => Ok(detail(running())),
        other => Err(not_found(other)),
    }
}

pub fn cancel(id: &str) -> Result<v1::JobDetail, Status> {
    match id {
        "j-1" => Ok(detail(v1::JobSummary {
            state: "Cancelling".into(),
            ..running()
        })),
        other => Err(not_found(other)),
    }
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

#[test]
fn submitting_a_missing_file_names_the_path() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["job", "submit", "no/such/job.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = stderr(&out);
    assert!(
        err.starts_with("error: cannot read job spec \"no/such/job.toml\": "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn an_invalid_spec_prints_the_coordinators_words() {
    let (_rt, url) = start_fake();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "name = \"x\"\nnodes = 0\n").expect("write");
    let path = path.to_str().expect("utf-8 path");
    let out = clusterctl(&url, &["job", "submit", path]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        stderr(&out),
        format!("error: {path}: nodes = 0: must be at least 1 (the gang size), e.g. nodes = 2\n")
    );
}

#[test]
fn submit_prints_the_id_state_and_why_it_waits() {
    let (_rt, url) = start_fake();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("job.toml");
    std::fs::write(&path, "name = \"opt-demo\"\nnodes = 2\n").expect("write");
    let path = path.to_str().expect("utf-8 path");
    let out = clusterctl(&url, &["job", "submit", path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "job j-2 submitted ({path}): Pending — waiting for 2 schedulable nodes (1 Ready)\n"
        )
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args([
            "--coordinator",
            &url,
            "--insecure",
            "-o",
            "json",
            "job",
            "submit",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("clusterctl runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"name = \"opt-demo\"\nnodes = 2\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("clusterctl exits");
    let job = stdout_json(&out);
    assert_eq!(job["job"]["name"], json!("<stdin>"));
    assert_eq!(job["job"]["state"], json!("Pending"));
}

#[test]
fn jobs_table_lists_progress_and_placement() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["jobs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with(
            "ID    NAME       STATE     ATTEMPT   RESTARTS   NODES             STEP   CHECKPOINT   AGE"
        ),
        "{text}"
    );
    assert!(
        lines[1].starts_with(
            "j-1   opt-demo   Running   2         1/50       gpu-001,gpu-004   230    200"
        ),
        "{text}"
    );
    assert!(
        lines[2].starts_with(
            "j-2   bert       Pending   -         0/3        -                 -      -"
        ),
        "{text}"
    );
    assert!(
        lines[2].ends_with("waiting for 2 schedulable nodes (1 Ready)"),
        "{text}"
    );

    let list = stdout_json(&clusterctl(&url, &["-o", "json", "jobs"]));
    assert_eq!(keys(&list), ["jobs"]);
    assert_eq!(list["jobs"][1]["last_checkpoint_step"], json!(null));
    assert_eq!(list["jobs"][1]["assigned_nodes"], json!([]));
}

#[test]
fn job_show_json_has_the_documented_shape() {
    let (_rt, url) = start_fake();
    let job = stdout_json(&clusterctl(&url, &["-o", "json", "job", "show", "j-1"]));
    assert_eq!(
        keys(&job),
        [
            "attempts",
            "bad_checkpoints",
            "checkpoint_dir",
            "checkpoint_layout",
            "events",
            "goodput",
            "job",
            "last_checkpoint",
            "lost_ms",
            "slurm",
            "spare_nodes",
            "spec_toml",
            "workdir",
            "workers",
        ]
    );
    assert_eq!(
        keys(&job["job"]),
        [
            "assigned_nodes",
            "attempt",
            "gpus_per_node",
            "id",
            "last_checkpoint_step",
            "max_restarts",
            "name",
            "nodes",
            "progress_step",
            "reason",
            "restarts",
            "source",
            "state",
            "submitted_at_unix_ms",
        ]
    );
    assert_eq!(
        job["last_checkpoint"],
        json!({"path": "/ckpt/step_00000200", "step": 200, "seen_at_unix_ms": NOW_ISH + 50_000, "attempt": 1})
    );
    assert_eq!(job["attempts"][0]["culprit_node"], json!("gpu-003"));
    assert_eq!(job["attempts"][0]["resumed_from_step"], json!(null));
    assert_eq!(
        keys(&job["attempts"][0]),
        [
            "attempt",
            "crash_loop",
            "culprit_node",
            "ended_at_unix_ms",
            "evidence",
            "exit_code",
            "last_step",
            "log_tail",
            "nodes",
            "outcome",
            "preflight",
            "reason",
            "resumed_from",
            "resumed_from_step",
            "signal",
            "started_at_unix_ms",
            "suspect",
            "triage",
        ]
    );
    assert_eq!(
        job["workers"][0],
        json!({
            "node": "gpu-001",
            "node_rank": 0,
            "state": "running",
            "exit_code": null,
            "progress_step": 230,
            "progress_at_unix_ms": NOW_ISH + 70_000,
            "pid": 4242,
            "log_path": "/var/lib/vigil/logs/j-1-2.log",
        })
    );
    assert_eq!(
        job["events"],
        json!([{"at_unix_ms": NOW_ISH, "kind": "submitted", "message": "submitted from job.toml"}])
    );
    assert_eq!(job["lost_ms"], json!(4_200));
    assert_eq!(job["checkpoint_layout"], json!("marker"));

    let cancelled = stdout_json(&clusterctl(&url, &["-o", "json", "job", "cancel", "j-1"]));
    assert_eq!(cancelled["job"]["state"], json!("Cancelling"));
}

#[test]
fn job_show_and_cancel_for_people() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["job", "show", "j-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("job             j-1 (opt-demo)\n"),
        "{text}"
    );
    assert!(text.contains("time lost       4.2s\n"), "{text}");
    assert!(text.contains("\nWORKERS\nNODE "), "{text}");
    assert!(text.contains("(culprit: gpu-003)\n"), "{text}");
    assert!(
        text.contains("   submitted   submitted from job.toml\n"),
        "{text}"
    );

    let out = clusterctl(&url, &["job", "cancel", "j-1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "job j-1 cancelling\n");

    let out = clusterctl(&url, &["job", "show", "j-404"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: job \"j-404\" not found (clusterctl jobs lists jobs)\n"
    );
}
