//! Which checkpoint in a job's checkpoint dir is the newest *complete* one, per layout.
//!
//! The scan is a plain function of the directory's contents ([`latest_complete`]),
//! so every layout rule is unit-tested on temp dirs; [`Watcher`] only remembers
//! what was last reported, so the agent of node rank 0 reports each change once.
//! Rules (DESIGN.md, "Checkpoint completeness"): a checkpoint that is not complete
//! is never chosen, the previous complete one is; candidates are ordered by the
//! last integer in their name, by modification time where a name has none.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

/// How a trainer marks a checkpoint as complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A subdirectory holding a `COMPLETE` file.
    Marker,
    /// A subdirectory holding `.metadata` (written last by torch.distributed.checkpoint).
    PytorchDcp,
    /// `latest_checkpointed_iteration.txt` names the iteration N of subdirectory `iter_{N:07}`.
    Megatron,
    /// The `latest` file names the tag, a subdirectory.
    Deepspeed,
    /// `checkpoint-N/` holding `trainer_state.json`.
    HfTrainer,
}

pub const LAYOUT_NAMES: &str = "marker, pytorch-dcp, megatron, deepspeed or hf-trainer";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown checkpoint layout {0:?}; use {LAYOUT_NAMES}")]
pub struct UnknownLayout(pub String);

impl FromStr for Layout {
    type Err = UnknownLayout;

    /// An empty name is `marker`, the layout vigil's own fixtures use.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "marker" => Ok(Self::Marker),
            "pytorch-dcp" => Ok(Self::PytorchDcp),
            "megatron" => Ok(Self::Megatron),
            "deepspeed" => Ok(Self::Deepspeed),
            "hf-trainer" => Ok(Self::HfTrainer),
            other => Err(UnknownLayout(other.to_owned())),
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Marker => "marker",
            Self::PytorchDcp => "pytorch-dcp",
            Self::Megatron => "megatron",
            Self::Deepspeed => "deepspeed",
            Self::HfTrainer => "hf-trainer",
        })
    }
}

/// A complete checkpoint: where it is and, when its name has one, its step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub step: Option<u64>,
}

const MEGATRON_TRACKER: &str = "latest_checkpointed_iteration.txt";
const DEEPSPEED_TRACKER: &str = "latest";

/// The newest complete checkpoint under `dir`; a missing dir holds none.
pub fn latest_complete(dir: &Path, layout: Layout) -> io::Result<Option<Checkpoint>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    match layout {
        Layout::Marker => newest_subdir(dir, |d, _| marker_holds(d, "COMPLETE")),
        Layout::PytorchDcp => newest_subdir(dir, |d, _| marker_holds(d, ".metadata")),
        Layout::HfTrainer => newest_subdir(dir, |d, name| {
            name.starts_with("checkpoint-") && trainer_state_matches(d, name)
        }),
        Layout::Megatron => Ok(read_tracker(&dir.join(MEGATRON_TRACKER))?
            .and_then(|text| megatron_dir(&text))
            .and_then(|name| existing_subdir(dir, &name))),
        Layout::Deepspeed => Ok(read_tracker(&dir.join(DEEPSPEED_TRACKER))?
            .filter(|tag| is_plain_name(tag))
            .and_then(|tag| existing_subdir(dir, &tag))),
    }
}

/// The last run of ASCII digits in `name`: `step_000200`, `checkpoint-200`,
/// `global_step200`, `iter_0000200` are all step 200.
pub fn last_integer(name: &str) -> Option<u64> {
    let end = name.rfind(|c: char| c.is_ascii_digit())? + 1;
    let start = name[..end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    name[start..end].parse().ok()
}

/// Orders candidates: numbered names by number, above unnumbered ones (ordered by
/// modification time), so a stray `tmp/` never outranks `step_000200/`; the name
/// breaks remaining ties so the choice never depends on directory order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    step: Option<u64>,
    modified: Option<SystemTime>,
    name: String,
}

/// The newest subdirectory that `complete` accepts: candidates are tried newest first, so the
/// (possibly deep) completeness check runs on the few newest only.
fn newest_subdir(
    dir: &Path,
    complete: impl Fn(&Path, &str) -> bool,
) -> io::Result<Option<Checkpoint>> {
    let mut candidates: Vec<(Rank, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !path.is_dir() {
            continue;
        }
        let rank = Rank {
            step: last_integer(&name),
            modified: entry.metadata().and_then(|m| m.modified()).ok(),
            name,
        };
        candidates.push((rank, path));
    }
    candidates.sort_by(|a, b| b.0.cmp(&a.0));
    Ok(candidates
        .into_iter()
        .find(|(rank, path)| complete(path, &rank.name))
        .map(|(rank, path)| Checkpoint {
            path,
            step: rank.step,
        }))
}

/// How much newer than its checkpoint's marker a data file may be and still count as written
/// before it: ranks on other hosts stamp their files with their own clocks (Lustre takes the
/// client's), and those differ by milliseconds, not seconds.
pub const MARKER_SKEW: std::time::Duration = std::time::Duration::from_secs(2);

/// A checkpoint directory completed by the marker file `marker`: the marker is a non-empty
/// regular file (an empty one may be a write the crash cut short), and no file in the
/// directory is newer than it (beyond [`MARKER_SKEW`]): a directory reused by a later save (a
/// rollback rewriting `step_50`) keeps its old marker while the new data goes in, and is not
/// complete again until the save writes its marker anew.
fn marker_holds(dir: &Path, marker: &str) -> bool {
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
fn walk_files(
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
fn trainer_state_matches(dir: &Path, name: &str) -> bool {
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
fn warn_once(dir: &Path, what: &'static str, message: String) {
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

/// Most bytes of a tracker file read (it holds one iteration number or tag).
const MAX_TRACKER_BYTES: u64 = 4096;

/// A tracker file's trimmed text; a missing or empty one names nothing yet. The job owns the
/// checkpoint dir and the agent may be root: never follow a symlink, never block on a FIFO,
/// read only a regular file and at most [`MAX_TRACKER_BYTES`].
fn read_tracker(path: &Path) -> io::Result<Option<String>> {
    let read = || -> io::Result<String> {
        use io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits())
            .open(path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        let mut text = String::new();
        file.take(MAX_TRACKER_BYTES).read_to_string(&mut text)?;
        Ok(text)
    };
    match read() {
        Ok(text) => Ok(Some(text.trim().to_owned()).filter(|t| !t.is_empty())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Megatron's tracker holds an iteration number, or `release` for a converted model.
fn megatron_dir(text: &str) -> Option<String> {
    if text == "release" {
        return Some("release".to_owned());
    }
    text.parse::<u64>().ok().map(|n| format!("iter_{n:07}"))
}

/// The tracker may only name a child of the checkpoint dir.
fn is_plain_name(name: &str) -> bool {
    !name.contains('/') && name != "." && name != ".."
}

fn existing_subdir(dir: &Path, name: &str) -> Option<Checkpoint> {
    let path = dir.join(name);
    path.is_dir().then(|| Checkpoint {
        path,
        step: last_integer(name),
    })
}

/// Files looked at to time one save, at most: a sharded checkpoint of a
/// large model has thousands; their times are spread over the save.
const MAX_SAVE_FILES: usize = 20_000;

/// How long the save of `c` took: from the oldest to the newest modification
/// time among its files (and, for layouts with a tracker file in `dir`, the
/// tracker's). `None` when it holds no readable file.
pub fn save_duration_ms(dir: &Path, c: &Checkpoint, layout: Layout) -> Option<u64> {
    save_timing(dir, c, layout).map(|(save_ms, _)| save_ms)
}

/// The save's duration (ms) and when it completed (the newest modification
/// time, unix ms); see [`save_duration_ms`].
pub fn save_timing(dir: &Path, c: &Checkpoint, layout: Layout) -> Option<(u64, u64)> {
    let mut times: Vec<SystemTime> = Vec::new();
    walk_files(&c.path, |_, _, meta| {
        times.extend(meta.modified().ok());
        true
    });
    let tracker = match layout {
        Layout::Megatron => Some(MEGATRON_TRACKER),
        Layout::Deepspeed => Some(DEEPSPEED_TRACKER),
        _ => None,
    };
    if let Some(t) = tracker.and_then(|name| std::fs::metadata(dir.join(name)).ok()) {
        times.extend(t.modified().ok());
    }
    let first = times.iter().min()?;
    let last = times.iter().max()?;
    let d = last.duration_since(*first).unwrap_or_default();
    let done = last
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    Some((ms(d), ms(done)))
}

/// Remembers the last checkpoint reported, so each change is reported once.
#[derive(Debug)]
pub struct Watcher {
    pub dir: PathBuf,
    pub layout: Layout,
    last: Option<Checkpoint>,
}

impl Watcher {
    pub fn new(dir: PathBuf, layout: Layout) -> Self {
        Self {
            dir,
            layout,
            last: None,
        }
    }

    /// The scan's result if it is news; an unreadable dir keeps the last answer.
    pub fn observe(&mut self, scan: io::Result<Option<Checkpoint>>) -> Option<Checkpoint> {
        let found = scan.ok()??;
        if self.last.as_ref() == Some(&found) {
            return None;
        }
        self.last = Some(found.clone());
        Some(found)
    }
}

#[cfg(test)]
mod tests {
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

    fn latest(
        tmp: &tempfile::TempDir,
        layout: Layout,
    ) -> io::Result<Option<(String, Option<u64>)>> {
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
        let tmp = dir_with(&["global_step100/", "global_step200/"])?;
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
}
