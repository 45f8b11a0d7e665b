# The two front-door commands are `make run` and `make test`; both build what they need from
# nothing (.venv from PyPI, node_modules from npm).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
BUF := node_modules/.bin/buf

.PHONY: run test install browser proto proto-check render bench

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test]'
	# Test-only oracle; --no-deps because its declared deps pull a CUDA torch + torchvision.
	$(PIP) install -c constraints.txt --no-deps k-diffusion
	# Not test-only: the demo model (`make run`) takes its CLIP BPE vocabulary from this package's
	# bpe_simple_vocab_16e6.txt.gz, and no module of it is imported. --no-deps for the same reason.
	$(PIP) install -c constraints.txt --no-deps open-clip-torch
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Headless Chromium and its WebDriver for the playground's browser test (tests/edge/test_playground.py):
# Debian's packages, so that nothing downloads a browser of its own. apt-get as root (else sudo).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	else echo "make: no apt-get: install Chromium and chromedriver at /usr/bin yourself (tests/edge/test_playground.py)"; fi

install: $(VENV)/.installed node_modules/.installed browser

# The service and the Envoy REST edge on the demo model, with a demo API key; prints a curl
# command for the documented example. Ctrl-C stops both.
run: $(VENV)/.installed
	$(VENV)/bin/t2i --log-format text up --http-port 8080 --grpc-port 50051 --metrics-port 9464 --data-dir data

test: install proto-check
	$(PY) -m pytest

# Regenerate the Python protobuf code after editing proto/ (the result is committed).
proto: install
	PY=$(PY) BUF=$(BUF) scripts/proto.sh python
	PY=$(PY) BUF=$(BUF) scripts/proto.sh openapi
	$(PY) scripts/render.py

# Rewrite the blocks rendered from Python sources (error table, settings) in envoy.yaml and
# the READMEs; proto-check fails when one is stale.
render: install
	$(PY) scripts/render.py

# buf lint, buf breaking against the first published v1, and generated code up to date.
proto-check: install
	PY=$(PY) BUF=$(BUF) scripts/proto.sh check

# Serving benchmark: first the engine's own cost outside the UNet (the loop per step with a no-op
# UNet at batch 1 and 8, and per request against diffusers' pipeline; "loop"), then the service vs a
# dynamic-batching peer vs a naive peer (diffusers), homogeneous and mixed workloads, open loop at
# three loads, plus raw engine vs service ("serving"); last, the image mix: a third image to image, a
# sixth hires fix, the service vs a dynamic-batching peer on diffusers' image pipelines near capacity
# ("serving-image", also `make bench-image`). About 17 to 24 minutes on 2 cores.
bench: install
	$(PY) -m benchmarks.loop_cost
	$(PY) -m benchmarks.serving
	$(PY) -m benchmarks.image_serving

# The image mix alone (benchmarks/image_serving.py): 4 to 6 minutes on 2 cores; writes docs/benchmarks.md
# ("serving-image").
# Jobs against synchronous calls at the same offered load, and submit-to-start latency on one
# replica (SQLite) and two (PostgreSQL): about 8 minutes on 2 cores; writes docs/benchmarks.md ("jobs").
.PHONY: bench-jobs
bench-jobs: install
	$(PY) -m benchmarks.jobs

.PHONY: bench-image
bench-image: install
	$(PY) -m benchmarks.image_serving

# The GPU check on a CUDA machine, offline, under 8 minutes (benchmarks/gpu_check.sh's header says how to
# carry the wheels it installs); writes docs/benchmarks.md ("gpu"). `make gpu-check ARGS=--dry-run` runs
# its plumbing on the CPU with tiny sizes in a few minutes and keeps no figures.
.PHONY: gpu-check
gpu-check:
	benchmarks/gpu_check.sh $(ARGS)

# Billing overhead: no billing vs SQLite ledger vs PostgreSQL + Redis.
bench-billing: install
	$(PY) -m benchmarks.billing

# REST through Envoy vs direct gRPC on the same service.
bench-edge: install
	$(PY) -m benchmarks.edge

# Streams with previews against unary calls; writes docs/benchmarks.md.
bench-stream: install
	$(PY) -m benchmarks.streaming

# Fair sharing under a flood, FIFO vs fair; writes docs/benchmarks.md ("fairness").
bench-fairness: install
	$(PY) -m benchmarks.fairness

# The cost model's constants (t2i/cost.py), measured; writes docs/benchmarks.md ("cost").
bench-cost: install
	$(PY) -m benchmarks.cost

# Per-request LoRA: mixed batches vs one adapter set per batch; writes docs/benchmarks.md.
bench-lora: install
	$(PY) -m benchmarks.lora

# Per-row LoRAs on an SDXL-size UNet (random weights), no LoRA vs rank 16/64 and each strategy;
# writes docs/benchmarks.md ("lora-sdxl"). About 15 minutes and 16 GB of memory on a 2-core CPU.
bench-lora-sdxl: install
	$(PY) -m benchmarks.lora_sdxl

# Scale-out proof: two replicas + one Envoy + PostgreSQL + Redis; writes docs/scale-out.md.
scaleout: install
	$(PY) -m benchmarks.scaleout
