//! When a checkpoint directory counts as complete beyond "its marker exists": the rules for
//! marker files (non-empty, nothing newer) and for HF Trainer's `trainer_state.json`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::{MAX_SAVE_FILES, last_integer};

/// How much newer than its checkpoint's marker a data file may be and still count as written
/// before it: ranks on other hosts stamp their files with their own clocks (Lustre takes the
/// client's), and those differ by milliseconds, not seconds.
pub const MARKER_SKEW: std::time::Duration = std::time::Duration::from_secs(2);

/// A checkpoint directory completed by the marker file `marker`: the marker is a non-empty
/// regular file (an empty one may be a write the crash cut short), and no file in the
/// directory is newer than it (beyond [`MARKER_SKEW`]): a directory reused by a later save (a
/// rollback rewriting `step_50`) keeps its old marker while the new data goes in, and is not
/// complete again until the save writes its marker anew.
pub(super) fn marker_holds(dir: &Path, marker: &str) -> bool {
    let Ok(meta) = std::fs::symlink_metadata(dir.join(marker)) else {
        return false;
    };
    if !meta.is_file() {
        return false;
    }
    if meta.len() == 0 {
        warn_once(
            dir,
            "empty marker",
            format!(
                "checkpoint {} has an empty {marker}: not counted as complete (an empty marker may \
                 be a write cut short); write something into it, such as the step number",
                dir.display()
            ),
        );
        return false;
    }
    let Ok(marked) = meta.modified() else {
        return false;
    };
    match newer_file(dir, marker, marked + MARKER_SKEW) {
        None => true,
        Some(file) => {
            warn_once(
                dir,
                "newer file",
                format!(
                    "checkpoint {} is not complete: {} is newer than its {marker} (the directory is \
                     being written again); the previous complete checkpoint counts",
                    dir.display(),
                    file.display()
                ),
            );
            false
        }
    }
}

/// A regular file under `dir` (other than the marker at its top) modified after `limit`.
fn newer_file(dir: &Path, marker: &str, limit: SystemTime) -> Option<PathBuf> {
    let mut found = None;
    walk_files(dir, |parent, entry, meta| {
        let newer = meta.is_file()
            && !(parent == dir && entry.file_name() == marker)
            && meta.modified().is_ok_and(|t| t > limit);
        if newer {
            found = Some(entry.path());
        }
        !newer
    });
    found
}

/// Calls `visit(parent, entry, metadata)` for every entry below `dir` that is not a directory,
/// at most [`MAX_SAVE_FILES`] of them, until it returns false. Symlinks are not followed (the
/// job owns the directory): a link is visited as itself.
pub(super) fn walk_files(
    dir: &Path,
    mut visit: impl FnMut(&Path, &std::fs::DirEntry, &std::fs::Metadata) -> bool,
) {
    let mut visited = 0usize;
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
                continue;
            }
            if visited >= MAX_SAVE_FILES || !visit(&d, &entry, &meta) {
                return;
            }
            visited += 1;
        }
    }
}

/// Most bytes of a `trainer_state.json` read (it grows with the log history).
const MAX_TRAINER_STATE_BYTES: u64 = 64 << 20;

/// An HF Trainer checkpoint `checkpoint-N/` is complete when its `trainer_state.json` (written
/// after the model, optimizer and scheduler) parses and its `global_step` is N.
pub(super) fn trainer_state_matches(dir: &Path, name: &str) -> bool {
    let path = dir.join("trainer_state.json");
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return false;
    };
    if !meta.is_file() || meta.len() > MAX_TRAINER_STATE_BYTES {
        return false;
    }
    let Ok(text) = std::fs::read(&path) else {
        return false;
    };
    let step = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("global_step").and_then(serde_json::Value::as_u64));
    if step.is_some() && step == last_integer(name) {
        return true;
    }
    warn_once(
        dir,
        "trainer state",
        format!(
            "checkpoint {} is not complete: its trainer_state.json {}",
            dir.display(),
            match step {
                None => "does not parse or has no global_step".to_owned(),
                Some(s) => format!("says global_step {s}, not the directory's number"),
            }
        ),
    );
    false
}

/// Logs `message` about checkpoint `dir` once per process and `what` (scans repeat every second).
pub(super) fn warn_once(dir: &Path, what: &'static str, message: String) {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock, PoisonError};
    static WARNED: OnceLock<Mutex<HashSet<(PathBuf, &'static str)>>> = OnceLock::new();
    let warned = WARNED.get_or_init(|| Mutex::new(HashSet::new()));
    let mut warned = warned.lock().unwrap_or_else(PoisonError::into_inner);
    if warned.len() > 10_000 {
        warned.clear();
    }
    if warned.insert((dir.to_owned(), what)) {
        tracing::warn!("{message}");
    }
}
