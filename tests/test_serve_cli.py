"""`loratune serve` flags: problems exit 2 with one message; a real start answers /health and /v1/models."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from loratune.cli.main import main


@pytest.mark.parametrize("flags, needle", [
    (["--adapter", "nodelimiter"], "expected NAME=DIR"),
    (["--adapter", "a=/x", "--adapter", "a=/y"], "used twice"),
    (["--adapter", "a=/does/not/exist"], "does not exist"),
    (["--adapter-root", "/does/not/exist"], "is not a directory"),
    (["--adapter-root", "/tmp", "/does/not/exist2"], "/does/not/exist2 is not a directory"),
    (["--max-queue", "0"], "--max-queue must be positive"),
    (["--adapter", "bad name=/tmp"], "invalid adapter name"),
    (["--device", "tpu9"], "device"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA")]))
def test_bad_flags_exit_2_with_a_message(flags, needle, capsys):
    code = main(["serve", "--model_name_or_path", "preset:tiny-llama", "--threads", "1", *flags])
    assert code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.slow
def test_serve_starts_and_answers(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LORATUNE_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "loratune.cli.main", "serve",
                             "--model", "preset:tiny-llama",
                             "--port", str(port), "--threads", "1", "--adapter-root", str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.2)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == ["preset:tiny-llama"]
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
    finally:
        proc.terminate()
        assert proc.wait(30) is not None


def test_the_base_defaults_to_the_first_adapters_base(tmp_path, capsys):
    from loratune.cli.serve import base_of

    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], '
        '"base_model_name_or_path": "preset:tiny-llama"}')
    assert base_of(None, {"a": str(adapter)}) == "preset:tiny-llama"
    assert base_of("preset:other", {"a": str(adapter)}) == "preset:other"  # the flag wins
    assert main(["serve", "--threads", "1"]) == 2  # neither a model nor an adapter
    assert "no model given" in capsys.readouterr().err
