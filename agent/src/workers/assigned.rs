//! The work this agent has been given, so commands about anything else can be refused: the
//! newest attempt of each job it was told to start (bounded; forgotten on agent restart).

use std::collections::{HashMap, VecDeque};

use super::Key;

/// Jobs remembered; the oldest is forgotten first.
const REMEMBERED_JOBS: usize = 4096;

#[derive(Debug, Default)]
pub struct Assigned {
    newest: HashMap<String, u64>,
    /// Insertion order of `newest`'s keys, for forgetting.
    order: VecDeque<String>,
}

impl Assigned {
    /// This node was given `key` (a StartWorker it accepted, or a worker it found running).
    pub fn note(&mut self, key: &Key) {
        match self.newest.get_mut(&key.job_id) {
            Some(n) => *n = (*n).max(key.attempt),
            None => {
                if self.order.len() >= REMEMBERED_JOBS
                    && let Some(old) = self.order.pop_front()
                {
                    self.newest.remove(&old);
                }
                self.newest.insert(key.job_id.clone(), key.attempt);
                self.order.push_back(key.job_id.clone());
            }
        }
    }

    /// The newest attempt of `job` this node was given, if any.
    pub fn newest(&self, job: &str) -> Option<u64> {
        self.newest.get(job).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(job: &str, attempt: u64) -> Key {
        Key {
            job_id: job.into(),
            attempt,
        }
    }

    #[test]
    fn the_newest_attempt_of_each_job_is_remembered() {
        let mut a = Assigned::default();
        a.note(&key("j", 2));
        a.note(&key("j", 1));
        assert_eq!(a.newest("j"), Some(2));
        assert_eq!(a.newest("other"), None);
    }

    #[test]
    fn memory_is_bounded() {
        let mut a = Assigned::default();
        for i in 0..=REMEMBERED_JOBS {
            a.note(&key(&format!("j{i}"), 1));
        }
        assert_eq!(a.newest("j0"), None, "the oldest is forgotten");
        assert_eq!(a.newest(&format!("j{REMEMBERED_JOBS}")), Some(1));
        assert!(a.newest.len() <= REMEMBERED_JOBS);
    }
}
