//! A damaged state store is found at start: the coordinator does not serve, exits 65 with one
//! message naming the data dir, what is damaged and the two ways out (restore a backup, or
//! `--recover`); `--recover` then starts from what is still valid and lists what was lost.
//!
//! Each case damages a copy of one real store: two agents registered, node-1 cordoned by an
//! operator ("keep-me"), the coordinator stopped cleanly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use vigil_tests::{Cluster, Coordinator, FAST_LIVENESS, LONG, bin, clusterctl, nodes, wait_for};

const DB: &str = "state.sqlite";
const EX_DATAERR: i32 = 65;

/// A clean copy of a real store, made once per test (tests run in parallel).
fn pristine() -> Result<(tempfile::TempDir, PathBuf)> {
    let mut cluster = Cluster::start(FAST_LIVENESS, 2)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", 2))?;
    let out = clusterctl(&cluster.url(), &["cordon", "node-1", "--reason", "keep-me"])?;
    if !out.success() {
        bail!("cordon failed: {}", out.stderr);
    }
    // A clean stop: SIGTERM, as systemd stops it.
    let status = cluster.coordinator.stop()?;
    if !status.success() {
        bail!("{status}: {}", cluster.coordinator.log_text());
    }
    let keep = tempfile::tempdir()?;
    let copy = keep.path().join("pristine");
    copy_dir(&cluster.data_dir(), &copy)?;
    Ok((keep, copy))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

fn spawn(data_dir: &Path, extra: &[&str]) -> Result<Child> {
    Ok(Command::new(bin("vigil-coordinator")?)
        .args([
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .arg("--data-dir")
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Starts a coordinator on `data_dir` and expects exit 65; returns its stderr.
fn refused(data_dir: &Path) -> Result<String> {
    let mut child = spawn(data_dir, &[])?;
    let exited = wait_for("the coordinator refuses the store", LONG, || {
        Ok(child.try_wait()?)
    });
    if exited.is_err() {
        child.kill().ok();
    }
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    exited.with_context(|| format!("it served a damaged store; log:\n{stderr}"))?;
    if out.status.code() != Some(EX_DATAERR) {
        bail!("exit {:?}, not 65:\n{stderr}", out.status.code());
    }
    let serving = String::from_utf8_lossy(&out.stdout);
    if serving.contains("serving") {
        bail!("it printed its serving line: {serving}");
    }
    let dir = data_dir.display().to_string();
    for needed in [dir.as_str(), "is damaged", "restore --from", "--recover"] {
        if !stderr.contains(needed) {
            bail!("the message lacks {needed:?}:\n{stderr}");
        }
    }
    Ok(stderr)
}

/// Flips one byte of node-1's record (inside its cordon's reason).
fn flip_cordon(dir: &Path) -> Result<()> {
    let path = dir.join(DB);
    let mut bytes = std::fs::read(&path)?;
    let at = find(&bytes, br#""reason":"keep-me""#).context("the cordon in the node record")? + 10;
    bytes[at] ^= 0x20;
    Ok(std::fs::write(&path, bytes)?)
}

fn damaged_copy(
    pristine: &Path,
    name: &str,
    damage: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = pristine.with_file_name(name);
    copy_dir(pristine, &dir)?;
    damage(&dir)?;
    Ok(dir)
}

#[test]
fn a_clean_stop_leaves_one_file_holding_every_record() -> Result<()> {
    let (_keep, pristine) = pristine()?;
    let wal = pristine.join(format!("{DB}-wal"));
    assert!(
        !wal.exists() || std::fs::metadata(&wal)?.len() == 0,
        "the log was checkpointed into {DB} at the clean stop"
    );
    let bytes = std::fs::read(pristine.join(DB))?;
    assert!(find(&bytes, b"keep-me").is_some(), "the cordon is in {DB}");
    // And it opens: the control case for every damage below.
    let mut child = spawn(&pristine, &[])?;
    std::thread::sleep(Duration::from_secs(1));
    let status = child.try_wait()?;
    child.kill().ok();
    let out = child.wait_with_output()?;
    assert!(
        status.is_none(),
        "it exited: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("serving"));
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn every_kind_of_damage_is_refused_with_exit_65_and_the_way_out() -> Result<()> {
    let (_keep, pristine) = pristine()?;
    // One byte of the cordoned node's record flipped.
    let flipped = damaged_copy(&pristine, "flipped", flip_cordon)?;
    let stderr = refused(&flipped)?;
    assert!(
        stderr.contains("nodes/node-1 fails its checksum"),
        "{stderr}"
    );

    // 1,647 random bytes in the middle of the file.
    let random = damaged_copy(&pristine, "random", |dir| {
        let path = dir.join(DB);
        let mut bytes = std::fs::read(&path)?;
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid - 800..mid + 847] {
            *b = fastrand::u8(..);
        }
        Ok(std::fs::write(&path, bytes)?)
    })?;
    refused(&random)?;

    // Truncated to half.
    let truncated = damaged_copy(&pristine, "truncated", |dir| {
        let path = dir.join(DB);
        let len = std::fs::metadata(&path)?.len();
        let file = std::fs::OpenOptions::new().write(true).open(&path)?;
        Ok(file.set_len(len / 2)?)
    })?;
    refused(&truncated)?;

    // A file of the store deleted: the database, then (on another copy) the marker.
    let no_db = damaged_copy(&pristine, "no-db", |dir| {
        Ok(std::fs::remove_file(dir.join(DB))?)
    })?;
    let stderr = refused(&no_db)?;
    assert!(stderr.contains("state.sqlite is missing"), "{stderr}");
    let no_marker = damaged_copy(&pristine, "no-marker", |dir| {
        Ok(std::fs::remove_file(dir.join("vigil-store"))?)
    })?;
    let stderr = refused(&no_marker)?;
    assert!(stderr.contains("marker vigil-store is missing"), "{stderr}");

    // Refusing changed nothing: still refused, the bytes as they were.
    let before = std::fs::read(flipped.join(DB))?;
    refused(&flipped)?;
    assert_eq!(std::fs::read(flipped.join(DB))?, before, "nothing written");
    Ok(())
}

#[test]
fn recover_starts_from_what_is_valid_and_lists_the_loss() -> Result<()> {
    let (_keep, pristine) = pristine()?;
    let flipped = damaged_copy(&pristine, "flipped", flip_cordon)?;
    let mut child = spawn(&flipped, &["--recover"])?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let line = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).ok();
        text
    });
    std::thread::sleep(Duration::from_secs(2));
    let running = child.try_wait()?.is_none();
    child.kill().ok();
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = line.join().unwrap_or_default();
    assert!(running, "--recover did not start:\n{stderr}");
    assert!(stdout.contains("serving"), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("--recover: lost: nodes/node-1 fails its checksum"),
        "{stderr}"
    );
    let aside: Vec<String> = std::fs::read_dir(&flipped)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged files kept aside");
    assert!(flipped.join(&aside[0]).join(DB).exists());
    // The new store is whole: a plain start now serves.
    let mut again = spawn(&flipped, &[])?;
    std::thread::sleep(Duration::from_secs(1));
    let still = again.try_wait()?.is_none();
    again.kill().ok();
    let out = again.wait_with_output()?;
    assert!(still, "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[test]
fn a_data_dir_replaced_by_an_older_copy_is_exposed_by_the_first_agent() -> Result<()> {
    let mut cluster = Cluster::start(FAST_LIVENESS, 2)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", 2))?;
    let addr = cluster.coordinator.grpc;
    cluster.coordinator.stop()?;
    let old = cluster.dir.path().join("older-copy");
    copy_dir(&cluster.data_dir(), &old)?;
    cluster.coordinator = Coordinator::start(cluster.dir.path(), FAST_LIVENESS, Some(addr))?;
    wait_for("agents back", LONG, || cluster.all("Ready", 2))?;
    // Changes the agents then hear of (acks carry the store's mark).
    for i in 0..3 {
        let reason = format!("after the copy {i}");
        let out = clusterctl(&cluster.url(), &["cordon", "node-0", "--reason", &reason])?;
        assert!(out.success(), "{}", out.stderr);
        let out = clusterctl(&cluster.url(), &["uncordon", "node-0"])?;
        assert!(out.success(), "{}", out.stderr);
    }
    std::thread::sleep(Duration::from_secs(2));
    cluster.coordinator.stop()?;
    // The data dir is replaced by the older copy: consistent, sealed, and behind.
    std::fs::remove_dir_all(cluster.data_dir())?;
    std::fs::rename(&old, cluster.data_dir())?;
    let before = std::fs::read(cluster.data_dir().join(DB))?;
    cluster.coordinator = Coordinator::start(cluster.dir.path(), FAST_LIVENESS, Some(addr))?;
    let status = wait_for(
        "the coordinator stops on the first agent's word",
        LONG,
        || Ok(cluster.coordinator.child.try_wait()?),
    )
    .with_context(|| cluster.coordinator.log_text())?;
    let log = cluster.coordinator.log_text();
    assert_eq!(status.code(), Some(EX_DATAERR), "{log}");
    for needed in [
        "was replaced by an older copy (a rollback)",
        "is damaged",
        "--recover",
    ] {
        assert!(log.contains(needed), "{needed:?} missing:\n{log}");
    }
    // It committed nothing of what it heard: the older copy is as it was (unsealed only).
    let after = std::fs::read(cluster.data_dir().join(DB))?;
    assert_eq!(before.len(), after.len(), "no commit grew the file");

    // The way out the message names: --recover goes on from the older copy as a new store,
    // held for review; the agents (marks of the old store) join it.
    let recover = ["--recover"];
    cluster.coordinator =
        Coordinator::start_args(cluster.dir.path(), FAST_LIVENESS, Some(addr), &[], &recover)?;
    let url = cluster.url();
    wait_for(
        "the agents join the recovered store, held for review",
        LONG,
        || {
            let listed = nodes(&url)?;
            let held = ["node-0", "node-1"].iter().all(|n| {
                listed.get(*n).is_some_and(|v| {
                    v["availability"] == "Ready" && v["cordon"]["source"] == "recovery"
                })
            });
            Ok(held.then_some(()))
        },
    )
    .with_context(|| cluster.coordinator.log_text())?;
    Ok(())
}

#[test]
fn recover_holds_every_node_for_review_until_an_operator_confirms() -> Result<()> {
    let mut cluster = Cluster::start(FAST_LIVENESS, 2)?;
    wait_for("agents Ready", LONG, || cluster.all("Ready", 2))?;
    let out = clusterctl(&cluster.url(), &["cordon", "node-1", "--reason", "keep-me"])?;
    assert!(out.success(), "{}", out.stderr);
    let addr = cluster.coordinator.grpc;
    cluster.coordinator.stop()?;
    flip_cordon(&cluster.data_dir())?;
    let recover = ["--recover"];
    cluster.coordinator =
        Coordinator::start_args(cluster.dir.path(), FAST_LIVENESS, Some(addr), &[], &recover)?;
    let url = cluster.url();
    wait_for("both nodes back, cordoned for review", LONG, || {
        let listed = nodes(&url)?;
        let held = ["node-0", "node-1"].iter().all(|n| {
            listed.get(*n).is_some_and(|v| {
                v["cordon"]["source"] == "recovery" && v["availability"] == "Ready"
            })
        });
        Ok(held.then_some(()))
    })
    .with_context(|| cluster.coordinator.log_text())?;
    let status = clusterctl(&url, &["status"])?;
    assert!(status.stdout.contains("RECOVERED"), "{}", status.stdout);
    let shown = clusterctl(&url, &["recovery"])?;
    assert!(
        shown.stdout.contains("nodes/node-1 fails its checksum"),
        "{}",
        shown.stdout
    );
    let confirmed = clusterctl(&url, &["recovery", "confirm"])?;
    assert!(confirmed.success(), "{}", confirmed.stderr);
    let status = clusterctl(&url, &["status"])?;
    assert!(status.stdout.contains("confirmed"), "{}", status.stdout);
    // Each node stays cordoned until an operator has looked at it.
    let listed = nodes(&url)?;
    assert_eq!(listed["node-0"]["cordon"]["source"], "recovery");
    let out = clusterctl(&url, &["uncordon", "node-0"])?;
    assert!(out.success(), "{}", out.stderr);
    Ok(())
}
