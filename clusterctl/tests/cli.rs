//! The clusterctl binary against no coordinator at all: it must fail fast, on one line, naming the
//! address; and its boolean flags read from the environment as people write them.

use std::process::{Command, Output};
use std::time::Duration;

/// Nothing listens on port 1 (it needs root), so connecting is refused at once.
const CLOSED: &str = "http://127.0.0.1:1";

fn clusterctl(args: &[&str]) -> (Output, Duration) {
    let started = std::time::SystemTime::now();
    let output = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args(args)
        .env_remove("VIGIL_COORDINATOR")
        .output()
        .expect("clusterctl runs");
    (output, started.elapsed().unwrap_or_default())
}

fn assert_unreachable(args: &[&str]) {
    let (out, took) = clusterctl(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert!(stderr.contains(CLOSED), "stderr: {stderr}");
    assert!(stderr.contains("VIGIL_COORDINATOR"), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr}");
    assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
}

#[test]
fn status_fails_fast_when_the_coordinator_is_down() {
    assert_unreachable(&["--coordinator", CLOSED, "--insecure", "status"]);
}

#[test]
fn json_nodes_fails_fast_when_the_coordinator_is_down() {
    assert_unreachable(&["--coordinator", CLOSED, "--insecure", "-o", "json", "nodes"]);
}

#[test]
fn the_coordinator_url_also_comes_from_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .arg("nodes")
        .env("VIGIL_COORDINATOR", CLOSED)
        .output()
        .expect("clusterctl runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(CLOSED));
}

#[test]
fn plaintext_without_insecure_is_refused_before_dialing_naming_both_ways_out() {
    let (out, _) = clusterctl(&["--coordinator", CLOSED, "status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--insecure"), "{stderr}");
    assert!(stderr.contains("--ca/--cert/--key"), "{stderr}");
}

#[test]
fn https_without_certificates_is_refused_naming_the_flags() {
    let (out, _) = clusterctl(&["--coordinator", "https://127.0.0.1:1", "status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--ca/--cert/--key"), "{stderr}");
}

#[test]
fn an_invalid_url_names_the_flag() {
    let (out, _) = clusterctl(&["--coordinator", "127.0.0.1:7770", "status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.starts_with("error: invalid --coordinator URL"),
        "{stderr}"
    );
}

#[test]
fn cordon_without_a_reason_is_a_usage_error() {
    let (out, _) = clusterctl(&["--coordinator", CLOSED, "cordon", "n1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reason"));
}

/// `clusterctl --coordinator CLOSED nodes` with `env` set (and no other VIGIL_ variable).
fn clusterctl_with_env(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clusterctl"));
    command.args(["--coordinator", CLOSED, "nodes"]);
    for name in ["VIGIL_COORDINATOR", "VIGIL_INSECURE", "VIGIL_DEBUG"] {
        command.env_remove(name);
    }
    let out = command
        .envs(env.iter().copied())
        .output()
        .expect("clusterctl runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The plaintext refusal, said before dialing: `--insecure` was off.
const REFUSED: &str = "is plaintext http://";
/// The dial was tried: `--insecure` was on.
const DIALED: &str = "cannot reach coordinator at";

#[test]
fn vigil_insecure_takes_every_usual_way_of_saying_yes_or_no() {
    for yes in ["1", "true", "TRUE", "yes", "Yes", "on", "ON"] {
        let (code, stderr) = clusterctl_with_env(&[("VIGIL_INSECURE", yes)]);
        assert_eq!(code, Some(1), "VIGIL_INSECURE={yes}: {stderr}");
        assert!(stderr.contains(DIALED), "VIGIL_INSECURE={yes}: {stderr}");
    }
    for no in ["0", "false", "False", "no", "NO", "off", "Off", ""] {
        let (code, stderr) = clusterctl_with_env(&[("VIGIL_INSECURE", no)]);
        assert_eq!(code, Some(1), "VIGIL_INSECURE={no}: {stderr}");
        assert!(stderr.contains(REFUSED), "VIGIL_INSECURE={no}: {stderr}");
    }
}

#[test]
fn vigil_debug_takes_every_usual_way_of_saying_yes_or_no() {
    for (value, debug) in [
        ("1", true),
        ("true", true),
        ("yes", true),
        ("On", true),
        ("0", false),
        ("FALSE", false),
        ("no", false),
        ("off", false),
    ] {
        let (code, stderr) =
            clusterctl_with_env(&[("VIGIL_INSECURE", "1"), ("VIGIL_DEBUG", value)]);
        assert_eq!(code, Some(1), "VIGIL_DEBUG={value}: {stderr}");
        assert!(stderr.contains(DIALED), "VIGIL_DEBUG={value}: {stderr}");
        assert_eq!(
            stderr.lines().any(|l| l.starts_with("debug: ")),
            debug,
            "VIGIL_DEBUG={value}: {stderr}"
        );
    }
}

#[test]
fn the_flag_beats_the_environment_and_a_bad_value_is_a_usage_error_naming_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args(["--coordinator", CLOSED, "--insecure", "nodes"])
        .env("VIGIL_INSECURE", "0")
        .output()
        .expect("clusterctl runs");
    assert!(String::from_utf8_lossy(&out.stderr).contains(DIALED));

    for (name, value) in [("VIGIL_INSECURE", "maybe"), ("VIGIL_DEBUG", "2")] {
        let (code, stderr) = clusterctl_with_env(&[(name, value)]);
        assert_eq!(code, Some(2), "{name}={value}: {stderr}");
        assert!(
            stderr.starts_with(&format!("error: {name}=\"{value}\" is not a yes or no")),
            "{stderr}"
        );
        assert!(
            stderr.contains("1 or 0, true or false, yes or no, on or off"),
            "{stderr}"
        );
    }
}

/// Every `clusterctl job` subcommand, as docs/clusterctl.md lists them.
const JOB_COMMANDS: [&str; 6] = ["submit", "show", "cancel", "restart", "report", "logs"];

fn help(args: &[&str]) -> String {
    let (out, _) = clusterctl(args);
    assert_eq!(out.status.code(), Some(0), "{args:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn job_help_lists_every_job_subcommand() {
    let text = help(&["job", "--help"]);
    let listed: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .collect();
    assert_eq!(listed, JOB_COMMANDS, "{text}");
    // The one line that sums `job` up, atop `job --help` and in `clusterctl --help`, names them all.
    let top = help(&["--help"]);
    let job_line = top
        .lines()
        .find(|l| l.trim_start().starts_with("job "))
        .unwrap_or_else(|| panic!("no job line in clusterctl --help: {top}"));
    let about = text.lines().next().unwrap_or_default();
    for name in JOB_COMMANDS {
        assert!(job_line.contains(name), "{name} missing from {job_line:?}");
        assert!(about.contains(name), "{name} missing from {about:?}");
    }
}

#[test]
fn man_page_names_clusterctl_and_its_commands() {
    let (out, _) = clusterctl(&["--print-man"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.starts_with(".ie \\n(.g .ds Aq"), "not roff: {page}");
    assert!(page.contains(".TH clusterctl 1"), "{page}");
    assert!(
        page.contains(".SH NAME\nclusterctl \\- Operate a vigil GPU training cluster"),
        "{page}"
    );
    for text in [
        "\\-\\-coordinator",
        "VIGIL_COORDINATOR",
        "clusterctl\\-drain(1)",
    ] {
        assert!(page.contains(text), "no {text} in {page}");
    }
    // Only alone (main looks for it before parsing): with anything else it is an unknown flag.
    let (out, _) = clusterctl(&["--print-man", "status"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
