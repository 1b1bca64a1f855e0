# Every target creates .venv when missing. torch is pinned first: the CPU wheel; a bare `torch`
# requirement with no torch installed would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-dev
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-slow test-all lint bench bench-serve bench-qlora venv browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Headless Chromium for the playground test (Debian packages; the test skips when unavailable).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	  || echo "chromium could not be installed; the playground browser test will be skipped"; }

demo: $(STAMP)
	$(BIN)/loratune train examples/quickstart.yaml

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) browser
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP) browser
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/train_speed.py

bench-serve: $(STAMP)
	$(BIN)/python bench/serve_mixed.py
	$(BIN)/python bench/serve_load.py

bench-qlora: $(STAMP)
	$(BIN)/python bench/qlora_memory.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
