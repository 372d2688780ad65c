//! The agent configuration's tests: defaults, files, flags and every refusal naming its key.

use super::*;

fn valid() -> AgentConfig {
    AgentConfig {
        node_name: "node-01".to_owned(),
        insecure: true,
        ..AgentConfig::default()
    }
}

fn invalid_field(cfg: &AgentConfig) -> &'static str {
    match cfg.validate() {
        Err(ConfigError::Invalid { field, .. }) => field,
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn empty_file_gives_the_documented_defaults() -> Result<(), ConfigError> {
    let cfg = AgentConfig::from_toml_str("")?;
    assert_eq!(cfg.coordinator, DEFAULT_COORDINATOR);
    assert_eq!(cfg.gpu_backend, GpuBackendKind::Nvml);
    assert_eq!(cfg.sim_gpus, 8);
    assert_eq!(cfg.state_dir, PathBuf::from("/var/lib/vigil-agent"));
    assert_eq!(cfg.metrics_listen.to_string(), "0.0.0.0:9771");
    assert_eq!(cfg.reconnect.initial_backoff, Duration::from_millis(200));
    assert_eq!(cfg.reconnect.max_backoff, Duration::from_secs(10));
    assert_eq!(cfg.node_name, hostname());
    assert!(cfg.diagnostics_command.is_empty(), "built-in self-check");
    assert!(cfg.keep_workers_on_shutdown, "agent restarts keep training");
    assert_eq!(cfg.worker_stop_grace, Duration::from_secs(10));
    assert_eq!(cfg.lease_stop_grace, Duration::from_secs(1));
    Ok(())
}

#[test]
fn diagnostics_command_needs_a_program() -> Result<(), ConfigError> {
    let mut cfg = valid();
    cfg.diagnostics_command = vec![" ".to_owned(), "-x".to_owned()];
    assert_eq!(invalid_field(&cfg), "diagnostics_command");
    cfg.diagnostics_command = vec!["/usr/bin/true".to_owned()];
    assert!(cfg.validate().is_ok());
    assert!(AgentConfig::from_toml_str("diagnostics_command = \"dcgmi diag\"").is_err());
    Ok(())
}

#[test]
fn every_key_is_read() -> Result<(), ConfigError> {
    let cfg = AgentConfig::from_toml_str(
        r#"
        coordinator = "https://coord:7000"
        node_name = "gpu-node-7"
        gpu_backend = "sim"
        sim_gpus = 4
        sim_fault_file = "/tmp/faults"
        diagnostics_command = ["dcgmi", "diag", "-r", "1"]
        state_dir = "/tmp/state"
        metrics_listen = "127.0.0.1:0"
        keep_workers_on_shutdown = false
        worker_stop_grace = "30s"
        lease_stop_grace = "500ms"
        insecure = false
        [reconnect]
        initial_backoff = "1s"
        max_backoff = "1m"
        [tls]
        ca = "/etc/vigil/tls/ca.crt"
        cert = "/etc/vigil/tls/node.crt"
        key = "/etc/vigil/tls/node.key"
        "#,
    )?;
    cfg.validate()?;
    assert_eq!(cfg.coordinator, "https://coord:7000");
    assert_eq!(
        cfg.tls.as_ref().map(|t| t.cert.clone()),
        Some(PathBuf::from("/etc/vigil/tls/node.crt"))
    );
    assert!(!cfg.insecure);
    assert_eq!(cfg.node_name, "gpu-node-7");
    assert_eq!(cfg.gpu_backend, GpuBackendKind::Sim);
    assert_eq!(cfg.sim_gpus, 4);
    assert_eq!(cfg.sim_fault_file, Some(PathBuf::from("/tmp/faults")));
    assert_eq!(cfg.diagnostics_command, ["dcgmi", "diag", "-r", "1"]);
    assert_eq!(cfg.state_dir, PathBuf::from("/tmp/state"));
    assert_eq!(cfg.metrics_listen.port(), 0);
    assert_eq!(cfg.reconnect.initial_backoff, Duration::from_secs(1));
    assert_eq!(cfg.reconnect.max_backoff, Duration::from_secs(60));
    assert!(!cfg.keep_workers_on_shutdown);
    assert_eq!(cfg.worker_stop_grace, Duration::from_secs(30));
    assert_eq!(cfg.lease_stop_grace, Duration::from_millis(500));
    Ok(())
}

#[test]
fn unknown_key_is_rejected_by_name() {
    let err = AgentConfig::from_toml_str("heartbeat_interval = \"1s\"");
    let msg = err.map(|_| ()).err().map(|e| e.to_string());
    assert!(msg.is_some_and(|m| m.contains("heartbeat_interval")));
}

#[test]
fn unknown_backend_is_rejected() {
    assert!(AgentConfig::from_toml_str("gpu_backend = \"rocm\"").is_err());
}

#[test]
fn node_name_must_be_short_and_plain() {
    let mut cfg = valid();
    assert!(cfg.validate().is_ok());
    for bad in ["", "has space", "ünï", "a/b"] {
        cfg.node_name = bad.to_owned();
        assert_eq!(invalid_field(&cfg), "node_name", "{bad:?}");
    }
    cfg.node_name = "a".repeat(64);
    assert_eq!(invalid_field(&cfg), "node_name");
    cfg.node_name = "A.b_c-9".repeat(9);
    assert!(cfg.validate().is_ok());
}

#[test]
fn sim_gpus_must_be_between_1_and_64() {
    let mut cfg = valid();
    for (n, ok) in [(0, false), (1, true), (64, true), (65, false)] {
        cfg.sim_gpus = n;
        assert_eq!(cfg.validate().is_ok(), ok, "{n}");
    }
}

#[test]
fn coordinator_must_be_an_http_url() {
    let mut cfg = valid();
    for bad in ["", "coord:7770", "ftp://coord:7770", "http://", "not a url"] {
        cfg.coordinator = bad.into();
        assert_eq!(invalid_field(&cfg), "coordinator", "{bad:?}");
    }
    cfg.coordinator = "https://coord:7770".into();
    assert_eq!(invalid_field(&cfg), "coordinator");
    cfg.coordinator = "http://10.0.0.1:7770".into();
    assert!(cfg.validate().is_ok());
}

fn problem(cfg: &AgentConfig) -> String {
    match cfg.validate() {
        Err(e @ ConfigError::Invalid { .. }) => e.to_string(),
        other => panic!("expected an invalid field, got {other:?}"),
    }
}

#[test]
fn coordinator_may_be_a_list() -> Result<(), ConfigError> {
    let cfg = AgentConfig::from_toml_str(
        "coordinator = [\"http://c1:7770\", \"http://c2:7770\", \"http://c3:7770\"]",
    )?;
    assert_eq!(
        cfg.coordinator.urls(),
        ["http://c1:7770", "http://c2:7770", "http://c3:7770"]
    );
    assert!(cfg.coordinator.is_group());
    assert!(cfg.coordinator.starts_with("http://"));
    AgentConfig {
        node_name: "n".into(),
        insecure: true,
        ..cfg
    }
    .validate()?;
    let one = AgentConfig::from_toml_str("coordinator = [\"http://c1:7770\"]")?;
    assert_eq!(one.coordinator, "http://c1:7770");
    assert!(!one.coordinator.is_group());
    let err = AgentConfig::from_toml_str("coordinator = 7770").map(|_| ());
    let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("a coordinator URL, or an array"), "{msg}");
    Ok(())
}

#[test]
fn coordinator_list_is_checked_naming_the_key_and_the_fix() {
    let list = |urls: &[&str]| AgentConfig {
        coordinator: urls
            .iter()
            .map(|u| (*u).to_owned())
            .collect::<Vec<_>>()
            .into(),
        ..valid()
    };
    let empty = problem(&list(&[]));
    assert!(empty.contains("coordinator: the list is empty"), "{empty}");
    let twice = problem(&list(&["http://c1:7770", "http://C1:7770/"]));
    assert!(
        twice.contains("listed twice; list each coordinator once"),
        "{twice}"
    );
    let mixed = problem(&AgentConfig {
        insecure: false,
        tls: Some(vigil_tls::TlsFiles {
            ca: "/ca".into(),
            cert: "/c".into(),
            key: "/k".into(),
        }),
        ..list(&["https://c1:7770", "http://c2:7770"])
    });
    assert!(mixed.contains("uses http:// but"), "{mixed}");
    assert!(mixed.contains("use one scheme"), "{mixed}");
    let bad = problem(&list(&["http://c1:7770", "c2:7770"]));
    assert!(bad.starts_with("invalid coordinator: "), "{bad}");
    let urls: Vec<String> = (1..=8).map(|i| format!("http://c{i}:7770")).collect();
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let many = problem(&list(&refs));
    assert!(many.contains("8 coordinators, more than 7"), "{many}");
    assert!(list(&refs[..7]).validate().is_ok());
    // Secure defaults still apply to every member of the list.
    let https = problem(&list(&["http://c1:7770", "https://c2:7770"]));
    assert!(https.contains("coordinator"), "{https}");
}

#[test]
fn coordinators_match_by_scheme_host_and_port() {
    let list = Coordinators::from_flag("http://c1:7770, http://c2:7770,http://c3");
    assert_eq!(list.len(), 3);
    assert_eq!(list.to_string(), "http://c1:7770,http://c2:7770,http://c3");
    assert_eq!(list.position("http://C2:7770/"), Some(1));
    assert_eq!(list.position("http://c3:80"), Some(2));
    assert_eq!(list.position("https://c2:7770"), None);
    assert_eq!(list.position("http://c4:7770"), None);
    assert_eq!(list.position("not a url"), None);
}

#[test]
fn changed_keys_see_a_changed_coordinator_list() {
    let old = valid();
    let new = AgentConfig {
        coordinator: Coordinators::from_flag("http://127.0.0.1:7770,http://c2:7770"),
        ..old.clone()
    };
    assert_eq!(old.changed_keys(&new), ["coordinator"]);
}

#[test]
fn initial_backoff_may_not_exceed_max_backoff() {
    let mut cfg = valid();
    cfg.reconnect.initial_backoff = Duration::from_secs(11);
    assert_eq!(invalid_field(&cfg), "reconnect.initial_backoff");
    cfg.reconnect.initial_backoff = Duration::ZERO;
    assert_eq!(invalid_field(&cfg), "reconnect.initial_backoff");
    cfg.reconnect.initial_backoff = Duration::from_secs(10);
    assert!(cfg.validate().is_ok());
}

#[test]
fn changed_keys_name_what_a_reload_would_change() -> Result<(), ConfigError> {
    let old = valid();
    assert!(old.changed_keys(&old.clone()).is_empty());
    let mut new = AgentConfig::from_toml_str(
        "insecure = true\nworker_stop_grace = \"30s\"\n[reconnect]\nmax_backoff = \"1m\"\n",
    )?;
    new.node_name = old.node_name.clone();
    assert_eq!(old.changed_keys(&new), ["reconnect", "worker_stop_grace"]);
    Ok(())
}

#[test]
fn bad_duration_is_rejected() {
    assert!(AgentConfig::from_toml_str("[reconnect]\nmax_backoff = \"soon\"").is_err());
}

#[test]
fn workers_section_is_checked_naming_the_key() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = AgentConfig::from_toml_str(
        "[workers]\nrun_as = \"vigil-job\"\nallowed_roots = [\"/shared\", \"/scratch\"]\n",
    )?;
    assert_eq!(cfg.workers.run_as.as_deref(), Some("vigil-job"));
    AgentConfig {
        node_name: "n".into(),
        insecure: true,
        ..cfg
    }
    .validate()?;
    for (workers, field) in [
        (
            WorkersSection {
                run_as: Some("Bad User".into()),
                ..Default::default()
            },
            "workers.run_as",
        ),
        (
            WorkersSection {
                run_as: Some(String::new()),
                ..Default::default()
            },
            "workers.run_as",
        ),
        (
            WorkersSection {
                allowed_roots: vec!["shared".into()],
                ..Default::default()
            },
            "workers.allowed_roots",
        ),
        (
            WorkersSection {
                allowed_roots: vec!["/shared/../etc".into()],
                ..Default::default()
            },
            "workers.allowed_roots",
        ),
        (
            WorkersSection {
                allowed_roots: vec!["/".into()],
                ..Default::default()
            },
            "workers.allowed_roots",
        ),
    ] {
        assert_eq!(invalid_field(&AgentConfig { workers, ..valid() }), field);
    }
    Ok(())
}

#[test]
fn workers_launch_defaults_on_and_slurm_mode_turns_it_off() -> Result<(), Box<dyn std::error::Error>>
{
    assert!(AgentConfig::from_toml_str("")?.workers.launch);
    let cfg = AgentConfig::from_toml_str("[workers]\nlaunch = false\n")?;
    assert!(!cfg.workers.launch);
    Ok(())
}
