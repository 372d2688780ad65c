//! The pending batch of the SQLite and memory backends: what a turn staged, one write per
//! record, until it is committed (or, after a failed commit, staged again ahead of what came
//! since).

use std::collections::HashMap;

use super::{Kind, Write};

/// Staged writes that keep one write per record: a turn that changes a record N times writes
/// it once (its last version, where its first was staged; order between records does not
/// matter within one commit). History entries are each kept: every put appends one.
#[derive(Debug, Default)]
pub struct Pending {
    writes: Vec<Write>,
    /// Where each record's write is in `writes`.
    at: HashMap<(Kind, String), usize>,
}

impl Pending {
    pub fn push(&mut self, write: Write) {
        let Some((kind, key)) = write.record() else {
            self.writes.push(write);
            return;
        };
        match self.at.get(&(kind, key.to_owned())) {
            Some(&i) => self.writes[i] = write,
            None => {
                self.at.insert((kind, key.to_owned()), self.writes.len());
                self.writes.push(write);
            }
        }
    }

    /// Everything staged, in order, leaving nothing.
    pub fn take(&mut self) -> Vec<Write> {
        self.at.clear();
        std::mem::take(&mut self.writes)
    }

    /// A batch whose commit failed goes back ahead of what was staged since; a record staged
    /// since keeps its newer write.
    pub fn restage(&mut self, batch: Vec<Write>) {
        let newer = self.take();
        for w in batch.into_iter().chain(newer) {
            self.push(w);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.writes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Put;

    fn put(kind: Kind, key: &str, value: &str) -> Write {
        Write::Put(Put {
            kind,
            key: key.into(),
            value: value.as_bytes().to_vec(),
        })
    }

    fn delete(key: &str) -> Write {
        Write::Delete {
            kind: Kind::Evidence,
            key: key.into(),
        }
    }

    fn shown(writes: &[Write]) -> Vec<String> {
        writes
            .iter()
            .map(|w| match w {
                Write::Put(p) => format!(
                    "{}/{}={}",
                    p.kind.dir(),
                    p.key,
                    String::from_utf8_lossy(&p.value)
                ),
                Write::Delete { kind, key } => format!("delete {}/{key}", kind.dir()),
            })
            .collect()
    }

    #[test]
    fn a_record_rewritten_in_one_turn_is_written_once_with_its_last_version() {
        let mut p = Pending::default();
        for i in 0..100 {
            p.push(put(Kind::Job, "j-1", &format!("v{i}")));
        }
        p.push(put(Kind::Node, "n1", "a"));
        p.push(put(Kind::Job, "j-2", "x"));
        p.push(put(Kind::Node, "n1", "b"));
        assert_eq!(
            shown(&p.take()),
            ["jobs/j-1=v99", "nodes/n1=b", "jobs/j-2=x"]
        );
        assert!(p.is_empty());
    }

    #[test]
    fn history_entries_are_each_kept_and_kinds_do_not_share_keys() {
        let mut p = Pending::default();
        p.push(put(Kind::Event, "n1", "e1"));
        p.push(put(Kind::Event, "n1", "e2"));
        p.push(put(Kind::Node, "n1", "a"));
        p.push(put(Kind::Lemon, "n1", "l"));
        assert_eq!(p.len(), 4);
        assert_eq!(
            shown(&p.take()),
            ["events/n1=e1", "events/n1=e2", "nodes/n1=a", "lemons/n1=l"]
        );
    }

    #[test]
    fn the_last_of_a_put_and_a_delete_of_one_record_wins() {
        let mut p = Pending::default();
        p.push(put(Kind::Evidence, "j/1/n1", "a"));
        p.push(delete("j/1/n1"));
        p.push(delete("j/1/n2"));
        p.push(put(Kind::Evidence, "j/1/n2", "b"));
        assert_eq!(
            shown(&p.take()),
            ["delete evidence/j/1/n1", "evidence/j/1/n2=b"]
        );
    }

    #[test]
    fn a_restaged_batch_goes_first_and_newer_writes_of_its_records_win() {
        let mut p = Pending::default();
        p.push(put(Kind::Job, "j-1", "old"));
        p.push(put(Kind::Evidence, "j/1/n1", "a"));
        p.push(put(Kind::Event, "n1", "e1"));
        let failed = p.take();
        // Staged while the commit was in flight.
        p.push(put(Kind::Job, "j-1", "new"));
        p.push(delete("j/1/n1"));
        p.push(put(Kind::Event, "n1", "e2"));
        p.push(put(Kind::Node, "n2", "x"));
        p.restage(failed);
        assert_eq!(
            shown(&p.take()),
            [
                "jobs/j-1=new",
                "delete evidence/j/1/n1",
                "events/n1=e1",
                "events/n1=e2",
                "nodes/n2=x"
            ]
        );
    }

    #[test]
    fn a_restaged_batch_alone_is_staged_as_it_was() {
        let mut p = Pending::default();
        p.push(put(Kind::Job, "j-1", "v"));
        p.push(delete("j/1/n1"));
        let failed = p.take();
        p.restage(failed.clone());
        assert_eq!(p.take(), failed);
    }
}
