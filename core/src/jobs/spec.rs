//! The job spec (TOML, as in DESIGN.md) and its validation: every error names
//! the field and the fix.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limits::{
    MAX_ARGV, MAX_COMMAND_BYTES, MAX_ENV_BYTES, MAX_ENV_VARS, MAX_PATH, MAX_SPEC_BYTES,
};

pub const DEFAULT_MAX_RESTARTS: u32 = 3;
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);
pub const DEFAULT_HANG_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_MASTER_PORT: u16 = 29500;
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
pub const MIN_VERIFY_TIMEOUT: Duration = Duration::from_secs(1);
pub const MAX_VERIFY_TIMEOUT: Duration = Duration::from_secs(3600);
pub const LAYOUTS: [&str; 5] = [
    "marker",
    "pytorch-dcp",
    "megatron",
    "deepspeed",
    "hf-trainer",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    pub name: String,
    /// Gang size: workers start on exactly this many nodes.
    pub nodes: u32,
    pub gpus_per_node: u32,
    pub command: Vec<String>,
    pub workdir: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub spare_nodes: u32,
    #[serde(default = "default_master_port")]
    pub master_port: u16,
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub restart: RestartSpec,
    #[serde(default)]
    pub progress: ProgressSpec,
    /// Loss-spike rollback policies (see `training_health`).
    #[serde(default)]
    pub training_health: crate::training_health::TrainingHealthSpec,
    /// When repeated identical failures end the job (see `crash_loop`).
    #[serde(default)]
    pub crash_loop: crate::jobs::crash_loop::CrashLoopSpec,
    /// A gang check before attempts start (see `preflight`).
    #[serde(
        default,
        skip_serializing_if = "crate::jobs::preflight::PreflightSpec::is_off"
    )]
    pub preflight: crate::jobs::preflight::PreflightSpec,
}

fn default_master_port() -> u16 {
    DEFAULT_MASTER_PORT
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    pub dir: String,
    #[serde(default = "default_layout")]
    pub layout: String,
    /// Run before a relaunch resumes from a candidate checkpoint (its path appended and in
    /// `VIGIL_CHECKPOINT`), as the job's user in its workdir; exit 0 = good. Empty: none.
    #[serde(default)]
    pub verify_command: Vec<String>,
    /// Each verification's limit: its process group is killed then, and the candidate is bad.
    #[serde(default = "default_verify_timeout", with = "humantime_serde")]
    pub verify_timeout: Duration,
}

fn default_layout() -> String {
    "marker".into()
}

fn default_verify_timeout() -> Duration {
    DEFAULT_VERIFY_TIMEOUT
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartSpec {
    pub max_restarts: u32,
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// Between SIGTERM and SIGKILL when workers are stopped.
    #[serde(with = "humantime_serde")]
    pub stop_grace: Duration,
}

impl Default for RestartSpec {
    fn default() -> Self {
        Self {
            max_restarts: DEFAULT_MAX_RESTARTS,
            backoff: DEFAULT_BACKOFF,
            stop_grace: DEFAULT_STOP_GRACE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProgressSpec {
    /// No progress from a worker for this long: the attempt is hung.
    #[serde(with = "humantime_serde")]
    pub hang_timeout: Duration,
}

impl Default for ProgressSpec {
    fn default() -> Self {
        Self {
            hang_timeout: DEFAULT_HANG_TIMEOUT,
        }
    }
}

/// Parse and validate a spec. `cluster_nodes` is how many nodes the cluster
/// knows (any state): a gang larger than that can never run.
pub fn parse(text: &str, source: &str, cluster_nodes: usize) -> Result<JobSpec, String> {
    let at = if source.is_empty() {
        String::new()
    } else {
        format!("{source}: ")
    };
    if text.len() > MAX_SPEC_BYTES {
        return Err(format!(
            "{at}job spec is {} bytes; the limit is {MAX_SPEC_BYTES}: move large values (long commands, many variables) into a script the command runs",
            text.len()
        ));
    }
    let spec: JobSpec = toml::from_str(text).map_err(|e| {
        let msg = e.to_string();
        let hint = if msg.contains("missing field") {
            "; see docs/jobs.md for the spec's keys"
        } else {
            ""
        };
        format!("{at}invalid job spec: {}{hint}", msg.trim())
    })?;
    validate(&spec, cluster_nodes).map_err(|e| format!("{at}{e}"))?;
    spec.training_health
        .validate()
        .map_err(|e| format!("{at}{e}"))?;
    spec.crash_loop.validate().map_err(|e| format!("{at}{e}"))?;
    spec.preflight.validate().map_err(|e| format!("{at}{e}"))?;
    Ok(spec)
}

fn validate(spec: &JobSpec, cluster_nodes: usize) -> Result<(), String> {
    let name_ok = !spec.name.is_empty()
        && spec.name.len() <= 48
        && spec.name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(format!(
            "name {:?} is invalid: use 1-48 letters, digits, '-', '_' or '.', starting with a letter or digit",
            spec.name
        ));
    }
    if spec.nodes == 0 {
        return Err("nodes = 0: a job needs at least one node; set nodes to the gang size".into());
    }
    let wanted = spec.nodes as usize;
    if wanted > cluster_nodes {
        return Err(format!(
            "nodes = {} but the cluster has only {cluster_nodes} node(s); lower nodes or add nodes first",
            spec.nodes
        ));
    }
    if spec.gpus_per_node == 0 || spec.gpus_per_node > 64 {
        return Err(format!(
            "gpus_per_node = {} must be between 1 and 64",
            spec.gpus_per_node
        ));
    }
    if spec.command.is_empty() || spec.command[0].trim().is_empty() {
        return Err("command is empty: give the program and its arguments, e.g. command = [\"python3\", \"train.py\"]".into());
    }
    check_command("command", &spec.command)?;
    check_verify(&spec.checkpoint)?;
    check_dir("workdir", &spec.workdir)?;
    check_dir("checkpoint.dir", &spec.checkpoint.dir)?;
    check_env(&spec.env)?;
    if !Path::new(&spec.workdir).is_absolute() {
        return Err(format!(
            "workdir {:?} is not an absolute path; every node resolves it on its own, so write it in full (e.g. /shared/runs/{})",
            spec.workdir, spec.name
        ));
    }
    if !Path::new(&spec.checkpoint.dir).is_absolute() {
        return Err(format!(
            "checkpoint.dir {:?} is not an absolute path; write it in full (e.g. /shared/ckpt/{})",
            spec.checkpoint.dir, spec.name
        ));
    }
    if !LAYOUTS.contains(&spec.checkpoint.layout.as_str()) {
        return Err(format!(
            "checkpoint.layout {:?} is unknown; use one of {}",
            spec.checkpoint.layout,
            LAYOUTS.join(", ")
        ));
    }
    for key in spec.env.keys() {
        let ok = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!(
                "env key {key:?} is not a valid environment variable name"
            ));
        }
        if key.starts_with("VIGIL_") {
            return Err(format!(
                "env key {key:?}: VIGIL_* variables are set by vigil; remove it"
            ));
        }
    }
    if spec.master_port == 0 {
        return Err("master_port = 0 is invalid; use a free port such as 29500".into());
    }
    if spec.restart.stop_grace > Duration::from_secs(600) {
        return Err("restart.stop_grace must be at most 10m".into());
    }
    if spec.progress.hang_timeout < Duration::from_secs(1) {
        return Err("progress.hang_timeout must be at least 1s".into());
    }
    Ok(())
}

/// An argv (`field`): at most [`MAX_ARGV`] arguments and [`MAX_COMMAND_BYTES`] bytes, no NUL.
pub(super) fn check_command(field: &str, command: &[String]) -> Result<(), String> {
    if command.len() > MAX_ARGV {
        return Err(format!(
            "{field} has {} arguments; the limit is {MAX_ARGV}: put them in a script or a config file",
            command.len()
        ));
    }
    let bytes: usize = command.iter().map(String::len).sum();
    if bytes > MAX_COMMAND_BYTES {
        return Err(format!(
            "{field} is {bytes} bytes; the limit is {MAX_COMMAND_BYTES}: put the arguments in a script or a config file"
        ));
    }
    if let Some(i) = command.iter().position(|a| a.contains('\0')) {
        return Err(format!("{field}[{i}] contains a NUL byte; remove it"));
    }
    Ok(())
}

/// `checkpoint.verify_command` (optional: empty is none) and `checkpoint.verify_timeout`.
fn check_verify(c: &CheckpointSpec) -> Result<(), String> {
    if c.verify_command.is_empty() {
        return Ok(());
    }
    if c.verify_command[0].trim().is_empty() {
        return Err("checkpoint.verify_command names no program: give the program and its arguments, e.g. verify_command = [\"python3\", \"/shared/verify.py\"], or remove it".into());
    }
    check_command("checkpoint.verify_command", &c.verify_command)?;
    if c.verify_timeout < MIN_VERIFY_TIMEOUT || c.verify_timeout > MAX_VERIFY_TIMEOUT {
        return Err(format!(
            "checkpoint.verify_timeout = {} must be between 1s and 1h",
            humantime::format_duration(c.verify_timeout)
        ));
    }
    Ok(())
}

/// A directory every node resolves: bounded, no NUL, no `..` (it could leave the allowed roots).
fn check_dir(field: &str, dir: &str) -> Result<(), String> {
    if dir.len() > MAX_PATH {
        return Err(format!(
            "{field} is {} bytes; the limit is {MAX_PATH}: use a shorter path",
            dir.len()
        ));
    }
    if dir.contains('\0') {
        return Err(format!("{field} contains a NUL byte; remove it"));
    }
    if Path::new(dir)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "{field} {dir:?} contains '..'; write the path without it"
        ));
    }
    Ok(())
}

/// `env`: at most [`MAX_ENV_VARS`] variables and [`MAX_ENV_BYTES`] bytes, no NUL in values.
fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV_VARS {
        return Err(format!(
            "env has {} variables; the limit is {MAX_ENV_VARS}: set the rest in the command's own script",
            env.len()
        ));
    }
    let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_ENV_BYTES {
        return Err(format!(
            "env is {bytes} bytes (keys and values); the limit is {MAX_ENV_BYTES}: pass large values in a file"
        ));
    }
    if let Some(k) = env.iter().find_map(|(k, v)| v.contains('\0').then_some(k)) {
        return Err(format!("env value of {k:?} contains a NUL byte; remove it"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "opt-demo"
nodes = 2
gpus_per_node = 8
command = ["python3", "train.py"]
workdir = "/shared/runs/opt-demo"
env = { NCCL_DEBUG = "WARN" }
spare_nodes = 1
[checkpoint]
dir = "/shared/ckpt/opt-demo"
layout = "marker"
[restart]
max_restarts = 50
backoff = "10s"
[progress]
hang_timeout = "10m"
"#;

    #[test]
    fn the_design_example_parses() {
        let spec = parse(GOOD, "job.toml", 3).expect("valid");
        assert_eq!(spec.nodes, 2);
        assert_eq!(spec.restart.max_restarts, 50);
        assert_eq!(spec.progress.hang_timeout, Duration::from_secs(600));
        assert_eq!(spec.master_port, 29500);
        assert_eq!(spec.env["NCCL_DEBUG"], "WARN");
    }

    fn err(text: &str) -> String {
        parse(text, "job.toml", 3).expect_err("invalid")
    }

    #[test]
    fn bad_specs_name_the_field_and_the_fix() {
        let cases = [
            (
                GOOD.replace("command = [\"python3\", \"train.py\"]", "command = []"),
                "command is empty",
            ),
            (GOOD.replace("nodes = 2", "nodes = 0"), "nodes = 0"),
            (GOOD.replace("nodes = 2", "nodes = 9"), "only 3 node"),
            (
                GOOD.replace("layout = \"marker\"", "layout = \"zip\""),
                "checkpoint.layout",
            ),
            (
                GOOD.replace("/shared/runs/opt-demo", "runs/opt-demo"),
                "workdir",
            ),
            (
                GOOD.replace("/shared/ckpt/opt-demo", "ckpt"),
                "checkpoint.dir",
            ),
            (format!("{GOOD}\ncolour = \"blue\"\n"), "colour"),
            (
                GOOD.replace("name = \"opt-demo\"", "name = \"a b\""),
                "name",
            ),
            (
                GOOD.replace("gpus_per_node = 8", "gpus_per_node = 0"),
                "gpus_per_node",
            ),
            (GOOD.replace("NCCL_DEBUG", "VIGIL_ATTEMPT"), "VIGIL_"),
        ];
        for (text, needle) in cases {
            let e = err(&text);
            assert!(e.contains(needle), "{e:?} should mention {needle}");
            assert!(e.starts_with("job.toml: "), "{e:?} names the source");
        }
    }

    #[test]
    fn specs_over_a_limit_name_the_field_and_the_limit() {
        let long_argv = format!("command = [{}]", vec!["\"a\""; MAX_ARGV + 1].join(", "));
        let huge_arg = format!("command = [\"{}\"]", "a".repeat(MAX_COMMAND_BYTES + 1));
        let many_env = format!(
            "env = {{ {} }}",
            (0..=MAX_ENV_VARS)
                .map(|i| format!("V{i} = \"x\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let big_env = format!("env = {{ A = \"{}\" }}", "x".repeat(MAX_ENV_BYTES));
        let cases = [
            (
                GOOD.replace("command = [\"python3\", \"train.py\"]", &long_argv),
                "256",
            ),
            (
                GOOD.replace("command = [\"python3\", \"train.py\"]", &huge_arg),
                "32768",
            ),
            (
                GOOD.replace("env = { NCCL_DEBUG = \"WARN\" }", &many_env),
                "128",
            ),
            (
                GOOD.replace("env = { NCCL_DEBUG = \"WARN\" }", &big_env),
                "env is",
            ),
            (GOOD.replace("\"WARN\"", "\"a\\u0000b\""), "NUL"),
            (GOOD.replace("\"train.py\"", "\"a\\u0000b\""), "command[1]"),
            (
                GOOD.replace("/shared/runs/opt-demo", "/shared/runs/../../etc"),
                "workdir",
            ),
            (
                GOOD.replace("/shared/ckpt/opt-demo", "/shared/ckpt/../x"),
                "checkpoint.dir",
            ),
            ("x".repeat(MAX_SPEC_BYTES + 1), "65536"),
        ];
        for (text, needle) in cases {
            let e = err(&text);
            assert!(e.contains(needle), "{e:?} should mention {needle}");
        }
    }

    #[test]
    fn a_missing_command_is_named() {
        let text = GOOD.replace("command = [\"python3\", \"train.py\"]\n", "");
        assert!(err(&text).contains("command"), "{}", err(&text));
    }

    #[test]
    fn defaults_apply() {
        let text = "name = \"a\"\nnodes = 1\ngpus_per_node = 1\ncommand = [\"x\"]\nworkdir = \"/w\"\n[checkpoint]\ndir = \"/c\"\n";
        let spec = parse(text, "", 1).expect("valid");
        assert_eq!(spec.checkpoint.layout, "marker");
        assert_eq!(spec.restart, RestartSpec::default());
        assert_eq!(spec.spare_nodes, 0);
        assert!(spec.checkpoint.verify_command.is_empty());
        assert_eq!(spec.checkpoint.verify_timeout, DEFAULT_VERIFY_TIMEOUT);
    }

    #[test]
    fn a_verify_command_parses_and_is_checked_like_command() {
        let with = |lines: &str| {
            GOOD.replace(
                "layout = \"marker\"",
                &format!("layout = \"marker\"\n{lines}"),
            )
        };
        let spec = parse(
            &with(
                "verify_command = [\"python3\", \"/shared/verify.py\"]\nverify_timeout = \"90s\"",
            ),
            "job.toml",
            3,
        )
        .expect("valid");
        assert_eq!(
            spec.checkpoint.verify_command,
            ["python3", "/shared/verify.py"]
        );
        assert_eq!(spec.checkpoint.verify_timeout, Duration::from_secs(90));
        let huge = format!(
            "verify_command = [\"{}\"]",
            "a".repeat(MAX_COMMAND_BYTES + 1)
        );
        let cases = [
            (
                with("verify_command = [\"\"]"),
                "checkpoint.verify_command names no program",
            ),
            (
                with("verify_command = [\"a\", \"b\\u0000\"]"),
                "checkpoint.verify_command[1] contains a NUL",
            ),
            (with(&huge), "checkpoint.verify_command is 32769 bytes"),
            (
                with("verify_command = [\"v\"]\nverify_timeout = \"0s\""),
                "checkpoint.verify_timeout = 0s must be between 1s and 1h",
            ),
            (
                with("verify_command = [\"v\"]\nverify_timeout = \"2h\""),
                "between 1s and 1h",
            ),
        ];
        for (text, needle) in cases {
            let e = err(&text);
            assert!(e.contains(needle), "{e:?} should mention {needle}");
        }
    }
}
