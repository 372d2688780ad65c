//! Fixtures shared by the coordinator's scenario tests: simulated time and registrations.

use std::time::Duration;

use vigil_proto::v1;

use crate::node::GpuRecord;
use crate::state::{ClusterState, Effect, Now, Registration};
use crate::step::{Input, step, tick};

/// The wall clock at `t(0)`.
pub const T0: u64 = 1_700_000_000_000;

/// `secs` after the start of a scenario, on both clocks.
pub fn t(secs: u64) -> Now {
    Now {
        mono: crate::time::Instant::from_origin(Duration::from_secs(secs)),
        wall_ms: T0 + secs * 1000,
    }
}

/// An empty state at `t(0)` whose nodes are never Unreachable or Lost within a scenario
/// (an hour of silence): for scenarios about something else than liveness.
pub fn patient_state() -> ClusterState {
    let liveness = crate::config::LivenessConfig {
        unreachable_after: Duration::from_secs(3600),
        lost_after: Duration::from_secs(7200),
        ..crate::config::LivenessConfig::default()
    };
    ClusterState::load(
        Vec::new(),
        Vec::new(),
        liveness,
        crate::config::HealthConfig::default(),
        t(0),
    )
}

/// An empty state at `t(0)` with the default liveness (Lost after 10 s of silence).
pub fn default_state() -> ClusterState {
    ClusterState::load(
        Vec::new(),
        Vec::new(),
        crate::config::LivenessConfig::default(),
        crate::config::HealthConfig::default(),
        t(0),
    )
}

/// The messages of `node`'s history entries of `kind`, oldest first.
pub fn node_events(s: &ClusterState, node: &str, kind: &str) -> Vec<String> {
    s.nodes[node]
        .events
        .iter()
        .filter(|e| e.kind == kind)
        .map(|e| e.message.clone())
        .collect()
}

/// Node `node` registering in `session` with one simulated GPU.
pub fn reg(node: &str, session: u64) -> Registration {
    reg_with_gpus(node, session, 1)
}

/// Node `node` registering in `session` with `gpus` simulated GPUs.
pub fn reg_with_gpus(node: &str, session: u64, gpus: u32) -> Registration {
    Registration {
        identity: crate::identity::HostIdentity {
            machine_id: format!("machine-{node}"),
            boot_id: "boot-1".into(),
        },
        session,
        node: node.to_owned(),
        hostname: node.to_owned(),
        address: "10.0.0.1".into(),
        agent_version: "0.1.0".into(),
        simulated: true,
        gpus: (0..gpus)
            .map(|i| GpuRecord {
                index: i,
                uuid: format!("GPU-{node}-{i}"),
                name: "sim".into(),
                pci_bus_id: String::new(),
                memory_total_bytes: 80 << 30,
                serial: String::new(),
            })
            .collect(),
        workers: Vec::new(),
        fabric: Vec::new(),
    }
}

/// Drive the core the way the engine does, and only that way: one input through [`step`].
/// Panics when the input was refused or came from a session that is not live (a report it
/// carries about an ended attempt is fine): a scenario that expects that uses [`step_raw`].
pub fn step_ok(s: &mut ClusterState, input: Input, now: Now) -> Vec<Effect> {
    let effects = step_raw(s, input, now);
    if let Some(e) = effects.iter().find(|e| {
        matches!(
            e,
            Effect::Refused(_)
                | Effect::Ignored {
                    why: crate::state::Ignored::StaleSession,
                    ..
                }
        )
    }) {
        panic!("input not applied: {e:?}");
    }
    effects
}

/// One input through [`step`], whatever came of it.
pub fn step_raw(s: &mut ClusterState, input: Input, now: Now) -> Vec<Effect> {
    step(s, input, now)
}

/// The passage of time through [`tick`].
pub fn tick_at(s: &mut ClusterState, now: Now) -> Vec<Effect> {
    tick(s, now)
}

/// `node`'s live session (panics when it has none).
pub fn session(s: &ClusterState, node: &str) -> u64 {
    s.nodes[node].session.expect("node is connected")
}

/// A heartbeat from `node`'s live session.
pub fn heartbeat(s: &mut ClusterState, node: &str, hb: v1::Heartbeat, now: Now) -> Vec<Effect> {
    let session = session(s, node);
    step_ok(
        s,
        Input::Heartbeat {
            node: node.to_owned(),
            session,
            heartbeat: hb,
        },
        now,
    )
}

/// An agent event from `node`'s live session.
pub fn agent_event(
    s: &mut ClusterState,
    node: &str,
    event: v1::AgentEvent,
    now: Now,
) -> Vec<Effect> {
    let session = session(s, node);
    step_ok(
        s,
        Input::AgentEvent {
            node: node.to_owned(),
            session,
            event,
        },
        now,
    )
}

/// An agent's report of XID `code` on GPU `gpu`, observed at `at` (unix ms).
pub fn xid(gpu: u32, code: u32, at: u64) -> v1::AgentEvent {
    v1::AgentEvent {
        at_unix_ms: at,
        kind: Some(v1::agent_event::Kind::Xid(v1::XidError {
            gpu_index: gpu,
            xid: code,
            gpu_uuid: String::new(),
        })),
    }
}

/// The commands among `effects`, as (node, command).
pub fn commands(effects: &[Effect]) -> Vec<(String, v1::command::Kind)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Command { node, kind } => Some((node.clone(), kind.clone())),
            _ => None,
        })
        .collect()
}

/// The nodes sent a `StopWorkers` among `effects`.
pub fn stops(effects: &[Effect]) -> Vec<String> {
    commands(effects)
        .into_iter()
        .filter(|(_, k)| matches!(k, v1::command::Kind::StopWorkers(_)))
        .map(|(n, _)| n)
        .collect()
}

/// The `StartWorker`s among `effects`, with their nodes.
pub fn starts(effects: &[Effect]) -> Vec<(String, v1::StartWorker)> {
    commands(effects)
        .into_iter()
        .filter_map(|(n, k)| match k {
            v1::command::Kind::StartWorker(w) => Some((n, w)),
            _ => None,
        })
        .collect()
}

/// A registration through [`step`].
pub fn register_at(s: &mut ClusterState, reg: Registration, now: Now) -> Vec<Effect> {
    step_ok(s, Input::Register(reg), now)
}

/// An operator's job submission through [`step`]: the new job's id.
pub fn submit_at(s: &mut ClusterState, spec: &str, now: Now) -> String {
    let effects = step_ok(
        s,
        Input::SubmitJob {
            spec_toml: spec.to_owned(),
            source: "job.toml".into(),
        },
        now,
    );
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Answer(crate::step::Answer::Submitted { id }) => Some(id.clone()),
            _ => None,
        })
        .expect("submitted")
}

/// A diagnostics record of a run that finished at `now`.
pub fn diagnostics_record(passed: bool, summary: &str, now: Now) -> crate::node::DiagnosticsRecord {
    crate::node::DiagnosticsRecord {
        passed,
        summary: summary.to_owned(),
        output: String::new(),
        duration_ms: 10,
        command: "builtin simulated self-check".into(),
        finished_at_unix_ms: now.wall_ms,
    }
}

/// A diagnostics result (an operator's, a triage's or a burn-in's) from `node`'s live session.
pub fn diagnostics_at(
    s: &mut ClusterState,
    node: &str,
    passed: bool,
    summary: &str,
    now: Now,
) -> Vec<Effect> {
    let session = session(s, node);
    step_ok(
        s,
        Input::Diagnostics {
            node: node.to_owned(),
            session,
            record: diagnostics_record(passed, summary, now),
        },
        now,
    )
}

/// Why [`step`] refused a request (panics when it did not).
pub fn refusal(effects: &[Effect]) -> crate::state::StateError {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Refused(err) => Some(err.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("not refused: {effects:?}"))
}

/// `effects`, and what follows when every checkpoint scan among them is answered at `now` with
/// "nothing newer" (a relaunch's workers start then): for scenarios about something else.
pub fn with_scans_answered(
    s: &mut ClusterState,
    mut effects: Vec<Effect>,
    now: Now,
) -> Vec<Effect> {
    let scans: Vec<(String, v1::ScanCheckpoints)> = commands(&effects)
        .into_iter()
        .filter_map(|(n, k)| match k {
            v1::command::Kind::ScanCheckpoints(c) => Some((n, c)),
            _ => None,
        })
        .collect();
    for (node, scan) in scans {
        let ev = v1::AgentEvent {
            at_unix_ms: now.wall_ms,
            kind: Some(v1::agent_event::Kind::CheckpointScan(v1::CheckpointScan {
                job_id: scan.job_id,
                attempt: scan.attempt,
                newest: None,
                error: String::new(),
                rejected: Vec::new(),
            })),
        };
        effects.extend(agent_event(s, &node, ev, now));
    }
    effects
}

/// `node`'s cordon reason, empty when it is not cordoned.
pub fn cordon_reason(s: &ClusterState, node: &str) -> String {
    s.nodes[node]
        .record
        .cordon
        .as_ref()
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

/// Agent event `kind` from `node`, seen by its agent at `now`, through [`step`].
pub fn event_at(
    s: &mut ClusterState,
    node: &str,
    kind: v1::agent_event::Kind,
    now: Now,
) -> Vec<Effect> {
    let event = v1::AgentEvent {
        at_unix_ms: now.wall_ms,
        kind: Some(kind),
    };
    agent_event(s, node, event, now)
}

/// A [`patient_state`] with nodes `n1` to `n{nodes}` of `gpus` simulated GPUs each, registered
/// at `t(0)`.
pub fn patient_cluster(nodes: u64, gpus: u32) -> ClusterState {
    let mut s = patient_state();
    for i in 1..=nodes {
        register_at(&mut s, reg_with_gpus(&format!("n{i}"), i, gpus), t(0));
    }
    s
}
