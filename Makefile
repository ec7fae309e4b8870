# Every target sets itself up on first use: a fresh clone needs only `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Tests and benchmarks read Tiny Shakespeare through this variable when the shared copy exists.
TINYSHAKESPEARE ?= $(wildcard $(abspath ../shared/data/tinyshakespeare.txt))
export TINYGPT_TINYSHAKESPEARE ?= $(TINYSHAKESPEARE)

.PHONY: install test lint summary bench clean chromium figures data train sample bench-train \
        bench-gpt2

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

# The linter first: a style slip fails in seconds, before the suite's minutes.
test: $(STAMP) chromium lint
	$(PY) -m pytest

# ruff, pinned in the dev extra and configured in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

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

# GPT-2 small in TinyGPT against transformers, same weights: forward and KV-cache generation.
# `make bench-gpt2 BENCH_ARGS=--quick` checks it runs.
bench-gpt2: $(STAMP)
	$(PY) -m benchmarks.gpt2 $(BENCH_ARGS)

# `make train`: the default corpus, the shakespeare-cpu preset, about five minutes on two cores,
# a checkpoint in runs/, then a 500-character sample of the newest run (`make sample` alone draws
# one). TRAIN_ARGS adds any `tinygpt train` option, SAMPLE_ARGS any `tinygpt generate` option.
TRAIN_STEPS ?= 4000
TRAIN_ARGS  ?=
SAMPLE_ARGS ?= --max-new-tokens 500 --temperature 0.8

data: $(STAMP)
	$(VENV)/bin/tinygpt prepare --corpus shakespeare

train: data
	$(VENV)/bin/tinygpt train --corpus shakespeare --config shakespeare-cpu --steps $(TRAIN_STEPS) \
		--eval-every 250 $(TRAIN_ARGS)
	$(VENV)/bin/tinygpt generate $(SAMPLE_ARGS)

sample: $(STAMP)
	$(VENV)/bin/tinygpt generate $(SAMPLE_ARGS)

# `make induction`: a 2-layer attention-only model trained on Tiny Shakespeare mixed with random
# tokens repeated, its heads scored as it trains (about two minutes on one core); writes
# runs/induction/ and copies the figure and the checkpoint to docs/ (docs/induction.md and the
# tour use them). INDUCTION_ARGS adds any `tinygpt experiment induction` option.
INDUCTION_ARGS ?=

.PHONY: induction
induction: $(STAMP)
	$(VENV)/bin/tinygpt experiment induction --corpus tinyshakespeare \
		$(if $(TINYGPT_TINYSHAKESPEARE),--tinyshakespeare $(TINYGPT_TINYSHAKESPEARE)) \
		--seed 0 --out runs/induction $(INDUCTION_ARGS)
	cp runs/induction/induction.png docs/induction.png
	rm -rf docs/induction-model && mkdir -p docs/induction-model
	cp -r runs/induction/ckpt-* docs/induction-model/

bench-train: $(STAMP)
	$(PY) benchmarks/train_recipe.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
