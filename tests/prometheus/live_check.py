#!/usr/bin/env python3
"""Assertions of the live Prometheus check (run by tests/prometheus/live-check.sh).

live-check.sh starts a vigil-coordinator, one vigil-agent (simulated GPUs) and a Prometheus
scraping both every second with deploy/prometheus/alerts.yml loaded, then runs this script,
which checks, through Prometheus's HTTP API and the /metrics endpoints themselves:

  1. both scrape targets are up, with no scrape error (Prometheus parsed what we serve);
  2. up{job="vigil-coordinator"} and up{job="vigil-agent"} are 1;
  3. every metric documented in docs/metrics.md is in Prometheus, from the component whose
     table documents it, except the names in ALLOWED_ABSENT (each with its reason); and every
     vigil_ metric Prometheus has is documented;
  4. Prometheus loaded every alert of deploy/prometheus/alerts.yml and evaluates each without
     error; each alert's runbook_url names an existing section of the docs;
  5. every PromQL query of deploy/grafana/vigil.json runs (Grafana variables substituted), returns
     data where it must, and every vigil_ name in the dashboard and the alerts is documented; the
     dashboard's panels have unique ids, do not overlap and all use the datasource variable;
  6. after an XID 79 injected into simulated GPU 0, the fault metrics appear (cordon by rule xid,
     XID counters of both components, fault-to-cordon histogram, node Cordoned, GPU unhealthy);
  7. /metrics of both components, fetched as Prometheus does (Accept: application/openmetrics-text),
     is served as OpenMetrics 1.0.0, ends with "# EOF", parses with the strict OpenMetrics parser
     of prometheus_client (pip install prometheus-client), and each family has HELP text and the
     type docs/metrics.md gives it.

Exit status 0 when everything holds; otherwise every failed assertion is listed and it exits 1.
Only the standard library and prometheus_client are used.
"""

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

# Documented metrics that a quiet cluster (one coordinator, one agent with simulated H100s, no
# jobs, no faults yet) does not export: a labelled family has no series before its first event.
# Keep this list small and give each entry its reason; the names must stay documented.
ALLOWED_ABSENT = {
    # -- appear only after an event --
    "vigil_cordons_total": "first cordon (asserted present after the injected XID)",
    "vigil_xid_errors_total": "first XID reported by an agent (asserted after the injected XID)",
    "vigil_agent_xid_errors_total": "first XID seen by the agent (asserted after the injected XID)",
    "vigil_diagnostics_total": "first diagnostic run reported to the coordinator",
    "vigil_job_restarts_total": "first job restart (one series per reason)",
    "vigil_job_checkpoint_age_seconds": "a Running job with a complete checkpoint",
    # -- per-job goodput and straggler series: one per job, and the quiet cluster runs none --
    "vigil_job_checkpoint_interval_seconds": "a job (one series per job)",
    "vigil_job_ettr_ratio": "a job (one series per job)",
    "vigil_job_lost_time_seconds": "a job (one series per job and phase)",
    "vigil_job_productive_time_seconds": "a job (one series per job)",
    "vigil_job_stragglers": "a Running job (one series per job)",
    "vigil_job_suggested_checkpoint_interval_seconds": "a job with a measured save time and MTBF",
    "vigil_job_wall_time_seconds": "a job (one series per job)",
    "vigil_agent_messages_throttled_total": "first throttled agent message (one series per node)",
    "vigil_control_calls_denied_total": "first clusterctl call refused for its role (needs TLS)",
    "vigil_remediations_total": "first remediation step that ends (one series per action and outcome)",
    # -- the agent's fabric series (node_exporter's names): the quiet cluster's host has no
    #    InfiniBand port or RoCE interface, so its agent watches none and exports none --
    "node_infiniband_link_downed_total": "a host with InfiniBand ports (none on the test host)",
    "node_infiniband_link_error_recovery_total": "a host with InfiniBand ports (none on the test host)",
    "node_infiniband_symbol_error_total": "a host with InfiniBand ports (none on the test host)",
    "node_infiniband_port_errors_received_total": "a host with InfiniBand ports (none on the test host)",
    "node_infiniband_port_transmit_discards_total": "a host with InfiniBand ports (none on the test host)",
    "node_infiniband_state_id": "a host with InfiniBand ports (none on the test host)",
    "node_infiniband_physical_state_id": "a host with InfiniBand ports (none on the test host)",
    "node_infiniband_rate_bytes_per_second": "a host with InfiniBand ports (none on the test host)",
    "node_network_carrier_changes_total": "a host with a RoCE interface (none on the test host)",
    "node_network_up": "a host with a RoCE interface (none on the test host)",
    "node_network_speed_bytes": "a host with a RoCE interface (none on the test host)",
    # -- not supported by the simulated GPU (an H100 remaps rows instead of retiring pages) --
    "vigil_gpu_retired_pages": "pre-Ampere GPUs only",
    "vigil_gpu_retired_pages_pending": "pre-Ampere GPUs only",
}

# Allowed-absent names that must be there once XID 79 has been injected on GPU 0.
AFTER_FAULT = ["vigil_cordons_total", "vigil_xid_errors_total", "vigil_agent_xid_errors_total"]

OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
JOBS = {"coordinator": "vigil-coordinator", "agent": "vigil-agent"}

# Values substituted for Grafana's variables when running the dashboard's queries.
GRAFANA_VARS = {
    "__rate_interval": "1m",
    "__range": "1h",
    "__interval": "15s",
    "latency_window": "1h",
    "node": ".*",
    "coordinator_job": "vigil-coordinator",
    "agent_job": "vigil-agent",
}

errors = []
pids = []


def fail(msg):
    errors.append(msg)
    print(f"  FAIL: {msg}")


def ok(msg):
    print(f"  ok: {msg}")


def check_processes():
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise SystemExit(f"live check: process {pid} (started by live-check.sh) exited early")


def http_get(url, headers=None, timeout=10):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode("utf-8", "replace")


class Prometheus:
    def __init__(self, url):
        self.url = url.rstrip("/")

    def api(self, path, **params):
        q = urllib.parse.urlencode(params)
        status, _, body = http_get(f"{self.url}/api/v1/{path}" + (f"?{q}" if q else ""))
        try:
            doc = json.loads(body)
        except ValueError:
            doc = {"status": "error", "error": body[:200]}
        if status != 200 or doc.get("status") != "success":
            raise RuntimeError(f"{path} {params}: HTTP {status}: {doc.get('error', body[:200])}")
        return doc["data"]

    def query(self, expr):
        return self.api("query", query=expr)["result"]

    def value(self, expr):
        """The single value of an instant query, or None when it returns nothing."""
        res = self.query(expr)
        if not res:
            return None
        if len(res) != 1:
            raise RuntimeError(f"{expr}: {len(res)} series, expected one")
        return float(res[0]["value"][1])


def wait_until(what, fn, timeout):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        check_processes()
        try:
            last = fn()
            if last is True:
                return True
        except (RuntimeError, OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(0.5)
    fail(f"{what}: not within {timeout} s (last: {last})")
    return False


# ---------------------------------------------------------------------------------------------
# docs/metrics.md

# A documented metric's row: vigil's own names, and the agent's fabric series under
# node_exporter's names (docs/metrics.md, "Fabric").
FABRIC_PREFIXES = ("node_infiniband_", "node_network_")
METRIC_ROW = r"^\|\s*`((?:vigil|node_infiniband|node_network)_[a-z0-9_]+)`\s*\|\s*([a-z]+)\s*\|"


def parse_docs(path):
    """{metric name: {component: type}} from the tables of docs/metrics.md."""
    names = {}
    component = None
    for line in open(path, encoding="utf-8"):
        h = re.match(r"^## (.+?)\s*$", line)
        if h:
            title = h.group(1).strip().lower()
            component = title if title in ("coordinator", "agent") else None
            continue
        m = re.match(METRIC_ROW, line)
        if m and component:
            names.setdefault(m.group(1), {})[component] = m.group(2)
    return names


def stored_name(name, typ):
    """The series name Prometheus stores for a documented metric (one per metric)."""
    return name + "_count" if typ == "histogram" else name


def family_name(name, typ):
    """The OpenMetrics family name of a documented sample name."""
    if typ == "counter" and name.endswith("_total"):
        return name[: -len("_total")]
    if typ == "info" and name.endswith("_info"):
        return name[: -len("_info")]
    return name


def documented_as(served, docs):
    """The documented metric a stored series name belongs to, or None."""
    if served in docs:
        return served
    for suffix in ("_bucket", "_count", "_sum"):
        base = served[: -len(suffix)]
        if served.endswith(suffix) and "histogram" in docs.get(base, {}).values():
            return base
    return None


# ---------------------------------------------------------------------------------------------
# checks

def check_targets(prom):
    print("==> scrape targets up (Prometheus scrapes and parses both)")

    def targets_up():
        active = prom.api("targets", state="active")["activeTargets"]
        by_job = {t["labels"].get("job"): t for t in active}
        missing = [j for j in JOBS.values() if j not in by_job]
        if missing:
            return f"no target for {missing}"
        bad = {j: (by_job[j]["health"], by_job[j]["lastError"]) for j in JOBS.values()
               if by_job[j]["health"] != "up" or by_job[j]["lastError"]}
        return True if not bad else f"not up: {bad}"

    if wait_until("both targets up", targets_up, 60):
        ok("targets vigil-coordinator and vigil-agent are up, no scrape error")
    for job in JOBS.values():
        v = prom.value(f'up{{job="{job}"}}')
        if v == 1:
            ok(f'up{{job="{job}"}} == 1')
        else:
            fail(f'up{{job="{job}"}} is {v}, expected 1')
    # The agent must have registered before the node's series exist.
    if wait_until("the agent registered (vigil_agents_connected == 1, vigil_agent_connected == 1)",
                  lambda: prom.value("vigil_agents_connected") == 1
                  and prom.value("vigil_agent_connected") == 1, 30):
        ok("the agent is registered with the coordinator")
    # Let both targets be scraped at least twice more, so that rate() has samples.
    time.sleep(2.5)


def served_names(prom):
    """{component: set of vigil_ (and fabric) series names} as stored by Prometheus."""
    res = prom.query('count by (__name__, job) ({__name__=~"vigil_.+|node_infiniband_.+|node_network_.+"})')
    by_job = {c: set() for c in JOBS}
    rev = {j: c for c, j in JOBS.items()}
    for r in res:
        c = rev.get(r["metric"].get("job"))
        if c:
            by_job[c].add(r["metric"]["__name__"])
    return by_job


def check_documented_present(prom, docs):
    print("==> every documented metric is in Prometheus (docs/metrics.md tables)")
    served = served_names(prom)
    for name in ALLOWED_ABSENT:
        if name not in docs:
            fail(f"ALLOWED_ABSENT names {name}, which docs/metrics.md does not document (stale entry?)")
    missing, allowed, present = [], [], 0
    for name, comps in sorted(docs.items()):
        for comp, typ in sorted(comps.items()):
            if stored_name(name, typ) in served[comp]:
                present += 1
            elif name in ALLOWED_ABSENT:
                allowed.append(name)
            else:
                missing.append(f"{name} ({comp}, {typ})")
    ok(f"{present} documented metrics present")
    if allowed:
        print(f"  (absent as allowed: {', '.join(sorted(allowed))})")
    for m in missing:
        fail(f"documented but not exported: {m}")
    for comp, names in served.items():
        for s in sorted(names):
            doc = documented_as(s, docs)
            if doc is None:
                fail(f"exported by the {comp} but not documented in docs/metrics.md: {s}")
            elif comp not in docs[doc]:
                fail(f"{s} is exported by the {comp}, but docs/metrics.md documents it only for "
                     f"the {', '.join(docs[doc])}")


def alert_names(path):
    return re.findall(r"^\s*-\s*alert:\s*(\S+)\s*$", open(path, encoding="utf-8").read(), re.M)


def check_rules(prom, alerts_path):
    print("==> Prometheus loaded deploy/prometheus/alerts.yml")
    want = alert_names(alerts_path)
    if not want:
        fail(f"no alert found in {alerts_path}")
        return

    def all_evaluated():
        rules = [r for g in prom.api("rules", type="alert")["groups"] for r in g["rules"]]
        got = {r["name"]: r for r in rules}
        missing = [a for a in want if a not in got]
        if missing:
            return f"alerts not loaded: {missing}"
        pending = [a for a in want if got[a].get("health") != "ok"]
        return True if not pending else {a: (got[a].get("health"), got[a].get("lastError")) for a in pending}

    if wait_until(f"all {len(want)} alert rules loaded and evaluated without error", all_evaluated, 30):
        ok(f"{len(want)} alert rules loaded, each evaluated with health ok: {', '.join(want)}")
    firing = [a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]]
    print(f"  (active alerts now: {', '.join(firing) if firing else 'none'})")


def dashboard_exprs(path):
    dash = json.load(open(path, encoding="utf-8"))
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            title = node.get("title") or node.get("name") or where
            for k, v in node.items():
                if k == "expr" and isinstance(v, str):
                    found.append((title, v))
                else:
                    walk(v, title)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    walk(dash, "dashboard")
    return found


def substitute(expr):
    def repl(m):
        var = m.group(1) or m.group(2)
        return GRAFANA_VARS.get(var, m.group(0))
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", repl, expr)


def metric_refs(text):
    # A name ending in "_" is a prefix in prose ("the vigil_gpu_* gauges"), not a metric.
    return {n for n in re.findall(r"\bvigil_[a-z0-9_]+\b", text) if not n.endswith("_")}


def check_names_documented(docs, alerts_path, dashboard_path):
    print("==> every vigil_ name used by the alerts and the dashboard is documented")
    for path in (alerts_path, dashboard_path):
        text = open(path, encoding="utf-8").read()
        # Alert names (VigilXxx) are capitalised and not matched; docs anchors are not metrics.
        bad = sorted(n for n in metric_refs(text) if documented_as(n, docs) is None)
        if bad:
            fail(f"{path} uses metrics docs/metrics.md does not document: {', '.join(bad)}")
        else:
            ok(f"{path}: {len(metric_refs(text))} metric names, all documented")


def github_anchor(heading):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def check_runbook_links(alerts_path):
    print("==> every runbook_url of the alerts points at an existing docs section")
    links = re.findall(r'runbook_url:\s*"([^"]+)"', open(alerts_path, encoding="utf-8").read())
    if not links:
        fail(f"{alerts_path}: no runbook_url annotation")
    for link in sorted(set(links)):
        path, _, frag = link.partition("#")
        if not os.path.isfile(path):
            fail(f"{alerts_path}: runbook_url {link}: no file {path}")
            continue
        headings = re.findall(r"^#+\s+(.+?)\s*$", open(path, encoding="utf-8").read(), re.M)
        if frag and frag not in {github_anchor(h) for h in headings}:
            fail(f"{alerts_path}: runbook_url {link}: no section with that anchor in {path}")
    ok(f"{len(set(links))} runbook links resolve")


def check_dashboard_layout(dashboard_path):
    print("==> Grafana dashboard structure (ids, grid, data source variable)")
    dash = json.load(open(dashboard_path, encoding="utf-8"))
    panels = dash.get("panels", [])
    if not isinstance(dash.get("schemaVersion"), int) or not dash.get("uid") or not panels:
        fail(f"{dashboard_path}: needs schemaVersion, uid and panels")
        return
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        fail(f"{dashboard_path}: no 'datasource' template variable of type datasource")
    ids, cells = set(), {}
    for p in panels:
        pid, title, g = p.get("id"), p.get("title"), p.get("gridPos", {})
        if pid in ids:
            fail(f"{dashboard_path}: panel id {pid} used twice")
        ids.add(pid)
        if not all(isinstance(g.get(k), int) for k in "xywh") or g["x"] < 0 or g["x"] + g["w"] > 24:
            fail(f"{dashboard_path}: panel {title!r} has a bad gridPos {g}")
            continue
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                if (x, y) in cells:
                    fail(f"{dashboard_path}: panels {cells[(x, y)]!r} and {title!r} overlap")
                    break
                cells[(x, y)] = title
            else:
                continue
            break
        if p.get("type") == "row":
            continue
        sources = [p.get("datasource")] + [t.get("datasource") for t in p.get("targets", [])]
        if not p.get("targets") or any((d or {}).get("uid") != "${datasource}" for d in sources):
            fail(f"{dashboard_path}: panel {title!r} must query the ${{datasource}} variable")
    ok(f"{len(panels)} panels, unique ids, no overlap, all on the datasource variable")


def check_dashboard_queries(prom, docs, dashboard_path):
    print("==> every query of the Grafana dashboard runs in Prometheus")
    served = set().union(*served_names(prom).values())
    exprs = dashboard_exprs(dashboard_path)
    ran, empty_ok = 0, 0
    for title, expr in exprs:
        q = substitute(expr)
        if "$" in q:
            fail(f"dashboard panel {title!r}: unknown Grafana variable in {expr!r}")
            continue
        try:
            res = prom.query(q)
        except RuntimeError as e:
            fail(f"dashboard panel {title!r}: {e}")
            continue
        ran += 1
        refs = metric_refs(q)
        # A query must return data when every metric it reads is exported now and it has no
        # comparison that may filter everything out: that catches a misspelt label value.
        needs_data = (refs and all(documented_as(n, docs) and stored_name_any(n, docs) in served
                                   for n in refs)
                      and not re.search(r"(>|<|==|!=)\s*-?\d", q))
        if needs_data and not res:
            fail(f"dashboard panel {title!r}: no data from {q!r} although its metrics are exported")
        elif not res:
            empty_ok += 1
    ok(f"{ran} of {len(exprs)} dashboard queries ran ({empty_ok} empty as may be, for now)")


def stored_name_any(name, docs):
    doc = documented_as(name, docs)
    if doc is None:
        return name
    if name != doc:  # explicit _bucket/_count/_sum
        return name
    typ = next(iter(docs[doc].values()))
    return stored_name(doc, typ)


def check_fault(prom, fault_file):
    print("==> inject XID 79 on simulated GPU 0: the fault metrics appear")
    with open(fault_file, "a", encoding="utf-8") as f:
        f.write("gpu=0 xid=79\n")
    wanted = [
        ('vigil_cordons_total{source="auto",rule="xid"}', lambda v: v is not None and v >= 1),
        ('sum(vigil_xid_errors_total{xid="79"})', lambda v: v is not None and v >= 1),
        ('sum(vigil_agent_xid_errors_total{gpu="0",xid="79"})', lambda v: v is not None and v >= 1),
        ("vigil_fault_to_cordon_seconds_count", lambda v: v is not None and v >= 1),
        ('vigil_nodes{state="Cordoned"}', lambda v: v == 1),
        ('vigil_gpus{state="unhealthy"}', lambda v: v is not None and v >= 1),
    ]
    for expr, good in wanted:
        if wait_until(f"{expr} after XID 79", lambda: good(prom.value(expr)) or prom.value(expr), 30):
            ok(f"{expr} = {prom.value(expr):g}")
    served = set().union(*served_names(prom).values())
    for name in AFTER_FAULT:
        if name not in served:
            fail(f"{name} still absent after the injected XID")


def check_exposition(name, url, docs, component):
    print(f"==> OpenMetrics lint of the {name}'s /metrics ({url})")
    status, headers, body = http_get(url, {"Accept": "application/openmetrics-text; version=1.0.0,"
                                                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"})
    if status != 200:
        fail(f"{url}: HTTP {status}")
        return
    ctype = headers.get("Content-Type", "")
    if ctype != OPENMETRICS_CONTENT_TYPE:
        fail(f"{url}: Content-Type {ctype!r}, expected {OPENMETRICS_CONTENT_TYPE!r}")
    if not body.endswith("# EOF\n"):
        fail(f"{url}: the exposition does not end with '# EOF' and a newline")
    try:
        families = list(text_string_to_metric_families(body))
    except Exception as e:  # the parser raises ValueError (and friends) on any violation
        fail(f"{url}: not valid OpenMetrics: {type(e).__name__}: {e}")
        return
    seen = set()
    for fam in families:
        if fam.name in seen:
            fail(f"{url}: family {fam.name} appears twice")
        seen.add(fam.name)
        if not fam.documentation.strip():
            fail(f"{url}: family {fam.name} has no HELP text")
        for s in fam.samples:
            fabric = component == "agent" and s.name.startswith(FABRIC_PREFIXES)
            if not s.name.startswith("vigil_") and not fabric:
                fail(f"{url}: sample {s.name} does not start with vigil_")
        doc = [(n, t) for n, comps in docs.items() for c, t in comps.items()
               if c == component and family_name(n, t) == fam.name]
        if not doc:
            fail(f"{url}: family {fam.name} ({fam.type}) is not documented for the {component}")
        elif doc[0][1] != fam.type:
            fail(f"{url}: {doc[0][0]} is served as {fam.type} but docs/metrics.md says {doc[0][1]}")
    samples = sum(len(f.samples) for f in families)
    ok(f"{len(families)} families, {samples} samples: valid OpenMetrics, types as documented")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prometheus", required=True)
    ap.add_argument("--coordinator-metrics", required=True)
    ap.add_argument("--agent-metrics", required=True)
    ap.add_argument("--fault-file", required=True)
    ap.add_argument("--docs", default="docs/metrics.md")
    ap.add_argument("--alerts", default="deploy/prometheus/alerts.yml")
    ap.add_argument("--dashboard", default="deploy/grafana/vigil.json")
    ap.add_argument("--pids", default="", help="comma-separated pids that must stay alive")
    args = ap.parse_args()
    pids.extend(int(p) for p in args.pids.split(",") if p)

    docs = parse_docs(args.docs)
    if len(docs) < 20:
        raise SystemExit(f"only {len(docs)} metrics parsed from {args.docs}: has its table format changed?")
    prom = Prometheus(args.prometheus)

    check_targets(prom)
    check_documented_present(prom, docs)
    check_rules(prom, args.alerts)
    check_names_documented(docs, args.alerts, args.dashboard)
    check_dashboard_layout(args.dashboard)
    check_runbook_links(args.alerts)
    check_dashboard_queries(prom, docs, args.dashboard)
    check_fault(prom, args.fault_file)
    check_exposition("coordinator", args.coordinator_metrics, docs, "coordinator")
    check_exposition("agent", args.agent_metrics, docs, "agent")

    if errors:
        print(f"\nlive check FAILED: {len(errors)} problem(s):", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print("\nlive check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
