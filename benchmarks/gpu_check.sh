#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it measures):
#
#   benchmarks/gpu_check.sh               # on a CUDA machine, offline: under 8 minutes, installs included;
#                                         # writes the "gpu" section of docs/benchmarks.md
#   benchmarks/gpu_check.sh --dry-run     # anywhere, on the CPU, tiny sizes: the whole plumbing in a few
#                                         # minutes; keeps no figures (notes in the "gpu" section that the
#                                         # plumbing passed, unless a GPU run has written it)
#   (other flags go to python -m benchmarks.gpu_check: --budget S, --compile regional|full, --vae-dir DIR)
#
# What the GPU machine needs: Python ($PYTHON, default python3) with a CUDA build of torch (any 2.x its
# driver takes), numpy, scipy and pillow; everything else comes from a wheel folder carried with the
# tree ($WHEELS, default benchmarks/gpu-wheels), installed offline (pip --no-index --find-links, --no-deps)
# into $SITE, which goes first on PYTHONPATH, so the pinned versions win over what the machine has.
#
# Preparing the wheel folder, on any machine with internet access, for the GPU machine's Python version
# and platform (here Python 3.12 on x86-64 Linux; about 46 MB):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d benchmarks/gpu-wheels -r benchmarks/gpu_requirements.txt
#   # optional, for the xformers rows: the xformers wheel built for the GPU machine's torch version, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d benchmarks/gpu-wheels xformers==VERSION_FOR_THAT_TORCH
#
# Then carry the tree with benchmarks/gpu-wheels to the GPU machine and run this script from anywhere.
# Without a wheel folder the script uses $PYTHON as it is (or, for --dry-run, the project's .venv).
set -euo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."

dry_run=""
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then dry_run=1; fi
done
budget=${GPU_CHECK_BUDGET:-470}   # seconds for everything, this script's installs included
wheels=${WHEELS:-benchmarks/gpu-wheels}
site=${SITE:-/tmp/t2i-gpu-check-site}

if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ -n "$dry_run" ] && [ ! -d "$wheels" ] && [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=python3
fi

if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "--- gpu check: installing $(ls "$wheels"/*.whl | wc -l) wheels from $wheels into $site (offline)"
    "$python" -m pip install -q --disable-pip-version-check --no-index --find-links "$wheels" --no-deps \
        --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The project itself runs from the tree: its packages live in service/, the benchmarks and testbed here.
export PYTHONPATH="$PWD/service:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

"$python" - <<'EOF'
import importlib, importlib.util, sys
missing = []
for name in ("torch", "numpy", "scipy", "PIL", "diffusers", "transformers", "grpc", "grpc_health", "grpc_reflection",
             "google.protobuf", "prometheus_client", "pydantic", "yaml", "typer", "t2i", "illustrious"):
    try:
        importlib.import_module(name)
    except Exception as error:
        missing.append(f"{name} ({type(error).__name__}: {error})")
if importlib.util.find_spec("open_clip") is None:
    missing.append("open_clip (open-clip-torch: the CLIP vocabulary file)")
if missing:
    sys.exit("gpu check: cannot import " + "; ".join(missing) + "\n(see this script's header: the wheel folder)")
import torch
print(f"--- gpu check: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"CUDA {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
EOF

elapsed=$(( $(date +%s) - started ))
exec "$python" -m benchmarks.gpu_check --budget $(( budget - elapsed )) "$@"
