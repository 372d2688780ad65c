//! Fuzz the simulated-GPU fault-file parser (`--sim-fault-file`): any text, never a panic; good
//! lines name a GPU in range, and folding and diffing them stays in bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_agent::gpu::faults;

fuzz_target!(|data: &[u8]| {
    let Some((&gpus, rest)) = data.split_first() else {
        return;
    };
    // The agent accepts 1 to 64 simulated GPUs.
    let gpus = 1 + u32::from(gpus % 64);
    let text = String::from_utf8_lossy(rest);
    let (lines, errors) = faults::parse(&text, gpus);
    assert!(lines.len() + errors.len() <= text.lines().count());
    assert!(lines.iter().all(|l| l.gpu < gpus));
    let state = faults::fold(&lines, gpus);
    assert_eq!(state.len(), gpus as usize);
    let all: Vec<&str> = text.lines().collect();
    let (half, _) = faults::parse(&all[..all.len() / 2].join("\n"), gpus);
    let _ = faults::new_xids(&half, &lines);
});
