# The two front-door commands: `make run` and `make test`. Both build .venv from nothing.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test install

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test]'
	# Test-only oracle; --no-deps because its declared deps pull a CUDA torch + torchvision.
	$(PIP) install -c constraints.txt --no-deps k-diffusion
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/t2i info

test: $(VENV)/.installed
	$(PY) -m pytest
