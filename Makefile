# Every target bootstraps .venv itself, so each works on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed
PORT ?= 8443
# The Python the project needs (pyproject.toml requires-python); checked before anything is built.
PYTHON_MIN := 3.11

.PHONY: run test lint typecheck unit clean bench bench-peer system-deps node-deps python-version spire test-spire

## python-version: refuse a Python older than $(PYTHON_MIN), and a .venv made by one (it is rebuilt)
python-version:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { \
	  echo "this project needs Python >= $(PYTHON_MIN); $(PYTHON) is $$($(PYTHON) -V 2>&1). Use PYTHON=python3.11 (or newer)."; exit 2; }
	@if [ -x $(BIN)/python ] && ! $(BIN)/python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then \
	  echo "$(VENV) was made by $$($(BIN)/python -V 2>&1); rebuilding it with $(PYTHON)"; rm -rf $(VENV); fi

$(BIN)/python: | python-version
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# What running needs (make run): the package and its dependencies only.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip uninstall --quiet --quiet --yes sts  # the distribution's name before spiffe-sts
	$(BIN)/python -m pip install --quiet -e '.[server]'
	@touch $(RUN_STAMP)

# What testing needs besides: linters, type checker, pytest, the third-party interop clients.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip uninstall --quiet --quiet --yes sts  # the distribution's name before spiffe-sts
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP) $(RUN_STAMP)

## run: the development environment end to end (`sts dev`): Workload API server + STS; it prints what to
## try, including `sts demo --state-dir state/dev`, the whole agent story against it. SPIRE=1: on a real
## SPIRE server and agent (built by `make spire`) instead of the development Workload API server
run: python-version $(RUN_STAMP) $(if $(filter 1,$(SPIRE)),spire)
	$(BIN)/sts dev --state-dir state/dev --port $(PORT) $(if $(filter 1,$(SPIRE)),--spire)

## test: lint, type-check, then the whole suite
test: python-version lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check sts spire tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) system-deps node-deps
	$(BIN)/pytest

## system-deps: what the tests run besides Python (redis-server, redis-sentinel, wrk for the failover-under-load
## test, prometheus and promtool for the metrics tests), from Debian's packages when missing
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (the store tests start their own)"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends redis-server; }
	@command -v redis-sentinel >/dev/null 2>&1 || { \
	  echo "installing redis-sentinel (the failover tests start their own Sentinels)"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends redis-sentinel; }
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk (the Redis failover test drives load with it)"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends wrk; }
	@{ command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; } || { \
	  echo "installing prometheus (the metrics tests scrape the STS with it and check rules with promtool)"; \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends prometheus; }

## node-deps: the pinned npm clients the interop tests drive (tests/interop/package-lock.json, `npm ci`);
## reinstalled only when the lock file is newer than the install (node_modules/.package-lock.json)
INTEROP := tests/interop
NODE_STAMP := $(INTEROP)/node_modules/.package-lock.json
node-deps: $(NODE_STAMP)

$(NODE_STAMP): $(INTEROP)/package-lock.json $(INTEROP)/package.json
	@command -v npm >/dev/null 2>&1 || { \
	  echo "make node-deps needs Node.js >= 20.18.1 with npm (tests/interop drives npm clients)"; exit 2; }
	cd $(INTEROP) && npm ci --no-audit --no-fund
	@touch $(NODE_STAMP)

## spire: SPIRE server and agent (v1.13.3, pinned in spire/real/go.mod) built from the Go module proxy
## into ~/.cache/sts-tools/spire-<version>/bin (reused when present; a cold build takes minutes)
spire:
	spire/real/build.sh

## test-spire: the real-SPIRE suite (tests/spire_real), building SPIRE first if needed
test-spire: $(STAMP) spire
	STS_SPIRE_BIN=$$(spire/real/build.sh) $(BIN)/pytest tests/spire_real

## bench: the benchmark end to end on loopback (installs wrk and redis-server when missing); QUICK=1 for
## about a minute (N=16,64, no peer, no Redis or slow-client runs); SOAK=1 adds a 10-minute soak;
## CHECK=1 exits 1 when a target is NOT MET
bench: $(STAMP) system-deps
	$(BIN)/python -m bench $(if $(filter 1,$(QUICK)),--quick) $(if $(filter 1,$(CHECK)),--check) \
	  $(if $(filter 1,$(SOAK)),--soak 10)

## bench-peer: the full benchmark, then authgent-server (PyPI, throwaway venv) and Keycloak (Maven Central,
## cached outside the repository; needs Java 17+ and Maven) with the same load shape
bench-peer: $(STAMP) system-deps
	$(BIN)/python -m bench --peer $(if $(filter 1,$(CHECK)),--check) $(if $(filter 1,$(SOAK)),--soak 10)

clean:
	rm -rf $(VENV) state .mypy_cache .ruff_cache .pytest_cache $(INTEROP)/node_modules
