#!/usr/bin/env bash
# Validates everything under deploy/, offline, and is what CI runs:
#
#   bash deploy/check.sh          check; exit non-zero on any failure
#   bash deploy/check.sh --fix    first rewrite the PrometheusRule and the
#                                 Helm chart's copies (helm/idlemon/files/)
#                                 from prometheus/idlemon-rules.yml and
#                                 grafana/idlemon-dashboard.json, then check
#
# It installs what it lacks (needs root or sudo for apt, only the first time):
#   - a Python virtualenv in ~/.cache/idlemon/deploy-check with PyYAML,
#     kubernetes-validate, the prometheus-operator CRD models and
#     helm-python-sdk (the Helm v4 SDK as a library: the chart is linted and
#     rendered without a helm binary or a cluster);
#   - promtool, unpacked from Debian's prometheus package into the same cache
#     (not installed: that package would also start a Prometheus server).
# kubectl is used to render the kustomizations when it has kustomize v4 or
# later; without it, each resource file is validated on its own.
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$DEPLOY"

FIX=false
for arg in "$@"; do
    case "$arg" in
        --fix) FIX=true ;;
        -h | --help) sed -n '2,15p' "$DEPLOY/check.sh" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "deploy/check.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

CACHE="${IDLEMON_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/idlemon/deploy-check}"
VENV="$CACHE/venv"
PY="$VENV/bin/python"
# Versions known to work; kubernetes-validate 1.37 has schemas for 1.25-1.37.
PIP_PACKAGES=(
    "PyYAML>=6"
    "kubernetes-validate==1.37.0"
    "cloudcoil.models.prometheus_operator==0.80.1.0"
    "helm-python-sdk==0.2.2"
)
# Kubernetes versions the manifests must be valid for: the oldest with
# securityContext.appArmorProfile, and the newest kubernetes-validate knows.
K8S_VERSIONS=(1.30 1.37)

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "deploy/check.sh: needs root (or sudo) to run: $*" >&2
        return 1
    fi
}

APT_UPDATED=false
apt_update_once() {
    if ! $APT_UPDATED; then
        as_root apt-get update -q
        APT_UPDATED=true
    fi
}

# ------------------------------------------------------------------ tools
step "tools"

if ! command -v python3 >/dev/null 2>&1; then
    note "installing python3 (Debian)"
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3 python3-venv
fi

if [ ! -x "$PY" ]; then
    note "creating a Python virtualenv in $VENV"
    mkdir -p "$CACHE"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        # Debian's python3 lacks ensurepip until python3-venv is installed.
        rm -rf "$VENV"
        apt_update_once
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv
        python3 -m venv "$VENV"
    fi
fi
if ! "$PY" -c 'import importlib.metadata as m, yaml, kubernetes_validate, cloudcoil.models.prometheus_operator, helm_python; assert m.version("helm-python-sdk") == "0.2.2"' 2>/dev/null; then
    note "installing ${PIP_PACKAGES[*]} (PyPI)"
    "$PY" -m pip install --quiet --disable-pip-version-check "${PIP_PACKAGES[@]}"
fi
"$PY" -c 'import importlib.metadata as m, yaml, kubernetes_validate.version as v; print("    python", __import__("sys").version.split()[0], "| PyYAML", yaml.__version__, "| kubernetes-validate", v.__version__, "| helm-python-sdk", m.version("helm-python-sdk"))'

PROMTOOL="$(command -v promtool || true)"
if [ -z "$PROMTOOL" ]; then
    PROMTOOL="$CACHE/promtool/usr/bin/promtool"
    if [ ! -x "$PROMTOOL" ]; then
        note "unpacking promtool from Debian's prometheus package into $CACHE/promtool"
        # apt's download sandbox user must be able to write there.
        install -d -m 0777 "$WORK/deb"
        if ! (cd "$WORK/deb" && apt-get download -q prometheus >/dev/null 2>&1); then
            apt_update_once
            (cd "$WORK/deb" && apt-get download -q prometheus >/dev/null)
        fi
        rm -rf "$CACHE/promtool"
        dpkg-deb -x "$WORK"/deb/prometheus_*.deb "$CACHE/promtool"
    fi
fi
note "$("$PROMTOOL" --version 2>&1 | head -1) ($PROMTOOL)"

KUSTOMIZE=false
if command -v kubectl >/dev/null 2>&1; then
    kustomize_version="$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\{0,1\}\([0-9]*\).*/\1/p')"
    if [ -n "$kustomize_version" ] && [ "$kustomize_version" -ge 4 ]; then
        KUSTOMIZE=true
        note "kubectl with kustomize v$kustomize_version: rendering the kustomizations"
    else
        note "kubectl's kustomize is older than v4 (or unknown): validating resource files one by one"
    fi
else
    note "no kubectl: validating resource files one by one"
fi

# ------------------------------------------------------------------ checks
FAILED=()
check() {
    local name="$1"
    shift
    step "$name"
    if "$@"; then
        note "ok"
    else
        note "FAILED: $name"
        FAILED+=("$name")
    fi
}

kubernetes_validate() {
    # --strict rejects unknown fields. A kind without a schema is only a
    # warning for kubernetes-validate: here it is a failure.
    local args=() version output status=0
    for version in "${K8S_VERSIONS[@]}"; do args+=(-k "$version"); done
    note "kubernetes-validate --strict ${args[*]} $*"
    output="$("$VENV/bin/kubernetes-validate" --strict --quiet "${args[@]}" "$@" 2>&1)" || status=$?
    if [ -n "$output" ]; then
        printf '%s\n' "$output" | sed 's/^/    /'
    fi
    if grep -q '^WARN' <<<"$output"; then
        return 1
    fi
    if [ "$status" -eq 0 ]; then
        note "$("$PY" -c 'import sys, yaml; docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]; print(len(docs), "resources valid:", ", ".join(sorted(d["kind"] + "/" + d["metadata"]["name"] for d in docs)))' "$@")"
    fi
    return "$status"
}

base_files=()
while IFS= read -r file; do base_files+=("$file"); done \
    < <(ls base/*.yaml | grep -v '/kustomization\.yaml$')
base_files+=(components/network-policy/networkpolicy.yaml)
crd_files=(overlays/prometheus-operator/podmonitor.yaml overlays/prometheus-operator/prometheusrule.yaml)

if $FIX; then
    check "rewrite the PrometheusRule from prometheus/idlemon-rules.yml (--fix)" \
        "$PY" checks.py rules-sync --fix
    check "rewrite helm/idlemon/files/ from the rules and the dashboard (--fix)" \
        "$PY" checks.py chart-sync --fix
fi

check "Kubernetes manifests, file by file (kubernetes-validate --strict, Kubernetes ${K8S_VERSIONS[*]})" \
    kubernetes_validate "${base_files[@]}"

if $KUSTOMIZE; then
    render_and_validate() {
        local dir="$1" name
        name="$(basename "$dir")"
        kubectl kustomize "$dir" >"$WORK/$name.yaml" || return 1
        "$PY" checks.py split "$WORK/$name.yaml" "$WORK/$name.core.yaml" "$WORK/$name.crd.yaml" || return 1
        kubernetes_validate "$WORK/$name.core.yaml" || return 1
        if [ -s "$WORK/$name.crd.yaml" ] && [ "$(cat "$WORK/$name.crd.yaml")" != "[]" ]; then
            "$PY" checks.py crds "$WORK/$name.crd.yaml" || return 1
        fi
    }
    check "kubectl kustomize base, then validate the output" render_and_validate base
    check "kubectl kustomize overlays/prometheus-operator, then validate the output" \
        render_and_validate overlays/prometheus-operator
    # The component as a user adds it: base plus components/network-policy.
    mkdir -p "$WORK/network-policy"
    cat >"$WORK/network-policy/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$WORK/network-policy" "$DEPLOY/base")
components:
  - $(realpath --relative-to="$WORK/network-policy" "$DEPLOY/components/network-policy")
EOF
    check "kubectl kustomize base + components/network-policy, then validate the output" \
        render_and_validate "$WORK/network-policy"
fi

# The chart: lint, renders (defaults, the opt-ins, every option, the
# ServiceMonitor), the schema's refusals, and the rendered DaemonSet against
# the Kustomize one (kubectl kustomize's output when there is one).
helm_chart() {
    local kustomized=()
    if [ -s "$WORK/base.yaml" ]; then kustomized=("$WORK/base.yaml"); fi
    "$PY" checks.py helm "$WORK" "${kustomized[@]}"
}
check "Helm chart helm/idlemon: lint, render, values.schema.json, same DaemonSet as Kustomize" helm_chart
helm_renders_valid() {
    local core=() crd=() file
    for file in "$WORK"/helm-*.core.yaml; do [ -e "$file" ] && core+=("$file"); done
    for file in "$WORK"/helm-*.crd.yaml; do
        if [ -s "$file" ] && [ "$(cat "$file")" != "[]" ]; then crd+=("$file"); fi
    done
    [ "${#core[@]}" -gt 0 ] || { note "no Helm render to validate"; return 1; }
    kubernetes_validate "${core[@]}" || return 1
    "$PY" checks.py crds "${crd[@]}"
}
check "every Helm render against Kubernetes ${K8S_VERSIONS[*]} and the prometheus-operator CRD schemas" \
    helm_renders_valid
check "helm/idlemon/files/ identical to prometheus/idlemon-rules.yml and grafana/idlemon-dashboard.json" \
    "$PY" checks.py chart-sync
check "one image repository and version (Cargo.toml) in the chart and the manifests" \
    "$PY" checks.py release-facts

check "PodMonitor and PrometheusRule against the prometheus-operator CRD schemas" \
    "$PY" checks.py crds "${crd_files[@]}"
check "manifests agree with each other (labels, ports, RBAC, capabilities, mounts)" \
    "$PY" checks.py manifests
check "promtool check rules prometheus/idlemon-rules.yml" \
    "$PROMTOOL" check rules prometheus/idlemon-rules.yml
check "promtool test rules prometheus/idlemon-rules.test.yml" \
    "$PROMTOOL" test rules prometheus/idlemon-rules.test.yml
check "PrometheusRule spec.groups identical to prometheus/idlemon-rules.yml groups" \
    "$PY" checks.py rules-sync
check "alert conventions (severity, for, annotations, runbook anchors)" \
    "$PY" checks.py rules-lint
check "python3 -m json.tool grafana/idlemon-dashboard.json" \
    bash -c "'$PY' -m json.tool grafana/idlemon-dashboard.json >/dev/null"
check "dashboard conventions (\${datasource}, \$__rate_interval, idlemon metrics only, queries parse)" \
    "$PY" checks.py dashboard "$PROMTOOL"
if [ -f Containerfile ]; then
    check "Containerfile copies every workspace member" \
        "$PY" checks.py containerfile
fi

echo
if [ "${#FAILED[@]}" -gt 0 ]; then
    echo "deploy/check.sh: ${#FAILED[@]} check(s) failed:"
    printf '  - %s\n' "${FAILED[@]}"
    exit 1
fi
echo "deploy/check.sh: all checks passed"
