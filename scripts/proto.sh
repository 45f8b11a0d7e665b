#!/usr/bin/env bash
# Protobuf tooling, one verb per call (the Makefile's proto targets call these):
#   deps      copy google/api/{annotations,http,httpbody}.proto from the pinned googleapis-common-protos
#             package into build/proto-deps (never committed, so never stale)
#   python D  generate the Python messages and gRPC stubs into D (default: service/)
#   openapi F generate the OpenAPI description of the REST API into F (default: edge/openapi.json)
#   check     buf lint, buf breaking against the first published v1, generated files fresh,
#             and every block scripts/render.py renders (envoy.yaml, READMEs) up to date
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
BUF=${BUF:-node_modules/.bin/buf}
DEPS=build/proto-deps
PROTO=illustrious/texttoimage/v1/text_to_image.proto

deps() {
  local src
  src=$("$PY" -c 'import os, google.api.annotations_pb2 as m; print(os.path.dirname(m.__file__))')
  mkdir -p "$DEPS/google/api"
  cp "$src/annotations.proto" "$src/http.proto" "$src/httpbody.proto" "$DEPS/google/api/"
}

python_code() {
  local out=${1:-service}
  deps
  "$PY" -m grpc_tools.protoc -I proto -I "$DEPS" \
    --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" "proto/$PROTO"
  # Regular packages (not namespace ones) so that setuptools finds them.
  for d in illustrious illustrious/texttoimage illustrious/texttoimage/v1; do
    : >"$out/$d/__init__.py"
  done
}

openapi() {
  local out=${1:-edge/openapi.json} work
  deps
  work=$(mktemp -d)
  "$PY" -m grpc_tools.protoc -I proto -I "$DEPS" --include_imports --include_source_info \
    --descriptor_set_out="$work/api.pb" "proto/$PROTO"
  "$PY" scripts/openapi.py "$work/api.pb" "$out"
  rm -rf "$work"
}

check() {
  deps
  "$BUF" lint proto
  # Breaking changes are judged against the commit that first published v1: anything that
  # broke a v1 client since then fails, not only changes in the latest commit.
  local baseline work
  baseline=$(git log --diff-filter=A --format=%H -- "proto/$PROTO" | tail -n 1)
  if [ -z "$baseline" ]; then
    echo "proto: v1 is not committed yet, nothing to compare against" >&2
  else
    work=$(mktemp -d)
    git archive "$baseline" buf.yaml proto | tar -x -C "$work"
    mkdir -p "$work/build" && cp -r "$DEPS" "$work/build/"
    "$BUF" build "$work" -o "$work/baseline.binpb"
    "$BUF" breaking proto --against "$work/baseline.binpb"
    rm -rf "$work"
    echo "proto: no breaking change since ${baseline:0:12}"
  fi
  local fresh
  fresh=$(mktemp -d)
  python_code "$fresh"
  if ! diff -r -x __pycache__ "$fresh/illustrious" service/illustrious; then
    echo "proto: generated code in service/illustrious is stale; run 'make proto'" >&2
    exit 1
  fi
  openapi "$fresh/openapi.json"
  if ! diff -q "$fresh/openapi.json" edge/openapi.json; then
    echo "proto: edge/openapi.json is stale; run 'make proto'" >&2
    exit 1
  fi
  rm -rf "$fresh"
  "$PY" scripts/render.py --check
  echo "proto: lint clean, generated code, OpenAPI and rendered blocks fresh"
}

case "${1:-}" in
  deps) deps ;;
  python) python_code "${2:-service}" ;;
  openapi) openapi "${2:-edge/openapi.json}" ;;
  check) check ;;
  *) echo "usage: $0 deps|python [DIR]|openapi [FILE]|check" >&2; exit 2 ;;
esac
