"""summarize_adapter: targets, ranks, counts and sizes read from adapter files alone."""

from __future__ import annotations

import os

import pytest
import torch

from loratune.adapter_io import PREFIX, save_adapter
from loratune.config import LoraConfig
from loratune.errors import AdapterError
from loratune.tools.inspection import human_size, summarize_adapter

D = 16


def write_adapter(path, config: LoraConfig, ranks: dict[str, int], *, dtype=torch.float32, extra=None) -> str:
    """Save an adapter whose module `path -> r` tensors are random (no model needed)."""
    tensors = {}
    for module, r in ranks.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, D, dtype=dtype)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(D, r, dtype=dtype)
    tensors.update(extra or {})
    save_adapter(str(path), config, tensors)
    return str(path)


def test_summary_reads_ranks_targets_and_counts_from_tensors(tmp_path):
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4},
                     base_model_name_or_path="preset:tiny-llama")
    ranks = {f"model.layers.{i}.self_attn.q_proj": 8 for i in range(2)}
    ranks |= {f"model.layers.{i}.self_attn.v_proj": 4 for i in range(2)}
    path = write_adapter(tmp_path / "a", cfg, ranks, dtype=torch.bfloat16)
    (tmp_path / "a" / "metrics.jsonl").write_text("not part of the adapter\n" * 100)
    s = summarize_adapter(path)
    assert s.target_names == ["q_proj", "v_proj"]
    assert s.ranks == {4: 2, 8: 2}
    assert s.max_rank == 8
    assert s.num_parameters == 2 * (2 * 8 * D) + 2 * (2 * 4 * D)
    assert s.dtypes == {"bfloat16": 8}
    files = ("adapter_config.json", "adapter_model.safetensors", "README.md")
    assert s.size_bytes == sum(os.path.getsize(os.path.join(path, f)) for f in files)
    d = s.to_dict()
    assert d["modules"]["model.layers.0.self_attn.v_proj"] == 4
    assert d["base_model_name_or_path"] == "preset:tiny-llama"


def test_summary_separates_dora_embedding_and_full_tensors(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True,
                     modules_to_save=["lm_head"])
    extra = {
        f"{PREFIX}model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(D),
        f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.zeros(4, 100),
        f"{PREFIX}model.embed_tokens.lora_embedding_B": torch.randn(D, 4),
        f"{PREFIX}lm_head.weight": torch.randn(100, D),
    }
    s = summarize_adapter(write_adapter(tmp_path / "a", cfg, {"model.layers.0.self_attn.q_proj": 4},
                                        extra=extra))
    assert s.dora_modules == ["model.layers.0.self_attn.q_proj"]
    assert s.extra_tensors == ["lm_head.weight"]
    assert [(m.name, m.r, m.embedding) for m in s.modules] == [("embed_tokens", 4, True),
                                                               ("q_proj", 4, False)]


def test_missing_or_corrupt_adapter_names_the_file(tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        summarize_adapter(str(tmp_path))
    path = write_adapter(tmp_path / "a", LoraConfig(r=2), {"m.q_proj": 2})
    with open(os.path.join(path, "adapter_model.safetensors"), "wb") as fh:
        fh.write(b"not safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        summarize_adapter(path)


def test_a_consistent_adapter_has_no_problems(tmp_path):
    cfg = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 4})
    s = summarize_adapter(write_adapter(tmp_path / "a", cfg, {"model.layers.0.self_attn.q_proj": 8,
                                                               "model.layers.0.self_attn.v_proj": 4}))
    assert s.problems == [] and s.to_dict()["problems"] == []


@pytest.mark.parametrize(("config", "ranks", "problem"), [
    (LoraConfig(r=8), {}, "no LoRA tensors (lora_A/lora_B): the weights file holds 0 tensor(s)"),
    (LoraConfig(r=8, target_modules=["q_proj"]), {"model.layers.0.self_attn.q_proj": 4},
     "tensor ranks differ from adapter_config.json (r=8): model.layers.0.self_attn.q_proj has r=4"),
    (LoraConfig(r=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 16}),
     {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 8},
     "(r=8, rank_pattern {'v_proj': 16}): model.layers.0.self_attn.v_proj has r=8"),
    (LoraConfig(r=4, target_modules=["k_proj"]), {"model.layers.0.self_attn.q_proj": 4},
     "target_modules entry 'k_proj' in adapter_config.json matches none of the adapter's modules (q_proj)"),
    (LoraConfig(r=4, target_modules=["q_proj"]), {"model.layers.0.self_attn.q_proj": 4,
                                                  "model.layers.0.self_attn.v_proj": 4},
     "tensors for modules that target_modules ['q_proj'] does not select: model.layers.0.self_attn.v_proj"),
    (LoraConfig(r=4, target_modules=".*k_proj"), {"model.layers.0.self_attn.q_proj": 4},
     "target_modules entry '.*k_proj' in adapter_config.json matches none of the adapter's modules (q_proj)"),
])
def test_files_no_loader_accepts_are_problems(tmp_path, config, ranks, problem):
    s = summarize_adapter(write_adapter(tmp_path / "a", config, ranks))
    assert any(problem in p for p in s.problems), s.problems


def test_nan_and_inf_tensors_are_problems(tmp_path):
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    path = write_adapter(tmp_path / "a", LoraConfig(r=4, target_modules=["q_proj"]),
                         {"model.layers.0.self_attn.q_proj": 4},
                         extra={key: torch.full((D, 4), float("inf"))})
    s = summarize_adapter(path)
    assert s.problems == ["1 tensor(s) hold NaN or Inf values: model.layers.0.self_attn.q_proj.lora_B.weight"]


def test_a_file_given_as_the_adapter_is_named_as_a_file(tmp_path):
    path = write_adapter(tmp_path / "a", LoraConfig(r=2), {"m.q_proj": 2})
    with pytest.raises(AdapterError,
                       match="adapter_config.json: is a file, not an adapter directory; did you mean its "
                                           "directory"):
        summarize_adapter(os.path.join(path, "adapter_config.json"))


@pytest.mark.parametrize(("n", "text"),
                         [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 2**20, "3.0 MiB")])
def test_human_size(n, text):
    assert human_size(n) == text
