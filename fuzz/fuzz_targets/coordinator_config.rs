//! Fuzz the coordinator's config parser: any bytes, never a panic; an accepted config validates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil_coordinator::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::from_toml_str(text) {
        assert!(config.validate().is_ok());
        assert!(config.liveness.agent_lease < config.liveness.lost_after);
    }
});
