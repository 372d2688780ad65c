//! The example configs in `deploy/config/` parse, show every key with its
//! default, match docs/configuration.md key for key, and pass `--check-config`;
//! bad files fail it with exit 64 and a message naming the key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};
use vigil_agent::AgentConfig;
use vigil_coordinator::Config;
use vigil_tests::{bin, write_file};

/// EX_USAGE: what both daemons exit with on an invalid configuration.
const EXIT_USAGE: i32 = 64;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &str) -> Result<String> {
    let path = repo_file(path);
    std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
}

fn check_config(binary: &str, file: &Path) -> Result<Output> {
    Command::new(bin(binary)?)
        .arg("--check-config")
        .arg(file)
        .output()
        .with_context(|| format!("cannot run {binary}"))
}

/// The keys a TOML example mentions, set or commented out, as dotted paths
/// (`liveness.lost_after`); a table header counts as a key (`health.xid`).
fn example_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        // `[[section.list]]` (an array of tables) names its keys like `[section]` does.
        let table = line
            .strip_prefix("[[")
            .and_then(|l| l.strip_suffix("]]"))
            .or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')));
        if let Some(header) = table {
            section = header.to_owned();
            keys.insert(section.clone());
            continue;
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
            keys.insert(if section.is_empty() {
                key.to_owned()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    keys
}

/// The keys in the table under `## heading` in docs/configuration.md (up to the next heading),
/// plus the sections they belong to.
fn documented_keys(docs: &str, heading: &str) -> Result<BTreeSet<String>> {
    let start = docs
        .find(&format!("## {heading}\n"))
        .with_context(|| format!("no \"## {heading}\" in docs/configuration.md"))?;
    let mut keys = BTreeSet::new();
    for line in docs[start..].lines().skip(1) {
        if line.starts_with('#') {
            break;
        }
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let key = rest.split('`').next().unwrap_or_default();
        if let Some((section, _)) = key.rsplit_once('.') {
            keys.insert(section.to_owned());
        }
        keys.insert(key.to_owned());
    }
    Ok(keys)
}

#[test]
fn coordinator_example_shows_the_defaults_and_every_documented_key() -> Result<()> {
    let text = read("deploy/config/coordinator.toml")?;
    let parsed = Config::from_toml_str(&text)?;
    assert!(parsed.tls.is_some(), "the example uses mutual TLS");
    assert_eq!(
        Config {
            tls: None,
            ..parsed
        },
        Config::default(),
        "deploy/config/coordinator.toml sets every other key to its default"
    );
    let docs = documented_keys(&read("docs/configuration.md")?, "vigil-coordinator")?;
    assert_eq!(
        example_keys(&text),
        docs,
        "keys of deploy/config/coordinator.toml vs docs/configuration.md"
    );
    Ok(())
}

#[test]
fn agent_example_shows_the_defaults_and_every_documented_key() -> Result<()> {
    let text = read("deploy/config/agent.toml")?;
    let parsed = AgentConfig::from_toml_str(&text)?;
    parsed.validate()?;
    // [workers] is an exception, said so in the file: a real host needs a job user and roots;
    // so is the transport: the example uses mutual TLS to an https:// coordinator.
    assert_eq!(parsed.workers.run_as.as_deref(), Some("vigil-job"));
    assert_eq!(
        parsed.workers.allowed_roots,
        [std::path::PathBuf::from("/shared")]
    );
    assert!(parsed.tls.is_some(), "the example uses mutual TLS");
    assert!(
        parsed.coordinator.starts_with("https://"),
        "{}",
        parsed.coordinator
    );
    let defaults = AgentConfig::default();
    assert_eq!(
        AgentConfig {
            workers: defaults.workers.clone(),
            tls: None,
            coordinator: defaults.coordinator.clone(),
            ..parsed
        },
        defaults,
        "deploy/config/agent.toml sets every other key to its default"
    );
    let docs = documented_keys(&read("docs/configuration.md")?, "vigil-agent")?;
    assert_eq!(
        example_keys(&text),
        docs,
        "keys of deploy/config/agent.toml vs docs/configuration.md"
    );
    Ok(())
}

#[test]
fn check_config_accepts_the_examples() -> Result<()> {
    for (binary, file) in [
        ("vigil-coordinator", "deploy/config/coordinator.toml"),
        ("vigil-coordinator", "deploy/config/coordinator-ha.toml"),
        ("vigil-agent", "deploy/config/agent.toml"),
    ] {
        let path = repo_file(file);
        let out = check_config(binary, &path)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{binary} --check-config {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.trim(), format!("{}: ok", path.display()));
    }
    Ok(())
}

/// Runs `--check-config` on `text`; asserts exit 64 and that stderr names every one of `names`.
fn assert_refused(binary: &str, text: &str, names: &[&str]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write_file(dir.path(), "bad.toml", text)?;
    let out = check_config(binary, &file)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(EXIT_USAGE),
        "{binary} --check-config on {text:?}: {stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing on stdout for a bad file");
    for name in names.iter().chain([&file.to_string_lossy().as_ref()]) {
        assert!(stderr.contains(name), "{binary}: {name:?} not in {stderr}");
    }
    Ok(())
}

#[test]
fn check_config_refuses_an_unknown_key_by_name() -> Result<()> {
    assert_refused(
        "vigil-coordinator",
        "lost_afterr = \"10s\"\n",
        &["lost_afterr"],
    )?;
    assert_refused(
        "vigil-agent",
        "[reconnect]\nmax_backof = \"10s\"\n",
        &["max_backof"],
    )
}

#[test]
fn check_config_refuses_a_bad_duration_by_name() -> Result<()> {
    assert_refused(
        "vigil-coordinator",
        "[liveness]\nlost_after = \"ten seconds\"\n",
        &["lost_after", "ten seconds"],
    )?;
    assert_refused(
        "vigil-agent",
        "worker_stop_grace = \"ten seconds\"\n",
        &["worker_stop_grace", "ten seconds"],
    )
}

#[test]
fn check_config_refuses_inconsistent_values_by_name() -> Result<()> {
    assert_refused(
        "vigil-coordinator",
        "[liveness]\nagent_lease = \"20s\"\n",
        &["liveness.agent_lease"],
    )?;
    assert_refused("vigil-agent", "sim_gpus = 0\n", &["sim_gpus"])
}

#[test]
fn check_config_refuses_a_missing_file_by_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nope.toml");
    for binary in ["vigil-coordinator", "vigil-agent"] {
        let out = check_config(binary, &missing)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_USAGE), "{binary}: {stderr}");
        assert!(
            stderr.contains(&missing.display().to_string()),
            "{binary}: {stderr}"
        );
    }
    Ok(())
}
