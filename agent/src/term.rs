//! Fencing by term: the agent follows only the newest leader it has heard of.
//!
//! Every coordinator message carries the leadership term of the coordinator that sent
//! it (etcd's create revision of the leader key; 0 from a single sled coordinator).
//! Terms only grow, so a message whose term is below the highest the agent has seen
//! comes from a deposed leader: it is ignored (no lease renewal, no command run) and
//! that session ends. The highest term survives agent restarts in
//! `state_dir/coordinator-term`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{info, warn};

/// The file under the state directory that holds the highest term seen.
pub const TERM_FILE: &str = "coordinator-term";

/// What a message's term means, given the highest term seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The leader the agent follows: act on the message.
    Current,
    /// A newer leader: adopt its term, then act on the message.
    Newer { previous: u64 },
    /// A deposed leader: ignore the message and end the session.
    Stale { highest: u64 },
}

/// The term rule, pure: `term` against the highest term seen.
pub fn judge(highest: u64, term: u64) -> Verdict {
    match term.cmp(&highest) {
        std::cmp::Ordering::Less => Verdict::Stale { highest },
        std::cmp::Ordering::Equal => Verdict::Current,
        std::cmp::Ordering::Greater => Verdict::Newer { previous: highest },
    }
}

/// Whether registering at `term` (after following `previous`) is a change of leader: a
/// higher term than one already followed. An agent that had seen no term (0) has not
/// seen a leader change; neither has one that stays with a single sled coordinator.
pub fn is_leader_change(verdict: Verdict) -> bool {
    matches!(verdict, Verdict::Newer { previous } if previous > 0)
}

/// Reads the term file's text: `None` when it is not a term.
pub fn parse(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The highest term seen, shared by every session, persisted on every rise.
#[derive(Debug)]
pub struct TermFence {
    highest: AtomicU64,
    path: PathBuf,
}

impl TermFence {
    /// Reads `state_dir/coordinator-term`; missing means 0, a corrupt file is logged and
    /// read as 0 (the next leader's term is adopted, and written back).
    pub async fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(TERM_FILE);
        let highest = match tokio::fs::read_to_string(&path).await {
            Ok(text) => match parse(&text) {
                Some(term) => {
                    info!(path = %path.display(), term, "highest coordinator term read");
                    term
                }
                None => {
                    warn!(
                        path = %path.display(),
                        content = %text.trim().chars().take(40).collect::<String>(),
                        "term file is corrupt; starting from term 0 (the next leader's term \
                         is adopted and written back)"
                    );
                    0
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot read the term file; starting from term 0 (check the state \
                     directory's permissions)"
                );
                0
            }
        };
        Self {
            highest: AtomicU64::new(highest),
            path,
        }
    }

    pub fn highest(&self) -> u64 {
        self.highest.load(Ordering::SeqCst)
    }

    pub fn judge(&self, term: u64) -> Verdict {
        judge(self.highest(), term)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Raises the highest term to `term` (never lowers it) and writes it to the term file
    /// before returning; a failed write is logged and the term still followed.
    pub async fn adopt(&self, term: u64) {
        let previous = self.highest.fetch_max(term, Ordering::SeqCst);
        if term <= previous {
            return;
        }
        if let Err(e) = write_atomically(&self.path, &format!("{term}\n")).await {
            warn!(
                path = %self.path.display(),
                term,
                error = %e,
                "cannot write the term file; the term is followed but an agent restart \
                 forgets it (check that the state directory is writable)"
            );
        }
    }
}

/// Write to a temporary file, flush it to disk, rename it over `path`: a reader sees
/// the old term or the new one, never half of one.
async fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let tmp = path.with_extension("tmp");
    let mut file = tokio::fs::File::create(&tmp).await?;
    file.write_all(text.as_bytes()).await?;
    file.sync_all().await?;
    drop(file);
    tokio::fs::rename(&tmp, path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_terms_are_stale_higher_ones_adopted() {
        assert_eq!(judge(5, 5), Verdict::Current);
        assert_eq!(judge(5, 3), Verdict::Stale { highest: 5 });
        assert_eq!(judge(5, 0), Verdict::Stale { highest: 5 });
        assert_eq!(judge(5, 9), Verdict::Newer { previous: 5 });
    }

    #[test]
    fn a_single_sled_coordinator_at_term_0_is_always_current() {
        assert_eq!(judge(0, 0), Verdict::Current);
        assert!(!is_leader_change(judge(0, 0)));
    }

    #[test]
    fn only_a_rise_from_a_followed_term_is_a_leader_change() {
        assert!(is_leader_change(judge(5, 9)));
        assert!(
            !is_leader_change(judge(0, 9)),
            "first leader this agent sees"
        );
        assert!(!is_leader_change(judge(9, 9)));
        assert!(!is_leader_change(judge(9, 5)));
    }

    #[test]
    fn term_file_text_is_one_number() {
        assert_eq!(parse("42\n"), Some(42));
        assert_eq!(parse(" 7 "), Some(7));
        assert_eq!(parse(""), None);
        assert_eq!(parse("-1"), None);
        assert_eq!(parse("term 5"), None);
    }

    #[tokio::test]
    async fn the_highest_term_survives_a_restart_and_never_falls() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let fence = TermFence::load(dir.path()).await;
        assert_eq!(fence.highest(), 0, "no file: term 0");
        fence.adopt(9).await;
        fence.adopt(4).await;
        assert_eq!(fence.highest(), 9);
        assert_eq!(std::fs::read_to_string(dir.path().join(TERM_FILE))?, "9\n");
        assert!(!dir.path().join("coordinator-term.tmp").exists());
        assert_eq!(TermFence::load(dir.path()).await.highest(), 9);
        Ok(())
    }

    #[tokio::test]
    async fn a_corrupt_term_file_reads_as_0_and_is_rewritten() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join(TERM_FILE), "garbage")?;
        let fence = TermFence::load(dir.path()).await;
        assert_eq!(fence.highest(), 0);
        fence.adopt(3).await;
        assert_eq!(std::fs::read_to_string(fence.path())?, "3\n");
        Ok(())
    }
}
