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
    checks.py chart-sync [--fix]                the chart's copies of rules and dashboard
    checks.py release-facts                     one image repository and version everywhere
    checks.py helm OUT_DIR [KUSTOMIZE_BASE]     lint and render the chart; Helm == Kustomize
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
CHART = DEPLOY / "helm" / "idlemon"
NETWORK_POLICY = DEPLOY / "components" / "network-policy"
# The chart cannot read files outside itself: it carries copies of these,
# written by `deploy/check.sh --fix` (chart-sync --fix).
CHART_COPIES = {
    RULES: CHART / "files" / "idlemon-rules.yml",
    DASHBOARD: CHART / "files" / "idlemon-dashboard.json",
}
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
    "idlemon_scan_cpu_seconds", "idlemon_walk_duration_seconds",
    "idlemon_walk_cpu_seconds_total", "idlemon_node_info", "idlemon_idle_timeout_resets_total",
    "idlemon_scan_shared_table_walks", "idlemon_scan_namespace_walks", "idlemon_scan_file_walk_available", "idlemon_ready", "idlemon_resets_received_total",
    "idlemon_idle_before_reset_seconds", "idlemon_malformed_events_total",
    "idlemon_event_log_errors_total", "idlemon_events_total",
    "idlemon_attribution_series_dropped_total", "idlemon_last_scan_timestamp_seconds",
    "idlemon_retransmit_timeouts_total", "idlemon_connect_failures_total",
    "idlemon_syn_retransmits_total", "idlemon_destination_connect_failures_total",
    "idlemon_destination_connects_succeeded_total",
    "idlemon_destination_established_connections",
}
HISTOGRAMS = {"idlemon_idle_before_reset_seconds", "idlemon_walk_duration_seconds"}
# Besides idlemon's own: Prometheus's `up` per target, and the process
# collector's standard metrics of the daemon.
OTHER_METRICS = {
    "up", "process_cpu_seconds_total", "process_resident_memory_bytes",
    "process_virtual_memory_bytes", "process_open_fds", "process_max_fds",
    "process_start_time_seconds", "process_threads",
}
# Recording rule names: level:metric:operations (Prometheus's convention).
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")


def recorded_series():
    return {rule["record"] for group in load(RULES)["groups"] for rule in group["rules"] if "record" in rule}

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
    result.check(spec.get("nodeSelector", {}).get("kubernetes.io/os") == "linux",
                 "DaemonSet is not limited to Linux nodes (nodeSelector kubernetes.io/os: linux)")
    terms = (spec.get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    no_fargate = {"key": "eks.amazonaws.com/compute-type", "operator": "NotIn", "values": ["fargate"]}
    result.check(bool(terms) and all(no_fargate in term.get("matchExpressions", []) for term in terms),
                 "DaemonSet may be scheduled on Fargate (every required node affinity term needs "
                 "eks.amazonaws.com/compute-type NotIn [fargate])")
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
    result.check(security.get("seLinuxOptions", {}).get("type") == "spc_t",
                 "seLinuxOptions.type must be spc_t (SELinux-enforcing nodes such as Bottlerocket)")

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
    api = env.get("IDLEMON_API_LISTEN", {}).get("value", "")
    result.check(api.startswith("127.0.0.1:") or api.startswith("[::1]:"),
                 f"IDLEMON_API_LISTEN {api!r} is not the pod's loopback: /sockets and /events must stay inside the pod")
    result.check(not any(str(p["containerPort"]) == api.rsplit(":", 1)[-1] for p in container.get("ports", [])),
                 "the API port is declared as a containerPort")
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
    component = load(NETWORK_POLICY / "kustomization.yaml")
    result.check(component.get("kind") == "Component" and component.get("resources") == ["networkpolicy.yaml"],
                 "components/network-policy is not a Component with networkpolicy.yaml")
    (policy,) = load_all(NETWORK_POLICY / "networkpolicy.yaml")
    result.check(policy["metadata"].get("namespace") == "idlemon", "the NetworkPolicy is not in namespace idlemon")
    result.check(policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items(),
                 "the NetworkPolicy does not select the idlemon pods")
    result.check(policy["spec"].get("policyTypes") == ["Ingress"], "the NetworkPolicy should restrict ingress only")
    ingress = policy["spec"].get("ingress", [])
    result.check(len(ingress) == 1 and ingress[0].get("ports") == [{"port": ports.get("metrics"), "protocol": "TCP"}],
                 f"the NetworkPolicy must admit the metrics port ({ports.get('metrics')}) and nothing else: {ingress}")
    result.check(len(ingress) == 1 and [set(peer) for peer in ingress[0].get("from", [])] == [{"namespaceSelector"}],
                 "the NetworkPolicy must admit one namespace (the monitoring one) only")
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
    records = recorded_series()
    for group in load(RULES)["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                record = rule["record"]
                result.check(RECORD_NAME.match(record) is not None,
                             f"recording rule {record}: name is not level:metric:operations")
                level = record.split(":")[0].split("_")
                grouped = re.search(r"\bby\s*\(([^)]*)\)", rule.get("expr", ""))
                result.check(grouped is not None and
                             {label.strip() for label in grouped.group(1).split(",")} >= set(level),
                             f"recording rule {record}: does not aggregate by its level ({', '.join(level)})")
                continue
            name = rule.get("alert")
            if not result.check(name is not None, f"group {group['name']}: a rule neither alert nor record"):
                continue
            for used in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", rule.get("expr", "")):
                result.check(used in records, f"{name}: uses {used}, which no recording rule makes")
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
    print(f"  recorded: {', '.join(sorted(records))}")
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
    for name in ("namespace", "workload"):
        var = variables.get(name, {})
        result.check("label_values(cluster_namespace_workload:idlemon_at_risk_sockets:sum" in str(var.get("query")),
                     f"variable {name} does not come from label_values(cluster_namespace_workload:idlemon_at_risk_sockets:sum, ...)")
    cluster = variables.get("cluster", {})
    result.check(re.search(r"label_values\(.*,\s*cluster\)", str(cluster.get("query"))) is not None
                 and cluster.get("includeAll") and cluster.get("allValue") == ".*",
                 "no cluster variable from label_values(..., cluster) defaulting to all")
    names = [v["name"] for v in board.get("templating", {}).get("list", [])]
    result.check(names[:2] == ["datasource", "cluster"], f"variables should start with datasource, cluster: {names}")
    records = recorded_series()
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
            for record in re.findall(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", expr):
                result.check(record in records, f"panel {title!r} uses {record}, which no recording rule makes")
            bare = re.sub(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b", "", expr)
            for metric in re.findall(r"(?<![\w:])idlemon_[a-z0-9_]+", bare):
                name = re.sub(r"_(bucket|sum|count)$", "", metric)
                name = name if name in HISTOGRAMS else metric
                used.add(name)
                result.check(name in METRICS, f"panel {title!r} uses unknown metric {metric}")
            for metric in re.findall(r"(?<![\w:])(up|process_[a-z0-9_]+)\b(?!\s*\()", bare):
                result.check(metric in OTHER_METRICS, f"panel {title!r} uses {metric}, which neither Prometheus nor idlemon exports")
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
        concrete = expr.replace("$__rate_interval", "1m")
        for name in ("node", "namespace", "workload", "cluster", "job"):
            concrete = concrete.replace(f"${name}", ".*")
        result.check("$" not in concrete, f"panel {title!r} uses a variable the check does not know: {expr}")
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


# ---------------------------------------------------------------- chart-sync

def chart_sync(fix):
    result = Failures(f"{rel(CHART)}/files == their sources")
    for source, copy in CHART_COPIES.items():
        if fix and (not copy.exists() or copy.read_bytes() != source.read_bytes()):
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(source.read_bytes())
            print(f"wrote {rel(copy)} from {rel(source)}")
        same = copy.exists() and copy.read_bytes() == source.read_bytes()
        if not same and copy.exists():
            import difflib
            for line in list(difflib.unified_diff(source.read_text().splitlines(), copy.read_text().splitlines(),
                                                  rel(source), rel(copy), lineterm="", n=1))[:40]:
                print("  " + line)
        result.check(same, f"{rel(copy)} differs from {rel(source)}: run `bash deploy/check.sh --fix`")
    return result.done()


# ---------------------------------------------------------------- release-facts

def workspace_facts():
    import tomllib

    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]
    return cargo["package"]["version"], cargo["metadata"]["idlemon"]["image"]


def release_facts():
    version, image = workspace_facts()
    result = Failures(f"image {image} and version {version} (Cargo.toml) in the chart and the manifests")
    chart = load(CHART / "Chart.yaml")
    result.check(str(chart.get("version")) == version, f"Chart.yaml version {chart.get('version')} is not {version}")
    result.check(str(chart.get("appVersion")) == version, f"Chart.yaml appVersion {chart.get('appVersion')} is not {version}")
    values = load(CHART / "values.yaml")
    result.check(values["image"]["repository"] == image,
                 f"values.yaml image.repository {values['image']['repository']} is not {image}")
    result.check(values["image"].get("tag") in ("", None, version),
                 f"values.yaml image.tag {values['image'].get('tag')!r} is neither empty (appVersion) nor {version}")
    kustomization = load(BASE / "kustomization.yaml")
    images = kustomization.get("images", [])
    result.check([i.get("name") for i in images] == [image],
                 f"base/kustomization.yaml images name {[i.get('name') for i in images]}, expected [{image}]")
    for entry in images:
        result.check(entry.get("newName") in (None, image), f"base/kustomization.yaml renames the image to {entry.get('newName')}")
        result.check(str(entry.get("newTag")) == version, f"base/kustomization.yaml newTag {entry.get('newTag')} is not {version}")
    named = []
    for file in sorted(DEPLOY.rglob("*.yaml")):
        if CHART in file.parents:
            continue
        for doc in load_all(file):
            for container in (doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
                              if isinstance(doc.get("spec"), dict) else []):
                named.append((rel(file), container.get("image")))
    result.check(bool(named), "no container image found in the manifests")
    for file, ref in named:
        result.check(ref == f"{image}:{version}", f"{file}: image {ref}, expected {image}:{version}")
    print(f"  {image}:{version}: Chart.yaml, values.yaml, base/kustomization.yaml, "
          f"{', '.join(sorted({f for f, _ in named}))}")
    return result.done()


# ---------------------------------------------------------------- helm

RELEASE = {"name": "idlemon", "namespace": "idlemon"}
PATHS_TOML = """\
[[path]]
name = "in-vpc"
cidr = "10.0.0.0/8"
idle_timeout = "none"

[[path]]
name = "internal-nlb"
cidr = "10.20.0.0/16"
ports = [443, "8000-8100"]
idle_timeout = 6000
"""
# Every option on (a PodMonitor and a ServiceMonitor exclude each other: the
# ServiceMonitor gets a render of its own).
ALL_OPTIONS = {
    "image": {"repository": "registry.example.com/team/idlemon", "tag": "0.1.0-rc1",
              "digest": "sha256:" + "ab" * 32, "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "registry"}],
    "idlemon": {
        "idleThreshold": 240, "idleTimeout": 300, "scanInterval": 2.5, "socketWalk": "namespaces",
        "maxSockets": 1048576, "maxAttributionSeries": 200, "destinationLabels": 20,
        "eventHistory": 1000000, "eventLog": "", "logFormat": "text", "logLevel": "idlemon=debug",
        "apiListen": "127.0.0.1:9782", "paths": PATHS_TOML,
        "enforce": {"mode": "dry-run", "cgroups": ["/kubepods.slice/kubepods-burstable.slice"],
                    "namespaces": ["payments", "billing"],
                    "podLabels": {"app": "billing", "app.kubernetes.io/part-of": "pay"},
                    "override": True,
                    "idlePercent": 40, "interval": 20, "count": 4, "accepted": True},
        "extraArgs": ["--disable-attach=fentry"],
        "extraEnv": [{"name": "IDLEMON_KERNEL_BTF", "value": "/sys/kernel/btf/vmlinux"}],
    },
    "metrics": {"port": 9791, "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                               "interval": "15s", "scrapeTimeout": "5s"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                       "runbookUrlBase": "https://wiki.example.com/idlemon/runbook#"},
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring", "folder": "Networking",
                         "labels": {"team": "sre"}},
    "networkPolicy": {"enabled": True, "prometheusNamespace": "observability",
                      "prometheusPodSelector": {"app.kubernetes.io/name": "prometheus"}},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/idlemon"}},
    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
    "priorityClassName": "system-cluster-critical",
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
    "nodeSelector": {"kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "m7g.large"},
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "eks.amazonaws.com/compute-type", "operator": "NotIn", "values": ["fargate"]},
                              {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]}]}]}}},
    "seLinuxOptions": {"type": "spc_t", "level": "s0"},
    "maxUnavailable": 2,
    "terminationGracePeriodSeconds": 60,
    "podAnnotations": {"example.com/owner": "sre"},
    "podLabels": {"team": "sre"},
}
# The opt-in objects at their defaults: they must equal the Kustomize overlay's,
# the rule file's, the dashboard's and the component's.
OPT_INS = {"metrics": {"podMonitor": {"enabled": True}}, "prometheusRule": {"enabled": True},
           "grafanaDashboard": {"enabled": True}, "networkPolicy": {"enabled": True}}
SERVICE_MONITOR = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}}
# Values the schema must refuse, each with why.
BAD_VALUES = [
    ("a misspelt key", {"idlemon": {"idleTreshold": 240}}),
    ("an unknown top-level key", {"imag": {"repository": "x"}}),
    ("a pull policy Kubernetes does not know", {"image": {"pullPolicy": "Sometimes"}}),
    ("a digest that is not sha256:<64 hex>", {"image": {"digest": "latest"}}),
    ("a tag with a colon", {"image": {"tag": "v1:2"}}),
    ("a threshold of 0 s", {"idlemon": {"idleThreshold": 0}}),
    ("a threshold as a string with a unit", {"idlemon": {"idleThreshold": "300s"}}),
    ("a fractional idle timeout", {"idlemon": {"idleTimeout": 350.5}}),
    ("a negative scan interval", {"idlemon": {"scanInterval": -5}}),
    ("a socket walk idlemon does not have", {"idlemon": {"socketWalk": "fast"}}),
    ("max sockets below idlemon's 64", {"idlemon": {"maxSockets": 10}}),
    ("max sockets above idlemon's 16777216", {"idlemon": {"maxSockets": 16777217}}),
    ("destination labels above 1000", {"idlemon": {"destinationLabels": 5000}}),
    ("a log format idlemon does not have", {"idlemon": {"logFormat": "xml"}}),
    ("an API address without a port", {"idlemon": {"apiListen": "127.0.0.1"}}),
    ("the path config as a map, not TOML text", {"idlemon": {"paths": {"cidr": "10.0.0.0/8"}}}),
    ("an enforcement mode idlemon does not have", {"idlemon": {"enforce": {"mode": "yes"}}}),
    ("enforcement mode off as a YAML boolean", {"idlemon": {"enforce": {"mode": False}}}),
    ("an enforced cgroup not from the cgroup root", {"idlemon": {"enforce": {"cgroups": ["kubepods.slice"]}}}),
    ("an enforced cgroup with ..", {"idlemon": {"enforce": {"cgroups": ["/kubepods.slice/../system.slice"]}}}),
    ("an enforcement idle percent above idlemon's 80", {"idlemon": {"enforce": {"idlePercent": 90}}}),
    ("a misspelt enforcement key", {"idlemon": {"enforce": {"idle_percent": 40}}}),
    ("an enforced namespace that is no namespace name", {"idlemon": {"enforce": {"namespaces": ["Payments"]}}}),
    ("an enforced pod label whose value is no label value", {"idlemon": {"enforce": {"podLabels": {"app": "-x"}}}}),
    ("enforcement podLabels as a list", {"idlemon": {"enforce": {"podLabels": ["app=billing"]}}}),
    ("extra args as one string", {"idlemon": {"extraArgs": "--disable-attach=fentry"}}),
    ("an extra env without a name", {"idlemon": {"extraEnv": [{"value": "1"}]}}),
    ("a port above 65535", {"metrics": {"port": 70000}}),
    ("a PodMonitor and a ServiceMonitor at once", {"metrics": {"podMonitor": {"enabled": True},
                                                               "serviceMonitor": {"enabled": True}}}),
    ("a scrape interval without a unit", {"metrics": {"podMonitor": {"interval": "30"}}}),
    ("enabled as a string", {"networkPolicy": {"enabled": "yes"}}),
    ("a namespace name with capitals", {"networkPolicy": {"prometheusNamespace": "Monitoring"}}),
    ("a runbook base that is not a URL", {"prometheusRule": {"runbookUrlBase": "runbook.md#"}}),
    ("a label value that is not a string", {"podLabels": {"team": 5}}),
    ("a toleration operator Kubernetes does not know", {"tolerations": [{"operator": "Any"}]}),
    ("an seLinuxOptions key Kubernetes does not know", {"seLinuxOptions": {"typ": "spc_t"}}),
    ("a memory quantity with a bad unit", {"resources": {"limits": {"memory": "256MB"}}}),
    ("maxUnavailable 0", {"maxUnavailable": 0}),
]


def render(chart, values):
    """The chart's rendered manifests: a list of documents in template order."""
    docs = []
    for template, text in sorted(chart.render(values=values, **RELEASE).items()):
        if template.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs):
    found = {}
    for doc in docs:
        found.setdefault(doc["kind"], []).append(doc)
    return found


def kustomize_daemonset(rendered):
    """The Kustomize DaemonSet: from `kubectl kustomize base` output when
    given, else base/daemonset.yaml with base/kustomization.yaml's image
    override applied (the only transformation the base makes to it)."""
    if rendered:
        return next(d for d in load_all(rendered) if d["kind"] == "DaemonSet")
    (ds,) = [d for d in load_all(BASE / "daemonset.yaml") if d["kind"] == "DaemonSet"]
    for entry in load(BASE / "kustomization.yaml").get("images", []):
        for container in ds["spec"]["template"]["spec"]["containers"]:
            name = container["image"].rsplit(":", 1)[0] if "@" not in container["image"] else container["image"].split("@")[0]
            if name == entry["name"]:
                container["image"] = f"{entry.get('newName', name)}:{entry['newTag']}"
    return ds


def compare(result, what, helm, kustomize, other="Kustomize"):
    if helm != kustomize:
        print(f"  {what}:")
        print("    helm:      " + json.dumps(helm, sort_keys=True)[:600])
        print(f"    {other.split()[0].lower() + ':':<10} " + json.dumps(kustomize, sort_keys=True)[:600])
    result.check(helm == kustomize, f"Helm and {other} disagree on {what}")


def same_daemonset(result, helm_docs, kustomize_rendered):
    """The DaemonSet that Helm renders at the defaults is the Kustomize one,
    field by field, except for labels and annotations (Helm adds its own)."""
    helm = by_kind(helm_docs)["DaemonSet"][0]
    kust = kustomize_daemonset(kustomize_rendered)
    compare(result, "the DaemonSet's updateStrategy", helm["spec"].get("updateStrategy"), kust["spec"].get("updateStrategy"))
    hpod, kpod = helm["spec"]["template"]["spec"], kust["spec"]["template"]["spec"]
    # The pod's security context first, then everything else the pod spec has.
    compare(result, "the pod's securityContext", hpod.get("securityContext"), kpod.get("securityContext"))
    for key in sorted((set(hpod) | set(kpod)) - {"containers", "securityContext"}):
        compare(result, f"the pod's {key}", hpod.get(key), kpod.get(key))
    compare(result, "the containers' names", [c["name"] for c in hpod["containers"]], [c["name"] for c in kpod["containers"]])
    for hc, kc in zip(hpod["containers"], kpod["containers"]):
        compare(result, f"container {hc['name']}'s securityContext", hc.get("securityContext"), kc.get("securityContext"))
        compare(result, f"container {hc['name']}'s env", sorted(hc.get("env", []), key=lambda e: e["name"]),
                sorted(kc.get("env", []), key=lambda e: e["name"]))
        for key in sorted((set(hc) | set(kc)) - {"securityContext", "env"}):
            compare(result, f"container {hc['name']}'s {key}", hc.get(key), kc.get(key))


def same_objects(result, helm_docs):
    """RBAC, Service and ServiceAccount: the same grants and ports."""
    helm = by_kind(helm_docs)
    base = {}
    for file in sorted(BASE.glob("*.yaml")):
        if file.name != "kustomization.yaml":
            for doc in load_all(file):
                base[doc["kind"]] = doc
    compare(result, "the ClusterRole's rules", helm["ClusterRole"][0]["rules"], base["ClusterRole"]["rules"])
    compare(result, "the ClusterRoleBinding's roleRef kind", helm["ClusterRoleBinding"][0]["roleRef"]["kind"],
            base["ClusterRoleBinding"]["roleRef"]["kind"])
    compare(result, "the ServiceAccount's token mount", helm["ServiceAccount"][0].get("automountServiceAccountToken"),
            base["ServiceAccount"].get("automountServiceAccountToken"))
    compare(result, "the Service's spec (selector aside)",
            {k: v for k, v in helm["Service"][0]["spec"].items() if k != "selector"},
            {k: v for k, v in base["Service"]["spec"].items() if k != "selector"})
    kinds = sorted(helm)
    compare(result, "the kinds of objects (Helm has no Namespace: --create-namespace)",
            kinds, sorted(set(base) - {"Namespace"}))


def same_options(result, helm_docs):
    """What the opt-in objects carry, against the files they come from."""
    helm = by_kind(helm_docs)
    overlay = {d["kind"]: d for f in sorted(OVERLAY.glob("*.yaml")) if f.name != "kustomization.yaml" for d in load_all(f)}
    component = {d["kind"]: d for f in sorted(NETWORK_POLICY.glob("*.yaml")) if f.name != "kustomization.yaml"
                 for d in load_all(f)}
    compare(result, "the PodMonitor's endpoints", helm["PodMonitor"][0]["spec"]["podMetricsEndpoints"],
            overlay["PodMonitor"]["spec"]["podMetricsEndpoints"])
    compare(result, "the PrometheusRule's groups", helm["PrometheusRule"][0]["spec"]["groups"], load(RULES)["groups"],
            f"{rel(RULES)} (run `bash deploy/check.sh --fix`)")
    dashboard = next((c for c in helm.get("ConfigMap", []) if "idlemon-dashboard.json" in c.get("data", {})), None)
    compare(result, "the dashboard", json.loads(dashboard["data"]["idlemon-dashboard.json"]) if dashboard else None,
            json.loads(DASHBOARD.read_text()), f"{rel(DASHBOARD)} (run `bash deploy/check.sh --fix`)")
    if dashboard:
        result.check(dashboard["metadata"]["labels"].get("grafana_dashboard") == "1", "the dashboard has no grafana_dashboard label")
        result.check("grafana_folder" in dashboard["metadata"].get("annotations", {}), "the dashboard has no folder annotation")
    policy = helm["NetworkPolicy"][0]["spec"]
    compare(result, "the NetworkPolicy (pod selector aside)", {k: v for k, v in policy.items() if k != "podSelector"},
            {k: v for k, v in component["NetworkPolicy"]["spec"].items() if k != "podSelector"})


def helm_checks(out_dir, kustomize_rendered=None):
    from helm_python import chart as helm
    from helm_python.errors import HelmError

    version, image = workspace_facts()
    out = Path(out_dir)
    result = Failures(f"{rel(CHART)} (Helm SDK, offline)")

    report = helm.lint(str(CHART), strict=False)
    for message in report.get("messages", []):
        print(f"  lint {['unknown', 'info', 'warning', 'error'][message['severity']]}: {message['path']}: {message['error']}")
    result.check(not report.get("errors") and all(m["severity"] < 3 for m in report.get("messages", [])),
                 f"helm lint reports errors: {report.get('errors')}")
    for kube in ("v1.30.0", "v1.37.0"):
        report = helm.lint(str(CHART), ALL_OPTIONS, kube_version=kube)
        result.check(not report.get("errors") and all(m["severity"] < 3 for m in report.get("messages", [])),
                     f"helm lint with every option on, Kubernetes {kube}: {report.get('errors') or report.get('messages')}")

    with helm.Chart.load(str(CHART)) as chart:
        cases = {"defaults": {}, "opt-ins": OPT_INS, "all-options": ALL_OPTIONS, "servicemonitor": SERVICE_MONITOR}
        renders = {}
        for name, values in cases.items():
            try:
                docs = renders[name] = render(chart, values)
            except HelmError as error:
                result.check(False, f"render {name}: {error}")
                continue
            core = [d for d in docs if not str(d.get("apiVersion", "")).startswith(CRD_GROUP)]
            crds = [d for d in docs if str(d.get("apiVersion", "")).startswith(CRD_GROUP)]
            with open(out / f"helm-{name}.core.yaml", "w") as f:
                yaml.safe_dump_all(core, f, sort_keys=False)
            with open(out / f"helm-{name}.crd.yaml", "w") as f:
                yaml.safe_dump_all(crds, f, sort_keys=False)
            print(f"  rendered {name}: {', '.join(d['kind'] + '/' + d['metadata']['name'] for d in docs)}")

        # Refusals: every bad value fails the schema, naming where.
        refused = 0
        for why, values in BAD_VALUES:
            try:
                chart.render(values=values, **RELEASE)
            except HelmError as error:
                refused += 1
                first = next((line.strip() for line in str(error).splitlines() if line.strip().startswith("- at")), str(error))
                result.check(True, why)
                print(f"  refused {why}: {first}")
            else:
                result.check(False, f"values.schema.json accepts {why}: {values}")
        print(f"  values.schema.json refused {refused} of {len(BAD_VALUES)} bad values")

        # Pods roll when the path config or the enforcement changes.
        changed = dict(ALL_OPTIONS, idlemon=dict(ALL_OPTIONS["idlemon"], paths=PATHS_TOML.replace("6000", "4000")))
        enforced = dict(ALL_OPTIONS, idlemon=dict(ALL_OPTIONS["idlemon"],
                                                  enforce=dict(ALL_OPTIONS["idlemon"]["enforce"], mode="on")))
        checksums = []
        for values in (ALL_OPTIONS, changed, enforced):
            ds = by_kind(render(chart, values))["DaemonSet"][0]
            checksums.append(ds["spec"]["template"]["metadata"].get("annotations", {}).get("checksum/config"))
        result.check(checksums[0] is not None and len(set(checksums)) == 3,
                     f"the pod template's checksum/config does not change with idlemon.paths and idlemon.enforce: {checksums}")

        # Enforcement alone: a config file with only the [enforce] table, mounted.
        import tomllib

        docs = render(chart, {"idlemon": {"enforce": {"mode": "on"}}})
        kinds = by_kind(docs)
        config = [c for c in kinds.get("ConfigMap", []) if "idlemon.toml" in c.get("data", {})]
        env = {e["name"]: e.get("value") for e in kinds["DaemonSet"][0]["spec"]["template"]["spec"]["containers"][0]["env"]}
        result.check(len(config) == 1 and tomllib.loads(config[0]["data"]["idlemon.toml"]) == {"enforce": {"mode": "on"}}
                     and env.get("IDLEMON_CONFIG") == "/etc/idlemon/idlemon.toml",
                     f"idlemon.enforce.mode on alone does not render and mount [enforce] mode = \"on\": {config}")

    if "defaults" in renders:
        docs = renders["defaults"]
        same_daemonset(result, docs, kustomize_rendered)
        same_objects(result, docs)
        ds = by_kind(docs)["DaemonSet"][0]
        result.check(ds["spec"]["template"]["spec"]["containers"][0]["image"] == f"{image}:{version}",
                     f"the default image is not {image}:{version}")
    if "opt-ins" in renders:
        same_options(result, renders["opt-ins"])
    if "all-options" in renders:
        import tomllib

        docs = renders["all-options"]
        kinds = by_kind(docs)
        ds = kinds["DaemonSet"][0]
        pod = ds["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        expected_env = {
            "IDLEMON_LISTEN": "0.0.0.0:9791", "IDLEMON_API_LISTEN": "127.0.0.1:9782", "IDLEMON_IDLE_THRESHOLD": "240",
            "IDLEMON_IDLE_TIMEOUT": "300", "IDLEMON_SCAN_INTERVAL": "2.5", "IDLEMON_SOCKET_WALK": "namespaces",
            "IDLEMON_MAX_SOCKETS": "1048576", "IDLEMON_MAX_ATTRIBUTION_SERIES": "200",
            "IDLEMON_DESTINATION_LABELS": "20", "IDLEMON_EVENT_HISTORY": "1000000", "IDLEMON_EVENT_LOG": "",
            "IDLEMON_LOG_FORMAT": "text", "IDLEMON_LOG_LEVEL": "idlemon=debug",
            "IDLEMON_CONFIG": "/etc/idlemon/idlemon.toml", "IDLEMON_KERNEL_BTF": "/sys/kernel/btf/vmlinux",
        }
        for name, value in expected_env.items():
            result.check(env.get(name) == value, f"every option on: {name} is {env.get(name)!r}, expected {value!r}")
        result.check(container["image"] == ALL_OPTIONS["image"]["repository"] + "@" + ALL_OPTIONS["image"]["digest"],
                     f"a digest does not pin the image: {container['image']}")
        result.check(container.get("args") == ["--disable-attach=fentry"], "idlemon.extraArgs are not the container's args")
        result.check(container["ports"][0]["containerPort"] == 9791, "metrics.port is not the container port")
        result.check(container["securityContext"].get("seLinuxOptions") == {"type": "spc_t", "level": "s0"},
                     "seLinuxOptions are not the container's")
        for key in ("tolerations", "nodeSelector", "affinity", "priorityClassName", "imagePullSecrets"):
            result.check(pod.get(key) == ALL_OPTIONS[key], f"{key} is not what the values say")
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        configmaps = {c["metadata"]["name"]: c for c in kinds["ConfigMap"]}
        config = configmaps.get(volumes.get("config", {}).get("configMap", {}).get("name"))
        result.check(config is not None and mounts.get("config") == "/etc/idlemon",
                     "the path config ConfigMap is not mounted at /etc/idlemon")
        if config:
            try:
                parsed = tomllib.loads(config["data"]["idlemon.toml"])
                expected = dict(tomllib.loads(PATHS_TOML), enforce={
                    "mode": "dry-run", "cgroups": ["/kubepods.slice/kubepods-burstable.slice"],
                    "namespaces": ["payments", "billing"],
                    "pod_labels": {"app": "billing", "app.kubernetes.io/part-of": "pay"},
                    "override": True,
                    "idle_percent": 40, "interval": 20, "count": 4, "accepted": True})
                result.check(parsed == expected,
                             f"the ConfigMap's TOML is not idlemon.paths and idlemon.enforce's [enforce]: {parsed}")
            except tomllib.TOMLDecodeError as error:
                result.check(False, f"the ConfigMap's idlemon.toml is not TOML: {error}")
        rule = kinds["PrometheusRule"][0]
        urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
        result.check(all(u.startswith("https://wiki.example.com/idlemon/runbook#idlemon") for u in urls),
                     f"runbookUrlBase is not the base of every runbook_url: {urls[:2]}")
        for kind in ("PodMonitor", "PrometheusRule"):
            result.check(kinds[kind][0]["metadata"]["labels"].get("release") == "kube-prometheus-stack",
                         f"the {kind} lacks its extra labels")
        dashboard = [c for c in kinds["ConfigMap"] if "idlemon-dashboard.json" in c.get("data", {})][0]
        result.check(dashboard["metadata"]["namespace"] == "monitoring", "grafanaDashboard.namespace is not used")
        result.check(dashboard["metadata"]["annotations"].get("grafana_folder") == "Networking", "the folder annotation is not the value")
        policy = kinds["NetworkPolicy"][0]["spec"]
        peer = policy["ingress"][0]["from"][0]
        result.check(peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "observability"}
                     and peer.get("podSelector", {}).get("matchLabels") == {"app.kubernetes.io/name": "prometheus"}
                     and policy["ingress"][0]["ports"] == [{"port": 9791, "protocol": "TCP"}],
                     f"the NetworkPolicy does not admit the chosen namespace and pods on the metrics port: {policy}")
    if "servicemonitor" in renders:
        kinds = by_kind(renders["servicemonitor"])
        monitor = kinds.get("ServiceMonitor", [None])[0]
        service = kinds["Service"][0]
        result.check(monitor is not None and "PodMonitor" not in kinds, "serviceMonitor.enabled renders no ServiceMonitor alone")
        if monitor:
            result.check(monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(),
                         "the ServiceMonitor does not select the Service")
            result.check(all(e["port"] in [p["name"] for p in service["spec"]["ports"]] for e in monitor["spec"]["endpoints"]),
                         "the ServiceMonitor scrapes a port the Service does not name")
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
    if command == "chart-sync":
        return chart_sync("--fix" in args)
    if command == "release-facts":
        return release_facts()
    if command == "helm" and len(args) in (1, 2):
        return helm_checks(*args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
