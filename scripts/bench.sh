#!/usr/bin/env bash
# Scale benchmark: a real vigil-coordinator against N simulated agents
# (target/release/vigil-loadgen: 8 simulated GPUs each, one gRPC connection
# each) on this machine, for N in BENCH_SIZES. Measures coordinator CPU and
# memory, heartbeat lag, fault-to-cordon (a burst of XID 79), fault-to-relaunch
# of a running job, `clusterctl status` latency, and the reconnect storm after
# kill -9 + restart (and how many agents' leases ran out on the way); then the
# real vigil-agent's own cost. Mutual TLS as in production: the loadgen makes a
# CA and one node certificate per simulated agent (rcgen, ECDSA P-256, as
# deploy/tls/make-certs.sh makes them). Writes docs/benchmarks.md (and the raw
# JSON next to the logs in a temp dir).
#
#   scripts/bench.sh                        all sizes (1000 5000 10000 20000)
#   BENCH_SIZES="1000 5000" scripts/bench.sh
#   BENCH_WARMUP=10 BENCH_WINDOW=30         seconds of warm-up and measurement per size
#   BENCH_RELAUNCHES=5                      timed job relaunches per size
#   BENCH_AGENT_SECONDS=30                  how long the real agent's cost is sampled
#   BENCH_PORT=17770                        coordinator gRPC port (metrics on port+1)
#   BENCH_OUT=docs/benchmarks.md            report path ("-": do not write one)
#   BENCH_SKIP_BUILD=1                      use the binaries already in target/release
#   BENCH_RESULTS=DIR                       add to the results in DIR; the report covers every size there
#   BENCH_SKIP_AGENT=1                      keep DIR/agent.json instead of measuring the agent again
#   BENCH_TLS=0                             plaintext (--insecure) instead of mutual TLS
#   BENCH_NICE=-10                          run the coordinator and loadgen at this nice value
#                                           (root; keeps other work on the machine from skewing them)
set -euo pipefail
cd "$(dirname "$0")/.."

# BENCH_SIZES=" " (blank) runs no size: it only rewrites the report from BENCH_RESULTS.
sizes=${BENCH_SIZES-"1000 5000 10000 20000"}
[ -n "$sizes" ] || sizes=" "
warmup=${BENCH_WARMUP:-10}
window=${BENCH_WINDOW:-30}
relaunches=${BENCH_RELAUNCHES:-5}
agent_seconds=${BENCH_AGENT_SECONDS:-30}
register_timeout=${BENCH_REGISTER_TIMEOUT:-150}
restart_timeout=${BENCH_RESTART_TIMEOUT:-120}
port=${BENCH_PORT:-17770}
metrics_port=$((port + 1))
agent_metrics_port=$((port + 2))
out_md=${BENCH_OUT:-docs/benchmarks.md}
tls=${BENCH_TLS:-1}
nice_value=${BENCH_NICE:-0}
bin=$PWD/target/release
work=$(mktemp -d "${TMPDIR:-/tmp}/vigil-bench.XXXXXX")
certs=$work/certs
if [ "$tls" = 1 ]; then
  url="https://127.0.0.1:$port"
else
  url="http://127.0.0.1:$port"
fi
# BENCH_RESULTS=DIR: keep results there (adding to earlier ones); the report covers every size in it.
results=${BENCH_RESULTS:-$work/results}
mkdir -p "$results"
clk_tck=$(getconf CLK_TCK)

say() { printf '\n==> %s\n' "$*" >&2; }
now_ns() { date +%s%N; }

# Every process this script starts is killed on exit.
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# File descriptors: one socket per agent on each side. Raising the hard limit
# needs CAP_SYS_RESOURCE; without it the soft limit goes as high as allowed.
fd_wanted=65536
fd_note=""
if ulimit -n "$fd_wanted" 2>/dev/null; then
  fd_note="raised to $fd_wanted"
else
  hard=$(ulimit -Hn)
  ulimit -n "$hard" 2>/dev/null || true
  fd_note="could not raise to $fd_wanted (ulimit -n $fd_wanted: not permitted); using the hard limit $hard"
fi
fd_limit=$(ulimit -n)
say "open-file limit per process: $fd_limit ($fd_note)"

if [ "${BENCH_SKIP_BUILD:-0}" != 1 ]; then
  say "building release binaries"
  # --bin applies to every -p given, so each binary is named.
  cargo build --release -p vigil-tests -p vigil-coordinator -p clusterctl -p vigil-agent \
    --bin vigil-loadgen --bin vigil-coordinator --bin clusterctl --bin vigil-agent >&2
fi

# cpu_ticks PID: utime + stime of the process, in clock ticks.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# status_kib PID FIELD: VmRSS / VmHWM in KiB.
status_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
# cores TICKS0 TICKS1 NS0 NS1: cores used over the interval.
cores() { python3 -c "import sys; t0,t1,n0,n1=map(int,sys.argv[1:]); print(round((t1-t0)/$clk_tck/((n1-n0)/1e9),3))" "$@"; }

coord_pid=""
# The burst phase injects XID 79 on many agents at once to time mass cordons: the cordon circuit
# breaker (docs/failure-handling.md) would hold all but its cap, so it is opened wide here.
coord_config="$work/coordinator.toml"
printf '[cordon_breaker]\nmax_fraction = 1.0\nmax_nodes = 1000000\n' >"$coord_config"
transport_flag=(--insecure)
loadgen_tls=()
agent_config="$work/agent.toml"
: >"$agent_config"
if [ "$tls" = 1 ]; then
  printf '[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' \
    "$certs/bench-ca.crt" "$certs/coordinator.crt" "$certs/coordinator.key" >>"$coord_config"
  printf 'coordinator = "%s"\n[tls]\nca = "%s"\ncert = "%s"\nkey = "%s"\n' "$url" \
    "$certs/bench-ca.crt" "$certs/bench-agent.crt" "$certs/bench-agent.key" >"$agent_config"
  transport_flag=()
  loadgen_tls=(--tls "$certs")
fi
# The coordinator and the loadgen run at BENCH_NICE (a negative value needs root). An array,
# not a function: `nice` execs the program, so `$!` is its pid (a function would fork a shell).
niced=(nice -n "$nice_value")
# With the kernel's autogroups (sched_autogroup_enabled), a process's nice value only weighs
# against its own session: the session's autogroup must get the same weight, or other sessions'
# builds still take their equal share of the cores.
autogroup_note="no autogroup change"
if [ "$nice_value" != 0 ] && [ "$(cat /proc/sys/kernel/sched_autogroup_enabled 2>/dev/null)" = 1 ]; then
  if echo "$nice_value" >/proc/self/autogroup 2>/dev/null; then
    autogroup_note="session autogroup nice $nice_value"
  else
    autogroup_note="could not set the session autogroup nice"
  fi
fi
# start_coordinator DATA_DIR LOG: starts it and waits until it serves.
start_coordinator() {
  local data=$1 log=$2
  : >"$log.out"
  "${niced[@]}" "$bin/vigil-coordinator" --config "$coord_config" "${transport_flag[@]}" \
    --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$metrics_port" \
    --data-dir "$data" >>"$log.out" 2>>"$log" &
  coord_pid=$!
  pids+=("$coord_pid")
  for _ in $(seq 1 600); do
    grep -q serving "$log.out" 2>/dev/null && return 0
    kill -0 "$coord_pid" 2>/dev/null || { echo "coordinator exited; see $log" >&2; return 1; }
    sleep 0.05
  done
  echo "coordinator did not serve within 30 s; see $log" >&2
  return 1
}

# wait_phase FILE PHASE PID TIMEOUT_S: until the loadgen writes PHASE (0), exits or times out (1).
wait_phase() {
  local file=$1 phase=$2 pid=$3 limit=$(($4 * 10))
  for _ in $(seq 1 "$limit"); do
    grep -q "^$phase " "$file" 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { grep -q "^$phase " "$file" 2>/dev/null && return 0; return 1; }
    sleep 0.1
  done
  return 1
}

metric() { # metric FILE NAME: first sample of a Prometheus metric (no labels), or null
  awk -v m="$2" '$1 == m { print $2; found = 1; exit } END { if (!found) print "null" }' "$1" 2>/dev/null || echo null
}

scrape() { python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics', timeout=10).read().decode())" 2>/dev/null || true; }

# The real agent's own cost: one vigil-agent with 8 simulated GPUs for agent_seconds.
measure_agent() {
  local dir=$work/agent-cost
  mkdir -p "$dir"
  say "real agent cost: one vigil-agent (8 simulated GPUs) for ${agent_seconds}s"
  start_coordinator "$dir/data" "$dir/coordinator.log"
  "$bin/vigil-agent" --config "$agent_config" "${transport_flag[@]}" --coordinator "$url" \
    --node-name bench-agent --gpu-backend sim --sim-gpus 8 \
    --state-dir "$dir/state" --metrics-listen "127.0.0.1:$agent_metrics_port" 2>"$dir/agent.log" &
  local apid=$!
  pids+=("$apid")
  local settle=5
  sleep "$settle"
  local t0 n0 t1 n1
  t0=$(cpu_ticks "$apid"); n0=$(now_ns)
  sleep $((agent_seconds - settle))
  t1=$(cpu_ticks "$apid"); n1=$(now_ns)
  local rss hwm
  rss=$(status_kib "$apid" VmRSS); hwm=$(status_kib "$apid" VmHWM)
  local c
  c=$(cores "$t0" "$t1" "$n0" "$n1")
  kill -9 "$apid" "$coord_pid" 2>/dev/null || true
  wait "$apid" "$coord_pid" 2>/dev/null || true
  cat >"$results/agent.json" <<JSON
{"seconds": $agent_seconds, "sampled_seconds": $((agent_seconds - settle)), "cpu_cores": $c, "rss_kib": ${rss:-0}, "hwm_kib": ${hwm:-0}}
JSON
  say "agent: cpu $c cores, RSS ${rss} KiB (peak ${hwm} KiB)"
}

# One size: coordinator + loadgen, phases driven by the loadgen's phase file.
run_size() {
  local n=$1 dir=$work/n$n
  mkdir -p "$dir"
  local faults=$((n / 10))
  if [ "$n" -ge 10000 ] || [ "$faults" -gt 150 ]; then faults=150; fi
  say "N=$n agents: warm-up ${warmup}s, window ${window}s, burst of $faults faults, $relaunches relaunches, restart storm"
  local loadavg
  loadavg=$(cut -d' ' -f1-3 /proc/loadavg)
  start_coordinator "$dir/data" "$dir/coordinator.log" || return 1
  local phases=$dir/phases
  : >"$phases"
  local l_t0 l_n0
  l_t0=$(cpu_ticks "$coord_pid"); l_n0=$(now_ns)
  "${niced[@]}" "$bin/vigil-loadgen" "${loadgen_tls[@]}" --coordinator "$url" --agents "$n" --warmup "$warmup" --window "$window" \
    --faults "$faults" --job --relaunches "$relaunches" --measure-restart \
    --register-timeout "$register_timeout" --restart-timeout "$restart_timeout" \
    --phase-file "$phases" >"$dir/loadgen.json" 2>"$dir/loadgen.log" &
  local lpid=$!
  pids+=("$lpid")
  local reg_ok=false win_ok=false restarted=false
  local reg_cores=null cores_w=null lg_cores=null rss_w=0 hwm=0 rss_end=0 queue=null
  local restart_serving_ms=null post_hwm=0
  if wait_phase "$phases" registered "$lpid" $((register_timeout + 30)); then
    reg_ok=true
    reg_cores=$(cores "$l_t0" "$(cpu_ticks "$coord_pid")" "$l_n0" "$(now_ns)")
  fi
  if $reg_ok && wait_phase "$phases" window-start "$lpid" $((warmup + 120)); then
    local t0 n0 g0 t1 n1 g1
    t0=$(cpu_ticks "$coord_pid"); g0=$(cpu_ticks "$lpid"); n0=$(now_ns)
    if wait_phase "$phases" window-end "$lpid" $((window + 120)); then
      win_ok=true
      t1=$(cpu_ticks "$coord_pid"); g1=$(cpu_ticks "$lpid"); n1=$(now_ns)
      cores_w=$(cores "$t0" "$t1" "$n0" "$n1")
      lg_cores=$(cores "$g0" "$g1" "$n0" "$n1")
      rss_w=$(status_kib "$coord_pid" VmRSS)
      scrape >"$dir/metrics-window-end.txt"
      queue=$(metric "$dir/metrics-window-end.txt" vigil_engine_queue_depth)
    fi
  fi
  if wait_phase "$phases" await-restart "$lpid" $((relaunches * 70 + 120)); then
    hwm=$(status_kib "$coord_pid" VmHWM); rss_end=$(status_kib "$coord_pid" VmRSS)
    say "N=$n: kill -9 the coordinator (pid $coord_pid) and restart it on the same data dir and port"
    kill -9 "$coord_pid"
    wait "$coord_pid" 2>/dev/null || true
    local k0
    k0=$(now_ns)
    if start_coordinator "$dir/data" "$dir/coordinator-restarted.log"; then
      restarted=true
      restart_serving_ms=$(( ($(now_ns) - k0) / 1000000 ))
    fi
  else
    hwm=$(status_kib "$coord_pid" VmHWM); rss_end=$(status_kib "$coord_pid" VmRSS)
  fi
  # The loadgen ends by itself once every agent registered again (or it gives up).
  for _ in $(seq 1 $(((restart_timeout + 60) * 10))); do
    kill -0 "$lpid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$lpid" 2>/dev/null || true
  wait "$lpid" 2>/dev/null || true
  local resumed=null full=null behind=null
  if $restarted; then
    post_hwm=$(status_kib "$coord_pid" VmHWM)
    # How the restarted coordinator took its agents back: resumed TLS sessions (tickets from
    # before the kill) or full handshakes.
    scrape >"$dir/metrics-after-restart.txt"
    resumed=$(awk '$1 == "vigil_tls_handshakes_total{kind=\"resumed\"}" { print $2 }' "$dir/metrics-after-restart.txt")
    full=$(awk '$1 == "vigil_tls_handshakes_total{kind=\"full\"}" { print $2 }' "$dir/metrics-after-restart.txt")
    behind=$(grep -c "engine is behind its queue" "$dir/coordinator-restarted.log" || true)
  fi
  kill -9 "$coord_pid" 2>/dev/null || true
  wait "$coord_pid" 2>/dev/null || true
  local loadgen=null
  if [ -s "$dir/loadgen.json" ]; then loadgen=$(tail -n 1 "$dir/loadgen.json"); fi
  local accept_errors
  accept_errors=$(grep -c -i "too many open files" "$dir/coordinator.log" "$dir"/coordinator-restarted.log 2>/dev/null | awk -F: '{ s += $NF } END { print s + 0 }')
  cat >"$results/n$n.json" <<JSON
{"agents": $n, "faults": $faults, "registered_phase": $reg_ok, "window_ok": $win_ok,
 "loadavg_before": "$loadavg", "tls": $([ "$tls" = 1 ] && echo true || echo false),
 "coordinator": {"cpu_cores_window": $cores_w, "cpu_cores_registration": $reg_cores,
   "rss_kib_window_end": ${rss_w:-0}, "hwm_kib": ${hwm:-0}, "rss_kib_before_kill": ${rss_end:-0},
   "engine_queue_depth_window_end": $queue, "restarted": $restarted,
   "restart_to_serving_ms": $restart_serving_ms, "hwm_kib_after_restart": ${post_hwm:-0},
   "too_many_open_files_lines": ${accept_errors:-0},
   "handshakes_after_restart": {"resumed": ${resumed:-null}, "full": ${full:-null}},
   "engine_fell_behind_times": ${behind:-null}},
 "loadgen_cpu_cores_window": $lg_cores,
 "loadgen": $loadgen,
 "logs": "$dir"}
JSON
  if [ "$loadgen" = null ]; then
    say "N=$n: the loadgen printed no result; last lines of its log:"
    tail -n 20 "$dir/loadgen.log" >&2 || true
  fi
  say "N=$n: done (coordinator $cores_w cores in the window, peak RSS $((${hwm:-0} / 1024)) MiB)"
}

# What was measured: the commit and the binary's build time (the working tree may have had local changes).
if [ -n "${sizes// /}" ]; then
  {
    printf 'commit %s (%s local changes under coordinator/ at run time)\n' \
      "$(git log -1 --format='%h %ci' 2>/dev/null || echo unknown)" \
      "$(git status --porcelain coordinator 2>/dev/null | wc -l)"
    printf 'vigil-coordinator binary built %s\n' "$(date -u -r "$bin/vigil-coordinator" '+%Y-%m-%d %H:%M:%S UTC' 2>/dev/null || echo '?')"
    printf 'settings: transport %s; BENCH_WARMUP=%s BENCH_WINDOW=%s BENCH_RELAUNCHES=%s BENCH_NICE=%s (%s); coordinator config: %s\n' \
      "$([ "$tls" = 1 ] && echo 'mutual TLS (rcgen ECDSA P-256, one node certificate per agent)' || echo 'plaintext (--insecure)')" \
      "$warmup" "$window" "$relaunches" "$nice_value" "$autogroup_note" "$(tr '\n' ' ' <"$coord_config" | sed 's#"[^"]*/certs/#"#g')"
    printf 'load average before the runs: %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
  } >"$results/build.txt"
fi
if [ "$tls" = 1 ]; then
  max_n=1
  for n in $sizes; do [ "$n" -gt "$max_n" ] && max_n=$n; done
  say "making a CA and certificates for $max_n agents (vigil-loadgen --make-certs)"
  "$bin/vigil-loadgen" --make-certs "$certs" --agents "$max_n" >&2
fi
if [ "${BENCH_SKIP_AGENT:-0}" = 1 ] && [ -s "$results/agent.json" ]; then
  say "keeping the agent cost in $results/agent.json"
else
  measure_agent
fi
for n in $sizes; do
  run_size "$n" || say "N=$n failed; continuing"
done

if [ "$out_md" != "-" ]; then
  say "writing $out_md"
  BENCH_FD_LIMIT="$fd_limit" BENCH_FD_NOTE="$fd_note" BENCH_WARMUP="$warmup" BENCH_WINDOW="$window" \
    BENCH_RELAUNCHES="$relaunches" BENCH_SIZES="$sizes" \
    python3 - "$results" >"$out_md" <<'PY'
import json, os, platform, subprocess, sys

res = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(res, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def get(d, *path):
    for k in path:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d

def ms(x):
    if x is None:
        return "–"
    return f"{x / 1000:.2f} s" if x >= 1000 else f"{x:.1f} ms"

def mib(kib):
    return "–" if not kib else f"{kib / 1024:.0f} MiB"

def pq(s, unit_ms=True):
    if not s or s.get("count", 0) == 0:
        return "–"
    return f"{ms(s.get('p50_ms'))} / {ms(s.get('p99_ms'))}"

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.rstrip()
    except OSError:
        return "?"

cpu_model = "?"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
except OSError:
    pass

import glob, re
sizes = sorted({int(m.group(1)) for f in glob.glob(os.path.join(res, "n*.json"))
                if (m := re.fullmatch(r"n(\d+)\.json", os.path.basename(f)))})
runs = {n: load(f"n{n}.json") for n in sizes}
agent = load("agent.json")
E = os.environ.get
out = []
w = out.append
w("# Benchmarks: one coordinator, thousands of agents")
w("")
w("Generated by `scripts/bench.sh` (regenerate: `scripts/bench.sh`; sizes: `BENCH_SIZES=\"1000 5000\" scripts/bench.sh`).")
w("Every number below was measured on the machine described here by `scripts/bench.sh` (the results of one "
  "invocation, or of several gathered with `BENCH_RESULTS=DIR`, with the same binaries).")
w("")
w("## Method")
w("")
w("- A real `target/release/vigil-coordinator` (default liveness: 1 s heartbeats, lease 8 s, lost after 10 s; "
  "a fresh data dir (the SQLite store); gRPC on 127.0.0.1) and `target/release/vigil-loadgen` run on the same machine, "
  "sharing its cores.")
w("- **Transport**: mutual TLS as in production, unless a run's settings below say plaintext: `vigil-loadgen "
  "--make-certs` makes a CA, the coordinator's certificate and one node certificate per simulated agent naming "
  "its node (rcgen, ECDSA P-256, as `deploy/tls/make-certs.sh` makes them with openssl); each agent's first session is "
  "a full TLS 1.3 handshake with client authentication; like the real agent, each simulated agent keeps its TLS "
  "client config across sessions, so after the coordinator's restart it resumes its session with the ticket the "
  "coordinator gave it (sealed with the keys in the data dir, `tls-ticket-keys`) when the coordinator accepts it; "
  "the report counts the restarted coordinator's resumed and full handshakes.")
w("- `vigil-loadgen` simulates N agents in one process (tokio multi-thread runtime). Each agent has its own "
  "TCP connection and `AgentService.Connect` stream, registers 8 SIMULATED H100s with UUIDs and serials of its own, and "
  "heartbeats at the interval the coordinator's `Registered` sets. Like the real agent (the same rule, "
  "`vigil_proto::heartbeat_form`), a heartbeat carries the 8 full `GpuSample`s (18 NVLinks each, as the agent's "
  "simulator sends) on the first beat of a session, when GPU health changed and every 30th beat, and GPU telemetry "
  "only (temperature, power, utilisation, memory) otherwise (docs/protocol.md). First connections are paced at 500 in flight; "
  "reconnects use the real agent's backoff (200 ms initial ceiling, doubling, full jitter, 10 s cap).")
w(f"- Timeline per N: all agents register; {E('BENCH_WARMUP')} s warm-up (a 2-node job with 1 spare is submitted "
  f"and started); {E('BENCH_WINDOW')} s measurement window; half-way through the window a burst of XID 79 events "
  "on 150 distinct agents (N/10 below N=10000) at the same moment; then "
  f"{E('BENCH_RELAUNCHES')} timed relaunches of the job; 20 `Status` calls; then `kill -9` of the coordinator, "
  "restart on the same data dir and port, and the reconnect storm.")
w("- **Heartbeat lag**: from the agent's side, heartbeat queued on the stream -> `Ack{seq}` received, every "
  "heartbeat of the window (log-linear histogram, ~3% resolution).")
w("- **Fault-to-cordon**: XID 79 `AgentEvent` queued on the agent's stream -> that node's `cordon` event "
  "received on a `ControlService.WatchEvents` follow stream. *All cordoned within*: first injection -> last "
  "cordon event of the burst.")
w("- **Fault-to-relaunch**: XID 79 on the job's rank-1 node -> `StartWorker` of the next attempt arriving at a "
  "loadgen agent (the simulated workers answer `StartWorker`/`StopWorkers` at once; backoff 0 s). The node is "
  "uncordoned with `--force` between repeats.")
w("- **`status` latency**: `ControlService.Status` round trip (what `clusterctl status` waits for), 20 times.")
w("- Like the real agent, a simulated agent gives up on a `Register` not answered within 5 s, and on a session "
  "the coordinator has not spoken on for its lease (8 s), then retries after its backoff.")
w("- **Restart to all re-registered**: first agent session broken by the `kill -9` -> last agent `Registered` "
  "by the restarted coordinator (includes the coordinator's own start-up).")
w("- **Agents fenced**: each simulated agent keeps a lease across its sessions as the real agent's worker "
  "supervisor does (renewed by every coordinator message, run out after `lease_ms` of silence); a lease that "
  "ran out is counted: on a real host that agent's workers would have been stopped. **Silence per agent**: its "
  "last coordinator message before the kill -> its first message from the restarted coordinator (the "
  "`LeaseRenewed` the coordinator sends as soon as it has the agent's `Register`, for a node whose work it has "
  "not given away, or else its `Registered`): the silence that counts against the lease.")
w("- **Coordinator CPU**: utime+stime from `/proc/PID/stat` over the measurement window, in cores; "
  "**RSS**: `VmRSS` at the end of the window and the peak `VmHWM` before the kill.")
w("- **Agent cost**: one real `vigil-agent --gpu-backend sim --sim-gpus 8` against an otherwise idle "
  f"coordinator; CPU sampled over its last {get(agent, 'sampled_seconds') or '?'} s of {get(agent, 'seconds') or '?'} s, RSS at the end.")
w("")
w("## Machine")
w("")
w(f"- CPU: {cpu_model}, `nproc` = {sh('nproc')}")
w(f"- Memory (`free -g`):")
w("")
w("```")
w(sh("free -g"))
w("```")
w("")
w(f"- Kernel: {platform.release()} ({platform.machine()})")
try:
    for line in open(os.path.join(res, "build.txt")):
        w(f"- Measured: {line.strip()}")
except OSError:
    pass
w(f"- Open files per process: {E('BENCH_FD_LIMIT')} ({E('BENCH_FD_NOTE')})")
w("")
w("## Results")
w("")
hdr = "| | " + " | ".join(f"N = {n}" for n in sizes) + " |"
w(hdr)
w("|---" * (len(sizes) + 1) + "|")

def row(label, f):
    cells = []
    for n in sizes:
        r = runs.get(n)
        try:
            cells.append(f(r) if r else "no result")
        except Exception:
            cells.append("–")
    w(f"| {label} | " + " | ".join(cells) + " |")

L = lambda r, *p: get(r, "loadgen", *p)
row("agents registered (initial)", lambda r: f"{L(r,'initial_registration','registered')} in {L(r,'initial_registration','seconds')} s" if L(r,'initial_registration') else "–")
def states(r):
    b = L(r, 'status_at_window_end', 'by_state') or {}
    return ", ".join(f"{b.get(k, 0)} {k}" for k in ["Ready", "Cordoned", "Degraded", "Unreachable", "Lost"] if b.get(k) or k == "Ready")
row("nodes at window end", states)
row("coordinator CPU (window)", lambda r: f"{get(r,'coordinator','cpu_cores_window')} cores")
row("coordinator CPU (registration)", lambda r: f"{get(r,'coordinator','cpu_cores_registration')} cores")
row("loadgen CPU (window)", lambda r: f"{get(r,'loadgen_cpu_cores_window')} cores")
row("coordinator RSS (window end / peak)", lambda r: f"{mib(get(r,'coordinator','rss_kib_window_end'))} / {mib(get(r,'coordinator','hwm_kib'))}")
row("heartbeats/s (sent / expected)", lambda r: f"{L(r,'heartbeat','sent_per_s'):.0f} / {L(r,'heartbeat','expected_per_s'):.0f}")
row("heartbeat lag p50 / p99", lambda r: pq(L(r,'heartbeat','lag')))
row("heartbeat lag max", lambda r: ms(L(r,'heartbeat','lag','max_ms')))
row("heartbeats unacked / dropped (window)", lambda r: f"{L(r,'heartbeat','ack_missing')} / {L(r,'heartbeat','dropped_queue_full')}")
row("sessions lost in window", lambda r: str(L(r,'heartbeat','sessions_lost')))
row("engine queue depth (window end)", lambda r: str(get(r,'coordinator','engine_queue_depth_window_end')))
row("fault burst (injected / cordoned)", lambda r: f"{L(r,'fault_burst','injected')} / {L(r,'fault_burst','cordoned')}")
row("fault-to-cordon p50 / p99", lambda r: pq(L(r,'fault_burst','fault_to_cordon')))
row("burst: all cordoned within", lambda r: ms(L(r,'fault_burst','all_cordoned_within_ms')))
row("fault-to-relaunch p50 / p99", lambda r: pq(L(r,'relaunch','fault_to_relaunch')) + f" (n={L(r,'relaunch','fault_to_relaunch','count')})" if L(r,'relaunch') else "not measured (no job)")
row("`status` latency p50 / p99", lambda r: pq(L(r,'status_rpc')))
row("coordinator restart to serving", lambda r: ms(get(r,'coordinator','restart_to_serving_ms')))
def restart_cell(r):
    if L(r, 'restart', 'error'):
        return "not measured: " + L(r, 'restart', 'error')
    if L(r, 'restart', 'all_reregistered'):
        return ms(L(r, 'restart', 'first_loss_to_all_registered_ms'))
    return f"never: {L(r,'restart','reregistered')} of {L(r,'restart','registered_before')} back after the timeout"
row("restart to all re-registered", restart_cell)
row("agents fenced in the restart (lease ran out)", lambda r: str(L(r,'restart','fenced')) if L(r,'restart','fenced') is not None else "not measured")
row("silence per agent across the restart p50 / p99 / max", lambda r: f"{pq(L(r,'restart','silence'))} / {ms(L(r,'restart','silence','max_ms'))}")
def handshakes(r):
    h = get(r, 'coordinator', 'handshakes_after_restart') or {}
    if h.get('resumed') is None:
        return "not measured"
    return f"{h['resumed']:.0f} resumed / {h['full']:.0f} full"
row("TLS handshakes of the restarted coordinator (resumed / full)", handshakes)
row("agents whose lease was renewed before their registration was stepped", lambda r: str(L(r,'restart','early_lease_renewals')) if L(r,'restart','early_lease_renewals') is not None else "not measured")
row("restarted engine: times it fell over 1 s behind its queue (silence then judged as of its backlog)", lambda r: str(get(r,'coordinator','engine_fell_behind_times')))
row("coordinator peak RSS after restart", lambda r: mib(get(r,'coordinator','hwm_kib_after_restart')))
row("transport; load average before the run", lambda r: f"{'mutual TLS' if r.get('tls') else 'plaintext'}; {r.get('loadavg_before', '?')}")
w("")
w("p50 / p99 are over every sample of the run: heartbeats of the window, the nodes of the burst, the relaunches, the `Status` calls.")
w("")
w("### Real agent cost")
w("")
if agent:
    w(f"One `vigil-agent` (8 simulated GPUs, 1 s heartbeats): **{agent['cpu_cores'] * 100:.2f}% of a core**, "
      f"RSS **{agent['rss_kib'] / 1024:.1f} MiB** (peak {agent['hwm_kib'] / 1024:.1f} MiB).")
else:
    w("Not measured (the run failed).")
w("")

w("## Targets")
w("")
w("The issue's targets are for 10,000 agents on this 2-core machine, with the load generator sharing it.")
w("")
w("| target | measured (N = 10000) | verdict | if not met: measured cause, next step |")
w("|---|---|---|---|")
r10 = runs.get(10000)
def verdict(ok):
    return "not measured" if ok is None else ("**met**" if ok else "**missed**")
SA = "[scale-analysis.md](scale-analysis.md"
CPU_WHY = f"the coordinator's CPU on cores shared with the load generator: {SA}#what-limits-it-now-measured)"
def target(name, value, ok, why=CPU_WHY):
    w(f"| {name} | {value} | {verdict(ok)} | {'' if ok else why} |")
if r10:
    reg = L(r10, 'initial_registration', 'registered') or 0
    b = L(r10, 'status_at_window_end', 'by_state') or {}
    ready = sum(b.get(k, 0) for k in ["Ready", "Cordoned", "Degraded"])
    lost = L(r10, 'heartbeat', 'sessions_lost')
    p99 = L(r10, 'heartbeat', 'lag', 'p99_ms')
    ok = reg >= 10000 and ready >= 10000 and lost == 0 and p99 is not None and p99 < 1000
    target("10,000 agents served (all registered, none Unreachable or Lost, no session lost, heartbeat lag p99 < 1 heartbeat)",
           f"{reg} registered, {ready} reachable, {lost} sessions lost, lag p99 {ms(p99)}", ok)
    c99 = L(r10, 'fault_burst', 'fault_to_cordon', 'p99_ms')
    target("fault-to-cordon p99 < 1 s", ms(c99), None if c99 is None else c99 < 1000 and L(r10,'fault_burst','cordoned') == L(r10,'fault_burst','injected'))
    wi = L(r10, 'fault_burst', 'all_cordoned_within_ms')
    target(f"{r10.get('faults')}-node burst cordoned within 2 s", ms(wi), None if wi is None else wi < 2000)
    h = get(r10, 'coordinator', 'hwm_kib')
    target("coordinator RSS < 1 GiB", f"peak {mib(h)}", None if not h else h < 1024 * 1024,
           "memory per connection (TLS, HTTP/2 and gRPC buffers) and per node; next: a heap profile of one "
           f"connection, then smaller buffers ({SA}#memory))")
    rs = L(r10, 'restart', 'first_loss_to_all_registered_ms')
    all_back = L(r10, 'restart', 'all_reregistered')
    storm = ("the restarted coordinator takes agents back at about 1,000 a second here (TCP, a resumed TLS handshake "
             "and an HTTP/2 connection each, before even the early lease renewal can reach them), so the last of "
             "10,000 arrive after their 8 s lease; runs vary, as handshakes abandoned at the agents' 3 s connect "
             "timeout cost them their session tickets; next: more tickets per handshake and a connect timeout that "
             f"grows while the agent holds a lease ({SA}#restart))")
    target("restart to all agents re-registered within 8 s", restart_cell(r10), None if all_back is None else bool(all_back) and rs is not None and rs < 8000, storm)
    fenced = L(r10, 'restart', 'fenced')
    target("coordinator kill -9: 0 agents fenced", "not measured" if fenced is None else f"{fenced} fenced", None if fenced is None else fenced == 0 and bool(all_back), storm)
    target("mutual TLS on", "yes" if r10.get('tls') else "no: plaintext run", bool(r10.get('tls')))
else:
    for name in ["10,000 agents served", "fault-to-cordon p99 < 1 s", "150-node burst cordoned within 2 s",
                 "coordinator RSS < 1 GiB", "restart to all agents re-registered within 8 s"]:
        target(name, "N = 10000 not run", None)
target("HA leader kill -9 (3-member etcd): every agent with the new leader within the lease, 0 fenced",
       "not measured by this script at scale: the failover tests (tests/tests/ha.rs) run a handful of agents", None,
       "the load generator dials one coordinator; next: `vigil-loadgen` following the leader among several "
       f"coordinators, and a 3-member etcd in this script ({SA}#next-steps-in-order-of-what-they-buy))")
target("agent on a real GPU (NVML backend): RSS and CPU",
       "not measured: the simulated agent is measured below; a GPU machine was not lent to this run", None,
       "no GPU on this machine")
if agent:
    target("agent RSS < 20 MiB", f"{agent['rss_kib'] / 1024:.1f} MiB", agent['rss_kib'] < 20 * 1024)
    target("agent CPU < 1% of a core", f"{agent['cpu_cores'] * 100:.2f}%", agent['cpu_cores'] < 0.01)
w("")
others = [n for n in sizes if n != 10000 and runs.get(n)]
if others:
    w("At the other sizes:")
    w("")
    for n in others:
        r = runs[n]
        w(f"- N = {n}: fault-to-cordon p99 {ms(L(r,'fault_burst','fault_to_cordon','p99_ms'))}, burst of "
          f"{r.get('faults')} cordoned within {ms(L(r,'fault_burst','all_cordoned_within_ms'))}, "
          f"peak RSS {mib(get(r,'coordinator','hwm_kib'))}, restart to all re-registered "
          f"{restart_cell(r)}.")
    w("")
w("What limits the missed targets, and what was changed to get here: [scale-analysis.md](scale-analysis.md)")
w("(written by hand; the tables above are regenerated by each run). Micro-benchmarks of the hot pure")
w("functions: [microbenchmarks.md](microbenchmarks.md).")
w("")
w("## Notes")
w("")
for n in sizes:
    r = runs.get(n)
    if not r:
        w(f"- N = {n}: no result (see the run's logs).")
        continue
    if r.get("loadgen") is None:
        w(f"- N = {n}: the load generator printed no result; logs were in `{r.get('logs')}`.")
    ir = get(r, "loadgen", "initial_registration") or {}
    if ir and not ir.get("all_registered"):
        tot = get(r, "loadgen", "errors_total_by_kind") or {}
        w(f"- N = {n}: only {ir.get('registered')} of {n} agents were registered when the load generator stopped "
          f"waiting ({ir.get('seconds')} s): {tot.get('register timed out', 0)} registrations were not answered within "
          f"5 s and {tot.get('lease expired', 0)} registered sessions went 8 s without a word from the coordinator; "
          f"each gave up and retried, so the coordinator kept processing registrations nobody waited for any more. "
          f"The rest of this run (burst, job, restart) had no registered agents to work with.")
    errs = get(r, "loadgen", "relaunch", "errors")
    if errs:
        w(f"- N = {n}: relaunch errors: {'; '.join(errs)}")
    if get(r, "coordinator", "too_many_open_files_lines"):
        w(f"- N = {n}: the coordinator logged {r['coordinator']['too_many_open_files_lines']} 'Too many open files' lines.")
    ends = get(r, "loadgen", "heartbeat", "session_ends_by_kind")
    if ends:
        w(f"- N = {n}: sessions ended or failed during the window: {ends}")
    st = get(r, "loadgen", "restart", "session_ends_and_failures_by_kind")
    if st:
        w(f"- N = {n}: during the reconnect storm, session ends and failed attempts by kind: {st}")
print("\n".join(out))
PY
fi
say "raw results and logs: $work"
cat "$results"/*.json
