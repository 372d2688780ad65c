#!/usr/bin/env bash
# Local demo cluster: a vigil-coordinator and three vigil-agents with SIMULATED
# GPUs, as real processes on loopback. It submits a 2-node job (with 1 spare)
# running the fake trainer, breaks a GPU of one of its nodes mid-run (XID 79),
# and shows vigil cordon the node and restart the job on the spare from its
# last complete checkpoint, with the time each step took.
#
#   ./scripts/demo.sh                   build (release), run the story, keep running until Ctrl-C
#   DEMO_SECONDS=5 ./scripts/demo.sh    stop by itself 5 s after the story (used by CI)
#   DEMO_PROFILE=dev ./scripts/demo.sh  use the debug build
#   DEMO_PORT=7770                      coordinator gRPC port (metrics on port+2000, agents above)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${DEMO_PROFILE:-release}
port=${DEMO_PORT:-7770}
metrics_port=$((port + 2000))
agents=3
dir=$(mktemp -d "${TMPDIR:-/tmp}/vigil-demo.XXXXXX")

say() { printf '\n==> %s\n' "$*"; }
ms_now() { date +%s%3N; }
elapsed() { local ms=$(( $(ms_now) - $1 )); printf '%d.%03d s' $((ms / 1000)) $((ms % 1000)); }

# etcd-client (the HA store) generates its gRPC code with protoc while building.
if ! command -v protoc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "protoc missing: installing Debian's protobuf-compiler (the etcd client's build needs it)"
    apt-get update -q >/dev/null && apt-get install -y -q protobuf-compiler >/dev/null
  else
    echo "demo: protoc not found; install it first (Debian/Ubuntu: sudo apt-get install protobuf-compiler)" >&2
    exit 1
  fi
fi

say "building vigil ($profile profile; the first build compiles every dependency and takes several minutes)"
# Cargo's own progress (one line per crate compiled), so a long first build is not silence.
cargo build --profile "$profile" --bins -p vigil-coordinator -p vigil-agent -p clusterctl -p vigil-tests
case "$profile" in dev) bin=$PWD/target/debug ;; *) bin=$PWD/target/$profile ;; esac
ctl() { "$bin/clusterctl" --insecure "$@"; }

pids=()
stopped=0
cleanup() {
  trap - EXIT INT TERM
  [ "$stopped" = 1 ] && return
  stopped=1
  say "stopping the demo cluster (logs and checkpoints kept in $dir)"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
fail() { echo "demo failed: $*; logs in $dir:" >&2; tail -n 15 "$dir"/*.log >&2; exit 1; }

url="http://127.0.0.1:$port"
export VIGIL_COORDINATOR=$url

say "starting vigil-coordinator on 127.0.0.1:$port (metrics :$metrics_port, data $dir/coordinator)"
"$bin/vigil-coordinator" --insecure --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
  --data-dir "$dir/coordinator" >"$dir/coordinator.out" 2>"$dir/coordinator.log" &
pids+=($!)
# Jobs run as whoever runs the demo (said explicitly: as root, the agent refuses to run jobs
# as root unless told so), and only under the demo's own directory.
# The demo's agents stop their jobs when the demo stops (a real agent leaves them running under
# their shims across its own restarts: keep_workers_on_shutdown, default true).
cat >"$dir/agent.toml" <<TOML
keep_workers_on_shutdown = false
[workers]
run_as = "$(id -un)"
allowed_roots = ["$dir"]
TOML
for i in $(seq 1 "$agents"); do
  name=$(printf 'sim-gpu-%03d' "$i")
  : >"$dir/$name.faults"
  echo "    vigil-agent $name with 8 SIMULATED GPUs (metrics :$((metrics_port + i)), faults $dir/$name.faults)"
  "$bin/vigil-agent" --insecure --config "$dir/agent.toml" --coordinator "$url" --node-name "$name" --gpu-backend sim --sim-gpus 8 \
    --sim-fault-file "$dir/$name.faults" --state-dir "$dir/$name" \
    --metrics-listen "127.0.0.1:$((metrics_port + i))" 2>"$dir/$name.log" &
  pids+=($!)
done

# wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.1 s.
wait_for() {
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 $((limit * 10))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || fail "a demo process exited early"; done
    sleep 0.1
  done
  fail "$what did not happen within $limit s"
}
ready_nodes() { ctl -o json status | grep -q "\"Ready\": $agents"; }
wait_for 30 "$agents nodes Ready" ready_nodes

echo
echo "\$ clusterctl status"
ctl status

mkdir -p "$dir/work" "$dir/ckpt"
cat >"$dir/job.toml" <<TOML
name = "opt-demo"
nodes = 2
gpus_per_node = 8
command = ["$bin/fake-trainer"]
workdir = "$dir/work"
spare_nodes = 1
env = { FAKE_STEP_MS = "50", FAKE_CKPT_EVERY = "20", FAKE_CKPT_DIR = "$dir/ckpt", FAKE_CKPT_LAYOUT = "marker" }
[checkpoint]
dir = "$dir/ckpt"
layout = "marker"
[restart]
max_restarts = 5
backoff = "0s"
stop_grace = "5s"
[progress]
hang_timeout = "30s"
TOML
say "submitting a 2-node job with 1 spare node: the fake trainer, a step every 50 ms, a checkpoint every 20 steps"
echo "\$ clusterctl job submit $dir/job.toml"
out=$(ctl job submit "$dir/job.toml")
echo "$out"
job=$(echo "$out" | awk '{print $2}')

job_json() { ctl -o json job show "$job"; }
has_checkpoint() { job_json | grep -q '"last_checkpoint_step": [0-9]'; }
wait_for 60 "a first complete checkpoint" has_checkpoint
echo
echo "\$ clusterctl jobs"
ctl jobs

# The job's nodes now (`assigned_nodes` of `job show -o json`), one per line.
job_nodes() {
  job_json | awk '/"assigned_nodes"/ {on = 1; next} on && /\]/ {exit} on {gsub(/[",[:space:]]/, ""); if ($0 != "") print}'
}
nodes1=$(job_nodes)
victim=$(echo "$nodes1" | sed -n 2p)
[ -n "$victim" ] || fail "cannot tell the job's nodes"
say "breaking GPU 3 of $victim (node rank 1): XID 79, the GPU has fallen off the bus"
echo "\$ echo 'gpu=3 xid=79' >> $dir/$victim.faults"
t0=$(ms_now)
echo "gpu=3 xid=79" >>"$dir/$victim.faults"
is_cordoned() { ctl -o json node "$victim" | grep -q '"reason": "XID 79'; }
wait_for 30 "the cordon of $victim" is_cordoned
t_cordon=$(elapsed "$t0")
attempt2_running() {
  local j; j=$(job_json)
  echo "$j" | grep -q '"attempt": 2,' && [ "$(echo "$j" | grep -c '"state": "running"')" = 2 ]
}
wait_for 60 "attempt 2 running" attempt2_running
t_relaunch=$(elapsed "$t0")
progress_after() { job_json | grep -q '"progress_step": [0-9]'; }
wait_for 30 "attempt 2 progress" progress_after
t_progress=$(elapsed "$t0")

echo
echo "\$ clusterctl nodes"
ctl nodes
echo
echo "\$ clusterctl job show $job"
ctl job show "$job"
resumed=$(job_json | grep '"resumed_from_step"' | tail -1 | tr -dc '0-9')

# Every claim below is checked first: a false one fails the demo (and CI's run of it).
nodes2=$(job_nodes)
echo "$nodes2" | grep -qx "$victim" && fail "attempt 2 still runs on $victim"
spare=$(echo "$nodes2" | grep -vxF "$nodes1" | head -1)
[ -n "$spare" ] || fail "attempt 2 did not move to the spare node (nodes: $(echo $nodes2))"
[ -n "$resumed" ] || fail "attempt 2 did not say which checkpoint it resumed from"
ckpt=$(printf '%s/ckpt/step_%08d' "$dir" "$resumed")
[ -s "$ckpt/COMPLETE" ] || fail "attempt 2 resumed from step $resumed, but $ckpt is not a complete checkpoint"
newer=$(ls -d "$dir"/ckpt/step_* 2>/dev/null | while read -r d; do
  step=$((10#${d##*step_}))
  # A complete checkpoint newer than the one resumed from, written before the relaunch.
  if [ "$step" -gt "$resumed" ] && [ -s "$d/COMPLETE" ] && ! grep -q "attempt 2" "$d"/* 2>/dev/null; then echo "$d"; fi
done | head -1)
[ -z "$newer" ] || fail "attempt 2 resumed from step $resumed, but $newer was complete before it"
for n in $(ctl -o json nodes | awk -F'"' '/"name"/ {print $4}'); do
  [ "$n" = "$victim" ] && continue
  ctl -o json node "$n" | grep -q '"cordon": null' || fail "node $n was cordoned too"
done

cat <<MSG

What happened (GPUs are SIMULATED; everything else is real processes on loopback):
  XID 79 injected -> $victim cordoned automatically:  $t_cordon
  XID 79 injected -> attempt 2 started on the spare ($spare): $t_relaunch
  XID 79 injected -> attempt 2 progress reported:     $t_progress (progress comes with heartbeats, every 1 s)
  attempt 2 resumed from the last complete checkpoint, step $resumed; no other node was cordoned.

Try, in another shell:
  export VIGIL_COORDINATOR=$url VIGIL_INSECURE=1   # this demo is plaintext (insecure = true)
  $bin/clusterctl job show $job
  $bin/clusterctl diagnose $victim             # fails: GPU 3 has not recovered from XID 79
  echo 'gpu=3 ok' >> $dir/$victim.faults      # "repair" the simulated GPU
  $bin/clusterctl diagnose $victim; $bin/clusterctl uncordon $victim
  $bin/clusterctl job cancel $job
  curl -s http://127.0.0.1:$metrics_port/metrics | grep ^vigil_
Logs, worker logs and checkpoints: $dir
MSG

if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS"
else
  echo "Press Ctrl-C to stop."
  wait
fi
