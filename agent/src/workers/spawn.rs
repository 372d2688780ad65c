//! Starting one worker: checking the request, laying out its files, and spawning its process group.
//!
//! Files of a worker live under `<state_dir>/jobs/<job_id>/<attempt>/`:
//! `rank<r>.log` (stdout and stderr, appended, after a one-line header),
//! `run/progress` (the worker's `VIGIL_PROGRESS_FILE`), and its shim's `shim.log`,
//! `shim-status.json` and `shim-stop.json` ([`crate::shim`]). Only `run/` belongs to the job's user
//! (it may write the progress file through a rename): the log stays the agent's, so a job cannot
//! swap it for a link to a file only root may read and have the agent serve that as its log.

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};
use vigil_proto::v1::StartWorker;

use super::confine::Confined;
use crate::checkpoint::{Layout, UnknownLayout};
use crate::shim::{
    HANDSHAKE_TIMEOUT, Handshake, Identity, LOG_FILE, Running, STATUS_FILE, STOP_FILE, Spec,
};

/// The variable the agent sets for every worker: where to write its step number.
pub const PROGRESS_FILE_VAR: &str = "VIGIL_PROGRESS_FILE";

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(
        "invalid job id {0:?}: it names a directory, so it must be non-empty, without '/', and not '.' or '..'"
    )]
    JobId(String),
    #[error("empty command: the job spec's command must name a program")]
    EmptyCommand,
    #[error("workdir {0:?} is not an absolute path; give the job spec an absolute workdir")]
    RelativeWorkdir(String),
    #[error(
        "workdir {} does not exist or is not a directory on this node; create it (or mount the shared storage) before the job starts",
        .0.display()
    )]
    MissingWorkdir(PathBuf),
    #[error(transparent)]
    Layout(#[from] UnknownLayout),
    #[error("cannot prepare {}; check that the agent's state dir is writable", .path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot start {program}: its shim failed: {message}; see {}",
        .log.display()
    )]
    Shim {
        program: String,
        message: String,
        log: PathBuf,
    },
}

/// Where one worker's files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub dir: PathBuf,
    pub log: PathBuf,
    /// The job user's own directory, holding `progress`.
    pub run: PathBuf,
    pub progress: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path, job_id: &str, attempt: u64, node_rank: u32) -> Self {
        let dir = state_dir
            .join("jobs")
            .join(job_id)
            .join(attempt.to_string());
        let run = dir.join("run");
        Self {
            log: dir.join(format!("rank{node_rank}.log")),
            progress: run.join("progress"),
            run,
            dir,
        }
    }
}

/// Checks what can be checked before anything is created; returns the
/// checkpoint layout to watch, for node rank 0 of a job with a checkpoint dir.
pub fn validate(start: &StartWorker) -> Result<Option<Layout>, SpawnError> {
    let job = start.job_id.as_str();
    if job.is_empty() || job.contains('/') || job == "." || job == ".." || job.contains('\0') {
        return Err(SpawnError::JobId(start.job_id.clone()));
    }
    if start.command.first().is_none_or(|p| p.is_empty()) {
        return Err(SpawnError::EmptyCommand);
    }
    let workdir = Path::new(&start.workdir);
    if !workdir.is_absolute() {
        return Err(SpawnError::RelativeWorkdir(start.workdir.clone()));
    }
    if !workdir.is_dir() {
        return Err(SpawnError::MissingWorkdir(workdir.to_owned()));
    }
    if start.node_rank != 0 || start.checkpoint_dir.is_empty() {
        return Ok(None);
    }
    Ok(Some(start.checkpoint_layout.parse()?))
}

/// The worker's environment on top of the agent's: the coordinator's, with
/// the `VIGIL_*` basics filled in from the request where the coordinator left
/// them out, and the agent's own progress file (never the coordinator's).
pub fn environment(start: &StartWorker, paths: &Paths) -> BTreeMap<String, String> {
    let mut env: BTreeMap<String, String> = start
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let defaults = [
        ("VIGIL_JOB_ID", start.job_id.clone()),
        ("VIGIL_ATTEMPT", start.attempt.to_string()),
        ("VIGIL_NODE_RANK", start.node_rank.to_string()),
        ("VIGIL_NNODES", start.nnodes.to_string()),
    ];
    for (key, value) in defaults {
        env.entry(key.to_owned()).or_insert(value);
    }
    env.insert(
        PROGRESS_FILE_VAR.to_owned(),
        paths.progress.display().to_string(),
    );
    env
}

/// The log's header line: when, what, where, and which variables (names only: values may be secrets).
pub fn header(start: &StartWorker, env: &BTreeMap<String, String>, now: SystemTime) -> String {
    let keys: Vec<&str> = env.keys().map(String::as_str).collect();
    format!(
        "==> vigil-agent {}: job {} attempt {} rank {}/{}: starting {:?} in {} with env {}\n",
        humantime::format_rfc3339_seconds(now),
        start.job_id,
        start.attempt,
        start.node_rank,
        start.nnodes,
        start.command,
        start.workdir,
        keys.join(",")
    )
}

/// What a shim needs besides the request: where its program, the lease and the graces are.
#[derive(Debug, Clone)]
pub struct ShimSettings {
    pub program: PathBuf,
    pub lease_file: PathBuf,
    pub lease_stop_grace: Duration,
    pub stop_grace: Duration,
}

/// A worker running under its new shim.
pub struct Launched {
    /// The shim, this agent's child: its exit is seen at once.
    pub shim: Child,
    pub running: Running,
}

/// A shim started and told its spec, whose answer is still to come.
pub struct Starting {
    child: Child,
    pub shim_pid: u32,
    program: String,
    shim_log: PathBuf,
}

/// Lays out the worker's files and starts its shim, which starts the worker in a process group
/// of its own, output appended to its log, as the user and in the (resolved) workdir `confined`
/// names. `start` has passed [`validate`]. The caller records the shim, then waits for its
/// answer ([`Starting::handshake`]): an agent that dies in between leaves a shim its successor
/// can find.
pub async fn spawn(
    start: &StartWorker,
    paths: &Paths,
    confined: &Confined,
    shim: &ShimSettings,
) -> Result<Starting, SpawnError> {
    let files = |path: &Path| {
        let path = path.to_owned();
        move |source| SpawnError::Files { path, source }
    };
    std::fs::create_dir_all(&paths.run).map_err(files(&paths.run))?;
    if let Some(id) = &confined.identity {
        std::os::unix::fs::chown(&paths.run, Some(id.uid), Some(id.gid))
            .map_err(files(&paths.run))?;
    }
    // Left by an earlier run of this attempt on this node: its progress file is not this
    // worker's progress, and its shim's stop order and exit are not this shim's.
    for stale in [
        paths.progress.clone(),
        paths.dir.join(STOP_FILE),
        paths.dir.join(STATUS_FILE),
    ] {
        match std::fs::remove_file(&stale) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(files(&stale)(e)),
            _ => {}
        }
    }
    let env = environment(start, paths);
    let open_private = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            // The agent's alone: other users on the node (other jobs) cannot read it.
            .mode(0o600)
            .open(path)
            .map_err(files(path))
    };
    let mut log = open_private(&paths.log)?;
    log.write_all(header(start, &env, SystemTime::now()).as_bytes())
        .map_err(files(&paths.log))?;
    let shim_log_path = paths.dir.join(LOG_FILE);
    let shim_log = open_private(&shim_log_path)?;
    let spec = Spec {
        job_id: start.job_id.clone(),
        attempt: start.attempt,
        node_rank: start.node_rank,
        command: start.command.clone(),
        workdir: confined.workdir.clone(),
        env,
        identity: confined.identity.as_ref().map(|id| Identity {
            name: id.name.clone(),
            uid: id.uid,
            gid: id.gid,
            home: id.home.clone(),
        }),
        log: paths.log.clone(),
        dir: paths.dir.clone(),
        lease_file: shim.lease_file.clone(),
        lease_stop_grace_ms: millis(shim.lease_stop_grace),
        stop_grace_ms: millis(shim.stop_grace),
    };
    let program = start.command.first().cloned().unwrap_or_default();
    let shim_error = |message: String| SpawnError::Shim {
        program: program.clone(),
        message,
        log: shim_log_path.clone(),
    };
    let mut child = Command::new(&shim.program)
        .arg0("vigil-agent")
        .arg("shim")
        .arg(&start.job_id)
        .arg(start.attempt.to_string())
        // The agent's systemd notification socket is neither the shim's nor the job's.
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(shim_log)
        // Its own group: a signal to the agent's group (a terminal's Ctrl-C) does not reach it.
        .process_group(0)
        .spawn()
        .map_err(|e| {
            shim_error(format!(
                "cannot start the shim {}: {e}",
                shim.program.display()
            ))
        })?;
    let sent = async {
        let mut stdin = child.stdin.take().ok_or("no pipe to the shim's input")?;
        let text = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
        stdin.write_all(&text).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let sent = match tokio::time::timeout(HANDSHAKE_TIMEOUT, sent).await {
        Ok(sent) => sent,
        Err(_) => Err("the shim did not read its spec".to_owned()),
    };
    let shim_pid = child.id();
    match (sent, shim_pid) {
        (Ok(()), Some(shim_pid)) => Ok(Starting {
            child,
            shim_pid,
            program,
            shim_log: shim_log_path,
        }),
        (sent, _) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let why = sent
                .err()
                .unwrap_or_else(|| "the shim exited at once".to_owned());
            Err(shim_error(why))
        }
    }
}

impl Starting {
    /// Waits for the shim's one line: the worker runs, or why it does not.
    pub async fn handshake(self) -> Result<Launched, SpawnError> {
        let Self {
            mut child,
            program,
            shim_log,
            ..
        } = self;
        let answer = async {
            let stdout = child
                .stdout
                .take()
                .ok_or("no pipe from the shim's output")?;
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            if line.is_empty() {
                return Err("the shim exited without a word".to_owned());
            }
            serde_json::from_str::<Handshake>(&line).map_err(|e| format!("{e}: {line:?}"))
        };
        let answer = match tokio::time::timeout(HANDSHAKE_TIMEOUT, answer).await {
            Ok(answer) => answer,
            Err(_) => Err(format!(
                "the shim did not answer within {}s",
                HANDSHAKE_TIMEOUT.as_secs()
            )),
        };
        match answer {
            Ok(Handshake::Running(running)) => Ok(Launched {
                shim: child,
                running,
            }),
            Ok(Handshake::Failed { error }) => {
                let _ = child.wait().await;
                Err(SpawnError::Spawn {
                    program,
                    source: io::Error::other(error),
                })
            }
            Err(message) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(SpawnError::Shim {
                    program,
                    message,
                    log: shim_log,
                })
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(workdir: &str) -> StartWorker {
        StartWorker {
            job_id: "job-1".into(),
            attempt: 3,
            node_rank: 0,
            nnodes: 2,
            command: vec!["python3".into(), "train.py".into()],
            workdir: workdir.into(),
            env: [("NCCL_DEBUG".to_owned(), "WARN".to_owned())].into(),
            ..StartWorker::default()
        }
    }

    fn reason(start: &StartWorker) -> String {
        validate(start)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn files_live_under_jobs_job_attempt() {
        let p = Paths::new(Path::new("/var/lib/vigil-agent"), "job-1", 3, 1);
        assert_eq!(p.dir, Path::new("/var/lib/vigil-agent/jobs/job-1/3"));
        assert_eq!(
            p.log,
            Path::new("/var/lib/vigil-agent/jobs/job-1/3/rank1.log")
        );
        assert_eq!(
            p.progress,
            Path::new("/var/lib/vigil-agent/jobs/job-1/3/run/progress")
        );
    }

    #[test]
    fn a_valid_request_watches_checkpoints_only_on_rank_0_with_a_dir() {
        let mut start = request("/");
        assert_eq!(validate(&start).ok(), Some(None), "no checkpoint dir");
        start.checkpoint_dir = "/ckpt".into();
        start.checkpoint_layout = "megatron".into();
        assert_eq!(validate(&start).ok(), Some(Some(Layout::Megatron)));
        start.node_rank = 1;
        assert_eq!(validate(&start).ok(), Some(None), "rank 1 does not watch");
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason_naming_the_problem() {
        let mut start = request("/");
        start.command.clear();
        assert!(reason(&start).contains("empty command"));
        start.command = vec![String::new()];
        assert!(reason(&start).contains("empty command"));
        let start = request("runs/x");
        assert!(reason(&start).contains("\"runs/x\" is not an absolute path"));
        let start = request("/no/such/workdir");
        assert!(reason(&start).contains("/no/such/workdir does not exist"));
        for job in ["", "a/b", "..", "."] {
            let mut start = request("/");
            start.job_id = job.into();
            assert!(reason(&start).contains("invalid job id"), "{job:?}");
        }
        let mut start = request("/");
        start.checkpoint_dir = "/ckpt".into();
        start.checkpoint_layout = "orbax".into();
        assert!(reason(&start).contains("unknown checkpoint layout \"orbax\""));
    }

    #[test]
    fn environment_adds_the_progress_file_and_fills_in_vigil_basics() {
        let mut start = request("/");
        start
            .env
            .insert("VIGIL_PROGRESS_FILE".into(), "/elsewhere".into());
        start.env.insert("VIGIL_NNODES".into(), "7".into());
        let paths = Paths::new(Path::new("/s"), "job-1", 3, 0);
        let env = environment(&start, &paths);
        assert_eq!(env["VIGIL_PROGRESS_FILE"], "/s/jobs/job-1/3/run/progress");
        assert_eq!(env["VIGIL_JOB_ID"], "job-1");
        assert_eq!(env["VIGIL_ATTEMPT"], "3");
        assert_eq!(env["VIGIL_NODE_RANK"], "0");
        assert_eq!(env["VIGIL_NNODES"], "7", "the coordinator's value wins");
        assert_eq!(env["NCCL_DEBUG"], "WARN");
    }

    #[test]
    fn header_names_env_keys_but_not_their_values() {
        let mut start = request("/work");
        start.env.insert("WANDB_API_KEY".into(), "secret".into());
        let env = environment(&start, &Paths::new(Path::new("/s"), "job-1", 3, 0));
        let line = header(&start, &env, SystemTime::UNIX_EPOCH);
        assert!(
            line.starts_with("==> vigil-agent 1970-01-01T00:00:00Z: job job-1 attempt 3 rank 0/2")
        );
        assert!(line.contains("[\"python3\", \"train.py\"] in /work"));
        assert!(line.contains("WANDB_API_KEY"));
        assert!(!line.contains("secret"));
        assert!(line.ends_with('\n'));
    }
}
