//! Reading a worker's log for `clusterctl job logs` (Command.read_log).

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use vigil_proto::v1::{LogData, ReadLog};

/// Largest read, whatever the coordinator asks.
const MAX_READ: u64 = 256 * 1024;

/// Read `req` from this node's log of that job attempt under `state_dir`.
/// The log is `<state_dir>/jobs/<job>/<attempt>/rank<r>.log`; a node runs one
/// worker per attempt, so the first `rank*.log` there is it.
pub fn read(state_dir: &Path, command_id: u64, req: &ReadLog) -> LogData {
    let missing = LogData {
        command_id,
        found: false,
        ..LogData::default()
    };
    // The id names a directory: refuse anything that could climb out of it.
    let safe = !req.job_id.is_empty()
        && req
            .job_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !req.job_id.starts_with('.');
    if !safe {
        return missing;
    }
    let dir = state_dir
        .join("jobs")
        .join(&req.job_id)
        .join(req.attempt.to_string());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return missing;
    };
    let mut logs: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("rank") && n.ends_with(".log"))
        })
        .collect();
    logs.sort();
    let Some(path) = logs.first() else {
        return missing;
    };
    match read_at(path, req.offset, u64::from(req.max_bytes).min(MAX_READ)) {
        Ok((data, next_offset)) => LogData {
            command_id,
            data,
            next_offset,
            found: true,
        },
        Err(_) => missing,
    }
}

/// Read up to `max` bytes from `offset` (negative: from the end), keeping
/// whole UTF-8 characters; returns the text and where the next read starts.
fn read_at(path: &Path, offset: i64, max: u64) -> std::io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = if offset < 0 {
        len.saturating_sub(offset.unsigned_abs())
    } else {
        u64::try_from(offset).unwrap_or(0).min(len)
    };
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::new();
    f.take(max).read_to_end(&mut buf)?;
    // Stop before a character cut in half; the next read starts there.
    let keep = match std::str::from_utf8(&buf) {
        Ok(_) => buf.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => buf.len(),
    };
    buf.truncate(keep);
    let next = start + u64::try_from(keep).unwrap_or(0);
    Ok((String::from_utf8_lossy(&buf).into_owned(), next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(job: &str, offset: i64, max: u32) -> ReadLog {
        ReadLog {
            job_id: job.into(),
            attempt: 2,
            offset,
            max_bytes: max,
        }
    }

    #[test]
    fn reads_the_tail_then_follows_from_the_offset() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let logs = dir.path().join("jobs/j-1/2");
        std::fs::create_dir_all(&logs)?;
        std::fs::write(logs.join("rank1.log"), "line one\nline two\n")?;
        let tail = read(dir.path(), 7, &req("j-1", -9, 1000));
        assert!(tail.found);
        assert_eq!(
            (tail.command_id, tail.data.as_str(), tail.next_offset),
            (7, "line two\n", 18)
        );
        let from = read(dir.path(), 8, &req("j-1", 5, 3));
        assert_eq!((from.data.as_str(), from.next_offset), ("one", 8));
        let end = read(dir.path(), 9, &req("j-1", 18, 100));
        assert_eq!((end.data.as_str(), end.next_offset), ("", 18));
        Ok(())
    }

    #[test]
    fn a_character_cut_in_half_waits_for_the_next_read() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let logs = dir.path().join("jobs/j-1/2");
        std::fs::create_dir_all(&logs)?;
        std::fs::write(logs.join("rank0.log"), "é")?;
        let first = read(dir.path(), 1, &req("j-1", 0, 1));
        assert_eq!((first.data.as_str(), first.next_offset), ("", 0));
        Ok(())
    }

    #[test]
    fn unknown_or_unsafe_jobs_are_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!read(dir.path(), 1, &req("nope", 0, 10)).found);
        assert!(!read(dir.path(), 1, &req("../etc", 0, 10)).found);
        assert!(!read(dir.path(), 1, &req("", 0, 10)).found);
    }
}
