//! The gang preflight end to end: real agents in network-namespace hosts, each with a second
//! "fabric" link used only by job traffic; one host's fabric link goes down at the switch (its
//! agent stays connected over the management network). The job's `[preflight] command` is a
//! small all-reduce over sockets between the group's nodes (rank 0 listens on
//! `MASTER_ADDR:MASTER_PORT` of the group, the others send it a buffer and get the sum back),
//! so it needs the fabric between them. vigil must single the host out by bisection, cordon it
//! (rule `preflight`, the script's output as evidence) and start the job on the others.
//!
//! The same scenario runs with a real `torchrun` gloo all-reduce where torch is installed
//! (`VIGIL_TORCHRUN`, else `torchrun` on `PATH`; `.ci/run` installs it in a venv: the PyPI wheel
//! with its nvidia-* dependencies, about 1 minute and 5.3 GB). Without it that test prints a SKIP
//! line, and with `VIGIL_REQUIRE_TORCH=1` it fails instead.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use vigil_tests::jobs::{attempt, spec_in, workers_running};
use vigil_tests::netns::{FABRIC_SUBNET, NetCluster};
use vigil_tests::scenario::attempt_nodes;
use vigil_tests::{FAST_LIVENESS, LONG, wait_for, write_file};

/// The all-reduce: MASTER_ADDR is the group's rank 0 on the management network (the address it
/// registered from); its fabric address has the same host part on the fabric subnet.
const ALLREDUCE: &str = r#"
import os, socket, sys, time
n = int(os.environ["VIGIL_NNODES"]); rank = int(os.environ["VIGIL_NODE_RANK"])
host = os.environ["MASTER_ADDR"].rsplit(".", 1)[1]
addr = os.environ["FABRIC_SUBNET"] + "." + host
port = int(os.environ["MASTER_PORT"]) + 1
deadline = time.time() + 5
buf = bytes([rank + 1]) * 65536
def left(): return max(0.1, deadline - time.time())
def recv_all(c, size):
    data = b""
    while len(data) < size:
        chunk = c.recv(size - len(data))
        if not chunk: raise IOError("peer closed")
        data += chunk
    return data
print(f"round {os.environ.get('VIGIL_PREFLIGHT_ROUND')} rank {rank} of {n} via {addr}:{port}", flush=True)
if n == 1:
    print("alone: nothing to reduce with"); sys.exit(0)
try:
    if rank == 0:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port)); s.listen(n); conns = []
        while len(conns) < n - 1:
            s.settimeout(left()); c, _ = s.accept(); c.settimeout(left()); conns.append(c)
        total = sum(recv_all(c, 65536)[0] for c in conns) + rank + 1
        for c in conns: c.sendall(bytes([total % 256]) * 65536)
    else:
        while True:
            try:
                c = socket.create_connection((addr, port), timeout=min(1.0, left())); break
            except OSError:
                if time.time() > deadline: raise
                time.sleep(0.2)
        c.settimeout(left()); c.sendall(buf); total = recv_all(c, 65536)[0]
    print(f"all-reduce ok: sum {total}")
except Exception as e:
    print(f"all-reduce failed: {e!r}"); sys.exit(1)
"#;

fn events(job: &Value) -> Vec<String> {
    job["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["message"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// torch's gloo all-reduce, one process per node (torchrun sets RANK, WORLD_SIZE, MASTER_*).
const TORCH_ALLREDUCE: &str = r#"
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1 << 16) * (dist.get_rank() + 1)
dist.all_reduce(t)
print(f"gloo all-reduce ok: rank {dist.get_rank()} of {dist.get_world_size()}, sum {t[0].item()}")
dist.destroy_process_group()
"#;

/// torchrun, if torch is installed and imports (`torchrun --help` imports it).
fn torchrun() -> Option<PathBuf> {
    let path =
        std::env::var_os("VIGIL_TORCHRUN").map_or_else(|| PathBuf::from("torchrun"), PathBuf::from);
    let ok = Command::new(&path)
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(path)
}

/// The scenario: three hosts with a fabric, node-1's fabric port down, a gang of two with one
/// spare and `[preflight] command` (run `when = "always"`, so the first attempt is checked).
fn scenario(
    command: &[String],
    timeout_s: u64,
    script: (&str, &str),
    evidence: &str,
) -> Result<()> {
    let config = format!("{FAST_LIVENESS}\n[cordon_breaker]\nmax_fraction = 1.0\n");
    let Some(c) = NetCluster::builder(&config).hosts(3).start()? else {
        return Ok(());
    };
    c.add_fabric()?;
    let script_path = c.dir.path().join("work").join(script.0);
    let argv: Vec<String> = command
        .iter()
        .map(|a| a.replace("SCRIPT", &script_path.display().to_string()))
        .collect();
    let extra =
        format!("[preflight]\ncommand = {argv:?}\ntimeout = \"{timeout_s}s\"\nwhen = \"always\"\n");
    let spec = spec_in(
        c.dir.path(),
        2,
        1,
        &format!(", FABRIC_SUBNET = \"{FABRIC_SUBNET}\""),
        &extra,
    )?;
    write_file(c.dir.path(), &format!("work/{}", script.0), script.1)?;
    // The scheduler places the gang on node-0 and node-1 (name order), node-2 is the spare.
    let bad = "node-1";
    c.fabric_down(bad)?;
    let id = c.submit(&spec)?;
    // Up to every round failing by its deadline (the command's timeout plus 10 s), and a margin.
    let round = Duration::from_secs(timeout_s + 10);
    let patience = round * 6 + LONG;
    let waited = wait_for("running on the two good hosts", patience, || {
        let job = c.job(&id)?;
        Ok((workers_running(&job, 2) && attempt(&job) >= 2).then_some(job))
    });
    let job = match waited {
        Ok(job) => job,
        Err(e) => {
            println!("{}", events(&c.job(&id)?).join("\n"));
            return Err(e);
        }
    };
    let history = events(&job);
    println!("{}", history.join("\n"));
    let nodes = attempt_nodes(&job, attempt(&job))?;
    ensure!(
        !nodes.contains(&bad.to_owned()),
        "placed on {nodes:?}: {job}"
    );
    let node = c.node(bad)?;
    let reason = node["cordon"]["reason"].as_str().context("cordoned")?;
    println!("{bad} cordoned: {reason}");
    ensure!(reason.contains("preflight of job"), "{reason}");
    ensure!(reason.contains(evidence), "evidence {evidence:?}: {reason}");
    for good in ["node-0", "node-2"] {
        ensure!(
            c.node(good)?["cordon"]["reason"].is_null(),
            "{good} not cordoned"
        );
    }
    ensure!(
        job["job"]["restarts"].as_u64() == Some(0),
        "no restart: {job}"
    );
    ensure!(
        history
            .iter()
            .any(|e| e.contains("preflight round 0 ended")),
        "{history:?}"
    );
    ensure!(
        history
            .iter()
            .any(|e| e.contains("preflight found node-1 bad")),
        "{history:?}"
    );
    Ok(())
}

#[test]
fn a_host_whose_fabric_link_is_down_is_found_by_the_preflight_cordoned_and_left_out() -> Result<()>
{
    let command = ["python3".to_owned(), "SCRIPT".to_owned()];
    scenario(
        &command,
        20,
        ("allreduce.py", ALLREDUCE),
        "all-reduce failed",
    )
}

#[test]
fn a_torchrun_gloo_all_reduce_preflight_finds_the_host_whose_fabric_link_is_down() -> Result<()> {
    let Some(torchrun) = torchrun() else {
        if std::env::var("VIGIL_REQUIRE_TORCH").is_ok_and(|v| v == "1") {
            bail!(
                "VIGIL_REQUIRE_TORCH=1 but torchrun is missing or torch does not import (set VIGIL_TORCHRUN)"
            );
        }
        println!(
            "SKIP: torchrun not found or torch does not import (set VIGIL_TORCHRUN; .ci/run installs torch)"
        );
        return Ok(());
    };
    // torchrun's rendezvous and gloo's pairs go over the fabric: the group's rank 0 fabric
    // address, gloo bound to the fabric interface; one process per node.
    let shell = format!(
        "PET_MASTER_ADDR=$FABRIC_SUBNET.${{MASTER_ADDR##*.}} GLOO_SOCKET_IFNAME=fab0 exec {} --nproc-per-node=1 SCRIPT",
        torchrun.display()
    );
    let command = ["sh".to_owned(), "-c".to_owned(), shell];
    scenario(
        &command,
        40,
        ("torch_allreduce.py", TORCH_ALLREDUCE),
        "failed",
    )
}
