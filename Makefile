# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo bench clean

# torch goes in first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-build-isolation "deepspeed==$(DEEPSPEED_VERSION)"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m pytest -q -ra

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(PY) -m training.demo

bench: install
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.scaling --measure --world_sizes 1 2 --steps 3

clean:
	rm -rf $(VENV) demo_output
