#!/usr/bin/env bash
# One look at a real GPU host through vigil's NVML backend; every output lands in OUT_DIR.
#
#   scripts/device-nvml-check.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds release builds of vigil-agent, vigil-coordinator and clusterctl.
# It records the driver's own view (nvidia-smi), runs `vigil-agent --check-gpus`
# (text and --json), then a one-node cluster on loopback (plaintext, temporary
# directories): clusterctl status / nodes / node / diagnose and the agent's
# /metrics. Both daemons are stopped at the end. About a minute; at most 8 files
# are written (the device tool's limit). GPU_BACKEND=sim runs the same on a host
# without a GPU, to test this script.
set -u
BIN=${1:?usage: $0 BIN_DIR OUT_DIR}
OUT=${2:?usage: $0 BIN_DIR OUT_DIR}
BACKEND=${GPU_BACKEND:-nvml}
NODE=${NODE_NAME:-gpu-node-1}
COORD_PORT=${COORD_PORT:-17770}
COORD=http://127.0.0.1:$COORD_PORT
mkdir -p "$OUT"
BIN=$(cd "$BIN" && pwd)
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
SUMMARY=$OUT/summary.txt
say() { echo "[$(date +%T)] $*" | tee -a "$SUMMARY"; }
# run FILE TIMEOUT CMD...: appends the command, its output and exit code to FILE.
run() {
    local file=$1 limit=$2
    shift 2
    { echo "\$ $*"; timeout "$limit" "$@" 2>&1; echo "[exit $?]"; echo; } >>"$file"
}

say "host: $(uname -a)"
say "libc: $(ldd --version 2>&1 | head -1)"
say "libnvidia-ml in ldconfig: $(ldconfig -p 2>/dev/null | grep -c 'libnvidia-ml.so.1') entries"
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

SMI=$OUT/nvidia-smi.txt
run "$SMI" 30 nvidia-smi
{ echo "\$ nvidia-smi -q | head -250"; timeout 60 nvidia-smi -q 2>&1 | head -250; echo; } >>"$SMI"
run "$SMI" 30 sh -c 'ldconfig -p | grep -i nvidia-ml; ls -l /usr/local/nvidia/lib64/libnvidia-ml* /usr/lib/x86_64-linux-gnu/libnvidia-ml* 2>&1'

# --check-gpus as an operator would run it; if the library is not found where
# the dynamic loader looks, once more with its folder on LD_LIBRARY_PATH.
CHECK=$OUT/check-gpus.txt
run "$CHECK" 60 "$BIN/vigil-agent" --check-gpus --gpu-backend "$BACKEND" --node-name "$NODE"
if grep -q '^\[exit 69\]' "$CHECK"; then
    lib=$(find / -xdev -name 'libnvidia-ml.so.1' 2>/dev/null | head -1)
    if [ -n "$lib" ]; then
        export LD_LIBRARY_PATH=$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        say "exit 69 with the default library lookup; found $lib, retrying with LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        run "$CHECK" 60 "$BIN/vigil-agent" --check-gpus --gpu-backend "$BACKEND" --node-name "$NODE"
    fi
fi
say "check-gpus: $(grep '^\[exit' "$CHECK" | tr '\n' ' ')"
timeout 60 "$BIN/vigil-agent" --check-gpus --json --gpu-backend "$BACKEND" --node-name "$NODE" \
    >"$OUT/check-gpus.json" 2>>"$CHECK"
say "check-gpus --json: exit $?"

# A one-node cluster on loopback.
"$BIN/vigil-coordinator" --insecure --listen "127.0.0.1:$COORD_PORT" \
    --metrics-listen 127.0.0.1:0 --data-dir "$WORK/coord" >"$OUT/coordinator.log" 2>&1 &
COORD_PID=$!
sleep 1
RUST_LOG=${AGENT_LOG:-info,vigil_agent=debug} "$BIN/vigil-agent" --insecure \
    --gpu-backend "$BACKEND" --node-name "$NODE" --coordinator "$COORD" \
    --state-dir "$WORK/agent" --metrics-listen 127.0.0.1:19771 >"$OUT/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 40); do
    timeout 5 "$BIN/clusterctl" --insecure --coordinator "$COORD" nodes 2>/dev/null | grep -q "$NODE" && break
    sleep 0.5
done
say "agent registered (or 20 s passed); waiting 10 s for heartbeats"
sleep 10

CL=$OUT/cluster.txt
ctl() { run "$CL" 60 "$BIN/clusterctl" --insecure --coordinator "$COORD" "$@"; }
ctl status
ctl nodes
ctl node "$NODE"
ctl -o json node "$NODE"
ctl diagnose --timeout 30s "$NODE"
ctl -o json diagnose --timeout 30s "$NODE"
ctl events
say "clusterctl: $(grep '^\[exit' "$CL" | tr '\n' ' ')"

{
    echo "\$ curl -s http://127.0.0.1:19771/metrics | grep -E '^(# (HELP|TYPE) )?(vigil_|DCGM_)'"
    if command -v curl >/dev/null; then
        curl -s --max-time 10 http://127.0.0.1:19771/metrics
    else
        python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:19771/metrics", timeout=10).read().decode())'
    fi | grep -E '^(# (HELP|TYPE) )?(vigil_|DCGM_)'
} >"$OUT/metrics.txt" 2>&1
say "metrics: $(grep -vc '^#' "$OUT/metrics.txt") lines"

kill -TERM "$AGENT_PID" 2>/dev/null
sleep 2
kill -TERM "$COORD_PID" 2>/dev/null
wait "$AGENT_PID"
say "agent exited: $?"
wait "$COORD_PID"
say "coordinator exited: $?"
rm -rf "$WORK"
say "done"
