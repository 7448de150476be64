# `make demo` and `make test` each bootstrap .venv on first use, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow test-all bench mutate clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The total includes bootstrapping .venv (the first time), so it is what a fresh clone costs.
demo:
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory $(STAMP) && $(BIN)/mambakit quickstart; rc=$$?; \
	echo "make demo: total wall time $$(( $$(date +%s) - start )) s (venv included)"; exit $$rc

# The suite CI and users run: everything but the end-to-end runs marked slow (under 15 minutes on 2 cores).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

# End-to-end runs (training through the CLI on real data); CI runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# Benchmarks compare against mambapy's pure-PyTorch scan; it declares only torch, so no deps are pulled.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps mambapy==1.2.0
	$(BIN)/python benchmarks/scan.py

# Plant known bugs one at a time in a temporary copy; report which survive the tests meant to catch them.
mutate: $(STAMP)
	$(BIN)/python benchmarks/mutate.py --markdown benchmarks/results/mutate.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
