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

## run: the example server on embedded defaults, with development trust bundles (until `sts dev` exists)
run: $(STAMP)
	$(BIN)/python certs/dev_certs.py init
	@echo "Try it: TOKEN=\$$($(BIN)/python certs/dev_certs.py svid spiffe://example.org/agent/researcher)"
	@echo "  curl -s localhost:8443/token -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\"
	@echo "    -d subject_token_type=urn:ietf:params:oauth:token-type:jwt -d subject_token=\$$TOKEN \\"
	@echo "    -d audience=tool:web-search -d scope=invoke"
	$(BIN)/sts serve --config examples/config.yaml

## test: lint, type-check, then the whole suite
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check sts tests certs

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) state .mypy_cache .ruff_cache .pytest_cache
