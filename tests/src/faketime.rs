//! One process's wall clock, stepped at will: libfaketime (Debian's `libfaketime`, pulled in by
//! `faketime`) preloaded into that process alone, reading its offset from a file the test
//! rewrites. Only `CLOCK_REALTIME` moves (`FAKETIME_DONT_FAKE_MONOTONIC=1`): what a step of the
//! host's clock (NTP, an operator's `date -s`) does to a process. Children inherit it, as they
//! would share the host's clock: an agent's workers are stepped with it.
//!
//! A trap for other programs put on it: libfaketime 0.9.10 fails an absolute
//! `clock_nanosleep(CLOCK_MONOTONIC)` with EINVAL at a non-zero offset (Python's `time.sleep`
//! does that). Rust's `thread::sleep` (`nanosleep`) and tokio's timers (epoll timeouts) are not
//! affected.
//!
//! Where libfaketime is not installed, the tests print [`SKIP_LINE`] and pass; `.ci/run` sets
//! `VIGIL_REQUIRE_FAKETIME=1`, which turns that skip into a failure.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

pub const REQUIRE_ENV: &str = "VIGIL_REQUIRE_FAKETIME";
pub const SKIP_LINE: &str = "SKIP: libfaketime is not installed (Debian: apt-get install faketime); \
     the clock-step tests need it to step one process's wall clock";

/// Where distributions put it, for machines without dpkg.
const KNOWN_PATHS: [&str; 3] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
];

/// The library, as `dpkg -L libfaketime` lists it, else at a known path.
pub fn library() -> Option<PathBuf> {
    let listed = Command::new("dpkg")
        .args(["-L", "libfaketime"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.ends_with("/libfaketime.so.1"))
                .map(PathBuf::from)
        });
    listed
        .into_iter()
        .chain(KNOWN_PATHS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
}

/// The library if the test can run; `None` after printing the skip line. Panics instead of
/// skipping when [`REQUIRE_ENV`] is set.
pub fn available() -> Option<PathBuf> {
    if let Some(lib) = library() {
        return Some(lib);
    }
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| v == "1") {
        panic!("{REQUIRE_ENV}=1 but libfaketime is not installed: {SKIP_LINE}");
    }
    // Through the locked handle, so the line shows in plain `cargo test` output.
    let _ = writeln!(std::io::stderr().lock(), "{SKIP_LINE}");
    None
}

/// A wall clock for the processes started with [`FakeWallClock::env`].
pub struct FakeWallClock {
    lib: PathBuf,
    /// Holds the offset file; removed on drop.
    dir: tempfile::TempDir,
    /// Processes it was preloaded into; see [`FakeWallClock::preloaded_into`].
    pids: Vec<u32>,
}

impl FakeWallClock {
    /// A clock at offset `+0` (the real time).
    pub fn new(lib: PathBuf) -> Result<Self> {
        let clock = Self {
            lib,
            dir: tempfile::tempdir()?,
            pids: Vec::new(),
        };
        clock.set("+0")?;
        Ok(clock)
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("offset")
    }

    /// The environment that puts a process on this clock. `FAKETIME_NO_CACHE` makes it re-read
    /// the file at every clock read, so a step takes effect at once (libfaketime otherwise
    /// caches it for 10 s).
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        vec![
            ("LD_PRELOAD".into(), self.lib.clone().into()),
            ("FAKETIME_TIMESTAMP_FILE".into(), self.file().into()),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }

    /// Sets the offset from the real time, in libfaketime's relative syntax (`+0`, `+1h`,
    /// `-10m`, `+3600`). Written then renamed, so no clock read sees a half-written file.
    pub fn set(&self, offset: &str) -> Result<()> {
        let tmp = self.dir.path().join("offset.tmp");
        std::fs::write(&tmp, format!("{offset}\n"))?;
        std::fs::rename(&tmp, self.file())?;
        Ok(())
    }

    /// What a process on this clock reads as the time now (`date +%s`).
    pub fn read(&self) -> Result<SystemTime> {
        let out = Command::new("date")
            .arg("+%s")
            .envs(self.env())
            .output()
            .context("cannot run date(1)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let secs: u64 = text.trim().parse().with_context(|| {
            format!(
                "date(1) on the fake clock printed {text:?} ({}; stderr: {})",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        Ok(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Proves the instrument before a test relies on it: a child on this clock reads the real
    /// time at `+0` and an hour ahead at `+1h`. Leaves the clock at `+0`.
    pub fn check(&self) -> Result<()> {
        for (offset, ahead) in [("+1h", 3600), ("+0", 0)] {
            self.set(offset)?;
            let fake = unix_secs(self.read()?);
            let real = unix_secs(SystemTime::now());
            if fake.abs_diff(real + ahead) > 60 {
                bail!(
                    "libfaketime ({}) does not step the wall clock: at {offset} a child read \
                     {fake}, the real time is {real}",
                    self.lib.display()
                );
            }
        }
        Ok(())
    }

    /// Records that `pid` was started on this clock, so its libfaketime shared memory is
    /// removed once it is dead: a SIGKILLed process leaves `/dev/shm/faketime_shm_PID`
    /// behind, which breaks the next preloaded process that gets the same pid.
    pub fn preloaded_into(&mut self, pid: u32) {
        self.pids.push(pid);
    }
}

impl Drop for FakeWallClock {
    fn drop(&mut self) {
        for pid in &self.pids {
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            for name in [
                format!("faketime_shm_{pid}"),
                format!("sem.faketime_sem_{pid}"),
            ] {
                let _ = std::fs::remove_file(Path::new("/dev/shm").join(name));
            }
        }
    }
}

/// Seconds since the epoch (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
