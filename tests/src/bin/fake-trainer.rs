//! `fake-trainer`: a stand-in for a training script, for end-to-end tests and the demo.
//!
//! It reads the environment vigil gives every worker, "trains" one step every `FAKE_STEP_MS`,
//! writes its step to `VIGIL_PROGRESS_FILE`, and (node rank 0) writes checkpoints in any of
//! vigil's layouts, completion marker last. It resumes only from a complete checkpoint, and
//! crashes, hangs or leaves a partial checkpoint on request. docs/jobs.md lists its variables.
//!
//! Exit codes: 0 done (`FAKE_TOTAL_STEPS`), 1 injected crash, 2 bad environment, 3 refused
//! to resume (incomplete or unreadable checkpoint), 4 I/O error. SIGTERM kills it at once.

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// What every worker gets from vigil; all must be present.
const REQUIRED: [&str; 9] = [
    "VIGIL_JOB_ID",
    "VIGIL_ATTEMPT",
    "VIGIL_NODE_RANK",
    "VIGIL_NNODES",
    "VIGIL_PROGRESS_FILE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "CUDA_VISIBLE_DEVICES",
];

const MEGATRON_TRACKER: &str = "latest_checkpointed_iteration.txt";
const DEEPSPEED_TRACKER: &str = "latest";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Marker,
    PytorchDcp,
    Megatron,
    Deepspeed,
    HfTrainer,
}

impl Layout {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "marker" => Self::Marker,
            "pytorch-dcp" => Self::PytorchDcp,
            "megatron" => Self::Megatron,
            "deepspeed" => Self::Deepspeed,
            "hf-trainer" => Self::HfTrainer,
            _ => return None,
        })
    }

    /// The checkpoint's directory name for `step`.
    fn dir_name(self, step: u64) -> String {
        match self {
            Self::Marker | Self::PytorchDcp => format!("step_{step:08}"),
            Self::Megatron => format!("iter_{step:07}"),
            Self::Deepspeed => format!("global_step{step}"),
            Self::HfTrainer => format!("checkpoint-{step}"),
        }
    }

    /// Writes checkpoint `step` under `root`: the data first (its last line names the
    /// `attempt` that wrote it, so tests can prove fencing), then (when `complete`) what
    /// marks it complete. Every file goes through a temp file and a rename.
    fn write(self, root: &Path, step: u64, attempt: u64, complete: bool) -> io::Result<PathBuf> {
        self.write_taking(root, step, attempt, complete, Duration::ZERO)
    }

    /// [`Layout::write`], taking `save` between the data and the marker (a slow save).
    fn write_taking(
        self,
        root: &Path,
        step: u64,
        attempt: u64,
        complete: bool,
        save: Duration,
    ) -> io::Result<PathBuf> {
        let dir = root.join(self.dir_name(step));
        fs::create_dir_all(&dir)?;
        let data = format!("fake weights at step {step}\n").repeat(64)
            + &format!("written by attempt {attempt}\n");
        let (data_file, marker): (&str, Option<(PathBuf, String)>) = match self {
            Self::Marker => (
                "model.bin",
                Some((dir.join("COMPLETE"), format!("{step}\n"))),
            ),
            Self::PytorchDcp => (
                "__0_0.distcp",
                Some((dir.join(".metadata"), format!("{step}\n"))),
            ),
            Self::Megatron => (
                "model_optim_rng.pt",
                Some((root.join(MEGATRON_TRACKER), step.to_string())),
            ),
            Self::Deepspeed => (
                "mp_rank_00_model_states.pt",
                Some((root.join(DEEPSPEED_TRACKER), self.dir_name(step))),
            ),
            Self::HfTrainer => (
                "model.safetensors",
                Some((
                    dir.join("trainer_state.json"),
                    format!("{{\"global_step\": {step}}}\n"),
                )),
            ),
        };
        write_atomic(&dir.join(data_file), data.as_bytes())?;
        std::thread::sleep(save);
        if let (true, Some((path, text))) = (complete, marker) {
            write_atomic(&path, text.as_bytes())?;
        }
        Ok(dir)
    }

    /// The step of the checkpoint at `path` if it is complete for this layout, else why not.
    /// For megatron and deepspeed, `path` may also be the checkpoint root (its tracker names it).
    fn complete_step(self, path: &Path) -> Result<u64, String> {
        let tracker = match self {
            Self::Megatron => Some(MEGATRON_TRACKER),
            Self::Deepspeed => Some(DEEPSPEED_TRACKER),
            _ => None,
        };
        if let Some(t) = tracker.filter(|t| path.join(t).is_file()) {
            let named = read_trimmed(&path.join(t))?;
            if named.is_empty() || named.contains('/') || named.starts_with('.') {
                return Err(format!("{t} names {named:?}, not a checkpoint directory"));
            }
            let name = match self {
                Self::Megatron => self.dir_name(last_integer(&named).ok_or("empty tracker")?),
                _ => named,
            };
            return self.complete_step(&path.join(name));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let step = step_of_path(path).ok_or_else(|| format!("no step number in {name:?}"))?;
        if !path.is_dir() {
            return Err("not a directory".to_string());
        }
        let has = |file: &str| {
            if path.join(file).is_file() {
                Ok(step)
            } else {
                Err(format!("{file} is missing"))
            }
        };
        let root = path.parent().unwrap_or(Path::new("/"));
        match self {
            Self::Marker => has("COMPLETE"),
            Self::PytorchDcp => has(".metadata"),
            Self::HfTrainer => has("trainer_state.json"),
            Self::Megatron | Self::Deepspeed => {
                let t = tracker.unwrap_or_default();
                let named = read_trimmed(&root.join(t))?;
                // The tracker moves on after each save, so it names this one or a later one.
                match last_integer(&named) {
                    Some(n) if n >= step || named == name => Ok(step),
                    _ => Err(format!("{t} names {named:?}, not {name:?} or later")),
                }
            }
        }
    }
}

fn read_trimmed(path: &Path) -> Result<String, String> {
    fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The last run of ASCII digits in `name`: `step_00000200`, `iter_0000200`, `global_step200`
/// and `checkpoint-200` are all step 200.
fn last_integer(name: &str) -> Option<u64> {
    let end = name.rfind(|c: char| c.is_ascii_digit())? + 1;
    let start = name[..end]
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |i| i + 1);
    name[start..end].parse().ok()
}

/// The step a resume path names (its last path component's last integer).
fn step_of_path(path: &Path) -> Option<u64> {
    last_integer(path.file_name()?.to_str()?)
}

/// Writes `bytes` to `path` through `.NAME.tmp` in the same directory and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Fault injection for one kind (crash, hang, partial): at which step, in which attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fault {
    step: Option<u64>,
    /// `None`: every attempt (`FAKE_*_ATTEMPT=any`).
    attempt: Option<u64>,
}

impl Fault {
    fn fires(self, step: u64, attempt: u64) -> bool {
        self.step == Some(step) && self.attempt.is_none_or(|a| a == attempt)
    }

    /// From its step on (in its attempt).
    fn since(self, step: u64, attempt: u64) -> bool {
        self.step.is_some_and(|s| step >= s) && self.attempt.is_none_or(|a| a == attempt)
    }
}

#[derive(Debug)]
struct Config {
    attempt: u64,
    rank: u64,
    progress_file: PathBuf,
    resume_from: Option<PathBuf>,
    step_ms: u64,
    total_steps: u64,
    ckpt_every: u64,
    ckpt_save_ms: u64,
    /// (rank, milliseconds per step): one rank runs slower (a straggler).
    slow: Option<(u64, u64)>,
    /// Write `step=N loss=X` instead of the bare step.
    loss: bool,
    /// The loss jumps to `loss_spike_value` from this step on.
    loss_spike: Fault,
    loss_spike_value: String,
    ckpt_dir: Option<PathBuf>,
    layout: Layout,
    crash: Fault,
    hang: Fault,
    partial: Fault,
    control_file: Option<PathBuf>,
}

fn var(name: &str) -> Option<String> {
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn number(name: &str, default: u64) -> Result<u64, String> {
    match var(name) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a whole number")),
    }
}

fn fault(kind: &str) -> Result<Fault, String> {
    let step = match var(&format!("FAKE_{kind}_AT_STEP")) {
        None => None,
        Some(_) => Some(number(&format!("FAKE_{kind}_AT_STEP"), 0)?),
    };
    let name = format!("FAKE_{kind}_ATTEMPT");
    let attempt = match var(&name).as_deref() {
        Some("any") => None,
        _ => Some(number(&name, 1)?),
    };
    Ok(Fault { step, attempt })
}

impl Config {
    fn from_env() -> Result<Self, String> {
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|v| env::var_os(v).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "missing environment: {} (vigil sets these for every worker)",
                missing.join(", ")
            ));
        }
        let rank = number("VIGIL_NODE_RANK", 0)?;
        if number("NODE_RANK", rank)? != rank {
            return Err("NODE_RANK and VIGIL_NODE_RANK disagree".to_string());
        }
        let layout_name = var("FAKE_CKPT_LAYOUT").unwrap_or_else(|| "marker".to_string());
        let layout = Layout::parse(&layout_name).ok_or_else(|| {
            format!("FAKE_CKPT_LAYOUT={layout_name:?}: use marker, pytorch-dcp, megatron, deepspeed or hf-trainer")
        })?;
        let attempt = number("VIGIL_ATTEMPT", 1)?;
        let expand = |p: String| {
            PathBuf::from(
                p.replace("{rank}", &rank.to_string())
                    .replace("{attempt}", &attempt.to_string()),
            )
        };
        Ok(Self {
            attempt,
            rank,
            progress_file: var("VIGIL_PROGRESS_FILE")
                .map(PathBuf::from)
                .ok_or("VIGIL_PROGRESS_FILE is empty")?,
            resume_from: var("VIGIL_RESUME_FROM").map(PathBuf::from),
            step_ms: number("FAKE_STEP_MS", 20)?,
            total_steps: number("FAKE_TOTAL_STEPS", 0)?,
            ckpt_every: number("FAKE_CKPT_EVERY", 50)?,
            ckpt_save_ms: number("FAKE_CKPT_SAVE_MS", 0)?,
            loss: var("FAKE_LOSS").is_some_and(|v| v == "1"),
            loss_spike: fault("LOSS_SPIKE")?,
            loss_spike_value: var("FAKE_LOSS_SPIKE_VALUE").unwrap_or_else(|| "40.0".to_string()),
            slow: match var("FAKE_SLOW_RANK") {
                Some(_) => Some((
                    number("FAKE_SLOW_RANK", 0)?,
                    number("FAKE_SLOW_STEP_MS", 100)?,
                )),
                None => None,
            },
            ckpt_dir: var("FAKE_CKPT_DIR").map(PathBuf::from),
            layout,
            crash: fault("CRASH")?,
            hang: fault("HANG")?,
            partial: fault("PARTIAL")?,
            control_file: var("FAKE_CONTROL_FILE").map(expand),
        })
    }
}

fn hang(step: u64, why: &str) -> ! {
    eprintln!("fake-trainer: hanging at step {step} ({why}); no more progress");
    loop {
        std::thread::sleep(Duration::from_secs(3_600));
    }
}

fn crash(step: u64, why: &str) -> ExitCode {
    eprintln!("fake-trainer: crashing at step {step} ({why})");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let cfg = match Config::from_env() {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("fake-trainer: {e}");
            return ExitCode::from(2);
        }
    };
    // One line of what vigil gave this worker, then `fresh start` or `resumed from step N`.
    let shown: Vec<String> = [&REQUIRED[..4], &REQUIRED[5..]]
        .concat()
        .iter()
        .map(|name| format!("{name}={}", env::var(name).unwrap_or_default()))
        .collect();
    println!("fake-trainer: {}", shown.join(" "));
    let first = match &cfg.resume_from {
        None => {
            println!("fresh start");
            1
        }
        Some(path) => match cfg.layout.complete_step(path) {
            Ok(step) => {
                println!("resumed from step {step}");
                step + 1
            }
            Err(why) => {
                eprintln!(
                    "fake-trainer: refusing to resume from incomplete checkpoint {}: {why}",
                    path.display()
                );
                return ExitCode::from(3);
            }
        },
    };
    match train(&cfg, first) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fake-trainer: {e}");
            ExitCode::from(4)
        }
    }
}

/// Steps from `first` until `FAKE_TOTAL_STEPS` (forever when 0) or a fault.
fn train(cfg: &Config, first: u64) -> io::Result<ExitCode> {
    let checkpoints = cfg
        .ckpt_dir
        .as_deref()
        .filter(|_| cfg.rank == 0 && cfg.ckpt_every > 0);
    let step_ms = match cfg.slow {
        Some((rank, ms)) if rank == cfg.rank => ms,
        _ => cfg.step_ms,
    };
    for step in first.. {
        std::thread::sleep(Duration::from_millis(step_ms));
        if let Some(control) = &cfg.control_file {
            match fs::read_to_string(control).unwrap_or_default().trim() {
                "crash" => return Ok(crash(step, "control file")),
                "hang" => hang(step, "control file"),
                _ => {}
            }
        }
        if cfg.crash.fires(step, cfg.attempt) {
            return Ok(crash(step, "FAKE_CRASH_AT_STEP"));
        }
        if cfg.hang.fires(step, cfg.attempt) {
            hang(step, "FAKE_HANG_AT_STEP");
        }
        // Only node rank 0 writes checkpoints, so only it leaves a partial one and crashes.
        if let (true, Some(root)) = (cfg.partial.fires(step, cfg.attempt), checkpoints) {
            let dir = cfg.layout.write(root, step, cfg.attempt, false)?;
            println!("wrote partial checkpoint {}", dir.display());
            return Ok(crash(step, "FAKE_PARTIAL_AT_STEP"));
        }
        let line = if !cfg.loss {
            format!("{step}\n")
        } else if cfg.loss_spike.since(step, cfg.attempt) {
            format!("step={step} loss={}\n", cfg.loss_spike_value)
        } else {
            format!("step={step} loss={:.4}\n", 2.0 + 1.0 / step as f64)
        };
        write_atomic(&cfg.progress_file, line.as_bytes())?;
        let save = Duration::from_millis(cfg.ckpt_save_ms);
        if let Some(root) = checkpoints.filter(|_| step % cfg.ckpt_every == 0) {
            let dir = cfg
                .layout
                .write_taking(root, step, cfg.attempt, true, save)?;
            println!("checkpoint {} (step {step})", dir.display());
        } else if cfg.ckpt_every > 0 && step % cfg.ckpt_every == 0 {
            // Every rank takes part in a save (sharded state): ranks stay in step.
            std::thread::sleep(save);
        }
        if cfg.total_steps > 0 && step >= cfg.total_steps {
            println!("done at step {step}");
            break;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Layout; 5] = [
        Layout::Marker,
        Layout::PytorchDcp,
        Layout::Megatron,
        Layout::Deepspeed,
        Layout::HfTrainer,
    ];

    #[test]
    fn steps_are_the_last_integer_of_the_last_component() {
        for (path, step) in [
            ("/ckpt/step_00000200", Some(200)),
            ("/ckpt/step_00000200/", Some(200)),
            ("/ckpt/iter_0000200", Some(200)),
            ("/ckpt/global_step200", Some(200)),
            ("/ckpt/checkpoint-200", Some(200)),
            ("/run7/ckpt/v2_step_15", Some(15)),
            ("/ckpt/step_1/latest", None),
            ("/ckpt/final", None),
        ] {
            assert_eq!(step_of_path(Path::new(path)), step, "{path}");
        }
    }

    #[test]
    fn every_layout_writes_what_vigil_reads_and_resumes_only_when_complete() {
        for layout in ALL {
            let root = tempfile::tempdir().expect("tempdir");
            let done = layout.write(root.path(), 100, 1, true).expect("write");
            assert_eq!(layout.complete_step(&done), Ok(100), "{layout:?}");
            let partial = layout.write(root.path(), 150, 1, false).expect("write");
            let err = layout.complete_step(&partial).expect_err("incomplete");
            assert!(!err.is_empty(), "{layout:?}");
            assert_eq!(
                layout.complete_step(&done),
                Ok(100),
                "{layout:?} after partial"
            );
            let leftovers: Vec<_> = walk(root.path())
                .into_iter()
                .filter(|p| p.to_string_lossy().ends_with(".tmp"))
                .collect();
            assert!(leftovers.is_empty(), "{layout:?}: {leftovers:?}");
        }
    }

    #[test]
    fn layouts_use_their_own_names_and_markers() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        let read = |p: PathBuf| fs::read_to_string(p).expect("read");
        Layout::Marker.write(r, 50, 1, true).expect("write");
        assert!(r.join("step_00000050/model.bin").is_file());
        assert!(r.join("step_00000050/COMPLETE").is_file());
        Layout::PytorchDcp.write(r, 60, 1, true).expect("write");
        assert!(r.join("step_00000060/__0_0.distcp").is_file());
        assert!(r.join("step_00000060/.metadata").is_file());
        Layout::Megatron.write(r, 70, 1, true).expect("write");
        assert!(r.join("iter_0000070").is_dir());
        assert_eq!(read(r.join(MEGATRON_TRACKER)), "70");
        Layout::Deepspeed.write(r, 80, 1, true).expect("write");
        assert!(r.join("global_step80").is_dir());
        assert_eq!(read(r.join(DEEPSPEED_TRACKER)), "global_step80");
        Layout::HfTrainer.write(r, 90, 1, true).expect("write");
        assert!(r.join("checkpoint-90/model.safetensors").is_file());
        assert!(read(r.join("checkpoint-90/trainer_state.json")).contains("\"global_step\": 90"));
    }

    #[test]
    fn tracker_layouts_resume_from_the_root_or_the_named_dir() {
        for layout in [Layout::Megatron, Layout::Deepspeed] {
            let root = tempfile::tempdir().expect("tempdir");
            layout.write(root.path(), 100, 1, true).expect("write");
            layout.write(root.path(), 200, 1, false).expect("write");
            assert_eq!(layout.complete_step(root.path()), Ok(100), "{layout:?}");
            layout.write(root.path(), 200, 1, true).expect("write");
            assert_eq!(layout.complete_step(root.path()), Ok(200), "{layout:?}");
        }
    }

    #[test]
    fn missing_or_unnumbered_checkpoints_are_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        for layout in ALL {
            assert!(
                layout
                    .complete_step(&root.path().join("step_00000010"))
                    .is_err()
            );
            assert!(layout.complete_step(root.path()).is_err(), "{layout:?}");
        }
    }

    #[test]
    fn faults_fire_at_their_step_in_their_attempt() {
        let first = Fault {
            step: Some(5),
            attempt: Some(1),
        };
        assert!(first.fires(5, 1));
        assert!(!first.fires(5, 2));
        assert!(!first.fires(4, 1));
        let any = Fault {
            step: Some(5),
            attempt: None,
        };
        assert!(any.fires(5, 3));
        let off = Fault {
            step: None,
            attempt: None,
        };
        assert!(!off.fires(5, 1));
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(walk(&path));
            }
            out.push(path);
        }
        out
    }
}
