"""Shared pytest set-up: deterministic, single-threaded-friendly, offline."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `from factories import ...`

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test models run fastest on one thread: a second one mostly waits on hand-offs
    (30x slower on a busy 2-core machine). Session-scoped, so module fixtures see it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _float_modes():
    """Process-wide float modes (the trainer flushes denormals) never leak between tests."""
    yield
    torch.set_flush_denormal(False)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


from factories import SMOLLM2, TASKS  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The packaged real model's preset name; the test is skipped (with the pip command) without it."""
    from loratune.errors import ConfigError
    from loratune.tools import gguf_base, loading

    spec = json.loads((loading.preset_dir(SMOLLM2) / "preset.json").read_text())["gguf"]
    try:
        gguf_base.packaged_gguf(SMOLLM2, spec)
    except ConfigError as exc:
        pytest.skip(str(exc))
    return SMOLLM2


@pytest.fixture(scope="session")
def smollm2_adapters(smollm2, tmp_path_factory) -> dict[str, Path]:
    """Short real fine-tunes of both shipped tasks ({"orders": dir, "sql": dir}), trained once per run
    with the settings of examples/orders.yaml (30 steps: one epoch of orders)."""
    from loratune.train import run

    root = tmp_path_factory.mktemp("smollm2")
    out = {}
    for task, steps in (("orders", 30), ("sql", 20)):
        out[task] = root / task
        run(model_name_or_path=smollm2, train_file=str(TASKS / task / "train.jsonl"),
            output_dir=str(out[task]), max_steps=steps, learning_rate=1e-3, lora_dropout=0.0,
            per_device_train_batch_size=8, max_seq_length=256, save_steps=0,
            logging_steps=5, disable_tqdm=True)
    return out
