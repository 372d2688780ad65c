//! The preflight's bisection, pure: from the rounds run so far, what is known about each node
//! (`learn`), which groups run next (`plan`), and when nothing more is to be learnt, the verdict.
//!
//! A group passes when every member ran the command to exit 0. What a pass proves depends on its
//! size: a group of two or more proves its members' fabric (they are *cleared*); a node run alone
//! proves only itself (it is *alone-ok*), except in a one-node job, where running alone is the
//! job's own shape. A failure proves a node bad when it is the only member not cleared: a node
//! that fails alone, or fails beside cleared partners.
//!
//! Round 0 is the whole gang. When it fails, the gang is split in halves, each taking half the
//! spares (so that the spares are tested as replacements); each later round splits the failed
//! groups of the round before that still hold three or more uncleared nodes, runs alone the nodes
//! that never ran alone, and pairs a node that passed alone with a cleared partner (or, with none
//! yet, with another alone-ok node it never failed beside). No group is ever run twice, so every
//! round learns something; `max_rounds` bounds them all the same.

use std::collections::{BTreeMap, BTreeSet};

/// How one node's part of a group's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// Why (exit code, signal, timeout) and the output's tail.
    Failed {
        why: String,
        output: String,
    },
    /// No answer by the round's deadline (an agent that does not know the command, or one cut off).
    Silent,
}

/// One group of one round as the plan sees it: members in rank order, and how each ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub nodes: Vec<String>,
    pub outcomes: BTreeMap<String, Outcome>,
}

impl Run {
    /// A group failed when any member failed; passed when all passed; otherwise (someone silent)
    /// it says nothing.
    pub fn verdict(&self) -> Option<bool> {
        let of = |n: &String| self.outcomes.get(n).unwrap_or(&Outcome::Silent);
        if self
            .nodes
            .iter()
            .any(|n| matches!(of(n), Outcome::Failed { .. }))
        {
            Some(false)
        } else if self.nodes.iter().all(|n| *of(n) == Outcome::Passed) {
            Some(true)
        } else {
            None
        }
    }
}

/// What the rounds so far prove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Knowledge {
    pub cleared: BTreeSet<String>,
    pub alone_ok: BTreeSet<String>,
    pub ran_alone: BTreeSet<String>,
    /// Proven bad, with the evidence: the group it failed in and its own outcome there.
    pub bad: BTreeMap<String, String>,
    /// Gave no answer in some round: left out of later rounds, never judged.
    pub silent: BTreeSet<String>,
    /// Every group that failed, oldest first.
    pub failed: Vec<Vec<String>>,
    /// Whether any node's run passed at all (alone or in a group, whatever the others did).
    pub any_pass: bool,
}

/// What the rounds in `rounds` prove. `solo`: the job runs on one node, so running alone is
/// the real test.
pub fn learn(rounds: &[Vec<Run>], solo: bool) -> Knowledge {
    let mut k = Knowledge::default();
    for run in rounds.iter().flatten() {
        for n in &run.nodes {
            if run.outcomes.get(n).is_none_or(|o| *o == Outcome::Silent) {
                k.silent.insert(n.clone());
            }
        }
        if run.outcomes.values().any(|o| *o == Outcome::Passed) {
            k.any_pass = true;
        }
        if run.nodes.len() == 1 {
            k.ran_alone.extend(run.nodes.iter().cloned());
        }
        match run.verdict() {
            Some(true) => {
                if run.nodes.len() >= 2 || solo {
                    k.cleared.extend(run.nodes.iter().cloned());
                } else {
                    k.alone_ok.extend(run.nodes.iter().cloned());
                }
            }
            Some(false) => k.failed.push(run.nodes.clone()),
            None => {}
        }
    }
    let runs: Vec<&Run> = rounds.iter().flatten().collect();
    for group in &k.failed {
        let uncleared: Vec<&String> = group.iter().filter(|n| !k.cleared.contains(*n)).collect();
        if let [only] = uncleared[..]
            && !k.silent.contains(only)
        {
            let evidence = evidence(&runs, group, only);
            k.bad.entry(only.clone()).or_insert(evidence);
        }
    }
    k
}

/// `node`'s outcome in the failed `group`, for its cordon's reason.
fn evidence(runs: &[&Run], group: &[String], node: &str) -> String {
    let run = runs.iter().rev().find(|r| r.nodes == group);
    let shape = if group.len() == 1 {
        "alone".to_owned()
    } else {
        format!("in group {} (the others passed elsewhere)", group.join(","))
    };
    match run.and_then(|r| r.outcomes.get(node)) {
        Some(Outcome::Failed { why, output }) => {
            let output = output.trim();
            let output = if output.is_empty() { "(none)" } else { output };
            format!("failed {shape}: {why}; output: {output}")
        }
        _ => {
            format!("failed {shape}: another member failed and {node} is the only one not cleared")
        }
    }
}

/// Whether `group` failed for a reason already found (it holds a bad node).
fn explained(k: &Knowledge, group: &[String]) -> bool {
    group.iter().any(|n| k.bad.contains_key(n))
}

/// The groups of the next round, given the pool (gang then spares) and the rounds run so far
/// (`rounds`; the last is the one just finished). Empty: nothing more to learn.
pub fn plan(pool: &[String], rounds: &[Vec<Run>], solo: bool) -> Vec<Vec<String>> {
    let k = learn(rounds, solo);
    let open =
        |n: &String| !k.cleared.contains(n) && !k.bad.contains_key(n) && !k.silent.contains(n);
    let mut used: BTreeSet<String> = BTreeSet::new();
    let mut groups: Vec<Vec<String>> = Vec::new();
    let mut singles: Vec<String> = Vec::new();
    // Bisection: halve what failed last round. After round 0, the halves of the gang each take
    // half the spares (never the gang again, and the spares are tested as replacements).
    let halves: Vec<(Vec<String>, Vec<String>)> = match rounds {
        [only] => only
            .iter()
            .filter(|r| r.verdict() == Some(false))
            .map(|r| {
                let spares: Vec<String> = pool
                    .iter()
                    .filter(|n| !r.nodes.contains(n))
                    .cloned()
                    .collect();
                let (g1, g2) = r.nodes.split_at(r.nodes.len() / 2);
                let (s1, s2) = spares.split_at(spares.len() / 2);
                ([g1, s1].concat(), [g2, s2].concat())
            })
            .collect(),
        [.., last] => last
            .iter()
            .filter(|r| r.verdict() == Some(false) && !explained(&k, &r.nodes))
            .filter_map(|r| {
                let open: Vec<String> = r.nodes.iter().filter(|n| open(n)).cloned().collect();
                if open.len() < 3 {
                    singles.extend(open);
                    return None;
                }
                let (a, b) = open.split_at(open.len() / 2);
                Some((a.to_vec(), b.to_vec()))
            })
            .collect(),
        [] => Vec::new(),
    };
    for (a, b) in halves {
        for half in [a, b] {
            let half: Vec<String> = half.into_iter().filter(|n| open(n)).collect();
            if solo {
                singles.extend(half);
                continue;
            }
            if half.len() >= 2 {
                used.extend(half.iter().cloned());
                groups.push(half);
            } else {
                singles.extend(half);
            }
        }
    }
    // Suspects: those singles, and every open node of any failure (one explained by a bad
    // node may hide a second).
    let implicated: BTreeSet<&String> = k.failed.iter().flatten().collect();
    let suspects: Vec<String> = pool
        .iter()
        .filter(|n| open(n) && (singles.contains(n) || implicated.contains(n)))
        .cloned()
        .collect();
    for n in &suspects {
        if used.contains(n) {
            continue;
        }
        if !k.ran_alone.contains(n) {
            used.insert(n.clone());
            groups.push(vec![n.clone()]);
            continue;
        }
        if solo {
            continue;
        }
        let failed_beside = |m: &String| {
            k.failed
                .iter()
                .any(|g| g.len() == 2 && g.contains(n) && g.contains(m))
        };
        let partner = pool
            .iter()
            .filter(|m| *m != n && !used.contains(*m) && !failed_beside(m))
            .find(|m| k.cleared.contains(*m) && !k.silent.contains(*m))
            .or_else(|| {
                suspects.iter().find(|m| {
                    *m != n && !used.contains(*m) && k.alone_ok.contains(*m) && !failed_beside(m)
                })
            })
            .cloned();
        if let Some(m) = partner {
            used.insert(n.clone());
            used.insert(m.clone());
            groups.push(vec![n.clone(), m]);
        }
    }
    groups
}

/// The most rounds a preflight of a pool of `pool` nodes runs: round 0, the halvings, then a
/// round of single runs and two of pairings.
pub fn max_rounds(pool: usize) -> u32 {
    let halvings = usize::BITS - pool.max(1).leading_zeros();
    halvings.saturating_mul(2).saturating_add(2)
}
