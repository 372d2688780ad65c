//! Fuzz the readers of Slurm's output (`[slurm]`: `sinfo`, `squeue`, hostlists): any text, never
//! a panic; every line is a node or job, or counted as bad; no hostlist expands past its bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_core::slurm::{hostlist, parse};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    let (nodes, bad) = parse::sinfo(&text);
    assert!(nodes.len() + bad <= lines);
    let (jobs, bad) = parse::squeue(&text);
    assert!(jobs.len() + bad <= lines);
    assert!(jobs.iter().all(|j| j.nodes.len() <= hostlist::MAX_HOSTS));
    if let Some(names) = hostlist::expand(&text) {
        assert!(names.len() <= hostlist::MAX_HOSTS);
    }
});
