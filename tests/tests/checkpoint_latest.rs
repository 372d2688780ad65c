//! `clusterctl checkpoint latest` through the real binary, on each layout, with a partial newest
//! checkpoint beside a complete one: what a Slurm batch script resumes from (docs/slurm.md). No
//! coordinator runs: the command needs none.

use std::path::Path;

use anyhow::{Context, Result};
use vigil_tests::{CtlOutput, clusterctl};

/// `clusterctl checkpoint latest --dir DIR --layout LAYOUT [extra]`, with a coordinator URL that
/// nothing answers: the command must not dial it.
fn latest(dir: &Path, layout: &str, extra: &[&str]) -> Result<CtlOutput> {
    let dir = dir.to_str().context("temp dir is not UTF-8")?;
    let mut args = vec!["checkpoint", "latest", "--dir", dir, "--layout", layout];
    args.extend_from_slice(extra);
    clusterctl("http://127.0.0.1:1", &args)
}

/// Files of a checkpoint dir: relative path and contents.
type Files<'a> = &'a [(&'a str, &'a [u8])];

/// Files under `root`, each `path` holding `text` (parents made).
fn write(root: &Path, files: Files) -> Result<()> {
    for (path, text) in files {
        let path = root.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The path printed (one line, nothing else), checked to be `root/name`.
fn assert_prints(out: &CtlOutput, root: &Path, name: &str) {
    assert!(out.success(), "clusterctl failed: {out:?}");
    assert_eq!(
        out.stdout,
        format!("{}\n", root.join(name).display()),
        "{out:?}"
    );
}

/// A torch.save file cut short: a zip's local header without its end-of-central-directory.
const CUT_SHORT_ZIP: &[u8] = b"PK\x03\x04 half a tensor";

#[test]
fn each_layout_prints_the_newest_complete_checkpoint_past_a_partial_newest() -> Result<()> {
    let cases: [(&str, Files, &str); 5] = [
        (
            "marker",
            &[
                ("step_000100/model.pt", b"w"),
                ("step_000100/COMPLETE", b"ok"),
                ("step_000200/model.pt", b"w"),
                ("step_000200/COMPLETE", b"ok"),
                ("step_000300/model.pt", b"w"),
            ],
            "step_000200",
        ),
        (
            "pytorch-dcp",
            &[
                ("step_100/__0_0.distcp", b"w"),
                ("step_100/.metadata", b"m"),
                ("step_200/__0_0.distcp", b"w"),
            ],
            "step_100",
        ),
        (
            "megatron",
            &[
                ("iter_0000100/mp_rank_00/model_optim_rng.pt", b"w"),
                ("iter_0000200/mp_rank_00/model_optim_rng.pt", b"w"),
                ("latest_checkpointed_iteration.txt", b"100\n"),
            ],
            "iter_0000100",
        ),
        (
            "deepspeed",
            &[
                ("global_step100/mp_rank_00_model_states.pt", b"w"),
                ("global_step200/mp_rank_00_model_states.pt", CUT_SHORT_ZIP),
                ("latest", b"global_step200"),
            ],
            "global_step100",
        ),
        (
            "hf-trainer",
            &[
                ("checkpoint-100/model.safetensors", b"w"),
                (
                    "checkpoint-100/trainer_state.json",
                    b"{\"global_step\": 100}",
                ),
                ("checkpoint-200/model.safetensors", b"w"),
            ],
            "checkpoint-100",
        ),
    ];
    for (layout, files, want) in cases {
        let tmp = tempfile::tempdir()?;
        write(tmp.path(), files)?;
        let out = latest(tmp.path(), layout, &[])?;
        assert_prints(&out, tmp.path(), want);
    }
    Ok(())
}

#[test]
fn no_complete_checkpoint_exits_1_with_nothing_on_stdout() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write(tmp.path(), &[("step_000100/model.pt", b"w")])?;
    for dir in [tmp.path().to_owned(), tmp.path().join("missing")] {
        let out = latest(&dir, "marker", &[])?;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert_eq!(out.stdout, "", "{out:?}");
        assert!(out.stderr.contains("no complete checkpoint"), "{out:?}");
    }
    Ok(())
}

#[test]
fn json_output_names_path_step_and_layout() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write(tmp.path(), &[("step_000300/.metadata", b"m")])?;
    let v = latest(tmp.path(), "pytorch-dcp", &["-o", "json"])?.json()?;
    let path = tmp.path().join("step_000300");
    assert_eq!(v["path"], path.to_str().context("utf-8")?);
    assert_eq!(v["step"], 300);
    assert_eq!(v["layout"], "pytorch-dcp");
    Ok(())
}

#[test]
fn an_unknown_layout_is_refused_naming_the_layouts() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let out = latest(tmp.path(), "orbax", &[])?;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("pytorch-dcp"), "{out:?}");
    Ok(())
}

#[test]
fn deepspeed_with_a_world_size_needs_a_shard_from_each_rank() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write(
        tmp.path(),
        &[
            ("global_step100/mp_rank_00_model_states.pt", b"w"),
            (
                "global_step100/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                b"w",
            ),
            (
                "global_step100/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                b"w",
            ),
            ("global_step200/mp_rank_00_model_states.pt", b"w"),
            (
                "global_step200/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                b"w",
            ),
            ("latest", b"global_step200"),
        ],
    )?;
    assert_prints(
        &latest(tmp.path(), "deepspeed", &[])?,
        tmp.path(),
        "global_step200",
    );
    let two = latest(tmp.path(), "deepspeed", &["--world-size", "2"])?;
    assert_prints(&two, tmp.path(), "global_step100");
    Ok(())
}
