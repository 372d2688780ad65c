use std::fs;

use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn dir_with(entries: &[&str]) -> io::Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    for entry in entries {
        let path = tmp.path().join(entry);
        if let Some(dir) = entry.strip_suffix('/') {
            fs::create_dir_all(tmp.path().join(dir))?;
        } else {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            // Markers hold something, and a trainer state names its directory's step.
            let text = match (path.file_name(), path.parent().and_then(Path::file_name)) {
                (Some(f), Some(d)) if f == "trainer_state.json" => format!(
                    "{{\"global_step\": {}}}",
                    last_integer(&d.to_string_lossy()).unwrap_or(0)
                ),
                _ => "1\n".to_owned(),
            };
            fs::write(&path, text)?;
        }
    }
    Ok(tmp)
}

fn latest(tmp: &tempfile::TempDir, layout: Layout) -> io::Result<Option<(String, Option<u64>)>> {
    Ok(latest_complete(tmp.path(), layout)?.map(|c| {
        let name = c
            .path
            .strip_prefix(tmp.path())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        (name, c.step)
    }))
}

fn some(name: &str, step: u64) -> Option<(String, Option<u64>)> {
    Some((name.to_owned(), Some(step)))
}

#[test]
fn save_duration_spans_the_first_file_to_the_marker() -> TestResult {
    let tmp = dir_with(&["step_5/model.bin", "step_5/COMPLETE"])?;
    let base = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let set = |p: &str, secs: f64| {
        let f = fs::File::options().write(true).open(tmp.path().join(p))?;
        f.set_modified(base + std::time::Duration::from_secs_f64(secs))
    };
    set("step_5/model.bin", 0.0)?;
    set("step_5/COMPLETE", 2.5)?;
    let c = latest_complete(tmp.path(), Layout::Marker)?.ok_or("no checkpoint")?;
    assert_eq!(
        save_duration_ms(tmp.path(), &c, Layout::Marker),
        Some(2_500)
    );
    let empty = dir_with(&["iter_0000007/"])?;
    fs::write(empty.path().join(MEGATRON_TRACKER), "7")?;
    let c = latest_complete(empty.path(), Layout::Megatron)?.ok_or("no checkpoint")?;
    assert_eq!(
        save_duration_ms(empty.path(), &c, Layout::Megatron),
        Some(0),
        "the tracker alone"
    );
    Ok(())
}

#[test]
fn last_integer_is_the_step_in_every_naming_scheme() {
    assert_eq!(last_integer("step_000200"), Some(200));
    assert_eq!(last_integer("checkpoint-200"), Some(200));
    assert_eq!(last_integer("global_step200"), Some(200));
    assert_eq!(last_integer("iter_0000200"), Some(200));
    assert_eq!(last_integer("run3_step_17"), Some(17));
    assert_eq!(last_integer("v2-final"), Some(2));
    assert_eq!(last_integer("final"), None);
    assert_eq!(last_integer(""), None);
    assert_eq!(last_integer("99999999999999999999999"), None, "overflow");
}

#[test]
fn layout_names_parse_and_unknown_ones_say_what_is_allowed() {
    for name in [
        "marker",
        "pytorch-dcp",
        "megatron",
        "deepspeed",
        "hf-trainer",
    ] {
        let layout: Result<Layout, _> = name.parse();
        assert_eq!(layout.map(|l| l.to_string()).ok().as_deref(), Some(name));
    }
    assert_eq!("".parse(), Ok(Layout::Marker));
    let err = "orbax".parse::<Layout>().err().map(|e| e.to_string());
    assert!(err.is_some_and(|e| e.contains("orbax") && e.contains("hf-trainer")));
}

#[test]
fn a_missing_dir_holds_no_checkpoint() -> TestResult {
    let tmp = tempfile::tempdir()?;
    for layout in [
        "marker",
        "pytorch-dcp",
        "megatron",
        "deepspeed",
        "hf-trainer",
    ] {
        let found = latest_complete(&tmp.path().join("nope"), layout.parse()?)?;
        assert_eq!(found, None, "{layout}");
    }
    Ok(())
}

#[test]
fn an_empty_dir_holds_no_checkpoint() -> TestResult {
    let tmp = dir_with(&[])?;
    for layout in [
        "marker",
        "pytorch-dcp",
        "megatron",
        "deepspeed",
        "hf-trainer",
    ] {
        assert_eq!(latest(&tmp, layout.parse()?)?, None, "{layout}");
    }
    Ok(())
}

#[test]
fn marker_picks_the_newest_subdir_with_complete() -> TestResult {
    let tmp = dir_with(&[
        "step_000100/COMPLETE",
        "step_000200/COMPLETE",
        "step_000050/",
    ])?;
    assert_eq!(latest(&tmp, Layout::Marker)?, some("step_000200", 200));
    Ok(())
}

#[test]
fn marker_skips_a_partial_newest_checkpoint() -> TestResult {
    let tmp = dir_with(&["step_100/COMPLETE", "step_200/model.pt", "step_300/"])?;
    assert_eq!(latest(&tmp, Layout::Marker)?, some("step_100", 100));
    Ok(())
}

#[test]
fn marker_orders_by_number_not_lexically() -> TestResult {
    let tmp = dir_with(&["step_9/COMPLETE", "step_10/COMPLETE", "step_2/COMPLETE"])?;
    assert_eq!(latest(&tmp, Layout::Marker)?, some("step_10", 10));
    Ok(())
}

#[test]
fn marker_ignores_a_complete_file_that_is_not_in_a_subdir() -> TestResult {
    let tmp = dir_with(&["COMPLETE", "step_1/"])?;
    assert_eq!(latest(&tmp, Layout::Marker)?, None);
    Ok(())
}

#[test]
fn unnumbered_names_are_ordered_by_modification_time() -> TestResult {
    let tmp = dir_with(&["older/COMPLETE", "newer/COMPLETE"])?;
    let old = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    fs::File::open(tmp.path().join("older"))?.set_modified(old)?;
    assert_eq!(
        latest(&tmp, Layout::Marker)?,
        Some(("newer".to_owned(), None))
    );
    let new = SystemTime::now() + std::time::Duration::from_secs(3600);
    fs::File::open(tmp.path().join("older"))?.set_modified(new)?;
    assert_eq!(
        latest(&tmp, Layout::Marker)?,
        Some(("older".to_owned(), None))
    );
    Ok(())
}

#[test]
fn numbered_names_outrank_unnumbered_ones() -> TestResult {
    let tmp = dir_with(&["step_5/COMPLETE", "scratch/COMPLETE"])?;
    assert_eq!(latest(&tmp, Layout::Marker)?, some("step_5", 5));
    Ok(())
}

#[test]
fn an_empty_marker_is_not_complete() -> TestResult {
    let tmp = dir_with(&["step_5/COMPLETE", "step_6/model.bin"])?;
    fs::write(tmp.path().join("step_6/COMPLETE"), "")?;
    assert_eq!(latest(&tmp, Layout::Marker)?, some("step_5", 5));
    Ok(())
}

/// Sets `path`'s modification time to `base` + `secs`.
fn touch(path: &Path, base: SystemTime, secs: u64) -> io::Result<()> {
    fs::File::options()
        .write(true)
        .open(path)?
        .set_modified(base + std::time::Duration::from_secs(secs))
}

#[test]
fn a_reused_directory_whose_data_is_newer_than_its_marker_is_not_complete() -> TestResult {
    let tmp = dir_with(&[
        "step_40/model.bin",
        "step_40/COMPLETE",
        "step_50/shards/rank1.bin",
        "step_50/model.bin",
        "step_50/COMPLETE",
    ])?;
    let base = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    let d = tmp.path();
    for f in ["step_40/model.bin", "step_40/COMPLETE", "step_50/model.bin"] {
        touch(&d.join(f), base, 0)?;
    }
    touch(&d.join("step_50/shards/rank1.bin"), base, 1)?;
    touch(&d.join("step_50/COMPLETE"), base, 0)?;
    assert_eq!(
        latest(&tmp, Layout::Marker)?,
        some("step_50", 50),
        "a shard 1 s after the marker is clock skew between hosts, not a rewrite"
    );
    // A rollback rewrites step_50: new data, the old marker still there.
    touch(&d.join("step_50/shards/rank1.bin"), base, 600)?;
    assert_eq!(latest(&tmp, Layout::Marker)?, some("step_40", 40));
    // The save completes: its marker is written anew.
    touch(&d.join("step_50/COMPLETE"), base, 601)?;
    assert_eq!(latest(&tmp, Layout::Marker)?, some("step_50", 50));
    Ok(())
}

#[test]
fn pytorch_dcp_needs_metadata() -> TestResult {
    let tmp = dir_with(&[
        "step_10/.metadata",
        "step_9/.metadata",
        "step_20/__0_0.distcp",
    ])?;
    assert_eq!(latest(&tmp, Layout::PytorchDcp)?, some("step_10", 10));
    fs::write(tmp.path().join("step_20/.metadata"), "")?;
    assert_eq!(
        latest(&tmp, Layout::PytorchDcp)?,
        some("step_10", 10),
        "an empty .metadata is a write cut short"
    );
    fs::write(tmp.path().join("step_20/.metadata"), "metadata")?;
    assert_eq!(latest(&tmp, Layout::PytorchDcp)?, some("step_20", 20));
    Ok(())
}

#[test]
fn hf_trainer_needs_trainer_state_in_checkpoint_n() -> TestResult {
    let tmp = dir_with(&[
        "checkpoint-500/trainer_state.json",
        "checkpoint-1000/model.safetensors",
        "checkpoint-90/trainer_state.json",
        "runs_2000/trainer_state.json",
    ])?;
    assert_eq!(
        latest(&tmp, Layout::HfTrainer)?,
        some("checkpoint-500", 500)
    );
    let state = tmp.path().join("checkpoint-1000/trainer_state.json");
    for bad in ["{}", "{\"global_step\": 900}", "{\"global_st"] {
        fs::write(&state, bad)?;
        assert_eq!(
            latest(&tmp, Layout::HfTrainer)?,
            some("checkpoint-500", 500),
            "{bad}: no global_step 1000"
        );
    }
    fs::write(&state, "{\"global_step\": 1000, \"log_history\": []}")?;
    assert_eq!(
        latest(&tmp, Layout::HfTrainer)?,
        some("checkpoint-1000", 1000)
    );
    Ok(())
}

#[test]
fn megatron_follows_the_tracker_to_iter_dir() -> TestResult {
    let tmp = dir_with(&["iter_0000100/", "iter_0000200/", "iter_0000300/"])?;
    assert_eq!(latest(&tmp, Layout::Megatron)?, None, "no tracker yet");
    fs::write(tmp.path().join(MEGATRON_TRACKER), "200\n")?;
    assert_eq!(latest(&tmp, Layout::Megatron)?, some("iter_0000200", 200));
    Ok(())
}

#[test]
fn megatron_tracker_naming_a_missing_dir_or_garbage_is_no_checkpoint() -> TestResult {
    let tmp = dir_with(&["iter_0000100/"])?;
    fs::write(tmp.path().join(MEGATRON_TRACKER), "400")?;
    assert_eq!(latest(&tmp, Layout::Megatron)?, None);
    fs::write(tmp.path().join(MEGATRON_TRACKER), "forty")?;
    assert_eq!(latest(&tmp, Layout::Megatron)?, None);
    fs::write(tmp.path().join(MEGATRON_TRACKER), "")?;
    assert_eq!(latest(&tmp, Layout::Megatron)?, None);
    Ok(())
}

#[test]
fn a_tracker_that_is_a_link_or_a_fifo_is_not_followed() -> TestResult {
    let tmp = dir_with(&["iter_0000010/x"])?;
    let elsewhere = tempfile::tempdir()?;
    fs::write(elsewhere.path().join("t"), "10")?;
    let tracker = tmp.path().join("latest_checkpointed_iteration.txt");
    std::os::unix::fs::symlink(elsewhere.path().join("t"), &tracker)?;
    assert!(latest_complete(tmp.path(), Layout::Megatron).is_err());
    fs::remove_file(&tracker)?;
    nix::unistd::mkfifo(&tracker, nix::sys::stat::Mode::S_IRWXU)?;
    assert!(
        latest_complete(tmp.path(), Layout::Megatron).is_err(),
        "no block, no read"
    );
    Ok(())
}

#[test]
fn megatron_release_is_a_checkpoint_without_a_step() -> TestResult {
    let tmp = dir_with(&["release/"])?;
    fs::write(tmp.path().join(MEGATRON_TRACKER), "release")?;
    assert_eq!(
        latest(&tmp, Layout::Megatron)?,
        Some(("release".into(), None))
    );
    Ok(())
}

#[test]
fn deepspeed_follows_the_latest_tag() -> TestResult {
    let tmp = dir_with(&[
        "global_step100/mp_rank_00_model_states.pt",
        "global_step200/mp_rank_00_model_states.pt",
    ])?;
    assert_eq!(latest(&tmp, Layout::Deepspeed)?, None, "no tag yet");
    fs::write(tmp.path().join("latest"), "global_step100")?;
    assert_eq!(
        latest(&tmp, Layout::Deepspeed)?,
        some("global_step100", 100)
    );
    fs::write(tmp.path().join("latest"), "global_step300\n")?;
    assert_eq!(
        latest(&tmp, Layout::Deepspeed)?,
        None,
        "tag names a missing dir"
    );
    Ok(())
}

#[test]
fn deepspeed_tag_may_not_leave_the_checkpoint_dir() -> TestResult {
    let tmp = dir_with(&["inner/global_step1/"])?;
    let inner = tmp.path().join("inner");
    fs::write(inner.join("latest"), "../inner")?;
    assert_eq!(latest_complete(&inner, Layout::Deepspeed)?, None);
    fs::write(inner.join("latest"), "..")?;
    assert_eq!(latest_complete(&inner, Layout::Deepspeed)?, None);
    Ok(())
}

#[test]
fn watcher_reports_each_change_once_and_survives_scan_errors() {
    let mut w = Watcher::new(PathBuf::from("/ckpt"), Layout::Marker);
    let ck = |step| Checkpoint {
        path: PathBuf::from(format!("/ckpt/step_{step}")),
        step: Some(step),
    };
    assert_eq!(w.observe(Ok(None)), None);
    assert_eq!(w.observe(Ok(Some(ck(1)))), Some(ck(1)));
    assert_eq!(w.observe(Ok(Some(ck(1)))), None);
    assert_eq!(w.observe(Err(io::Error::other("EIO"))), None);
    assert_eq!(w.observe(Ok(None)), None);
    assert_eq!(w.observe(Ok(Some(ck(2)))), Some(ck(2)));
}

fn candidates(tmp: &tempfile::TempDir, layout: Layout, max: usize) -> io::Result<Vec<String>> {
    Ok(complete_candidates(tmp.path(), layout, max, None)?
        .into_iter()
        .filter_map(|c| c.path.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect())
}

#[test]
fn candidates_are_the_newest_complete_ones_newest_first() -> TestResult {
    let tmp = dir_with(&[
        "step_100/COMPLETE",
        "step_200/COMPLETE",
        "step_300/",
        "step_400/COMPLETE",
        "step_500/COMPLETE",
    ])?;
    assert_eq!(
        candidates(&tmp, Layout::Marker, 3)?,
        ["step_500", "step_400", "step_200"],
        "the incomplete 300 is no candidate"
    );
    assert_eq!(candidates(&tmp, Layout::Marker, 1)?, ["step_500"]);
    assert!(candidates(&tmp, Layout::Marker, 0)?.is_empty());
    Ok(())
}

#[test]
fn with_a_tracker_only_the_tracked_checkpoint_is_a_candidate() -> TestResult {
    let tmp = dir_with(&["iter_0000100/", "iter_0000200/", "iter_0000300/"])?;
    fs::write(tmp.path().join(MEGATRON_TRACKER), "300\n")?;
    assert_eq!(candidates(&tmp, Layout::Megatron, 3)?, ["iter_0000300"]);
    let tmp = dir_with(&[
        "global_step10/mp_rank_00_model_states.pt",
        "global_step20/mp_rank_00_model_states.pt",
    ])?;
    fs::write(tmp.path().join(DEEPSPEED_TRACKER), "global_step20")?;
    assert_eq!(candidates(&tmp, Layout::Deepspeed, 3)?, ["global_step20"]);
    Ok(())
}
