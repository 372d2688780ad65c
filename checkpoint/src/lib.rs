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

mod complete;
mod deepspeed;

pub use complete::MARKER_SKEW;
use complete::{marker_holds, trainer_state_matches, walk_files};

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
    latest_complete_with(dir, layout, None)
}

/// [`latest_complete`] for a gang of `world_size` ranks, when known: a DeepSpeed save needs a
/// ZeRO shard from each (see `deepspeed`).
pub fn latest_complete_with(
    dir: &Path,
    layout: Layout,
    world_size: Option<u32>,
) -> io::Result<Option<Checkpoint>> {
    Ok(complete_candidates(dir, layout, 1, world_size)?
        .into_iter()
        .next())
}

/// Up to `max` complete checkpoints under `dir`, newest first (for a verify_command to try in
/// turn), for a gang of `world_size` ranks when known. With a tracker file (megatron, deepspeed)
/// only the one it names (for deepspeed, the newest complete tag up to it) is provably complete
/// (older ones may have been pruned mid-delete), so it is the only candidate.
pub fn complete_candidates(
    dir: &Path,
    layout: Layout,
    max: usize,
    world_size: Option<u32>,
) -> io::Result<Vec<Checkpoint>> {
    if !dir.is_dir() || max == 0 {
        return Ok(Vec::new());
    }
    match layout {
        Layout::Marker => complete_subdirs(dir, max, |d, _| marker_holds(d, "COMPLETE")),
        Layout::PytorchDcp => complete_subdirs(dir, max, |d, _| marker_holds(d, ".metadata")),
        Layout::HfTrainer => complete_subdirs(dir, max, |d, name| {
            name.starts_with("checkpoint-") && trainer_state_matches(d, name)
        }),
        Layout::Megatron => Ok(read_tracker(&dir.join(MEGATRON_TRACKER))?
            .and_then(|text| megatron_dir(&text))
            .and_then(|name| existing_subdir(dir, &name))
            .into_iter()
            .collect()),
        Layout::Deepspeed => Ok(read_tracker(&dir.join(DEEPSPEED_TRACKER))?
            .filter(|tag| is_plain_name(tag))
            .and_then(|tag| deepspeed::newest(dir, &tag, world_size))
            .into_iter()
            .collect()),
    }
}

/// The gang's world size from a `StartWorker`: its nodes times the processes per node that
/// vigil gives the launcher (`PET_NPROC_PER_NODE`); `None` when either is missing.
pub fn world_size(nnodes: u32, env: &std::collections::HashMap<String, String>) -> Option<u32> {
    let per_node: u32 = env.get("PET_NPROC_PER_NODE")?.parse().ok()?;
    nnodes.checked_mul(per_node).filter(|w| *w > 0)
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

/// The `max` newest subdirectories that `complete` accepts: candidates are tried newest first,
/// so the (possibly deep) completeness check runs on the few newest only.
fn complete_subdirs(
    dir: &Path,
    max: usize,
    complete: impl Fn(&Path, &str) -> bool,
) -> io::Result<Vec<Checkpoint>> {
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
        .filter(|(rank, path)| complete(path, &rank.name))
        .take(max)
        .map(|(rank, path)| Checkpoint {
            path,
            step: rank.step,
        })
        .collect())
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
    /// The gang's world size, when known (see [`latest_complete_with`]).
    pub world_size: Option<u32>,
    last: Option<Checkpoint>,
}

impl Watcher {
    pub fn new(dir: PathBuf, layout: Layout) -> Self {
        Self {
            dir,
            layout,
            world_size: None,
            last: None,
        }
    }

    pub fn with_world_size(self, world_size: Option<u32>) -> Self {
        Self { world_size, ..self }
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
mod tests;
