# Every target bootstraps .venv itself, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## run: the development environment end to end (`sts dev`): Workload API server + STS; it prints what to
## try, including `sts demo --state-dir state/dev`, the whole agent story against it
run: $(STAMP)
	$(BIN)/sts dev --state-dir state/dev --port 8443

## test: lint, type-check, then the whole suite
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check sts spire tests

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) state .mypy_cache .ruff_cache .pytest_cache
