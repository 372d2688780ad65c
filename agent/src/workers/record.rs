//! `<state_dir>/workers.json`: the workers this agent runs, so a restarted agent finds them.
//!
//! Rewritten (temp file, fsync, rename: [`crate::shim::write_json`]) whenever a worker starts or ends, so a
//! crash leaves either the old list or the new one, never half of each.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::group;

pub const FILE_NAME: &str = "workers.json";

/// One running worker as the next agent needs it: enough to find and stop its group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub job_id: String,
    pub attempt: u64,
    pub node_rank: u32,
    pub pid: u32,
    pub pgid: i32,
    pub log_path: PathBuf,
    pub started_at_unix_ms: u64,
    /// The leader's start time (`/proc/<pid>/stat`): a recycled pid is not our worker.
    #[serde(default)]
    pub start_time: Option<u64>,
    /// The worker's shim (absent in records of agents before shims: those workers are stopped).
    #[serde(default)]
    pub shim_pid: Option<u32>,
    /// The shim's start time: a recycled pid is not our shim.
    #[serde(default)]
    pub shim_start_time: Option<u64>,
    /// Node rank 0's checkpoint dir and layout, so a re-adopting agent watches it again.
    #[serde(default)]
    pub checkpoint_dir: Option<PathBuf>,
    #[serde(default)]
    pub checkpoint_layout: Option<String>,
    /// The gang's world size, for DeepSpeed's shard check (absent in records of older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<u32>,
    /// The worker's own stop grace (from its StartWorker), in milliseconds.
    #[serde(default)]
    pub stop_grace_ms: Option<u64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct WorkersFile {
    workers: Vec<Record>,
}

impl Record {
    /// True while the worker's group still has a live member that is ours.
    ///
    /// Linux never hands out a pid still in use as a process group id, so a
    /// live group without its leader is still the worker's; a live leader whose
    /// start time differs is a stranger that inherited the pid.
    pub fn still_running(&self) -> bool {
        let Ok(pid) = i32::try_from(self.pid) else {
            return false;
        };
        let leader = group::read_stat(pid);
        let recycled =
            matches!((leader, self.start_time), (Some(now), Some(then)) if now.start_time != then);
        if recycled {
            return false;
        }
        group::group_alive(self.pgid)
    }
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The recorded workers; no file means none.
pub fn load(state_dir: &Path) -> io::Result<Vec<Record>> {
    let text = match std::fs::read_to_string(path(state_dir)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let file: WorkersFile = serde_json::from_str(&text).map_err(io::Error::other)?;
    Ok(file.workers)
}

pub fn save(state_dir: &Path, workers: &[Record]) -> io::Result<()> {
    let file = WorkersFile {
        workers: workers.to_vec(),
    };
    crate::shim::write_json(&path(state_dir), &file, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(job: &str, pid: u32) -> Record {
        Record {
            job_id: job.to_owned(),
            attempt: 2,
            node_rank: 1,
            pid,
            pgid: i32::try_from(pid).unwrap_or(i32::MAX),
            log_path: PathBuf::from("/state/jobs/j/2/rank1.log"),
            started_at_unix_ms: 1_700_000_000_000,
            start_time: Some(12),
            shim_pid: Some(pid + 1),
            shim_start_time: Some(13),
            checkpoint_dir: Some(PathBuf::from("/ckpt/j")),
            checkpoint_layout: Some("marker".to_owned()),
            world_size: Some(16),
            stop_grace_ms: Some(2_000),
        }
    }

    #[test]
    fn records_survive_a_save_and_load() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        assert_eq!(load(tmp.path())?, Vec::new(), "no file: no workers");
        let workers = vec![record("a", 10), record("b", 11)];
        save(tmp.path(), &workers)?;
        assert_eq!(load(tmp.path())?, workers);
        save(tmp.path(), &[])?;
        assert_eq!(load(tmp.path())?, Vec::new());
        assert!(!tmp.path().join("workers.json.tmp").exists());
        Ok(())
    }

    #[test]
    fn a_record_of_an_agent_before_shims_still_loads() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        std::fs::write(
            path(tmp.path()),
            r#"{"workers":[{"job_id":"a","attempt":1,"node_rank":0,"pid":10,"pgid":10,
                "log_path":"/s/jobs/a/1/rank0.log","started_at_unix_ms":1,"start_time":5}]}"#,
        )?;
        let loaded = load(tmp.path())?;
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].shim_pid, None, "no shim: stopped as an orphan");
        Ok(())
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_list() -> io::Result<()> {
        let tmp = tempfile::tempdir()?;
        std::fs::write(path(tmp.path()), "{ not json")?;
        assert!(load(tmp.path()).is_err());
        Ok(())
    }

    #[test]
    fn a_worker_whose_group_is_gone_is_not_running() {
        assert!(!record("gone", 4_999_999).still_running());
    }

    #[test]
    fn a_recycled_pid_is_not_our_worker() {
        // This test process is alive, but its start time is not the recorded one.
        let pid = std::process::id();
        let me = group::read_stat(i32::try_from(pid).unwrap_or(i32::MAX));
        let mut r = record("stranger", pid);
        r.start_time = me.map(|s| s.start_time + 1);
        assert!(me.is_some());
        assert!(!r.still_running());
    }
}
