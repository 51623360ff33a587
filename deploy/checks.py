#!/usr/bin/env python3
"""Offline checks of deploy/ that no off-the-shelf tool does. deploy/check.sh
runs them (after kubernetes-validate and promtool); each subcommand prints what
it checked and exits non-zero on a failure.

    checks.py split RENDERED CORE_OUT CRD_OUT   split `kubectl kustomize` output
    checks.py crds FILE...                      PodMonitor/PrometheusRule schemas
    checks.py manifests                         cross-file and security checks
    checks.py rules-sync [--fix]                PrometheusRule == plain rule file
    checks.py rules-lint                        labels, annotations, runbook anchors
    checks.py dashboard PROMTOOL                Grafana dashboard conventions
    checks.py containerfile                     the image build copies every crate
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
BASE = DEPLOY / "base"
OVERLAY = DEPLOY / "overlays" / "prometheus-operator"
RULES = DEPLOY / "prometheus" / "idlemon-rules.yml"
PROMETHEUS_RULE = OVERLAY / "prometheusrule.yaml"
RUNBOOK = DEPLOY / "runbook.md"
DASHBOARD = DEPLOY / "grafana" / "idlemon-dashboard.json"
CONTAINERFILE = DEPLOY / "Containerfile"
RUNBOOK_URL = "https://github.com/idlemon/idlemon/blob/main/deploy/runbook.md#"
CRD_GROUP = "monitoring.coreos.com/"

# Every metric idlemon exports (README.md, "Metrics"). The dashboard may use
# no other (histograms: with their _bucket, _sum and _count series).
METRICS = {
    "idlemon_build_info", "idlemon_idle_threshold_seconds", "idlemon_idle_timeout_seconds",
    "idlemon_probe_info", "idlemon_degraded", "idlemon_tcp_state_transitions_total",
    "idlemon_sends_after_idle_total", "idlemon_receives_after_idle_total",
    "idlemon_socket_table_full_total", "idlemon_keepalive_probes_answered_total",
    "idlemon_keepalive_timer_runs_total", "idlemon_resets_sent_total",
    "idlemon_keepalive_timeouts_total", "idlemon_events_lost_total", "idlemon_tracked_sockets",
    "idlemon_at_risk_sockets", "idlemon_long_idle_sockets", "idlemon_network_namespaces",
    "idlemon_scans_total", "idlemon_scan_errors_total", "idlemon_scan_duration_seconds",
    "idlemon_scan_cpu_seconds", "idlemon_scan_shared_table_walks", "idlemon_scan_namespace_walks", "idlemon_scan_file_walk_available", "idlemon_ready", "idlemon_resets_received_total",
    "idlemon_idle_before_reset_seconds", "idlemon_malformed_events_total",
    "idlemon_event_log_errors_total", "idlemon_events_total",
    "idlemon_attribution_series_dropped_total", "idlemon_last_scan_timestamp_seconds",
}
HISTOGRAMS = {"idlemon_idle_before_reset_seconds"}

PROMETHEUS_RULE_HEADER = """\
# The alert rules of deploy/prometheus/idlemon-rules.yml for the Prometheus
# Operator. spec.groups must stay identical to that file's groups:
# deploy/check.sh fails when they differ; `deploy/check.sh --fix` rewrites this
# file from it. Edit the rules there, not here.
#
# kube-prometheus-stack's Prometheus selects PrometheusRules by the label
# `release: <helm release name>` unless its ruleSelectorNilUsesHelmValues is
# false: add that label in an overlay if yours does.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: idlemon
  namespace: idlemon
  labels:
    app.kubernetes.io/name: idlemon
spec:
"""


class Failures:
    def __init__(self, what):
        self.what = what
        self.errors = []
        self.checked = 0

    def check(self, ok, message):
        self.checked += 1
        if not ok:
            self.errors.append(message)
            print(f"  FAIL {message}")
        return ok

    def done(self):
        if self.errors:
            print(f"{self.what}: {len(self.errors)} of {self.checked} checks failed")
            return 1
        print(f"{self.what}: {self.checked} checks passed")
        return 0


def load_all(path):
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def rel(path):
    return os.path.relpath(path, REPO)


# ---------------------------------------------------------------- split

def split(rendered, core_out, crd_out):
    docs = load_all(rendered)
    core = [d for d in docs if not str(d.get("apiVersion", "")).startswith(CRD_GROUP)]
    crds = [d for d in docs if str(d.get("apiVersion", "")).startswith(CRD_GROUP)]
    with open(core_out, "w") as f:
        yaml.safe_dump_all(core, f, sort_keys=False)
    with open(crd_out, "w") as f:
        yaml.safe_dump_all(crds, f, sort_keys=False)
    print(f"{rendered}: {len(core)} core resources, {len(crds)} {CRD_GROUP} resources")
    return 0


# ---------------------------------------------------------------- crds

def unknown_keys(given, known, path):
    """Keys of `given` (the YAML) that the model dropped: pydantic ignores
    unknown fields, so a typo would otherwise pass."""
    found = []
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if key not in known:
                found.append(f"{path}.{key}")
            else:
                found += unknown_keys(value, known[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(known, list):
        for i, (a, b) in enumerate(zip(given, known)):
            found += unknown_keys(a, b, f"{path}[{i}]")
    return found


def crds(files):
    from cloudcoil.models.prometheus_operator import v1 as monitoring

    result = Failures("prometheus-operator resources (cloudcoil.models.prometheus_operator schemas)")
    for file in files:
        for doc in load_all(file):
            kind = doc.get("kind")
            name = f"{file}: {kind}/{doc.get('metadata', {}).get('name')}"
            if not result.check(doc.get("apiVersion") == "monitoring.coreos.com/v1",
                                f"{name}: apiVersion {doc.get('apiVersion')} is not monitoring.coreos.com/v1"):
                continue
            model = getattr(monitoring, kind or "", None)
            if not result.check(model is not None, f"{name}: no schema for kind {kind}"):
                continue
            try:
                parsed = model.model_validate(doc)
            except Exception as error:  # pydantic.ValidationError
                result.check(False, f"{name}: {error}")
                continue
            dumped = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
            extra = unknown_keys(doc, dumped, "")
            if result.check(not extra, f"{name}: unknown fields {', '.join(extra)}"):
                print(f"  ok   {name}")
    return result.done()


# ---------------------------------------------------------------- manifests

def manifests():
    result = Failures("manifest consistency")
    kustomization = load(BASE / "kustomization.yaml")
    listed = kustomization.get("resources", [])
    for resource in listed:
        result.check((BASE / resource).is_file(), f"base/kustomization.yaml lists missing {resource}")
    for file in sorted(BASE.glob("*.yaml")):
        if file.name != "kustomization.yaml":
            result.check(file.name in listed, f"base/{file.name} is not in base/kustomization.yaml resources")
    overlay = load(OVERLAY / "kustomization.yaml")
    for resource in overlay.get("resources", []):
        result.check((OVERLAY / resource).exists(), f"overlay kustomization lists missing {resource}")
    for file in sorted(OVERLAY.glob("*.yaml")):
        if file.name != "kustomization.yaml":
            result.check(file.name in overlay.get("resources", []), f"overlay {file.name} is not in its kustomization")

    docs = {}
    for file in sorted(BASE.glob("*.yaml")) + sorted(OVERLAY.glob("*.yaml")):
        if file.name == "kustomization.yaml":
            continue
        for doc in load_all(file):
            docs[doc["kind"]] = doc
            namespaced = doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding")
            if namespaced:
                result.check(doc["metadata"].get("namespace") == "idlemon",
                             f"{rel(file)}: {doc['kind']} is not in namespace idlemon")

    ds = docs["DaemonSet"]
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"]["labels"]
    selector = ds["spec"]["selector"]["matchLabels"]
    result.check(selector.items() <= labels.items(), "DaemonSet selector does not match its pod labels")
    result.check(spec.get("serviceAccountName") == docs["ServiceAccount"]["metadata"]["name"],
                 "DaemonSet does not use the ServiceAccount")
    binding = docs["ClusterRoleBinding"]
    result.check(binding["roleRef"]["name"] == docs["ClusterRole"]["metadata"]["name"],
                 "ClusterRoleBinding does not bind the ClusterRole")
    result.check(any(s.get("kind") == "ServiceAccount" and s.get("name") == docs["ServiceAccount"]["metadata"]["name"]
                     and s.get("namespace") == "idlemon" for s in binding["subjects"]),
                 "ClusterRoleBinding does not bind the ServiceAccount")
    rules = docs["ClusterRole"]["rules"]
    result.check(rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
                 f"ClusterRole grants more than get/list/watch on pods: {rules}")

    result.check(spec.get("hostPID") is True, "DaemonSet needs hostPID")
    result.check(not spec.get("hostNetwork"), "DaemonSet should not use hostNetwork")
    result.check({"operator": "Exists"} in spec.get("tolerations", []), "DaemonSet does not tolerate every taint")
    result.check(spec.get("priorityClassName") == "system-node-critical", "priorityClassName is not system-node-critical")
    strategy = ds["spec"].get("updateStrategy", {})
    result.check(strategy.get("type") == "RollingUpdate"
                 and strategy.get("rollingUpdate", {}).get("maxUnavailable") == "10%",
                 "updateStrategy is not RollingUpdate with maxUnavailable 10%")

    (container,) = spec["containers"]
    security = container["securityContext"]
    caps = security.get("capabilities", {})
    result.check(caps.get("drop") == ["ALL"], "capabilities do not drop ALL")
    result.check(sorted(caps.get("add", [])) == ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"],
                 f"capabilities added are {caps.get('add')}, expected BPF, PERFMON, SYS_ADMIN, SYS_PTRACE")
    result.check(security.get("privileged") is False, "container must not be privileged")
    result.check(security.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation must be false")
    result.check(security.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem must be true")
    result.check(security.get("runAsUser") == 0, "runAsUser must be 0 (capabilities without file caps)")

    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for name, volume in volumes.items():
        if "hostPath" in volume:
            result.check(mounts.get(name, {}).get("readOnly") is True,
                         f"hostPath volume {name} is not mounted read-only")
    host_paths = {v["hostPath"]["path"]: mounts[n]["mountPath"] for n, v in volumes.items() if "hostPath" in v}
    expected = {"/sys/kernel/btf": "/sys/kernel/btf", "/sys/kernel/tracing": "/sys/kernel/tracing",
                "/sys/fs/cgroup": "/sys/fs/cgroup", "/proc": "/host/proc", "/run/netns": "/run/netns"}
    result.check(host_paths == expected, f"hostPath mounts are {host_paths}, expected {expected}")

    env = {e["name"]: e for e in container.get("env", [])}
    proc_root = env.get("IDLEMON_PROC_ROOT", {}).get("value")
    result.check(proc_root == host_paths.get("/proc"), "IDLEMON_PROC_ROOT is not where /proc is mounted")
    result.check(env.get("IDLEMON_NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
                 "IDLEMON_NODE_NAME does not come from spec.nodeName")
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    listen = env.get("IDLEMON_LISTEN", {}).get("value", "")
    result.check(ports.get("metrics") is not None and listen.endswith(f":{ports.get('metrics')}"),
                 f"IDLEMON_LISTEN {listen} does not listen on the metrics port {ports.get('metrics')}")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet", {})
        result.check(get.get("path") == path and get.get("port") == "metrics",
                     f"{probe} is not GET {path} on port metrics")
    limits = container.get("resources", {}).get("limits", {})
    result.check("memory" in limits and "cpu" not in limits, "expected a memory limit and no CPU limit")

    service = docs["Service"]
    result.check(service["spec"]["selector"].items() <= labels.items(), "Service selector does not match the pods")
    result.check(any(p.get("targetPort") == "metrics" for p in service["spec"]["ports"]),
                 "Service does not expose port metrics")
    monitor = docs["PodMonitor"]
    result.check(monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(),
                 "PodMonitor selector does not match the pods")
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    result.check(all(e.get("port") in ports for e in endpoints), "PodMonitor scrapes a port the pods do not name")
    result.check(all(e.get("honorLabels") is True for e in endpoints),
                 "PodMonitor needs honorLabels: true (owner namespace/pod labels)")
    result.check(all(any(r.get("targetLabel") == "node" for r in e.get("relabelings", [])) for e in endpoints),
                 "PodMonitor does not set the node label the rules and the dashboard use")
    return result.done()


# ---------------------------------------------------------------- rules

def rules_sync(fix):
    plain = load(RULES)
    if fix:
        text = RULES.read_text()
        start = re.search(r"^groups:", text, re.M)
        if not start:
            print(f"{rel(RULES)}: no top-level groups:")
            return 1
        body = "".join(("  " + line) if line.strip() else line
                       for line in text[start.start():].splitlines(keepends=True))
        PROMETHEUS_RULE.write_text(PROMETHEUS_RULE_HEADER + body)
        print(f"wrote {rel(PROMETHEUS_RULE)} from {rel(RULES)}")
    prometheus_rule = load(PROMETHEUS_RULE)
    result = Failures(f"{rel(PROMETHEUS_RULE)} spec.groups == {rel(RULES)} groups")
    result.check(prometheus_rule.get("kind") == "PrometheusRule", "not a PrometheusRule")
    result.check(set(plain) == {"groups"}, f"{rel(RULES)} has keys besides groups: {sorted(plain)}")
    same = prometheus_rule.get("spec", {}).get("groups") == plain.get("groups")
    if not same:
        mine = yaml.safe_dump(prometheus_rule.get("spec", {}).get("groups"), sort_keys=True).splitlines()
        theirs = yaml.safe_dump(plain.get("groups"), sort_keys=True).splitlines()
        import difflib
        for line in difflib.unified_diff(theirs, mine, rel(RULES), rel(PROMETHEUS_RULE), lineterm="", n=2):
            print("  " + line)
        print("  run `deploy/check.sh --fix` to copy the rules over")
    result.check(same, "the groups differ")
    return result.done()


def github_anchors(markdown):
    anchors, in_fence = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        match = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            base, n = slug, 1
            while slug in anchors:
                slug = f"{base}-{n}"
                n += 1
            anchors.add(slug)
    return anchors


def rules_lint():
    result = Failures(f"{rel(RULES)} conventions")
    anchors = github_anchors(RUNBOOK.read_text()) if RUNBOOK.exists() else set()
    result.check(RUNBOOK.exists(), f"{rel(RUNBOOK)} is missing")
    names = []
    for group in load(RULES)["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert")
            if not result.check(name is not None, f"group {group['name']}: a rule that is not an alert"):
                continue
            names.append(name)
            result.check(rule.get("labels", {}).get("severity") in ("critical", "warning", "info"),
                         f"{name}: severity must be critical, warning or info")
            result.check(bool(rule.get("for")), f"{name}: no `for`")
            annotations = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                result.check(bool(annotations.get(key)), f"{name}: no {key} annotation")
            result.check("$labels" in annotations.get("description", "") or "$value" in annotations.get("description", ""),
                         f"{name}: description uses neither $labels nor $value")
            url = annotations.get("runbook_url", "")
            result.check(url == RUNBOOK_URL + name.lower(), f"{name}: runbook_url should be {RUNBOOK_URL}{name.lower()}")
            result.check(name.lower() in anchors, f"{name}: {rel(RUNBOOK)} has no section #{name.lower()}")
    result.check(len(names) == len(set(names)), "alert names repeat")
    for target in re.findall(r"\]\(#([^)]+)\)", RUNBOOK.read_text() if RUNBOOK.exists() else ""):
        result.check(target in anchors, f"{rel(RUNBOOK)} links to #{target}, which no heading makes")
    print(f"  alerts: {', '.join(names)}")
    return result.done()


# ---------------------------------------------------------------- dashboard

def dashboard(promtool):
    result = Failures(f"{rel(DASHBOARD)} conventions")
    board = json.loads(DASHBOARD.read_text())
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    variables = {v["name"]: v for v in board.get("templating", {}).get("list", [])}
    result.check(variables.get("datasource", {}).get("type") == "datasource"
                 and variables["datasource"].get("query") == "prometheus",
                 "no datasource variable of type prometheus")
    for name in ("namespace", "pod"):
        var = variables.get(name, {})
        result.check(f"label_values(idlemon_at_risk_sockets" in str(var.get("query")),
                     f"variable {name} does not come from label_values(idlemon_at_risk_sockets, ...)")
    for var in variables.values():
        if var.get("type") == "query":
            result.check(var.get("datasource") == datasource, f"variable {var['name']} does not use ${{datasource}}")
    result.check(isinstance(board.get("schemaVersion"), int) and board["schemaVersion"] >= 36, "schemaVersion below 36")

    panels, exprs, ids = [], [], []
    for panel in board.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    used = set()
    for panel in panels:
        title = panel.get("title")
        ids.append(panel.get("id"))
        result.check(panel.get("datasource") == datasource, f"panel {title!r} does not use ${{datasource}}")
        if panel.get("type") == "row":
            continue
        result.check(bool(panel.get("targets")), f"panel {title!r} has no query")
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            exprs.append((title, target.get("refId"), expr))
            result.check(target.get("datasource") == datasource,
                         f"panel {title!r} query {target.get('refId')} does not use ${{datasource}}")
            for function, window in re.findall(r"\b(rate|irate|increase|delta|deriv)\s*\([^\[]*\[([^\]]*)\]", expr):
                result.check(window == "$__rate_interval",
                             f"panel {title!r}: {function}(...[{window}]) should use [$__rate_interval]")
            for metric in re.findall(r"\bidlemon_[a-z0-9_]+", expr):
                name = re.sub(r"_(bucket|sum|count)$", "", metric)
                name = name if name in HISTOGRAMS else metric
                used.add(name)
                result.check(name in METRICS, f"panel {title!r} uses unknown metric {metric}")
            result.check(not re.search(r"\bup\b", expr), f"panel {title!r} uses `up`: dashboards use idlemon_* only")
        if panel.get("type") == "heatmap":
            result.check(all(t.get("format") == "heatmap" for t in panel["targets"]),
                         f"heatmap {title!r} queries are not format heatmap")
    result.check(len(ids) == len(set(ids)), "panel ids repeat")
    print(f"  {len(panels)} panels, {len(exprs)} queries, {len(used)} of {len(METRICS)} idlemon metrics shown")
    missing = sorted(METRICS - used)
    if missing:
        print(f"  not shown: {', '.join(missing)}")

    # promtool parses every query, with the variables given values.
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, (title, ref, expr) in enumerate(exprs):
        concrete = (expr.replace("$__rate_interval", "1m").replace("$node", ".*")
                    .replace("$namespace", ".*").replace("$pod", ".*"))
        rules["groups"][0]["rules"].append({"record": f"dashboard:query_{i}:{ref}", "expr": concrete})
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        yaml.safe_dump(rules, f)
        path = f.name
    try:
        run = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    result.check(run.returncode == 0, "promtool cannot parse every query:\n" + run.stdout + run.stderr)
    if run.returncode == 0:
        print(f"  promtool parsed all {len(exprs)} queries")
    return result.done()


# ---------------------------------------------------------------- containerfile

def containerfile():
    import tomllib

    result = Failures(f"{rel(CONTAINERFILE)} copies the workspace")
    text = CONTAINERFILE.read_text()
    copied = set()
    for line in text.splitlines():
        match = re.match(r"^\s*COPY\s+(?!--from)(?:--\S+\s+)*(.+)$", line)
        if match:
            copied.update(match.group(1).split()[:-1])
    workspace = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]
    for member in workspace["members"]:
        result.check(member in copied, f"workspace member {member} is not copied into the builder")
    for file in ("Cargo.toml", "Cargo.lock"):
        result.check(file in copied, f"{file} is not copied into the builder")
    for path in copied:
        result.check((REPO / path).exists(), f"COPY {path}: no such path in the repository")
    return result.done()


def main(argv):
    command, args = (argv[0], argv[1:]) if argv else ("", [])
    if command == "split" and len(args) == 3:
        return split(*args)
    if command == "crds" and args:
        return crds(args)
    if command == "manifests":
        return manifests()
    if command == "rules-sync":
        return rules_sync("--fix" in args)
    if command == "rules-lint":
        return rules_lint()
    if command == "dashboard" and len(args) == 1:
        return dashboard(args[0])
    if command == "containerfile":
        return containerfile()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
