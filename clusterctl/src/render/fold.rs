//! Folding routine events: a run of consecutive events of a routine kind (checkpoints) becomes
//! one line, `checkpoints step 40 … 3450: 345, every 1.0s`, so the failures, cordons and
//! restarts between them stay in sight. Text output only; `-o json` lists every event.

use crate::table::format_elapsed;

/// Kinds that happen on a schedule and say nothing new one by one.
pub const ROUTINE_KINDS: [&str; 1] = ["checkpoint"];

/// What folding needs to know of an event (or of a timeline row).
pub trait Foldable {
    fn at_ms(&self) -> u64;
    fn kind(&self) -> &str;
    fn message(&self) -> &str;
    /// Whether two events of the same kind come from the same source (job, node) and may
    /// share a line.
    fn same_source(&self, _other: &Self) -> bool {
        true
    }
}

/// A run of two or more consecutive routine events of one kind and source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub kind: String,
    pub count: usize,
    pub first_at_ms: u64,
    pub last_at_ms: u64,
    pub first_step: Option<u64>,
    pub last_step: Option<u64>,
}

impl Run {
    /// The mean time between the run's events.
    pub fn mean_interval_ms(&self) -> u64 {
        self.last_at_ms.saturating_sub(self.first_at_ms) / (self.count as u64 - 1).max(1)
    }

    /// `checkpoints step 40 … 3450: 345, every 1.0s` (`checkpoints: 345, every 1.0s` when
    /// the messages name no step).
    pub fn summary(&self) -> String {
        let steps = match (self.first_step, self.last_step) {
            (Some(a), Some(b)) => format!(" step {a} … {b}"),
            _ => String::new(),
        };
        format!(
            "{}s{steps}: {}, every {}",
            self.kind,
            self.count,
            format_elapsed(self.mean_interval_ms())
        )
    }
}

/// One line of folded output: an event as it is, or a run standing for several.
#[derive(Debug, PartialEq, Eq)]
pub enum Folded<'a, T> {
    One(&'a T),
    /// `first` is the run's first event (for its time and source).
    Run {
        first: &'a T,
        run: Run,
    },
}

pub fn is_routine(kind: &str) -> bool {
    ROUTINE_KINDS.contains(&kind)
}

/// The step a message names as `(step N)` (the coordinator's checkpoint events).
pub fn step_of(message: &str) -> Option<u64> {
    let rest = &message[message.rfind("(step ")? + "(step ".len()..];
    rest[..rest.find(')')?].parse().ok()
}

/// `items` in order, each run of two or more consecutive routine events of the same kind and
/// source folded into one [`Folded::Run`]; every other event stays on its own.
pub fn fold<T: Foldable>(items: &[T]) -> Vec<Folded<'_, T>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < items.len() {
        let first = &items[i];
        let mut end = i + 1;
        if is_routine(first.kind()) {
            while end < items.len()
                && items[end].kind() == first.kind()
                && first.same_source(&items[end])
            {
                end += 1;
            }
        }
        if end - i < 2 {
            out.push(Folded::One(first));
        } else {
            let last = &items[end - 1];
            out.push(Folded::Run {
                first,
                run: Run {
                    kind: first.kind().to_string(),
                    count: end - i,
                    first_at_ms: first.at_ms(),
                    last_at_ms: last.at_ms(),
                    first_step: step_of(first.message()),
                    last_step: step_of(last.message()),
                },
            });
        }
        i = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct E(u64, &'static str, String, &'static str);

    impl Foldable for E {
        fn at_ms(&self) -> u64 {
            self.0
        }
        fn kind(&self) -> &str {
            self.1
        }
        fn message(&self) -> &str {
            &self.2
        }
        fn same_source(&self, other: &Self) -> bool {
            self.3 == other.3
        }
    }

    fn ckpt(at: u64, step: u64, job: &'static str) -> E {
        E(
            at,
            "checkpoint",
            format!("complete checkpoint /ckpt/step_{step:08} (step {step})"),
            job,
        )
    }

    fn other(at: u64, kind: &'static str) -> E {
        E(at, kind, format!("{kind} happened"), "j-1")
    }

    fn lines(items: &[E]) -> Vec<String> {
        fold(items)
            .into_iter()
            .map(|f| match f {
                Folded::One(e) => format!("{} {}", e.1, e.2),
                Folded::Run { run, .. } => run.summary(),
            })
            .collect()
    }

    #[test]
    fn a_run_of_checkpoints_is_one_line_and_everything_else_stays() {
        let mut items = vec![other(0, "submitted")];
        // 345 checkpoints, step 40 to 3450, one a second.
        items.extend((0..345).map(|i| ckpt(1_000 + i * 1_000, 40 + i * 10, "j-1")));
        items.push(other(400_000, "xid"));
        items.push(other(401_000, "restart"));
        items.push(ckpt(402_000, 3_460, "j-1"));
        items.push(ckpt(404_000, 3_470, "j-1"));
        items.push(other(405_000, "cordon"));
        assert_eq!(
            lines(&items),
            [
                "submitted submitted happened",
                "checkpoints step 40 … 3480: 345, every 1.0s",
                "xid xid happened",
                "restart restart happened",
                "checkpoints step 3460 … 3470: 2, every 2.0s",
                "cordon cordon happened",
            ]
        );
    }

    #[test]
    fn single_checkpoints_other_sources_and_non_routine_runs_are_not_folded() {
        let items = vec![
            ckpt(0, 10, "j-1"),
            other(1, "xid"),
            other(2, "xid"),
            ckpt(3, 20, "j-1"),
            ckpt(4, 30, "j-2"),
        ];
        let folded = fold(&items);
        assert_eq!(folded.len(), 5);
        assert!(folded.iter().all(|f| matches!(f, Folded::One(_))));
    }

    #[test]
    fn steps_are_read_from_the_message_when_it_names_them() {
        assert_eq!(step_of("complete checkpoint /c/step_7 (step 7)"), Some(7));
        assert_eq!(step_of("complete checkpoint /c/last (unknown step)"), None);
        assert_eq!(step_of("(step x)"), None);
        let items = [
            E(0, "checkpoint", "a".into(), ""),
            E(3_000, "checkpoint", "b".into(), ""),
            E(6_000, "checkpoint", "c".into(), ""),
        ];
        assert_eq!(lines(&items), ["checkpoints: 3, every 3.0s"]);
    }
}
