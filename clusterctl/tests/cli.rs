//! The clusterctl binary against no coordinator at all: it must fail fast, on one line, naming the address.

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
