//! Fuzz the job-spec parser (`clusterctl job submit` text): any bytes, never a panic; an accepted
//! spec is within every limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_coordinator::{jobspec, limits};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = jobspec::parse(text, "fuzz.toml", 8) {
        assert!(spec.nodes >= 1 && spec.nodes <= 8);
        assert!(spec.command.len() <= limits::MAX_ARGV);
        assert!(spec.env.len() <= limits::MAX_ENV_VARS);
        assert!(!spec.workdir.contains(".."), "{:?}", spec.workdir);
    }
});
