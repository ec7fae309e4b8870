# Every target sets itself up on first use: a fresh clone needs only `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Tests and benchmarks read Tiny Shakespeare through this variable when the shared copy exists.
TINYSHAKESPEARE ?= $(wildcard $(abspath ../shared/data/tinyshakespeare.txt))
export TINYGPT_TINYSHAKESPEARE ?= $(TINYSHAKESPEARE)

.PHONY: install test summary bench clean chromium figures

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

test: $(STAMP) chromium
	$(PY) -m pytest

# The browser test (tests/test_pictures_browser.py) drives Debian's chromium; in CI it fails rather
# than skips when chromium is missing, so install it here (as root) when it is not there yet.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else echo "/usr/bin/chromium is missing: run 'sudo apt-get install -y chromium' for the browser test"; fi; \
	fi

# The README heatmap and the tour's figures (trains a small model for a few minutes).
figures: $(STAMP)
	$(PY) docs/make_figures.py

summary: $(STAMP)
	$(VENV)/bin/tinygpt summary --config seed

# Attention and model timings, CPU (and CUDA when present): table on stdout, JSON + PNG in
# benchmarks/results/. `make bench BENCH_ARGS=--quick` runs every code path on tiny sizes.
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
