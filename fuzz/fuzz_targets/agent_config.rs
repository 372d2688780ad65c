//! Fuzz the agent's config parser and its checks: any bytes, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_agent::AgentConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = AgentConfig::from_toml_str(text) {
        if config.validate().is_ok() {
            assert!(!config.node_name.is_empty());
            assert!(config.workers.allowed_roots.iter().all(|r| r.is_absolute()));
        }
    }
});
