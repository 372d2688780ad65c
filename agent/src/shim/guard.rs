//! `vigil-agent shim-guard`: the member of a worker's process group that takes the group down
//! when its shim dies.
//!
//! The shim starts the guard first, as the leader of a new process group, with the read end of a
//! pipe as its standard input; only the shim holds the write end (close-on-exec, so the worker
//! never inherits it). The worker then joins the guard's group. The guard reads until the pipe
//! ends — which happens only when the shim is gone, whether it exited or was killed with
//! SIGKILL — and then sends SIGKILL to its whole group: the worker, everything the worker
//! started in that group, and itself. No `unsafe`, no `PR_SET_PDEATHSIG` (which would reach the
//! worker's leader only, not torchrun's children).
//!
//! The guard ignores SIGTERM, SIGINT and SIGHUP, so a stop of the group (SIGTERM first) leaves it
//! watching until the final SIGKILL; as root it cannot be killed by the job's own user.

use std::io::Read as _;
use std::process::ExitCode;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::getpgrp;
use tokio::signal::unix::{SignalKind, signal};

pub fn main() -> ExitCode {
    // The handlers stay installed for the life of the process: these signals no longer kill it.
    let ignored = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .and_then(|rt| {
            rt.block_on(async {
                for kind in [
                    SignalKind::terminate(),
                    SignalKind::interrupt(),
                    SignalKind::hangup(),
                ] {
                    std::mem::forget(signal(kind)?);
                }
                Ok::<_, std::io::Error>(())
            })?;
            Ok(rt)
        });
    let _runtime = match ignored {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vigil-agent shim-guard: cannot ignore SIGTERM: {e}");
            kill_group();
            return ExitCode::FAILURE;
        }
    };
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 64];
    loop {
        match stdin.read(&mut buf) {
            // The shim is gone: its end of the pipe closed.
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    kill_group();
    ExitCode::SUCCESS
}

fn kill_group() {
    let _ = killpg(getpgrp(), Signal::SIGKILL);
}
