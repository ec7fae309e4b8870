# Every target sets itself up on first use: a fresh clone needs only `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Tests and benchmarks read Tiny Shakespeare through this variable when the shared copy exists.
TINYSHAKESPEARE ?= $(wildcard $(abspath ../shared/data/tinyshakespeare.txt))
export TINYGPT_TINYSHAKESPEARE ?= $(TINYSHAKESPEARE)

.PHONY: install test summary bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

summary: $(STAMP)
	$(VENV)/bin/tinygpt summary --config seed

# Attention and model timings, CPU (and CUDA when present): table on stdout, JSON + PNG in
# benchmarks/results/. `make bench BENCH_ARGS=--quick` runs every code path on tiny sizes.
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
