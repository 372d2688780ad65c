//! DeepSpeed checkpoints: `latest` names the tag (`global_step480/`), but rank 0 writes it before
//! DeepSpeed's closing barrier, so other ranks' ZeRO shards (`zero_pp_rank_{dp}_mp_rank_{mp}_
//! optim_states.pt`) may still be in flight, and a crash then leaves a tag that `latest` names
//! with shards missing or cut short. So a tag counts as complete only when its files say so:
//! - at least one `*model_states.pt`;
//! - its ZeRO shards, if it has any: for every model-parallel rank the data-parallel ranks
//!   `0..n` with no gap and the same `n` for every model-parallel rank, and, when the gang's
//!   world size is known (nodes x GPUs per node), at least one shard per rank (ZeRO stages 1-3
//!   save one per rank);
//! - no `.pt` file cut short: `torch.save` writes a zip archive (PyTorch 1.6 on), which ends
//!   with its end-of-central-directory record; a file that starts as a zip and lacks it is a
//!   write in progress or a write a crash cut short. (Legacy pickle files are not checked.)
//!
//! When the tag `latest` names is not complete, the newest complete tag with a lower step is
//! the checkpoint (tags with a higher step are saves in progress).

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use super::{Checkpoint, complete::walk_files, last_integer};

const ZIP_LOCAL_HEADER: &[u8; 4] = b"PK\x03\x04";
const ZIP_END_OF_DIRECTORY: &[u8; 4] = b"PK\x05\x06";
/// The end-of-central-directory record is 22 bytes plus a comment of at most 65,535.
const ZIP_TAIL: u64 = 22 + 65_535;

/// The newest complete DeepSpeed checkpoint in `dir`, whose `latest` names `tag`.
pub(super) fn newest(dir: &Path, tag: &str, world_size: Option<u32>) -> Option<Checkpoint> {
    let named = dir.join(tag);
    if !named.is_dir() {
        return None;
    }
    match complete(&named, world_size) {
        Ok(()) => {
            return Some(Checkpoint {
                path: named,
                step: last_integer(tag),
            });
        }
        Err(why) => super::complete::warn_once(
            &named,
            "deepspeed shards",
            format!(
                "DeepSpeed checkpoint {} (named by `latest`) is not complete: {why}; the newest \
                 complete tag before it counts",
                named.display()
            ),
        ),
    }
    let limit = last_integer(tag)?;
    let mut older: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| {
            let step = last_integer(e.file_name().to_str()?)?;
            (step < limit).then(|| (step, e.path()))
        })
        .collect();
    older.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    older
        .into_iter()
        .find(|(_, path)| complete(path, world_size).is_ok())
        .map(|(step, path)| Checkpoint {
            path,
            step: Some(step),
        })
}

/// Whether the tag directory `dir` holds a whole save; the error says what is missing.
pub(super) fn complete(dir: &Path, world_size: Option<u32>) -> Result<(), String> {
    let mut model_states = 0usize;
    // model-parallel rank -> data-parallel ranks seen
    let mut shards: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut cut_short = None;
    walk_files(dir, |_, entry, meta| {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return true;
        };
        if name.ends_with("model_states.pt") {
            model_states += 1;
        }
        if let Some((dp, mp)) = zero_shard(name) {
            shards.entry(mp).or_default().push(dp);
        }
        if name.ends_with(".pt") && meta.is_file() && zip_cut_short(&entry.path()) {
            cut_short = Some(name.to_owned());
            return false;
        }
        true
    });
    if let Some(name) = cut_short {
        return Err(format!(
            "{name} is cut short (a zip archive with no end record: still being written, or its \
             writer died)"
        ));
    }
    if model_states == 0 {
        return Err("it has no *model_states.pt".into());
    }
    let mut per_mp = None;
    let mut total = 0usize;
    for (mp, dps) in &mut shards {
        dps.sort_unstable();
        dps.dedup();
        let n = dps.len();
        if dps.iter().enumerate().any(|(i, dp)| *dp as usize != i) {
            return Err(format!(
                "model-parallel rank {mp} has ZeRO shards of data-parallel ranks {dps:?}: some \
                 are missing"
            ));
        }
        if per_mp.is_some_and(|m| m != n) {
            return Err(format!(
                "model-parallel ranks hold different numbers of ZeRO shards ({n} for rank {mp})"
            ));
        }
        per_mp = Some(n);
        total += n;
    }
    if let Some(world) = world_size.filter(|w| total > 0 && total < *w as usize) {
        return Err(format!(
            "it has {total} ZeRO shards for a world of {world} ranks"
        ));
    }
    Ok(())
}

/// `(dp, mp)` of a ZeRO shard name: `[bf16_]zero_pp_rank_{dp}_mp_rank_{mp}_optim_states.pt`.
fn zero_shard(name: &str) -> Option<(u32, u32)> {
    let rest = &name[name.find("zero_pp_rank_")? + "zero_pp_rank_".len()..];
    let (dp, rest) = rest.split_once("_mp_rank_")?;
    let (mp, tail) = rest.split_once('_')?;
    if !tail.ends_with("optim_states.pt") {
        return None;
    }
    Some((dp.parse().ok()?, mp.parse().ok()?))
}

/// A file that starts as a zip archive but does not end with its end-of-central-directory
/// record. Unreadable files are not judged here (the scan does not read what it cannot).
fn zip_cut_short(path: &Path) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = [0u8; 4];
    if file.read_exact(&mut head).is_err() || &head != ZIP_LOCAL_HEADER {
        return false;
    }
    let Ok(len) = file.metadata().map(|m| m.len()) else {
        return false;
    };
    let from = len.saturating_sub(ZIP_TAIL);
    if file.seek(SeekFrom::Start(from)).is_err() {
        return false;
    }
    let mut tail = Vec::new();
    if file.take(ZIP_TAIL).read_to_end(&mut tail).is_err() {
        return false;
    }
    !tail.windows(4).any(|w| w == ZIP_END_OF_DIRECTORY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        std::fs::create_dir_all(dir).expect("mkdir");
        std::fs::write(dir.join(name), bytes).expect("write");
    }

    /// A minimal complete zip: an empty archive is just its end record.
    fn zip() -> Vec<u8> {
        let mut z = b"PK\x03\x04 local header and data".to_vec();
        z.extend_from_slice(b"PK\x01\x02 central directory");
        z.extend_from_slice(b"PK\x05\x06");
        z.extend_from_slice(&[0u8; 18]);
        z
    }

    fn save(root: &Path, step: u64, dp: u32, mp: u32) -> std::path::PathBuf {
        let dir = root.join(format!("global_step{step}"));
        for m in 0..mp {
            write(&dir, &format!("mp_rank_{m:02}_model_states.pt"), &zip());
            for d in 0..dp {
                write(
                    &dir,
                    &format!("bf16_zero_pp_rank_{d}_mp_rank_{m:02}_optim_states.pt"),
                    &zip(),
                );
            }
        }
        dir
    }

    #[test]
    fn a_whole_save_is_complete_and_shard_names_parse() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = save(tmp.path(), 10, 4, 2);
        assert_eq!(complete(&dir, Some(8)), Ok(()));
        assert_eq!(complete(&dir, None), Ok(()));
        assert_eq!(
            zero_shard("zero_pp_rank_3_mp_rank_01_optim_states.pt"),
            Some((3, 1))
        );
        assert_eq!(zero_shard("mp_rank_00_model_states.pt"), None);
    }

    #[test]
    fn missing_or_cut_short_shards_make_a_save_incomplete() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = save(tmp.path(), 10, 4, 1);
        assert!(
            complete(&dir, Some(8)).is_err_and(|e| e.contains("4 ZeRO shards for a world of 8"))
        );
        std::fs::remove_file(dir.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"))
            .expect("rm");
        assert!(complete(&dir, None).is_err_and(|e| e.contains("some are missing")));

        let dir = save(tmp.path(), 20, 2, 1);
        let mut cut = zip();
        cut.truncate(cut.len() - 20);
        write(&dir, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", &cut);
        assert!(complete(&dir, Some(2)).is_err_and(|e| e.contains("cut short")));
        // A legacy (pickle) file is not judged by its end.
        write(
            &dir,
            "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
            b"\x80\x02legacy",
        );
        assert_eq!(complete(&dir, Some(2)), Ok(()));

        let empty = tmp.path().join("global_step30");
        write(&empty, "notes.txt", b"x");
        assert!(complete(&empty, None).is_err_and(|e| e.contains("no *model_states.pt")));
    }

    #[test]
    fn an_incomplete_tag_named_by_latest_falls_back_to_the_newest_complete_one_before_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        save(tmp.path(), 10, 2, 1);
        save(tmp.path(), 20, 2, 1);
        let bad = save(tmp.path(), 30, 2, 1);
        save(tmp.path(), 40, 1, 1); // a save in progress past `latest`
        std::fs::remove_file(bad.join("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"))
            .expect("rm");
        let found = newest(tmp.path(), "global_step30", Some(2));
        assert_eq!(found.and_then(|c| c.step), Some(20));
        let found = newest(tmp.path(), "global_step20", Some(2));
        assert_eq!(found.and_then(|c| c.step), Some(20));
        assert_eq!(newest(tmp.path(), "global_step99", Some(2)), None);
    }
}
