use super::fake::FakeSysfs;
use super::*;

fn tree() -> (tempfile::TempDir, FakeSysfs) {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = FakeSysfs::new(dir.path());
    (dir, fake)
}

fn reader(fake: &FakeSysfs, devices: &[&str]) -> FabricReader {
    FabricReader::new(
        fake.root(),
        &FabricSection {
            devices: devices.iter().map(|d| (*d).to_owned()).collect(),
        },
    )
}

#[test]
fn a_host_without_fabric_reads_nothing() {
    let (_dir, fake) = tree();
    assert_eq!(reader(&fake, &[]).read(), []);
    let missing = FabricReader::new(Path::new("/nonexistent/root"), &FabricSection::default());
    assert_eq!(missing.read(), []);
}

#[test]
fn infiniband_ports_read_with_state_rate_and_counters() -> std::io::Result<()> {
    let (_dir, fake) = tree();
    fake.add_ib_port("mlx5_0", 1, 400)?;
    fake.bump_ib_counter("mlx5_0", 1, "link_downed", 3)?;
    let ports = reader(&fake, &[]).read();
    assert_eq!(ports.len(), 1);
    let p = &ports[0];
    assert_eq!(p.kind(), FabricKind::Infiniband);
    assert_eq!((p.device.as_str(), p.port), ("mlx5_0", 1));
    assert_eq!(
        (p.state.as_str(), p.phys_state.as_str()),
        ("ACTIVE", "LinkUp")
    );
    assert_eq!(p.rate_mbps, Some(400_000));
    assert_eq!(p.link_downed, Some(3));
    assert_eq!(p.port_xmit_discards, Some(0));
    assert_eq!(p.carrier_changes, None);
    fake.set_ib_state("mlx5_0", 1, "1: DOWN", "3: Disabled")?;
    let p = &reader(&fake, &[]).read()[0];
    assert_eq!(
        (p.state.as_str(), p.phys_state.as_str()),
        ("DOWN", "Disabled")
    );
    Ok(())
}

#[test]
fn missing_and_garbled_files_are_absent_values() -> std::io::Result<()> {
    let (dir, fake) = tree();
    fake.add_ib_port("mlx5_0", 1, 200)?;
    let port = dir.path().join("sys/class/infiniband/mlx5_0/ports/1");
    std::fs::remove_file(port.join("rate"))?;
    std::fs::write(port.join("counters/link_downed"), "lots\n")?;
    std::fs::remove_file(port.join("state"))?;
    std::fs::write(port.join("counters/symbol_error"), "9".repeat(10_000))?;
    let p = &reader(&fake, &[]).read()[0];
    assert_eq!(p.rate_mbps, None);
    assert_eq!(p.link_downed, None);
    assert_eq!(p.state, "");
    assert_eq!(
        p.symbol_error, None,
        "a file past the bound is not a number"
    );
    Ok(())
}

#[test]
fn by_default_only_roce_capable_interfaces_are_watched() -> std::io::Result<()> {
    let (_dir, fake) = tree();
    fake.add_netdev("eth0", 100_000, true)?;
    fake.add_netdev("eno1", 1_000, false)?;
    let ports = reader(&fake, &[]).read();
    let names: Vec<&str> = ports.iter().map(|p| p.device.as_str()).collect();
    assert_eq!(names, ["eth0"]);
    assert_eq!(ports[0].kind(), FabricKind::Netdev);
    assert_eq!(ports[0].state, "up");
    assert_eq!(ports[0].rate_mbps, Some(100_000));
    assert_eq!(ports[0].carrier_changes, Some(0));
    Ok(())
}

#[test]
fn configured_globs_choose_devices_ports_and_interfaces() -> std::io::Result<()> {
    let (_dir, fake) = tree();
    fake.add_ib_port("mlx5_0", 1, 400)?;
    fake.add_ib_port("mlx5_1", 1, 400)?;
    fake.add_ib_port("mlx5_1", 2, 400)?;
    fake.add_netdev("eno1", 1_000, false)?;
    fake.add_netdev("eth0", 100_000, true)?;
    let names = |devices: &[&str]| -> Vec<String> {
        reader(&fake, devices)
            .read()
            .iter()
            .map(|p| format!("{}/{}", p.device, p.port))
            .collect()
    };
    assert_eq!(names(&["mlx5_0"]), ["mlx5_0/1"]);
    assert_eq!(names(&["mlx5_1/2", "eno*"]), ["mlx5_1/2", "eno1/0"]);
    assert_eq!(names(&["nothing*"]), Vec::<String>::new());
    assert!(reader(&fake, &["x"]).configured());
    assert!(!reader(&fake, &[]).configured());
    Ok(())
}

#[test]
fn a_netdev_speed_of_minus_one_is_absent() -> std::io::Result<()> {
    let (dir, fake) = tree();
    fake.add_netdev("eth0", 100_000, true)?;
    std::fs::write(dir.path().join("sys/class/net/eth0/speed"), "-1\n")?;
    fake.set_operstate("eth0", "down")?;
    fake.bump_carrier_changes("eth0", 2)?;
    let p = &reader(&fake, &[]).read()[0];
    assert_eq!(
        (p.state.as_str(), p.rate_mbps, p.carrier_changes),
        ("down", None, Some(2))
    );
    Ok(())
}

#[test]
fn the_read_is_bounded() -> std::io::Result<()> {
    let (_dir, fake) = tree();
    for i in 0..40 {
        fake.add_ib_port(&format!("mlx5_{i:02}"), 1, 400)?;
        fake.add_ib_port(&format!("mlx5_{i:02}"), 2, 400)?;
    }
    assert_eq!(reader(&fake, &[]).read().len(), MAX_PORTS);
    Ok(())
}

#[test]
fn bad_globs_are_named() {
    let section = FabricSection {
        devices: vec!["mlx5_*".into(), " ".into()],
    };
    let (field, problem) = section.problem().expect("a blank glob");
    assert_eq!(field, "fabric.devices");
    assert!(problem.contains("not a device glob"), "{problem}");
    assert_eq!(FabricSection::default().problem(), None);
}

#[test]
fn the_check_report_shows_every_field_or_absent() -> std::io::Result<()> {
    let (_dir, fake) = tree();
    fake.add_ib_port("mlx5_0", 1, 400)?;
    fake.add_netdev("eth0", 100_000, true)?;
    let r = reader(&fake, &[]);
    let ports = r.read();
    let text = check::render_text(&r, &ports);
    assert!(text.contains(": 2 port(s)"), "{text}");
    assert!(
        text.contains("port mlx5_0/1\n  state            ACTIVE"),
        "{text}"
    );
    assert!(text.contains("link_downed          0"), "{text}");
    assert!(
        text.contains("interface eth0\n  operstate        up"),
        "{text}"
    );
    let json = check::render_json(&r, &ports);
    assert_eq!(json["ports"][0]["rate_mbps"], 400_000);
    assert_eq!(json["ports"][1]["carrier_changes"], 0);
    assert_eq!(json["configured"], false);
    Ok(())
}
