"""Exported GGUF files run in llama.cpp itself (slow; needs a llama-server binary).

The binary is looked up in $LORATUNE_LLAMA_CPP (a directory holding llama-server) and in the cache
`make llama-cpp` builds (~/.cache/loratune/llama.cpp/build/bin); without one the tests are skipped.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from factories import SMOLLM2, TASKS
from loratune import LoraConfig, get_peft_model
from loratune.cli.main import main
from loratune.tools.generation import GenerationSettings, chat_ids, generate_text
from loratune.tools.gguf import write_gguf_model
from loratune.tools.load_trained import load_model
from loratune.tools.loading import load_base_model, load_tokenizer

pytestmark = pytest.mark.slow
CACHE_BIN = Path("~/.cache/loratune/llama.cpp/build/bin").expanduser()
TASK = TASKS / "orders"


def llama_server() -> Path:
    for directory in (os.environ.get("LORATUNE_LLAMA_CPP"), CACHE_BIN):
        if directory and (Path(directory) / "llama-server").is_file():
            return Path(directory) / "llama-server"
    pytest.skip("no llama.cpp binary: build one with `make llama-cpp` or set LORATUNE_LLAMA_CPP to a "
                "directory holding llama-server")


@contextmanager
def serving(model: Path, lora: Path | None = None):
    """A llama-server on a free port for `model` (+ `lora`); yields a chat function (greedy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [str(llama_server()), "-m", str(model), "--port", str(port), "-c", "1024", "-t", "2", "--no-webui"]
    proc = subprocess.Popen(args + (["--lora", str(lora)] if lora else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            if proc.poll() is not None:
                raise AssertionError(f"llama-server exited: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)

        def chat(messages, max_tokens=48):
            body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "seed": 0}
            req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return json.loads(r.read())["choices"][0]["message"]["content"]
        yield chat
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_adapter_in_llama_cpp_answers_like_the_merged_gguf_and_unlike_the_base(tmp_path):
    """Random weights make greedy text chaotic, so both sides are float32: the exported base is
    rewritten in f32 (the export writes it in f16) to sit beside the f32 merged model."""
    llama_server()
    model = load_base_model("preset:tiny-llama", dtype="float32")
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                        base_model_name_or_path="preset:tiny-llama")
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    assert main(["export", adapter, "--format", "gguf", "-o", str(tmp_path / "a")]) == 0
    assert main(["merge", "--adapter", adapter, "--output_dir", str(tmp_path / "m"), "--format", "gguf",
                 "--outtype", "f32"]) == 0
    base_f32 = write_gguf_model(load_base_model("preset:tiny-llama", dtype="float32"),
                                load_tokenizer("preset:tiny-llama"), tmp_path / "base-f32.gguf", "f32")
    prompts = [[{"role": "user", "content": t}] for t in ("Hello", "Write a list", "2 + 2 =")]
    with serving(Path(base_f32), tmp_path / "a" / "adapter.gguf") as chat:
        with_lora = [chat(p, 8) for p in prompts]
    with serving(tmp_path / "m" / "model.gguf") as chat:
        merged = [chat(p, 8) for p in prompts]
    with serving(tmp_path / "a" / "base.gguf", tmp_path / "a" / "adapter.gguf") as chat:
        assert [chat(p, 8) for p in prompts]  # the exported pair itself loads and answers
    with serving(Path(base_f32)) as chat:
        base = [chat(p, 8) for p in prompts]
    assert with_lora == merged
    assert with_lora != base


def exact_match(answers: list[str], rows: list[dict]) -> float:
    return sum(a.strip() == r["messages"][-1]["content"].strip() for a, r in zip(answers, rows)) / len(rows)


def test_smollm2_task_adapter_keeps_its_accuracy_in_llama_cpp(tmp_path, request):
    """Held-out exact match in llama.cpp (adapter, and merged without --lora) is at least 90% of
    loratune's greedy exact match for the same adapter (a short orders fine-tune of the real model)."""
    llama_server()  # skip before the fine-tune when there is no binary
    adapter = str(request.getfixturevalue("smollm2_adapters")["orders"])
    rows = [json.loads(line) for line in (TASK / "test.jsonl").read_text().splitlines()[:40]]
    prompts = [r["messages"][:-1] for r in rows]
    loaded = load_model(SMOLLM2, adapter, dtype="float32")
    settings = GenerationSettings(max_new_tokens=64)
    ours = exact_match([generate_text(loaded.model, loaded.tokenizer, chat_ids(loaded.tokenizer, p), settings)
                        for p in prompts], rows)
    assert main(["export", adapter, "--format", "gguf", "-o", str(tmp_path / "a")]) == 0
    assert main(["merge", "--adapter", adapter, "--output_dir", str(tmp_path / "m"), "--format", "gguf"]) == 0
    base = Path((tmp_path / "a" / "Modelfile").read_text().splitlines()[0].removeprefix("FROM "))
    with serving(base, tmp_path / "a" / "adapter.gguf") as chat:
        lora = exact_match([chat(p, 64) for p in prompts], rows)
    with serving(tmp_path / "m" / "model.gguf") as chat:
        merged = exact_match([chat(p, 64) for p in prompts], rows)
    print(f"exact match on {len(rows)} held-out rows: loratune {ours:.0%}, llama.cpp --lora {lora:.0%}, "
          f"llama.cpp merged {merged:.0%}")
    assert ours > 0.2, f"the adapter scores {ours:.0%} in loratune: not trained for this task?"
    assert lora >= 0.9 * ours, (lora, ours)
    assert merged >= 0.9 * ours, (merged, ours)
