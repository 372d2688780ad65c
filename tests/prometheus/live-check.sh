#!/usr/bin/env bash
# Checks the Prometheus/Grafana files of deploy/ against a live vigil, with a real Prometheus.
#
#   tests/prometheus/live-check.sh
#
# 1. promtool: check config deploy/prometheus/prometheus.yml, check rules and test rules
#    deploy/prometheus/alerts{,_test}.yml; deploy/grafana/vigil.json is valid JSON.
# 2. Starts, on 127.0.0.1 with a temporary directory: a vigil-coordinator, one vigil-agent with
#    2 simulated GPUs, and `prometheus` scraping both every second with
#    deploy/prometheus/alerts.yml as its rule file (the packaged prometheus service is not used).
# 3. Runs tests/prometheus/live_check.py, which asserts through Prometheus's API and the
#    /metrics endpoints (see its docstring): targets up, every documented metric present (bar a
#    small allowlist of names that appear only after an event), the alert rules loaded, the
#    dashboard's queries valid, the fault metrics after an injected XID, and an OpenMetrics lint
#    of exactly what both components serve.
# Everything it started is stopped and the temporary directory removed, whatever happens.
#
# Needs: prometheus and promtool (Debian: apt-get install prometheus), python3 with
# prometheus_client (pip install prometheus-client), cargo (it runs `cargo build` for the two
# binaries; VIGIL_LIVE_NO_BUILD=1 skips that and uses what is in target/debug).
# Ports (change them if they are taken): VIGIL_LIVE_GRPC_PORT (27770),
# VIGIL_LIVE_COORDINATOR_METRICS_PORT (29770), VIGIL_LIVE_AGENT_METRICS_PORT (29771),
# VIGIL_LIVE_PROMETHEUS_PORT (29090).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD

grpc_port=${VIGIL_LIVE_GRPC_PORT:-27770}
coord_metrics_port=${VIGIL_LIVE_COORDINATOR_METRICS_PORT:-29770}
agent_metrics_port=${VIGIL_LIVE_AGENT_METRICS_PORT:-29771}
prom_port=${VIGIL_LIVE_PROMETHEUS_PORT:-29090}
bin=${VIGIL_BIN_DIR:-$root/target/debug}

say() { printf '==> %s\n' "$*"; }
die() { echo "live-check: $*" >&2; exit 1; }

for tool in prometheus promtool python3; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found (Debian: apt-get install prometheus python3)"
done
python3 -c 'import prometheus_client.openmetrics.parser' 2>/dev/null \
  || die "python3 cannot import prometheus_client (pip install prometheus-client)"

say "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml
say "promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml
say "promtool test rules deploy/prometheus/alerts_test.yml"
promtool test rules deploy/prometheus/alerts_test.yml
say "deploy/grafana/vigil.json is valid JSON"
python3 -m json.tool deploy/grafana/vigil.json >/dev/null

if [ "${VIGIL_LIVE_NO_BUILD:-0}" != 1 ]; then
  say "cargo build --bins -p vigil-coordinator -p vigil-agent"
  cargo build --quiet --bins -p vigil-coordinator -p vigil-agent
fi
for b in vigil-coordinator vigil-agent; do
  [ -x "$bin/$b" ] || die "$bin/$b not found: build it first (cargo build --bins -p $b)"
done

# Refuse to start on a port that is taken, rather than checking someone else's process.
python3 - "$grpc_port" "$coord_metrics_port" "$agent_metrics_port" "$prom_port" <<'PY' \
  || die "a port is in use; set VIGIL_LIVE_*_PORT (see the top of this script)"
import socket, sys
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            sys.exit(f"port {port}: {e}")
PY

tmp=$(mktemp -d "${TMPDIR:-/tmp}/vigil-prom-check.XXXXXX")
pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  if [ "$rc" != 0 ]; then
    for log in "$tmp"/*.log; do
      [ -f "$log" ] || continue
      echo "--- last lines of $(basename "$log")" >&2
      tail -n 15 "$log" >&2
    done
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "starting vigil-coordinator (grpc 127.0.0.1:$grpc_port, metrics :$coord_metrics_port)"
"$bin/vigil-coordinator" --insecure --listen "127.0.0.1:$grpc_port" --metrics-listen "127.0.0.1:$coord_metrics_port" \
  --data-dir "$tmp/coordinator" >"$tmp/coordinator.log" 2>&1 &
pids+=($!)

say "starting vigil-agent with 2 simulated GPUs (metrics :$agent_metrics_port)"
: >"$tmp/agent.faults"
"$bin/vigil-agent" --insecure --coordinator "http://127.0.0.1:$grpc_port" --node-name prom-check-001 \
  --gpu-backend sim --sim-gpus 2 --sim-fault-file "$tmp/agent.faults" --state-dir "$tmp/agent" \
  --metrics-listen "127.0.0.1:$agent_metrics_port" >"$tmp/agent.log" 2>&1 &
pids+=($!)

# The same job names as deploy/prometheus/prometheus.yml (the alerts select on them), scraped
# every second, with the repository's rule file.
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $root/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: vigil-coordinator
    static_configs:
      - targets: ["127.0.0.1:$coord_metrics_port"]
  - job_name: vigil-agent
    static_configs:
      - targets: ["127.0.0.1:$agent_metrics_port"]
EOF
say "promtool check config (the temporary prometheus.yml)"
promtool check config "$tmp/prometheus.yml" >/dev/null

say "starting prometheus on 127.0.0.1:$prom_port ($(prometheus --version 2>&1 | head -n 1))"
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
pids+=($!)

python3 tests/prometheus/live_check.py \
  --prometheus "http://127.0.0.1:$prom_port" \
  --coordinator-metrics "http://127.0.0.1:$coord_metrics_port/metrics" \
  --agent-metrics "http://127.0.0.1:$agent_metrics_port/metrics" \
  --fault-file "$tmp/agent.faults" \
  --docs docs/metrics.md \
  --alerts deploy/prometheus/alerts.yml \
  --dashboard deploy/grafana/vigil.json \
  --pids "$(IFS=,; echo "${pids[*]}")"
