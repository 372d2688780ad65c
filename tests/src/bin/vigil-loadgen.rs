//! `vigil-loadgen`: N simulated agents (8 simulated GPUs each, every one on
//! its own gRPC connection) against a real coordinator, measuring from the
//! agents' side what an operator cares about at scale:
//!
//! - heartbeat processing lag: heartbeat sent -> `Ack{seq}` received;
//! - fault-to-cordon: XID 79 queued on the stream -> the node's `cordon`
//!   event on a `WatchEvents --follow` stream, for a burst of N faults;
//! - fault-to-relaunch (`--job`): XID 79 on a running job's rank-1 node ->
//!   the `StartWorker` of the next attempt arriving at an agent;
//! - `clusterctl status` latency: the `Status` RPC round trip;
//! - reconnect storm (`--measure-restart`): once it writes `await-restart`
//!   to the phase file, something else kill -9s and restarts the
//!   coordinator; the time from the first broken session to the last agent
//!   registered again, and how many agents' leases ran out on the way (on a
//!   real host those agents' workers would have been stopped: `fenced`).
//!
//! With `--tls DIR` every agent dials with mutual TLS as its own node (certificates
//! made beforehand by `--make-certs DIR`), as production runs.
//!
//! Prints one JSON object on stdout; progress on stderr. `scripts/bench.sh`
//! drives it and samples the coordinator's CPU and memory.

#[path = "vigil-loadgen/agent.rs"]
mod agent;
#[path = "vigil-loadgen/control.rs"]
mod control;
#[path = "vigil-loadgen/gpus.rs"]
mod gpus;
#[path = "vigil-loadgen/stats.rs"]
mod stats;
#[path = "vigil-loadgen/tls.rs"]
mod tls;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use agent::{AgentCmd, AgentConfig, RelaunchWatch, Shared};
use stats::{ms, round3, summarize_ms};

const XID_FALLEN_OFF_THE_BUS: u32 = 79;

#[derive(Parser, Debug)]
#[command(
    name = "vigil-loadgen",
    about = "simulate many vigil agents against a real coordinator and measure it"
)]
struct Cli {
    /// Coordinator gRPC URL.
    #[arg(long, default_value = "http://127.0.0.1:7770")]
    coordinator: String,
    /// Number of simulated agents (8 simulated GPUs each).
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Node names are PREFIX-00001, PREFIX-00002, ...
    #[arg(long, default_value = "load")]
    prefix: String,
    /// First connections (dial + Register) in flight at once.
    #[arg(long, default_value_t = 500)]
    connect_concurrency: usize,
    /// Give up waiting for every agent to register after this many seconds.
    #[arg(long, default_value_t = 180.0)]
    register_timeout: f64,
    /// Seconds after every agent registered before measuring.
    #[arg(long, default_value_t = 10.0)]
    warmup: f64,
    /// Seconds of heartbeat measurement after the warm-up.
    #[arg(long, default_value_t = 30.0)]
    window: f64,
    /// Inject XID 79 on this many distinct agents at once (a burst).
    #[arg(long, default_value_t = 0)]
    faults: usize,
    /// When to inject the burst, in seconds after every agent registered
    /// [default: warm-up + half the window].
    #[arg(long)]
    fault_at: Option<f64>,
    /// Submit a 2-node job (1 spare) and time its relaunches after XID 79 on rank 1.
    #[arg(long)]
    job: bool,
    /// How many relaunches to time with --job.
    #[arg(long, default_value_t = 5)]
    relaunches: usize,
    /// `Status` RPC round trips to time.
    #[arg(long, default_value_t = 20)]
    status_samples: usize,
    /// At the end, wait for the coordinator to be killed and restarted and time
    /// the reconnect storm.
    #[arg(long)]
    measure_restart: bool,
    /// Give up on the reconnect storm after this many seconds.
    #[arg(long, default_value_t = 180.0)]
    restart_timeout: f64,
    /// Append `PHASE UNIX_MS` lines here as the run goes (for scripts/bench.sh).
    #[arg(long, value_name = "FILE")]
    phase_file: Option<PathBuf>,
    /// Reconnect backoff: first ceiling, doubled per failure (full jitter).
    #[arg(long, default_value_t = 200)]
    initial_backoff_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    max_backoff_ms: u64,
    /// Tokio worker threads [default: one per core].
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Write a CA and certificates for the coordinator, an operator and --agents nodes
    /// into DIR, then exit (start the coordinator with DIR/coordinator.{crt,key} and
    /// DIR/bench-ca.crt, then run with --tls DIR).
    #[arg(long, value_name = "DIR")]
    make_certs: Option<PathBuf>,
    /// Mutual TLS with the certificates --make-certs wrote in DIR (--coordinator https://...).
    #[arg(long, value_name = "DIR")]
    tls: Option<PathBuf>,
}

/// Simulated agent `i`'s node name.
pub fn agent_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-{:05}", i + 1)
}

fn progress(msg: impl AsRef<str>) {
    eprintln!("[vigil-loadgen {}] {}", agent::unix_ms(), msg.as_ref());
}

struct Phases {
    file: Option<std::fs::File>,
}

impl Phases {
    fn open(path: Option<&PathBuf>) -> Result<Self> {
        let file = match path {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("cannot open phase file {}", p.display()))?,
            ),
            None => None,
        };
        Ok(Self { file })
    }

    fn mark(&mut self, phase: &str) {
        progress(format!("phase {phase}"));
        if let Some(f) = self.file.as_mut() {
            writeln!(f, "{phase} {}", agent::unix_ms()).ok();
            f.flush().ok();
        }
    }
}

struct Fleet {
    names: Vec<String>,
    cmds: Vec<mpsc::UnboundedSender<AgentCmd>>,
    by_name: HashMap<String, usize>,
    shared: Arc<Shared>,
}

impl Fleet {
    fn start(cli: &Cli) -> Self {
        let shared = Arc::new(Shared::default());
        let cfg = Arc::new(AgentConfig {
            coordinator: cli.coordinator.clone(),
            tls_dir: cli.tls.clone(),
            initial_backoff: Duration::from_millis(cli.initial_backoff_ms),
            max_backoff: Duration::from_millis(cli.max_backoff_ms),
        });
        let pacing = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
        let mut names = Vec::with_capacity(cli.agents);
        let mut cmds = Vec::with_capacity(cli.agents);
        let mut by_name = HashMap::with_capacity(cli.agents);
        for i in 0..cli.agents {
            let name = agent_name(&cli.prefix, i);
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(agent::run(
                i,
                name.clone(),
                cfg.clone(),
                shared.clone(),
                pacing.clone(),
                rx,
            ));
            by_name.insert(name.clone(), i);
            names.push(name);
            cmds.push(tx);
        }
        Self {
            names,
            cmds,
            by_name,
            shared,
        }
    }

    fn registered(&self) -> usize {
        self.shared.registered_now.load(Ordering::SeqCst)
    }

    /// Asks agent `i` to report XID 79; resolves to when it was queued on its stream.
    fn inject(&self, i: usize) -> oneshot::Receiver<Result<Instant, String>> {
        let (done, rx) = oneshot::channel();
        let cmd = AgentCmd::Xid {
            gpu: (i % gpus::GPUS as usize) as u32,
            xid: XID_FALLEN_OFF_THE_BUS,
            done,
        };
        if let Err(mpsc::error::SendError(AgentCmd::Xid { done, .. })) = self.cmds[i].send(cmd) {
            done.send(Err("agent task gone".into())).ok();
        }
        rx
    }
}

/// Waits until `cond` holds, polling every 10 ms; false on timeout.
async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

fn secs(x: f64) -> Duration {
    Duration::from_secs_f64(x.max(0.0))
}

/// A burst of XID 79 on `count` agents (spread over the fleet, none of `avoid`):
/// fault-to-cordon per node and for the whole burst.
async fn fault_burst(
    fleet: &Fleet,
    cordons: &control::Cordons,
    count: usize,
    avoid: &[String],
) -> Value {
    let candidates: Vec<usize> = (0..fleet.names.len())
        .filter(|&i| !avoid.contains(&fleet.names[i]))
        .collect();
    let count = count.min(candidates.len());
    if count == 0 {
        return json!({"injected": 0});
    }
    let stride = candidates.len() as f64 / count as f64;
    let chosen: Vec<usize> = (0..count)
        .map(|k| candidates[((k as f64 * stride) as usize).min(candidates.len() - 1)])
        .collect();
    for &i in &chosen {
        cordons.clear(&fleet.names[i]);
    }
    progress(format!("injecting XID 79 on {count} agents at once"));
    let receivers: Vec<_> = chosen.iter().map(|&i| (i, fleet.inject(i))).collect();
    let mut injected: Vec<(usize, Instant)> = Vec::with_capacity(count);
    let mut failed = 0usize;
    // One deadline for the whole burst: an agent without a session queues the
    // XID until it has one, and must not hold up the others.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (i, rx) in receivers {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(at))) => injected.push((i, at)),
            _ => failed += 1,
        }
    }
    let all_cordoned = wait_until(Duration::from_secs(30), || {
        injected
            .iter()
            .all(|(i, _)| cordons.get(&fleet.names[*i]).is_some())
    })
    .await;
    let first_inject = injected.iter().map(|(_, t)| *t).min();
    let mut latencies = Vec::new();
    let mut last_cordon: Option<Instant> = None;
    let mut missing = Vec::new();
    for (i, at) in &injected {
        match cordons.get(&fleet.names[*i]) {
            Some(c) => {
                latencies.push(ms(c.saturating_duration_since(*at)));
                last_cordon = Some(last_cordon.map_or(c, |l| l.max(c)));
            }
            None => missing.push(fleet.names[*i].clone()),
        }
    }
    let within = match (first_inject, last_cordon, all_cordoned) {
        (Some(f), Some(l), true) => Some(round3(ms(l.saturating_duration_since(f)))),
        _ => None,
    };
    progress(format!(
        "burst: {} injected, {} cordoned, all within {:?} ms",
        injected.len(),
        latencies.len(),
        within
    ));
    missing.truncate(10);
    json!({
        "injected": injected.len(),
        "inject_failed": failed,
        "cordoned": latencies.len(),
        "fault_to_cordon": summarize_ms(&latencies),
        "all_cordoned_within_ms": within,
        "missing_examples": missing,
    })
}

/// One relaunch: XID 79 on the job's rank-1 node -> StartWorker of the next attempt.
async fn one_relaunch(
    fleet: &Fleet,
    ctl: &mut control::Control,
    job_id: &str,
) -> Result<(f64, String)> {
    let job = control::wait_running(ctl, job_id, 1, Duration::from_secs(30)).await?;
    let summary = job.summary.context("GetJob without a summary")?;
    let Some(victim) = summary.assigned_nodes.get(1).cloned() else {
        bail!("job has no rank-1 node: {:?}", summary.assigned_nodes);
    };
    let Some(&i) = fleet.by_name.get(&victim) else {
        bail!("rank-1 node {victim} is not a loadgen agent");
    };
    let next = summary.attempt + 1;
    let (tx, rx) = oneshot::channel();
    if let Ok(mut w) = fleet.shared.relaunch.lock() {
        *w = Some(RelaunchWatch {
            job_id: job_id.to_owned(),
            attempt: next,
            arrived: Some(tx),
        });
    }
    let injected = match tokio::time::timeout(Duration::from_secs(10), fleet.inject(i)).await {
        Ok(Ok(Ok(at))) => at,
        Ok(Ok(Err(e))) => bail!("XID on {victim} not sent: {e}"),
        _ => bail!("XID on {victim} not sent in time"),
    };
    let (arrived, on) = match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(x)) => x,
        _ => bail!("no StartWorker of attempt {next} within 30 s of XID 79 on {victim}"),
    };
    let latency = ms(arrived.saturating_duration_since(injected));
    progress(format!(
        "relaunch: XID 79 on {victim} (rank 1 of attempt {}) -> attempt {next} StartWorker on {on} in {latency:.1} ms",
        summary.attempt
    ));
    control::wait_running(ctl, job_id, next, Duration::from_secs(30)).await?;
    control::uncordon_force(ctl, &victim).await?;
    Ok((latency, victim))
}

async fn relaunches(fleet: &Fleet, ctl: &mut control::Control, job_id: &str, n: usize) -> Value {
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..n {
        match one_relaunch(fleet, ctl, job_id).await {
            Ok((latency, _)) => samples.push(latency),
            Err(e) => {
                progress(format!("relaunch failed: {e:#}"));
                errors.push(format!("{e:#}"));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    json!({
        "job": job_id,
        "samples_ms": samples.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
        "fault_to_relaunch": summarize_ms(&samples),
        "errors": errors,
    })
}

async fn status_latency(ctl: &mut control::Control, n: usize) -> Value {
    let mut samples = Vec::new();
    let mut errors = 0usize;
    for _ in 0..n {
        let t = Instant::now();
        match control::status(ctl).await {
            Ok(_) => samples.push(ms(t.elapsed())),
            Err(_) => errors += 1,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut v = summarize_ms(&samples);
    v["errors"] = json!(errors);
    v
}

fn nodes_by_state(s: &vigil_proto::v1::StatusResponse) -> Value {
    let m: BTreeMap<String, u32> = s
        .nodes_by_state
        .iter()
        .map(|c| (c.state.clone(), c.count))
        .collect();
    json!({"total": s.nodes_total, "by_state": m, "gpus_healthy": s.gpus_healthy, "gpus_total": s.gpus_total})
}

/// Waits for the reconnect storm: first broken session -> all agents registered again.
async fn measure_restart(fleet: &Fleet, timeout: Duration) -> Value {
    let shared = &fleet.shared;
    // Agents registered when the coordinator goes away: those must come back.
    let n = fleet.registered();
    if n == 0 {
        return json!({"error": "no agent was registered before the restart"});
    }
    let errors_before = shared.errors_snapshot();
    let registrations_before = shared.registrations.load(Ordering::Relaxed);
    let fenced_before = shared.fenced.load(Ordering::Relaxed);
    let renewals_before = shared.early_renewals.load(Ordering::Relaxed);
    shared.recording_silence.store(true, Ordering::Relaxed);
    if let Ok(mut f) = shared.first_loss.lock() {
        *f = None;
    }
    progress("waiting for the coordinator to go away (kill -9)");
    if !wait_until(timeout, || fleet.registered() < n).await {
        return json!({"error": "no session broke: the coordinator was not restarted"});
    }
    let Some(first_loss) = shared.first_loss.lock().ok().and_then(|f| *f) else {
        return json!({"error": "sessions broke but no time was recorded"});
    };
    progress("sessions broke; waiting for every agent to register again");
    let mut min_registered = n;
    let all = wait_until(timeout, || {
        let r = fleet.registered();
        min_registered = min_registered.min(r);
        r >= n
    })
    .await;
    let last = shared.last_registered.lock().ok().and_then(|l| *l);
    let storm_ms = match (all, last) {
        (true, Some(l)) => Some(round3(ms(l.saturating_duration_since(first_loss)))),
        _ => None,
    };
    let errors_after = shared.errors_snapshot();
    let during: BTreeMap<String, u64> = errors_after
        .iter()
        .map(|(k, v)| (k.clone(), v - errors_before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    progress(format!(
        "reconnect storm: all {n} registered again: {all}, first loss -> last Registered {storm_ms:?} ms"
    ));
    json!({
        "registered_before": n,
        "all_reregistered": all,
        "reregistered": fleet.registered(),
        "first_loss_to_all_registered_ms": storm_ms,
        "min_registered_seen": min_registered,
        "registrations": shared.registrations.load(Ordering::Relaxed) - registrations_before,
        // Leases that ran out (the agent heard nothing for a whole lease): on real hosts,
        // workers stopped. An agent not back at all is not counted here: see all_reregistered.
        "fenced": shared.fenced.load(Ordering::Relaxed) - fenced_before,
        "early_lease_renewals": shared.early_renewals.load(Ordering::Relaxed) - renewals_before,
        // Per agent: last coordinator message before the kill -> Registered by the new one.
        "silence": shared.silence.summary(),
        "session_ends_and_failures_by_kind": during,
    })
}

fn heartbeat_counters(shared: &Shared) -> [u64; 4] {
    [
        shared.hb_sent.load(Ordering::Relaxed),
        shared.hb_acked.load(Ordering::Relaxed),
        shared.hb_dropped.load(Ordering::Relaxed),
        shared.hb_unacked.load(Ordering::Relaxed),
    ]
}

async fn run(cli: Cli) -> Result<Value> {
    let mut phases = Phases::open(cli.phase_file.as_ref())?;
    let n = cli.agents;
    let started = Instant::now();
    progress(format!("starting {n} agents against {}", cli.coordinator));
    let fleet = Fleet::start(&cli);
    let shared = fleet.shared.clone();
    let mut last_report = Instant::now();
    let all_registered = wait_until(secs(cli.register_timeout), || {
        if last_report.elapsed() > Duration::from_secs(2) {
            last_report = Instant::now();
            progress(format!("{} / {n} registered", fleet.registered()));
        }
        fleet.registered() >= n
    })
    .await;
    let register_s = started.elapsed().as_secs_f64();
    progress(format!(
        "{} / {n} registered after {register_s:.1} s",
        fleet.registered()
    ));
    let mut out = json!({
        "agents": n,
        "gpus_per_agent": gpus::GPUS,
        "coordinator": cli.coordinator,
        "initial_registration": {
            "all_registered": all_registered,
            "registered": fleet.registered(),
            "seconds": round3(register_s),
            "connect_concurrency": cli.connect_concurrency,
        },
    });
    phases.mark("registered");
    let t0 = Instant::now();

    let admin = tls::admin(cli.tls.as_ref())?;
    let mut ctl = control::connect(&cli.coordinator, &admin).await?;
    let cordons = Arc::new(control::Cordons::default());
    tokio::spawn(control::watch_cordons(
        control::connect(&cli.coordinator, &admin).await?,
        cordons.clone(),
    ));

    let mut job_id = None;
    let mut job_nodes: Vec<String> = Vec::new();
    if cli.job && fleet.registered() < 3 {
        out["job_error"] = json!("fewer than 3 agents registered: no job submitted");
    } else if cli.job {
        match control::submit_job(&mut ctl).await {
            Ok(job) => {
                let id = job.summary.map(|s| s.id).unwrap_or_default();
                progress(format!("submitted job {id}"));
                match control::wait_running(&mut ctl, &id, 1, Duration::from_secs(30)).await {
                    Ok(_) => job_id = Some(id),
                    Err(e) => out["job_error"] = json!(format!("{e:#}")),
                }
            }
            Err(e) => out["job_error"] = json!(format!("{e:#}")),
        }
    }

    tokio::time::sleep_until(t0 + secs(cli.warmup)).await;
    shared.recording.store(true, Ordering::Relaxed);
    let before = heartbeat_counters(&shared);
    let errors_before = shared.errors_snapshot();
    let lost_before = shared.sessions_lost.load(Ordering::Relaxed);
    let window_start = Instant::now();
    phases.mark("window-start");

    if cli.faults > 0 {
        let at = cli.fault_at.unwrap_or(cli.warmup + cli.window / 2.0);
        tokio::time::sleep_until(t0 + secs(at)).await;
        // Keep the job's nodes (and every spare it may pick) out of the burst.
        if let Some(id) = &job_id
            && let Ok(job) = control::get_job(&mut ctl, id).await
        {
            job_nodes = job
                .summary
                .map(|s| s.assigned_nodes)
                .unwrap_or_default()
                .into_iter()
                .chain(job.spare_nodes)
                .collect();
        }
        out["fault_burst"] = fault_burst(&fleet, &cordons, cli.faults, &job_nodes).await;
    }

    tokio::time::sleep_until(t0 + secs(cli.warmup + cli.window)).await;
    shared.recording.store(false, Ordering::Relaxed);
    let window = window_start.elapsed().as_secs_f64();
    let after = heartbeat_counters(&shared);
    phases.mark("window-end");
    let during: BTreeMap<String, u64> = shared
        .errors_snapshot()
        .iter()
        .map(|(k, v)| (k.clone(), v - errors_before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    let sent = after[0] - before[0];
    out["heartbeat"] = json!({
        "interval_ms": shared.heartbeat_interval_ms.load(Ordering::Relaxed),
        "lease_ms": shared.lease_ms.load(Ordering::Relaxed),
        "window_s": round3(window),
        "sent": sent,
        "sent_per_s": round3(sent as f64 / window),
        "expected_per_s": round3(n as f64 * 1000.0 / shared.heartbeat_interval_ms.load(Ordering::Relaxed).max(1) as f64),
        "acked": after[1] - before[1],
        "dropped_queue_full": after[2] - before[2],
        "ack_missing": after[3] - before[3],
        "lag": shared.lag.summary(),
        "sessions_lost": shared.sessions_lost.load(Ordering::Relaxed) - lost_before,
        "session_ends_by_kind": during,
    });
    match control::status(&mut ctl).await {
        Ok(s) => out["status_at_window_end"] = nodes_by_state(&s),
        Err(e) => out["status_at_window_end"] = json!({"error": format!("{e:#}")}),
    }

    if let Some(id) = &job_id {
        out["relaunch"] = relaunches(&fleet, &mut ctl, id, cli.relaunches).await;
    }
    out["status_rpc"] = status_latency(&mut ctl, cli.status_samples).await;
    if let Ok(g) = cordons.gaps.lock() {
        out["events_stream_gaps"] = json!(*g);
    }

    if cli.measure_restart {
        drop(ctl);
        phases.mark("await-restart");
        out["restart"] = measure_restart(&fleet, secs(cli.restart_timeout)).await;
    }
    out["errors_total_by_kind"] = json!(shared.errors_snapshot());
    out["registrations_total"] = json!(shared.registrations.load(Ordering::Relaxed));
    phases.mark("done");
    Ok(out)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(dir) = &cli.make_certs {
        return match tls::make_certs(dir, &cli.prefix, cli.agents) {
            Ok(()) => {
                progress(format!(
                    "certificates for {} agents in {}",
                    cli.agents,
                    dir.display()
                ));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vigil-loadgen: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(t) = cli.worker_threads {
        builder.worker_threads(t.max(1));
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vigil-loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    let code = match result {
        Ok(v) => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vigil-loadgen: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Do not wait for thousands of connections to close one by one.
    runtime.shutdown_background();
    code
}
