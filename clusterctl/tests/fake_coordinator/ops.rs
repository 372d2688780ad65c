//! The fake's events, drain and job logs, and the tests of `events`, `drain`, `job logs` and
//! `completions`.

use std::io::{BufRead, BufReader};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use vigil_proto::v1;

use super::{clusterctl, sim_node, start_fake, stderr, stdout_json};

pub type FakeStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

const T0: u64 = 1_700_000_000_000;

/// How long the fake pauses before the event it streams after the backlog.
const FOLLOW_PAUSE: Duration = Duration::from_millis(600);

fn event(at: u64, kind: &str, node: &str, job: &str, message: &str) -> v1::ClusterEvent {
    v1::ClusterEvent {
        at_unix_ms: at,
        kind: kind.into(),
        node: node.into(),
        job: job.into(),
        message: message.into(),
    }
}

/// Sends `items`, pausing `pause` before those marked `true`; ends the stream after the last
/// unless `forever`.
fn stream<T: Send + 'static>(
    items: Vec<(bool, T)>,
    pause: Duration,
    forever: bool,
) -> FakeStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        for (wait, item) in items {
            if wait {
                tokio::time::sleep(pause).await;
            }
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
        }
        if forever {
            std::future::pending::<()>().await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Two past events; following, one more after a pause, then the end. Node `echo`: one event
/// whose message is the request; node `forever`: one event, then a stream that never ends.
pub fn watch_events(req: v1::WatchEventsRequest) -> FakeStream<v1::ClusterEvent> {
    let echo = format!(
        "node={} job={} backlog={} follow={}",
        req.node, req.job, req.backlog, req.follow
    );
    match req.node.as_str() {
        "echo" => {
            return stream(
                vec![(false, event(T0, "echo", "", "", &echo))],
                FOLLOW_PAUSE,
                false,
            );
        }
        "forever" => {
            let first = event(T0, "registered", "forever", "", "agent 0.1.0 registered");
            return stream(vec![(false, first)], FOLLOW_PAUSE, true);
        }
        _ => {}
    }
    let mut events = vec![
        (
            false,
            event(T0, "cordon", "gpu-003", "", "cordoned by operator: bad fan"),
        ),
        (
            false,
            event(
                T0 + 60_000,
                "worker-exited",
                "gpu-001",
                "j-1",
                "rank 0 exited with code 1",
            ),
        ),
    ];
    if req.follow {
        let late = event(
            T0 + 120_000,
            "xid",
            "gpu-004",
            "",
            "Xid 79: GPU has fallen off the bus",
        );
        events.push((true, late));
    }
    stream(events, FOLLOW_PAUSE, false)
}

/// `gpu-003` had two jobs, `gpu-idle` none.
pub fn drain(req: v1::DrainRequest) -> Result<v1::DrainResponse, Status> {
    let jobs_restarted = match req.name.as_str() {
        "gpu-003" => vec!["j-1".to_string(), "j-7".to_string()],
        "gpu-idle" => vec![],
        other => return Err(super::not_found(other)),
    };
    let mut node = sim_node();
    node.name = req.name;
    if let Some(c) = node.cordon.as_mut() {
        c.reason = req.reason;
    }
    Ok(v1::DrainResponse {
        node: Some(node),
        jobs_restarted,
    })
}

/// j-1's two workers, one line split across chunks, the last line without a newline; a
/// nonzero `tail_bytes` is echoed first.
pub fn job_logs(req: v1::JobLogsRequest) -> Result<FakeStream<v1::LogChunk>, Status> {
    if req.id != "j-1" {
        return Err(Status::not_found(format!(
            "job {:?} not found (clusterctl jobs lists jobs)",
            req.id
        )));
    }
    let chunk = |node: &str, rank: u32, data: &str| v1::LogChunk {
        node: node.into(),
        node_rank: rank,
        attempt: 2,
        data: data.into(),
    };
    let mut chunks = vec![];
    if req.tail_bytes != 0 {
        let echo = format!("tail={} follow={}\n", req.tail_bytes, req.follow);
        chunks.push(chunk("gpu-001", 0, &echo));
    }
    chunks.extend([
        chunk("gpu-001", 0, "step 1\nstep 2 par"),
        chunk("gpu-004", 1, "hello from rank 1\n"),
        chunk("gpu-001", 0, "tial\n"),
        chunk("gpu-004", 1, "no newline at the end"),
    ]);
    chunks.retain(|c| req.node.is_empty() || c.node == req.node);
    let items = chunks.into_iter().map(|c| (false, c)).collect();
    Ok(stream(items, FOLLOW_PAUSE, false))
}

fn stdout(out: &std::process::Output) -> String {
    assert!(out.status.success(), "stderr: {}", stderr(out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    stdout(out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect()
}

#[test]
fn events_print_the_backlog_aligned_or_as_json_lines() {
    let (_rt, url) = start_fake();
    assert_eq!(
        stdout(&clusterctl(&url, &["events"])),
        "TIME                  KIND           NODE/JOB     MESSAGE\n\
         2023-11-14 22:13:20Z  cordon         gpu-003      cordoned by operator: bad fan\n\
         2023-11-14 22:14:20Z  worker-exited  gpu-001/j-1  rank 0 exited with code 1\n"
    );
    let lines = json_lines(&clusterctl(&url, &["events", "-o", "json"]));
    assert_eq!(lines.len(), 2);
    assert_eq!(
        lines[1],
        json!({"at_unix_ms": T0 + 60_000, "kind": "worker-exited", "node": "gpu-001", "job": "j-1", "message": "rank 0 exited with code 1"})
    );
    let echo = json_lines(&clusterctl(
        &url,
        &[
            "-o",
            "json",
            "events",
            "--node",
            "echo",
            "--job",
            "j-1",
            "--backlog",
            "7",
        ],
    ));
    assert_eq!(
        echo[0]["message"],
        json!("node=echo job=j-1 backlog=7 follow=false")
    );
    let out = clusterctl(&url, &["events", "--backlog", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn followed_events_stream_in_the_backlogs_columns_until_the_stream_ends() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["events", "--follow"]);
    assert_eq!(
        stdout(&out),
        "TIME                  KIND           NODE/JOB          MESSAGE\n\
         2023-11-14 22:13:20Z  cordon         gpu-003           cordoned by operator: bad fan\n\
         2023-11-14 22:14:20Z  worker-exited  gpu-001/j-1       rank 0 exited with code 1\n\
         2023-11-14 22:15:20Z  xid            gpu-004           Xid 79: GPU has fallen off the bus\n"
    );
    let lines = json_lines(&clusterctl(&url, &["events", "-f", "-o", "json"]));
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["kind"], json!("xid"));
}

/// `--kind` picks kinds out of what the coordinator sends (it has no such filter), in the
/// backlog and in what follows; with it and no `--backlog`, the most the coordinator sends.
#[test]
fn events_of_the_kinds_asked_for_only() {
    let (_rt, url) = start_fake();
    let out = clusterctl(&url, &["events", "-f", "--kind", "xid", "--kind", "cordon"]);
    assert_eq!(
        stdout(&out),
        "TIME                  KIND           NODE/JOB          MESSAGE\n\
         2023-11-14 22:13:20Z  cordon         gpu-003           cordoned by operator: bad fan\n\
         2023-11-14 22:15:20Z  xid            gpu-004           Xid 79: GPU has fallen off the bus\n"
    );
    let lines = json_lines(&clusterctl(
        &url,
        &["events", "-f", "-o", "json", "--kind", "worker-exited"],
    ));
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["kind"], json!("worker-exited"));
    assert_eq!(
        stdout(&clusterctl(&url, &["events", "--kind", "diagnostics"])),
        "no events\n"
    );
    let echo = json_lines(&clusterctl(
        &url,
        &["-o", "json", "events", "--node", "echo", "--kind", "echo"],
    ));
    assert_eq!(
        echo[0]["message"],
        json!("node=echo job= backlog=1000 follow=false")
    );
}

/// Runs clusterctl until it has printed `lines` lines, then sends it Ctrl-C (SIGINT); the lines
/// and the exit code.
fn until_ctrl_c(url: &str, args: &[&str], lines: usize) -> (Vec<String>, Option<i32>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args(["--coordinator", url, "--insecure"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("clusterctl runs");
    let reader = BufReader::new(child.stdout.take().expect("stdout"));
    let printed: Vec<String> = reader
        .lines()
        .take(lines)
        .map(|l| l.expect("utf-8"))
        .collect();
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let started = SystemTime::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (printed, status.code());
        }
        if started.elapsed().unwrap_or_default() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("clusterctl did not stop at Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctrl_c_ends_a_followed_stream_with_exit_code_0() {
    let (_rt, url) = start_fake();
    let (lines, code) = until_ctrl_c(&url, &["events", "-f", "--node", "forever"], 2);
    assert!(lines[0].starts_with("TIME "), "{lines:?}");
    assert!(lines[1].ends_with("agent 0.1.0 registered"), "{lines:?}");
    assert_eq!(code, Some(0));
}

#[test]
fn status_watch_prints_snapshots_until_ctrl_c() {
    let (_rt, url) = start_fake();
    let (lines, code) = until_ctrl_c(&url, &["status", "--watch", "--interval", "500ms"], 20);
    assert_eq!(code, Some(0));
    assert!(
        lines[0].starts_with("--- ") && lines[0].ends_with("Z ---"),
        "{lines:?}"
    );
    assert!(lines[1].starts_with("coordinator  "), "{lines:?}");
    let separators = lines.iter().filter(|l| l.starts_with("--- ")).count();
    assert!(separators >= 2, "{lines:?}");
    assert!(
        lines.iter().any(String::is_empty),
        "snapshots are separated: {lines:?}"
    );
    assert!(
        !lines.concat().contains('\x1b'),
        "no escapes off a terminal"
    );
    let (lines, code) = until_ctrl_c(
        &url,
        &["-o", "json", "status", "-w", "--interval", "500ms"],
        2,
    );
    assert_eq!(code, Some(0));
    for line in lines {
        let status: Value = serde_json::from_str(&line).expect("one JSON object per line");
        assert_eq!(status["nodes_total"], json!(1));
    }
}

#[test]
fn drain_names_the_jobs_it_restarts() {
    let (_rt, url) = start_fake();
    assert_eq!(
        stdout(&clusterctl(&url, &["drain", "gpu-003", "--reason", "fan"])),
        "node gpu-003 drained: cordoned (fan); restarting 2 job(s) elsewhere from their last checkpoint: j-1, j-7\n"
    );
    assert_eq!(
        stdout(&clusterctl(&url, &["drain", "gpu-idle"])),
        "node gpu-idle drained: cordoned (drained by operator); no jobs were running on it\n"
    );
    let result = stdout_json(&clusterctl(&url, &["-o", "json", "drain", "gpu-003"]));
    assert_eq!(result["jobs_restarted"], json!(["j-1", "j-7"]));
    assert_eq!(result["node"]["name"], json!("gpu-003"));
    assert_eq!(
        result["node"]["cordon"]["reason"],
        json!("drained by operator")
    );
    let out = clusterctl(&url, &["drain", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: node \"nope\" not found (clusterctl nodes lists known nodes)\n"
    );
}

#[test]
fn job_logs_prefix_lines_of_two_nodes_and_join_split_lines() {
    let (_rt, url) = start_fake();
    assert_eq!(
        stdout(&clusterctl(&url, &["job", "logs", "j-1"])),
        "[gpu-001 rank 0] step 1\n\
         [gpu-004 rank 1] hello from rank 1\n\
         [gpu-001 rank 0] step 2 partial\n\
         [gpu-004 rank 1] no newline at the end\n"
    );
    assert_eq!(
        stdout(&clusterctl(
            &url,
            &["job", "logs", "j-1", "--node", "gpu-001"]
        )),
        "step 1\nstep 2 partial\n"
    );
    let follow = stdout(&clusterctl(
        &url,
        &["job", "logs", "j-1", "-f", "--tail", "64K"],
    ));
    assert!(
        follow.starts_with("[gpu-001 rank 0] tail=65536 follow=true\n"),
        "{follow}"
    );
    let chunks = json_lines(&clusterctl(&url, &["-o", "json", "job", "logs", "j-1"]));
    assert_eq!(chunks.len(), 4);
    assert_eq!(
        chunks[0],
        json!({"node": "gpu-001", "node_rank": 0, "attempt": 2, "data": "step 1\nstep 2 par"})
    );
    let out = clusterctl(&url, &["job", "logs", "j-404"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "error: job \"j-404\" not found (clusterctl jobs lists jobs)\n"
    );
}

#[test]
fn completions_need_no_coordinator() {
    // `completion` (kubectl's spelling) is an alias of `completions`; both print the same script.
    for command in ["completions", "completion"] {
        for shell in ["bash", "zsh", "fish"] {
            let out = clusterctl("http://127.0.0.1:1", &[command, shell]);
            assert!(out.status.success(), "{command} {shell}: {}", stderr(&out));
            let script = stdout(&out);
            assert!(script.contains("clusterctl"), "{command} {shell}: {script}");
            for subcommand in ["status", "nodes", "cordon", "drain", "uncordon", "job"] {
                assert!(
                    script.contains(subcommand),
                    "{command} {shell}: no {subcommand}"
                );
            }
        }
    }
    let bash = stdout(&clusterctl("http://127.0.0.1:1", &["completion", "bash"]));
    assert!(bash.contains("_clusterctl()"), "{bash}");
    let zsh = stdout(&clusterctl("http://127.0.0.1:1", &["completion", "zsh"]));
    assert!(zsh.starts_with("#compdef clusterctl"), "{zsh}");
    let fish = stdout(&clusterctl("http://127.0.0.1:1", &["completion", "fish"]));
    assert!(fish.contains("complete -c clusterctl"), "{fish}");
    let out = clusterctl("http://127.0.0.1:1", &["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
