# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test test-fast lint typecheck docs pytest clean

setup: $(STAMP)

# torch first, from the CPU wheel on disk; the project itself only asks for torch>=2.6.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedbehavior simulate

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

test: lint typecheck docs pytest

# The edit loop: lint, types and every test but the slow ones (deployments, end-to-end runs).
test-fast: lint typecheck
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs site .mypy_cache .pytest_cache .ruff_cache
