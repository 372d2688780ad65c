#!/usr/bin/env bash
# Local demo cluster: one vigil-coordinator and three vigil-agents with
# SIMULATED GPUs, as real processes on loopback, then `clusterctl status`.
#
#   ./scripts/demo.sh                 build (release), start, show status, run until Ctrl-C
#   DEMO_SECONDS=20 ./scripts/demo.sh stop by itself after 20 s (used by CI)
#   DEMO_PROFILE=dev ./scripts/demo.sh  use the debug build
#   DEMO_PORT=7770                    coordinator gRPC port (metrics on 9770, agents 9771..)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${DEMO_PROFILE:-release}
port=${DEMO_PORT:-7770}
metrics_port=$((port + 2000))
agents=${DEMO_AGENTS:-3}
dir=$(mktemp -d "${TMPDIR:-/tmp}/vigil-demo.XXXXXX")

echo "==> building vigil ($profile profile)"
cargo build --quiet --profile "$profile" --bins -p vigil-coordinator -p vigil-agent -p clusterctl
case "$profile" in dev) bin=target/debug ;; *) bin=target/$profile ;; esac

pids=()
stopped=0
cleanup() {
  trap - EXIT INT TERM
  [ "$stopped" = 1 ] && return
  stopped=1
  echo
  echo "==> stopping the demo cluster (logs kept in $dir)"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

url="http://127.0.0.1:$port"
export VIGIL_COORDINATOR=$url

echo "==> starting vigil-coordinator on 127.0.0.1:$port (metrics :$metrics_port, data $dir/coordinator)"
"$bin/vigil-coordinator" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
  --data-dir "$dir/coordinator" >"$dir/coordinator.out" 2>"$dir/coordinator.log" &
pids+=($!)

for i in $(seq 1 "$agents"); do
  name=$(printf 'sim-gpu-%03d' "$i")
  echo "==> starting vigil-agent $name with 8 SIMULATED GPUs (metrics :$((metrics_port + i)))"
  : >"$dir/$name.faults"
  "$bin/vigil-agent" --coordinator "$url" --node-name "$name" --gpu-backend sim --sim-gpus 8 \
    --sim-fault-file "$dir/$name.faults" --state-dir "$dir/$name" --metrics-listen "127.0.0.1:$((metrics_port + i))" 2>"$dir/$name.log" &
  pids+=($!)
done

echo "==> waiting for $agents nodes to be Ready"
ready=0
for _ in $(seq 1 150); do
  if "$bin/clusterctl" -o json status 2>/dev/null | grep -q "\"Ready\": $agents"; then ready=1; break; fi
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "a demo process exited early; logs in $dir:"; tail -n 20 "$dir"/*.log; exit 1; }
  done
  sleep 0.2
done
if [ "$ready" != 1 ]; then
  echo "nodes did not become Ready within 30 s; logs in $dir:"; tail -n 20 "$dir"/*.log; exit 1
fi

echo
echo "\$ clusterctl status"
"$bin/clusterctl" status
echo
echo "\$ clusterctl nodes"
"$bin/clusterctl" nodes
cat <<MSG

The demo cluster runs on loopback; its GPUs are SIMULATED. Try, in another shell:
  export VIGIL_COORDINATOR=$url
  $bin/clusterctl cordon sim-gpu-002 --reason "fan failure"
  $bin/clusterctl node sim-gpu-002
  kill -9 \$(pgrep -f 'node-name sim-gpu-003')     # watch it go Unreachable, then Lost
  echo "gpu=3 xid=79" >> $dir/sim-gpu-001.faults    # a GPU falls off the bus: auto cordon
  $bin/clusterctl diagnose sim-gpu-001
  curl -s http://127.0.0.1:$metrics_port/metrics | grep ^vigil_
Logs: $dir
MSG

if [ -n "${DEMO_SECONDS:-}" ]; then
  sleep "$DEMO_SECONDS"
  "$bin/clusterctl" status
else
  echo "Press Ctrl-C to stop."
  wait
fi
