//! The gang preflight end to end: real agents in network-namespace hosts, each with a second
//! "fabric" link used only by job traffic; one host's fabric link goes down at the switch (its
//! agent stays connected over the management network). The job's `[preflight] command` is a
//! small all-reduce over sockets between the group's nodes (rank 0 listens on
//! `MASTER_ADDR:MASTER_PORT` of the group, the others send it a buffer and get the sum back),
//! so it needs the fabric between them. vigil must single the host out by bisection, cordon it
//! (rule `preflight`, the script's output as evidence) and start the job on the others.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use vigil_tests::jobs::{attempt, spec_in, workers_running};
use vigil_tests::netns::{FABRIC_SUBNET, NetCluster};
use vigil_tests::scenario::attempt_nodes;
use vigil_tests::{FAST_LIVENESS, write_file};

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

#[test]
fn a_host_whose_fabric_link_is_down_is_found_by_the_preflight_cordoned_and_left_out() -> Result<()>
{
    let config = format!("{FAST_LIVENESS}\n[cordon_breaker]\nmax_fraction = 1.0\n");
    let Some(c) = NetCluster::builder(&config).hosts(3).start()? else {
        return Ok(());
    };
    c.add_fabric()?;
    let script = c.dir.path().join("work/allreduce.py");
    let extra = format!(
        "[preflight]\ncommand = [\"python3\", \"{}\"]\ntimeout = \"20s\"\nwhen = \"always\"\n",
        script.display()
    );
    let spec = spec_in(
        c.dir.path(),
        2,
        1,
        &format!(", FABRIC_SUBNET = \"{FABRIC_SUBNET}\""),
        &extra,
    )?;
    write_file(c.dir.path(), "work/allreduce.py", ALLREDUCE)?;
    // The scheduler places the gang on node-0 and node-1 (name order), node-2 is the spare.
    let bad = "node-1";
    c.fabric_down(bad)?;
    let id = c.submit(&spec)?;
    let job = c.wait_job(&id, "running on the two good hosts", |j| {
        workers_running(j, 2) && attempt(j) >= 2
    })?;
    let nodes = attempt_nodes(&job, attempt(&job))?;
    ensure!(
        !nodes.contains(&bad.to_owned()),
        "placed on {nodes:?}: {job}"
    );
    let node = c.node(bad)?;
    let reason = node["cordon"]["reason"].as_str().context("cordoned")?;
    ensure!(reason.contains("preflight of job"), "{reason}");
    ensure!(reason.contains("all-reduce failed"), "evidence: {reason}");
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
    let history = events(&job);
    println!("{}", history.join("\n"));
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
