# The two front-door commands are `make run` and `make test`; both build what they need from
# nothing (.venv from PyPI, node_modules from npm).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
BUF := node_modules/.bin/buf

.PHONY: run test install proto proto-check render bench

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

install: $(VENV)/.installed node_modules/.installed

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

# Serving benchmark: raw engine vs gRPC service vs naive peer; writes docs/benchmarks.md.
bench: install
	$(PY) -m benchmarks.serving

# Billing overhead: no billing vs SQLite ledger vs PostgreSQL + Redis.
bench-billing: install
	$(PY) -m benchmarks.billing

# REST through Envoy vs direct gRPC on the same service.
bench-edge: install
	$(PY) -m benchmarks.edge

# Per-request LoRA: mixed batches vs one adapter set per batch; writes docs/benchmarks.md.
bench-lora: install
	$(PY) -m benchmarks.lora

# Scale-out proof: two replicas + one Envoy + PostgreSQL + Redis; writes docs/scale-out.md.
scaleout: install
	$(PY) -m benchmarks.scaleout
