//! Exposing a rolled-back coordinator: the agent keeps the highest store mark it was told.
//!
//! A single coordinator (its SQLite store) tells every agent its store mark (the store's random id and its number
//! of durable commits) in `Registered` and in every `Ack`. The agent keeps the highest mark of
//! the store it was last told of, in `state_dir/coordinator-store`, and sends it in every
//! `Register`. A coordinator whose data dir was replaced by an older copy of itself has the same
//! store id but fewer commits than an agent was told: it refuses that registration and stops
//! (exit 65) instead of serving from the old state. A different store id (a restored or
//! recovered store is a new store) replaces the kept mark. An empty id (etcd, which guards
//! itself; or a coordinator that predates marks) changes nothing.
//!
//! Only marks the coordinator reports as durable are kept, so a kept mark never exceeds what
//! the store committed: a lost or stale file can hide a rollback, never invent one.

use std::path::{Path, PathBuf};

use tokio::sync::Mutex;
use tracing::{info, warn};

/// The file under the state directory that holds the highest store mark told.
pub const STORE_FILE: &str = "coordinator-store";
/// Longer store ids are not kept (the coordinator refuses longer register fields).
const MAX_STORE_ID: usize = 255;

/// A coordinator store's identity and how many commits it had made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub store_id: String,
    pub seq: u64,
}

/// What a mark the coordinator told means, given the mark kept so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No mark (empty id: a store that keeps none), or an id this agent cannot keep: nothing
    /// changes.
    Unmarked,
    /// The kept mark again: nothing changes.
    Known,
    /// The same store, further on (or the first mark told): kept from now on.
    Further { previous: Option<u64> },
    /// Another store (restored, recovered, or a new data dir): replaces the kept mark.
    NewStore { previous: String },
    /// The same store behind the mark kept: the store went back (the coordinator refuses this
    /// agent's next registration). Nothing changes.
    Behind { highest: u64 },
}

impl Verdict {
    /// Whether the told mark replaces the kept one.
    pub fn adopts(&self) -> bool {
        matches!(self, Verdict::Further { .. } | Verdict::NewStore { .. })
    }
}

/// The rule, pure: the mark `told` against the mark `kept`.
pub fn judge(kept: Option<&Mark>, told: &Mark) -> Verdict {
    if !keepable(&told.store_id) {
        return Verdict::Unmarked;
    }
    let Some(kept) = kept else {
        return Verdict::Further { previous: None };
    };
    if kept.store_id != told.store_id {
        return Verdict::NewStore {
            previous: kept.store_id.clone(),
        };
    }
    match told.seq.cmp(&kept.seq) {
        std::cmp::Ordering::Greater => Verdict::Further {
            previous: Some(kept.seq),
        },
        std::cmp::Ordering::Equal => Verdict::Known,
        std::cmp::Ordering::Less => Verdict::Behind { highest: kept.seq },
    }
}

/// An id the file and the next `Register` can carry: non-empty, bounded, one word.
fn keepable(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_STORE_ID && !id.chars().any(|c| c.is_whitespace())
}

/// Reads the file's text (`ID SEQ`): `None` when it is not a mark.
pub fn parse(text: &str) -> Option<Mark> {
    let (id, seq) = text.trim().split_once(' ')?;
    let mark = Mark {
        store_id: id.to_owned(),
        seq: seq.parse().ok()?,
    };
    keepable(&mark.store_id).then_some(mark)
}

/// The file's text for `mark`.
pub fn render(mark: &Mark) -> String {
    format!("{} {}\n", mark.store_id, mark.seq)
}

/// The highest mark told, shared by every session, persisted on every change.
#[derive(Debug)]
pub struct StoreWitness {
    /// Held across the file's write, so writes land in the order of the changes.
    kept: Mutex<Option<Mark>>,
    path: PathBuf,
}

impl StoreWitness {
    /// Reads `state_dir/coordinator-store`; missing means none, a corrupt file is logged and
    /// read as none (the next mark told is kept, and written back).
    pub async fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(STORE_FILE);
        let kept = match tokio::fs::read_to_string(&path).await {
            Ok(text) => match parse(&text) {
                Some(mark) => {
                    info!(path = %path.display(), store_id = %mark.store_id, store_seq = mark.seq, "highest coordinator store mark read");
                    Some(mark)
                }
                None => {
                    warn!(
                        path = %path.display(),
                        content = %text.trim().chars().take(40).collect::<String>(),
                        "coordinator store file is corrupt; starting with no store mark (the \
                         next mark the coordinator tells is kept and written back)"
                    );
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(
                    path = %path.display(),
                    error = %e,
                    "cannot read the coordinator store file; starting with no store mark \
                     (check the state directory's permissions)"
                );
                None
            }
        };
        Self {
            kept: Mutex::new(kept),
            path,
        }
    }

    /// The mark kept, for the next `Register`.
    pub async fn kept(&self) -> Option<Mark> {
        self.kept.lock().await.clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Judges `told` and keeps it when it is further on or a new store, writing the file
    /// before returning; a failed write is logged and the mark still kept in memory.
    pub async fn observe(&self, told: Mark) -> Verdict {
        let mut kept = self.kept.lock().await;
        let verdict = judge(kept.as_ref(), &told);
        match &verdict {
            Verdict::NewStore { previous } => info!(
                store_id = %told.store_id,
                store_seq = told.seq,
                previous_store_id = %previous,
                "coordinator runs on another store (restored, recovered or new); keeping its \
                 mark from now on"
            ),
            Verdict::Behind { highest } => warn!(
                store_id = %told.store_id,
                store_seq = told.seq,
                highest_seq = highest,
                "coordinator reports commit {} of its store, below commit {highest} it \
                 reported before: its data dir went back; the next registration tells it",
                told.seq
            ),
            _ => {}
        }
        if !verdict.adopts() {
            return verdict;
        }
        if let Err(e) = write_atomically(&self.path, &render(&told)).await {
            warn!(
                path = %self.path.display(),
                store_id = %told.store_id,
                store_seq = told.seq,
                error = %e,
                "cannot write the coordinator store file; the mark is kept but an agent \
                 restart forgets it (check that the state directory is writable)"
            );
        }
        *kept = Some(told);
        verdict
    }
}

/// Write to a temporary file, then rename it over `path`: a reader sees the old mark or the
/// new one, never half of one. Not synced: the mark rises with every commit of the
/// coordinator, and a mark lost in a crash only makes the agent remember less.
async fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, text).await?;
    tokio::fs::rename(&tmp, path).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(id: &str, seq: u64) -> Mark {
        Mark {
            store_id: id.into(),
            seq,
        }
    }

    #[test]
    fn the_first_mark_and_every_rise_of_the_same_store_are_kept() {
        assert_eq!(
            judge(None, &mark("a", 0)),
            Verdict::Further { previous: None }
        );
        assert_eq!(
            judge(Some(&mark("a", 5)), &mark("a", 9)),
            Verdict::Further { previous: Some(5) }
        );
        assert!(judge(Some(&mark("a", 5)), &mark("a", 6)).adopts());
        assert_eq!(judge(Some(&mark("a", 5)), &mark("a", 5)), Verdict::Known);
    }

    #[test]
    fn a_lower_seq_of_the_same_store_is_never_kept() {
        let verdict = judge(Some(&mark("a", 9)), &mark("a", 4));
        assert_eq!(verdict, Verdict::Behind { highest: 9 });
        assert!(!verdict.adopts());
    }

    #[test]
    fn another_store_replaces_the_mark_whatever_its_seq() {
        let verdict = judge(Some(&mark("a", 900)), &mark("b", 3));
        assert_eq!(
            verdict,
            Verdict::NewStore {
                previous: "a".into()
            }
        );
        assert!(verdict.adopts());
    }

    #[test]
    fn a_store_without_a_mark_changes_nothing() {
        assert_eq!(judge(Some(&mark("a", 9)), &mark("", 0)), Verdict::Unmarked);
        assert_eq!(judge(None, &mark("", 7)), Verdict::Unmarked);
        assert_eq!(judge(None, &mark("two words", 7)), Verdict::Unmarked);
        let long = "x".repeat(MAX_STORE_ID + 1);
        assert_eq!(judge(None, &mark(&long, 7)), Verdict::Unmarked);
    }

    #[test]
    fn the_file_holds_the_id_and_the_seq() {
        assert_eq!(parse(&render(&mark("3f9a", 42))), Some(mark("3f9a", 42)));
        assert_eq!(parse(" 3f9a 7 \n"), Some(mark("3f9a", 7)));
        assert_eq!(parse(""), None);
        assert_eq!(parse("3f9a"), None);
        assert_eq!(parse("3f9a -1"), None);
        assert_eq!(parse("3f9a 1 2"), None);
        assert_eq!(parse(" 5"), None);
    }

    #[tokio::test]
    async fn the_mark_survives_a_restart_and_never_falls() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let witness = StoreWitness::load(dir.path()).await;
        assert_eq!(witness.kept().await, None, "no file: no mark");
        witness.observe(mark("a", 9)).await;
        witness.observe(mark("a", 4)).await;
        witness.observe(mark("", 0)).await;
        assert_eq!(witness.kept().await, Some(mark("a", 9)));
        assert_eq!(std::fs::read_to_string(witness.path())?, "a 9\n");
        assert!(!dir.path().join("coordinator-store.tmp").exists());
        let restarted = StoreWitness::load(dir.path()).await;
        assert_eq!(restarted.kept().await, Some(mark("a", 9)));
        restarted.observe(mark("b", 1)).await;
        assert_eq!(
            StoreWitness::load(dir.path()).await.kept().await,
            Some(mark("b", 1))
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_corrupt_file_reads_as_no_mark_and_is_rewritten() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join(STORE_FILE), "garbage")?;
        let witness = StoreWitness::load(dir.path()).await;
        assert_eq!(witness.kept().await, None);
        witness.observe(mark("a", 3)).await;
        assert_eq!(std::fs::read_to_string(witness.path())?, "a 3\n");
        Ok(())
    }
}
