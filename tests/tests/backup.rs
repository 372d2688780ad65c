//! Backups of a running coordinator's store, end to end: `vigil-coordinator backup` against the
//! live data dir while an operator cordons and uncordons, `vigil-coordinator restore` into a new
//! dir, and a coordinator started on it; the refusals of `restore`; the `[backup]` schedule.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;
use vigil_tests::{Cluster, Coordinator, FAST_LIVENESS, LONG, bin, clusterctl, metric, nodes};

const NODES: [&str; 3] = ["node-0", "node-1", "node-2"];

/// One `vigil-coordinator` command: (exit code, stdout, stderr).
fn coordinator_cmd(args: &[&Path]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(bin("vigil-coordinator")?)
        .args(args)
        .output()
        .context("cannot run vigil-coordinator")?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn backup(data_dir: &Path, to: &Path) -> Result<(Option<i32>, String, String)> {
    coordinator_cmd(&[
        Path::new("backup"),
        Path::new("--data-dir"),
        data_dir,
        Path::new("--to"),
        to,
    ])
}

fn restore(from: &Path, data_dir: &Path) -> Result<(Option<i32>, String, String)> {
    coordinator_cmd(&[
        Path::new("restore"),
        Path::new("--from"),
        from,
        Path::new("--data-dir"),
        data_dir,
    ])
}

/// The word after `key` in `line` ("store 3fa2…," gives "3fa2…").
fn word_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = &line[line.find(key)? + key.len()..];
    rest.split([' ', ',', ')', ';']).find(|w| !w.is_empty())
}

/// One operator change: which node, the cordon it asks for (None: uncordon), when it was sent
/// and answered, and whether clusterctl said it succeeded.
struct Op {
    node: &'static str,
    cordon: Option<String>,
    sent: Instant,
    answered: Instant,
    ok: bool,
}

/// Cordons and uncordons the nodes in turn, one change at a time, until `stop`.
fn operator(url: String, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Op>>>) {
    let mut cordoned = [false; NODES.len()];
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let n = i % NODES.len();
        let node = NODES[n];
        let cordon = (!cordoned[n]).then(|| format!("load op {i}"));
        let sent = Instant::now();
        let out = match &cordon {
            Some(reason) => clusterctl(&url, &["cordon", node, "--reason", reason]),
            None => clusterctl(&url, &["uncordon", node]),
        };
        let ok = out.is_ok_and(|o| o.success());
        if ok {
            cordoned[n] = !cordoned[n];
        }
        let op = Op {
            node,
            cordon,
            sent,
            answered: Instant::now(),
            ok,
        };
        log.lock().unwrap_or_else(|p| p.into_inner()).push(op);
        i += 1;
    }
}

/// The cordons a store may hold for `node` if its snapshot was taken between `began` and
/// `ended`: the last change acknowledged before `began`, or any change after it that was sent
/// before `ended` (changes are made one at a time, so the snapshot holds a prefix of them).
fn possible(ops: &[Op], node: &str, began: Instant, ended: Instant) -> Vec<Option<String>> {
    let mine: Vec<&Op> = ops.iter().filter(|o| o.node == node).collect();
    let floor = mine.iter().rposition(|o| o.ok && o.answered < began);
    let mut out: Vec<Option<String>> = match floor {
        Some(k) => vec![mine[k].cordon.clone()],
        None => vec![None],
    };
    let after = floor.map_or(0, |k| k + 1);
    out.extend(
        mine[after..]
            .iter()
            .filter(|o| o.sent < ended)
            .map(|o| o.cordon.clone()),
    );
    out
}

fn cordons(url: &str) -> Result<BTreeMap<String, Option<String>>> {
    let listed = nodes(url)?;
    NODES
        .iter()
        .map(|n| {
            let node = listed
                .get(*n)
                .with_context(|| format!("{n} is missing from the restored store"))?;
            Ok((
                (*n).to_owned(),
                node["cordon"]["reason"].as_str().map(str::to_owned),
            ))
        })
        .collect()
}

fn config(backups: &Path) -> String {
    format!(
        "{FAST_LIVENESS}\n[backup]\ninterval = \"1s\"\ndir = \"{}\"\nkeep = 3\n",
        backups.display()
    )
}

#[test]
fn a_backup_under_load_restores_every_acknowledged_cordon_under_a_new_store_id() -> Result<()> {
    let backups = tempfile::tempdir()?;
    let config = config(backups.path());
    let mut cluster = Cluster::start(&config, NODES.len())?;
    vigil_tests::wait_for("agents Ready", LONG, || cluster.all("Ready", NODES.len()))?;

    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let (url, stop, log) = (cluster.url(), stop.clone(), log.clone());
        std::thread::spawn(move || operator(url, stop, log))
    };
    std::thread::sleep(Duration::from_millis(1500));
    let file = cluster.dir.path().join("under-load.sqlite");
    let began = Instant::now();
    let (code, line, err) = backup(&cluster.data_dir(), &file)?;
    let ended = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("operator thread panicked"))?;
    if code != Some(0) {
        bail!("backup failed ({code:?}): {err}");
    }
    let ops = std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()));
    let before = ops.iter().filter(|o| o.ok && o.answered < began).count();
    let during = ops
        .iter()
        .filter(|o| o.sent < ended && o.answered > began)
        .count();
    println!(
        "{} changes, {before} acknowledged before the backup began, {during} in flight while it \
         ran ({:?}); {line}",
        ops.len(),
        ended - began
    );
    assert!(before >= NODES.len(), "too few changes before the backup");
    assert!(line.contains(&file.display().to_string()), "{line}");
    let backup_id = word_after(&line, "store ")
        .context("no store id")?
        .to_owned();
    let seq: u64 = word_after(&line, "commit seq ")
        .context("no seq")?
        .parse()?;
    assert!(seq > before as u64, "{line}");
    assert!(line.contains("nodes=3") && line.contains("bytes"), "{line}");

    // Restore into a new dir: a new store id, what was acknowledged before the backup there.
    let second = tempfile::tempdir()?;
    let restored_dir = second.path().join("coordinator-data");
    let (code, restored, err) = restore(&file, &restored_dir)?;
    assert_eq!(code, Some(0), "restore: {err}");
    let new_id = word_after(&restored, "new store id ")
        .context("no new id")?
        .to_owned();
    assert_ne!(new_id, backup_id, "{restored}");
    assert!(restored.contains(&backup_id), "{restored}");
    assert!(restored.contains("nothing moved aside"), "{restored}");
    let mut coordinator = Coordinator::start(second.path(), FAST_LIVENESS, None)?;
    let actual = cordons(&coordinator.url())?;
    for (node, cordon) in &actual {
        let allowed = possible(&ops, node, began, ended);
        if !allowed.contains(cordon) {
            bail!(
                "{node} has cordon {cordon:?} after the restore; the backup ran from {:?} to {:?} \
                 into the load, so it must be one of {allowed:?}",
                began,
                ended
            );
        }
    }
    let log_text = coordinator.log_text();
    assert!(
        log_text.contains(&format!("store_id={new_id}")) || log_text.contains(&new_id),
        "the restored coordinator runs store {new_id}:\n{log_text}"
    );
    println!("restored: {actual:?}");

    // Scheduled backups ran meanwhile, checked and pruned to `keep`.
    let text = vigil_tests::http_get(cluster.coordinator.metrics, "/metrics")?;
    let ok = metric(&text, "vigil_store_backups_total{result=\"ok\"}").unwrap_or(0.0);
    assert!(ok >= 1.0, "scheduled backups: {ok}\n{text}");
    assert_eq!(
        metric(&text, "vigil_store_backups_total{result=\"error\"}"),
        Some(0.0)
    );
    let age = metric(&text, "vigil_store_backup_age_seconds").context("no age")?;
    assert!(age.is_finite() && age < 30.0, "age {age}");
    assert_eq!(
        metric(&text, "vigil_store_backup_interval_seconds"),
        Some(1.0)
    );
    let files: Vec<PathBuf> = std::fs::read_dir(backups.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sqlite"))
        .collect();
    assert!((1..=3).contains(&files.len()), "{files:?}");

    // Agents accept the restored store in place of the old one (a new id is a new store).
    let addr = cluster.coordinator.grpc;
    cluster.coordinator.kill9();
    coordinator.kill9();
    cluster.coordinator = Coordinator::start(second.path(), FAST_LIVENESS, Some(addr))?;
    vigil_tests::wait_for("agents Ready on the restored store", LONG, || {
        cluster.all("Ready", NODES.len())
    })?;
    assert_eq!(cordons(&cluster.url())?, actual);
    Ok(())
}

#[test]
fn restore_refuses_a_damaged_backup_and_a_data_dir_a_coordinator_holds() -> Result<()> {
    let cluster = Cluster::start(FAST_LIVENESS, 1)?;
    vigil_tests::wait_for("agent Ready", LONG, || cluster.all("Ready", 1))?;
    let out = clusterctl(
        &cluster.url(),
        &["cordon", "node-0", "--reason", "fan noise"],
    )?;
    assert!(out.success(), "{}", out.stderr);
    let file = cluster.dir.path().join("b.sqlite");
    let (code, line, err) = backup(&cluster.data_dir(), &file)?;
    assert_eq!(code, Some(0), "backup: {err}");

    // Again to the same file: refused, unless --force.
    let (code, _, err) = backup(&cluster.data_dir(), &file)?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );

    // Into the live data dir: the running coordinator holds its lock.
    let data = cluster.data_dir();
    let listing = |dir: &Path| -> Result<Vec<String>> {
        let mut n: Vec<String> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        Ok(n)
    };
    let before = listing(&data)?;
    let (code, _, err) = restore(&file, &data)?;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("stop vigil-coordinator first"), "{err}");
    assert_eq!(listing(&data)?, before, "nothing moved, nothing installed");
    let out = clusterctl(&cluster.url(), &["-o", "json", "nodes"])?;
    assert!(out.success(), "the coordinator carries on: {}", out.stderr);

    // A few bytes of the backup overwritten (in the cordon's reason): refused, naming it.
    let mut bytes = std::fs::read(&file)?;
    let at = bytes
        .windows(9)
        .position(|w| w == b"fan noise")
        .context("the reason is in the backup")?;
    bytes[at..at + 3].copy_from_slice(b"FAN");
    let damaged = cluster.dir.path().join("damaged.sqlite");
    std::fs::write(&damaged, bytes)?;
    let target = cluster.dir.path().join("restored");
    let (code, _, err) = restore(&damaged, &target)?;
    assert_eq!(code, Some(65), "{err}");
    assert!(
        err.contains("damaged.sqlite") && err.contains("is damaged") && err.contains("checksum"),
        "{err}"
    );
    assert!(!target.join("state.sqlite").exists(), "nothing restored");

    // The intact backup restores, under a new id.
    let (code, restored, err) = restore(&file, &target)?;
    assert_eq!(code, Some(0), "{err}");
    let old = word_after(&line, "store ").context("id")?;
    let new = word_after(&restored, "new store id ").context("new id")?;
    assert_ne!(old, new);
    let marker = std::fs::read_to_string(target.join("vigil-store"))?;
    assert!(marker.contains(new), "{marker}");
    Ok(())
}
