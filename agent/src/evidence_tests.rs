use super::*;

fn proc_entry(root: &Path, pid: u32, comm: &str, pgid: u32, state: &str) -> std::io::Result<()> {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("stat"),
        format!("{pid} ({comm}) S 1 {pgid} {pgid} 0 -1 4194560 0 0\n"),
    )?;
    std::fs::write(dir.join("comm"), format!("{comm}\n"))?;
    std::fs::write(
        dir.join("status"),
        format!("Name:\t{comm}\nState:\t{state}\nPid:\t{pid}\n"),
    )?;
    std::fs::write(dir.join("wchan"), "futex_wait_queue")?;
    Ok(())
}

#[test]
fn every_process_of_the_workers_group_is_read_with_its_kernel_view() -> std::io::Result<()> {
    let root = tempfile::tempdir()?;
    proc_entry(root.path(), 100, "python3", 100, "S (sleeping)")?;
    proc_entry(root.path(), 101, "pt_main thread", 100, "D (disk sleep)")?;
    proc_entry(root.path(), 200, "bash", 200, "S (sleeping)")?;
    std::fs::write(root.path().join("101/stack"), "[<0>] futex_wait+0x1/0x2\n")?;
    std::fs::create_dir_all(root.path().join("self"))?;
    let found = processes(root.path(), 101);
    let pids: Vec<u32> = found.iter().map(|p| p.pid).collect();
    assert_eq!(pids, [100, 101], "the whole group of 101");
    assert_eq!(found[1].comm, "pt_main thread", "a command with a space");
    assert_eq!(found[1].state, "D (disk sleep)");
    assert_eq!(found[1].wchan, "futex_wait_queue");
    assert_eq!(found[1].kernel_stack, "[<0>] futex_wait+0x1/0x2\n");
    assert!(
        found[0].kernel_stack.starts_with("unreadable: "),
        "{}",
        found[0].kernel_stack
    );
    assert_eq!(processes(Path::new("/nonexistent"), 1), []);
    Ok(())
}

fn port(device: &str, state: &str, link_downed: u64) -> FabricPort {
    FabricPort {
        kind: vigil_proto::v1::FabricKind::Infiniband.into(),
        device: device.into(),
        port: 1,
        state: state.into(),
        phys_state: "LinkUp".into(),
        link_downed: Some(link_downed),
        symbol_error: Some(5),
        ..FabricPort::default()
    }
}

#[test]
fn fabric_deltas_keep_ports_that_rose_or_are_down() {
    let before = [
        port("mlx5_0", "ACTIVE", 1),
        port("mlx5_1", "ACTIVE", 0),
        port("mlx5_2", "ACTIVE", 0),
    ];
    let now = [
        port("mlx5_0", "ACTIVE", 4),
        port("mlx5_1", "ACTIVE", 0),
        port("mlx5_2", "DOWN", 0),
    ];
    let d = deltas(&before, &now);
    let seen: Vec<(&str, &str, u64)> = d
        .iter()
        .map(|d| (d.port.as_str(), d.state.as_str(), d.link_downed))
        .collect();
    assert_eq!(seen, [("mlx5_0/1", "ACTIVE", 3), ("mlx5_2/1", "DOWN", 0)]);
    assert_eq!(d[0].symbol_error, 0);
    // Without a baseline (the agent restarted since the start), the counters count whole.
    assert_eq!(
        deltas(&[], &[port("mlx5_0", "ACTIVE", 2)])[0].link_downed,
        2
    );
}
