//! `vigil-netproxy LISTEN UPSTREAM CONTROL_FILE`: the fault-injection TCP proxy
//! the namespace tests put between agents and the coordinator (latency,
//! stalls, resets; see `vigil_tests::proxy`).

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match vigil_tests::proxy::main_with_args(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil-netproxy: {e}");
            ExitCode::from(2)
        }
    }
}
