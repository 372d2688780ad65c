//! Bad input gets a clear error naming the thing and a non-zero exit, and loses nothing.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use vigil_tests::{Cluster, FAST_LIVENESS, LONG, bin, clusterctl, now, wait_for};

fn coordinator_with_data_dir(data_dir: &std::path::Path) -> Result<std::process::Output> {
    Ok(Command::new(bin("vigil-coordinator")?)
        .args([
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .output()?)
}

#[test]
fn data_dir_that_is_a_file_is_refused_by_path() -> Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    let out = coordinator_with_data_dir(file.path())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&file.path().display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("not a directory"), "{stderr}");
    Ok(())
}

#[test]
fn data_dir_under_a_file_is_not_writable_and_refused_by_path() -> Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    let dir = file.path().join("state");
    let out = coordinator_with_data_dir(&dir)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&dir.display().to_string()), "{stderr}");
    Ok(())
}

#[test]
fn data_dir_holding_something_else_is_refused_and_left_untouched() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("postgresql.conf"), "x")?;
    let out = coordinator_with_data_dir(dir.path())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path())?.count(),
        1,
        "nothing written into a foreign dir"
    );
    Ok(())
}

#[test]
fn data_dir_holding_a_damaged_old_sled_store_is_refused_by_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("conf"), b"\xff\xfegarbage")?;
    std::fs::write(dir.path().join("db"), vec![0x5a_u8; 8192])?;
    let out = coordinator_with_data_dir(dir.path())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stderr: {stderr}");
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn invalid_config_exits_64_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path =
        vigil_tests::write_file(dir.path(), "c.toml", "[liveness]\nlost_afterr = \"10s\"\n")?;
    let out = Command::new(bin("vigil-coordinator")?)
        .arg("--config")
        .arg(&path)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("lost_afterr"), "{stderr}");
    Ok(())
}

#[test]
fn clusterctl_against_a_closed_port_fails_fast_naming_the_address() -> Result<()> {
    bin("clusterctl")?; // build first: the timing below is clusterctl's alone
    // Bind and drop to find a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        &["status"][..],
        &["-o", "json", "nodes"],
        &["cordon", "x", "--reason", "y"],
    ] {
        let start = now();
        let out = clusterctl(&url, args)?;
        assert!(!out.success(), "{args:?} succeeded against a closed port");
        assert!(
            out.stderr.contains(&format!("127.0.0.1:{port}")),
            "{args:?}: {}",
            out.stderr
        );
        assert_eq!(
            out.stderr.trim().lines().count(),
            1,
            "one line: {}",
            out.stderr
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "took {:?}",
            start.elapsed()
        );
    }
    Ok(())
}

#[test]
fn clusterctl_cordon_of_an_unknown_node_is_a_clear_error() -> Result<()> {
    let cluster = Cluster::start(FAST_LIVENESS, 1)?;
    wait_for("agent Ready", LONG, || cluster.all("Ready", 1))?;
    let out = clusterctl(
        &cluster.url(),
        &["cordon", "no-such-node", "--reason", "test"],
    )?;
    assert!(!out.success());
    assert!(out.stderr.contains("no-such-node"), "{}", out.stderr);
    assert!(out.stderr.contains("not found"), "{}", out.stderr);

    let out = clusterctl(&cluster.url(), &["cordon", "node-0", "--reason", "   "])?;
    assert!(!out.success(), "an empty reason is refused");
    assert!(out.stderr.contains("reason"), "{}", out.stderr);

    let out = clusterctl(&cluster.url(), &["node", "no-such-node"])?;
    assert!(!out.success());
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    // Nothing was changed by the refused calls.
    assert_eq!(
        vigil_tests::nodes(&cluster.url())?["node-0"]["state"],
        "Ready"
    );
    Ok(())
}
