//! Reading a hang's evidence for a suspect, pure: what each node's workers were doing when the
//! attempt was declared hung ([`Doing`], from `py-spy dump` text and the kernel's process
//! state), and which node that points at ([`odd_one_out`]).
//!
//! In a hung gang the healthy ranks wait in a collective (all_reduce, barrier, ...) for a peer
//! that never arrives. A node whose workers are *not* in a collective (stuck in a data loader,
//! in uninterruptible sleep in the kernel, or gone) while the others are is where the hang
//! started. One such node is a suspect; several, or none in a collective, point nowhere.
//!
//! Helper processes of the gang (torchrun's agent, data-loader workers, multiprocessing's
//! resource tracker) are never in a collective and are left out of the reading.

use serde::{Deserialize, Serialize};

use super::evidence::{NodeEvidence, ProcessRecord};

/// What one node's workers were doing, as far as its evidence tells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Doing {
    /// Every rank with a Python stack waits in a collective (its name: `all_reduce`).
    Collective(String),
    /// A rank is elsewhere: its pid and the innermost frame of its main thread.
    Elsewhere(String),
    /// A worker process is in uninterruptible sleep (`D`): its pid and `wchan`.
    Uninterruptible(String),
    /// The node ran no worker of the attempt when asked (the capture's error says so).
    NoWorker,
    /// Nothing to go by (no py-spy on the node, no stacks, a capture that failed).
    Unknown,
}

impl Doing {
    /// Is this node "the odd one" when the rest of the gang waits in a collective?
    pub fn odd(&self) -> bool {
        matches!(
            self,
            Doing::Elsewhere(_) | Doing::Uninterruptible(_) | Doing::NoWorker
        )
    }

    /// In words, for a reason line.
    pub fn describe(&self) -> String {
        match self {
            Doing::Collective(op) => format!("waiting in {op}"),
            Doing::Elsewhere(at) => format!("not in a collective ({at})"),
            Doing::Uninterruptible(at) => format!("in uninterruptible sleep ({at})"),
            Doing::NoWorker => "running no worker of the attempt".into(),
            Doing::Unknown => "unknown (no Python stacks)".into(),
        }
    }
}

/// Collective and point-to-point calls of torch.distributed (and the libraries that wrap it);
/// a frame is one of them when its function is named so and its file is a communication
/// library's.
const COLLECTIVES: &[&str] = &[
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_base",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "monitored_barrier",
    "all_to_all",
    "all_to_all_single",
    "reduce",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "send",
    "recv",
    "batch_isend_irecv",
    "wait",
];

/// Files of communication libraries, as py-spy shows them.
const COMM_FILES: &[&str] = &[
    "torch/distributed/",
    "c10d",
    "deepspeed/comm/",
    "nccl",
    "gloo",
    "horovod/",
];

/// Processes of the gang that are not ranks: never in a collective, and no sign of a hang.
const HELPERS: &[&str] = &[
    "torch/distributed/elastic/",
    "torch/utils/data/_utils/worker.py",
    "multiprocessing/resource_tracker.py",
    "multiprocessing/forkserver.py",
];

/// One frame of `py-spy dump` output: `    all_reduce (torch/distributed/distributed_c10d.py:2050)`
/// as (function, file).
fn frame(line: &str) -> Option<(&str, &str)> {
    let indent = line.len() - line.trim_start().len();
    let line = line.trim();
    if indent != 4 || !line.ends_with(')') {
        return None;
    }
    let open = line.rfind(" (")?;
    let function = &line[..open];
    let location = &line[open + 2..line.len() - 1];
    let file = location.rsplit_once(':').map_or(location, |(f, _)| f);
    // Not a local variable of `--locals` output (`x: (1, 2)`).
    let plain = !function.is_empty() && !function.contains(' ') && !function.ends_with(':');
    plain.then_some((function, file))
}

/// The collective a frame is in, if it is one.
fn collective(function: &str, file: &str) -> Option<String> {
    let native = function.starts_with("nccl") || function.contains("ProcessGroupNCCL");
    if native {
        return Some(function.to_owned());
    }
    let name = function.trim_start_matches('_');
    let comm = COMM_FILES.iter().any(|f| file.contains(f));
    (comm && COLLECTIVES.contains(&name)).then(|| name.to_owned())
}

/// What one process's Python stacks show: `None` when there are none to read (no py-spy, a
/// dump that failed) or the process is a helper.
fn python_doing(p: &ProcessRecord) -> Option<Doing> {
    let frames: Vec<(&str, &str)> = p.python_stacks.lines().filter_map(frame).collect();
    if frames.is_empty()
        || frames
            .iter()
            .any(|(_, f)| HELPERS.iter().any(|h| f.contains(h)))
    {
        return None;
    }
    if let Some(op) = frames
        .iter()
        .find_map(|(func, file)| collective(func, file))
    {
        return Some(Doing::Collective(op));
    }
    // The innermost frame of the first thread (py-spy lists the main thread first).
    let (func, file) = frames[0];
    Some(Doing::Elsewhere(format!(
        "pid {} in {func} ({file})",
        p.pid
    )))
}

/// Is this process in uninterruptible sleep (`State: D (disk sleep)`)?
fn uninterruptible(p: &ProcessRecord) -> bool {
    p.state.trim_start().starts_with('D')
}

/// What a node's workers were doing, from its evidence.
pub fn doing(e: &NodeEvidence) -> Doing {
    if let Some(p) = e.processes.iter().find(|p| uninterruptible(p)) {
        let wchan = if p.wchan.is_empty() { "-" } else { &p.wchan };
        return Doing::Uninterruptible(format!("pid {} {}, waiting in {wchan}", p.pid, p.comm));
    }
    if e.processes.is_empty() && e.error.contains("no worker") {
        return Doing::NoWorker;
    }
    let mut found = None;
    for d in e.processes.iter().filter_map(python_doing) {
        match d {
            Doing::Elsewhere(_) => return d,
            _ => found = found.or(Some(d)),
        }
    }
    found.unwrap_or(Doing::Unknown)
}

/// The one node the gang's evidence points at, and why in one line: the only node (of
/// `nodes`, the attempt's) whose workers are not in a collective while others wait in one.
/// `answered` holds what each node that answered was doing; `all_in`: every node had its
/// chance to answer (the attempt has stopped), so a node without an answer counts as odd.
pub fn odd_one_out(
    nodes: &[String],
    answered: &[(&str, &Doing)],
    all_in: bool,
) -> Option<(String, String)> {
    let doing = |n: &str| answered.iter().find(|(a, _)| *a == n).map(|(_, d)| *d);
    if !all_in && nodes.iter().any(|n| doing(n).is_none()) {
        return None;
    }
    let waiting: Vec<(&str, &str)> = nodes
        .iter()
        .filter_map(|n| match doing(n) {
            Some(Doing::Collective(op)) => Some((n.as_str(), op.as_str())),
            _ => None,
        })
        .collect();
    let odd: Vec<&str> = nodes
        .iter()
        .filter(|n| doing(n).is_none_or(Doing::odd))
        .map(String::as_str)
        .collect();
    let ([suspect], Some((_, op))) = (odd.as_slice(), waiting.first()) else {
        return None;
    };
    let what = doing(suspect).map_or_else(
        || "did not answer the capture".to_owned(),
        |d| format!("its workers are {}", d.describe()),
    );
    Some((
        (*suspect).to_owned(),
        format!(
            "{suspect}: {what} while {} wait in {op}",
            listed(&waiting.iter().map(|(n, _)| *n).collect::<Vec<_>>())
        ),
    ))
}

/// `n1, n2, n3 and 5 more`.
fn listed(names: &[&str]) -> String {
    const SHOWN: usize = 3;
    let head = names[..names.len().min(SHOWN)].join(", ");
    match names.len().saturating_sub(SHOWN) {
        0 => head,
        more => format!("{head} and {more} more"),
    }
}

#[cfg(test)]
#[path = "hang_signs_tests.rs"]
mod tests;
