//! The `vigil-coordinator` binary's `--help`: what it says to an operator who has only the binary.

use std::process::Command;

#[test]
fn help_says_what_the_config_file_sets_and_where_it_is_documented() {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil-coordinator"))
        .arg("--help")
        .output()
        .expect("vigil-coordinator runs");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in [
        "set in the --config file",
        "TLS ([tls]",
        "high availability ([ha]",
        "the policies ([liveness], [health], [lemons], [triage], [burn_in], [stragglers]",
        "backups ([backup])",
        "docs/configuration.md",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}: {help}");
    }
}
