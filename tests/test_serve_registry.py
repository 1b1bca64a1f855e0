"""Adapter names, roots and validation before an adapter becomes visible."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from factories import tiny_model
from loratune.errors import AdapterError, UnsupportedFeatureError
from loratune.serve.lora_rows import linear_shapes
from loratune.serve.registry import RequestError, check_adapter_name, prepare_adapter, resolve_adapter_path

Q = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


def write(path, tensors, **config):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "target_modules": ["q_proj"], **config}))
    return path


def q_tensors(r=2, layers=(0, 1)):
    out = {}
    for i in layers:
        out[Q.format(i, "A")] = torch.randn(r, 32)
        out[Q.format(i, "B")] = torch.randn(32, r)
    return out


@pytest.fixture
def shapes():
    return linear_shapes(tiny_model("llama"))


def test_adapter_names():
    assert check_adapter_name("sql-v1.2_x", base_name="base") == "sql-v1.2_x"
    for bad in ("", "a b", "../x", "a/b", "é", "x" * 129, "base", "__base__", 3, None, ".", ".."):
        with pytest.raises(RequestError) as info:
            check_adapter_name(bad, base_name="base")
        assert info.value.status == 400


@pytest.mark.parametrize("name", [
    "sql.v2", "sql-v1.2_x", "a" * 128, "..a", "", ".", "..", "a/b", "a\\b", "a b", "x" * 129, "__base__", "é",
])
def test_server_and_library_share_one_name_rule(name):
    """A name the server serves is a name add_adapter takes (and save_pretrained can use as a folder)."""
    from loratune import LoraConfig, get_peft_model
    from loratune.errors import ConfigError

    try:
        check_adapter_name(name, base_name="base")
        served = True
    except RequestError:
        served = False
    try:
        get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"]), adapter_name=name)
        added = True
    except ConfigError:
        added = False
    assert served == added == (name in ("sql.v2", "sql-v1.2_x", "a" * 128, "..a"))


def test_paths_must_resolve_under_a_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "ok").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    assert resolve_adapter_path("ok", [root]) == root / "ok"
    assert resolve_adapter_path(str(root / "ok"), [root]) == root / "ok"
    for bad in ("../outside", str(outside), "escape", str(root / "ok" / ".." / ".."), "", "a\x00b"):
        with pytest.raises(RequestError) as info:
            resolve_adapter_path(bad, [root])
        assert info.value.status == 400, bad
    with pytest.raises(RequestError, match="--adapter-root"):
        resolve_adapter_path("ok", [])


def test_prepare_reads_scaling_from_config_and_patterns(tmp_path, shapes):
    path = write(tmp_path / "a", {**q_tensors(2, (0,)), **q_tensors(4, (1,))}, lora_alpha=8,
                 alpha_pattern={"layers.1.self_attn.q_proj": 2},
                 rank_pattern={"layers.1.self_attn.q_proj": 4},
                 use_rslora=True)
    prepared = prepare_adapter("a", path, shapes, torch.bfloat16)
    layer0, layer1 = (prepared.layers[f"model.layers.{i}.self_attn.q_proj"] for i in (0, 1))
    assert layer0.scaling == pytest.approx(8 / math.sqrt(2))
    assert layer1.scaling == pytest.approx(2 / math.sqrt(4))
    assert layer0.lora_A.dtype == torch.float32  # kept in fp32, as PEFT does
    assert layer1.lora_B.shape == (32, 4)


@pytest.mark.parametrize("case, needle, error", [
    ("missing_layer", "layers.1.self_attn.q_proj.lora_A.weight is missing", AdapterError),
    ("missing_B", "layers.0.self_attn.q_proj.lora_B.weight is missing", AdapterError),
    ("wrong_shape", "q_proj.lora_A.weight has shape (2, 31), expected (2, 32)", AdapterError),
    ("extra_module", "not a linear layer of the base model", AdapterError),
    ("embedding", "embedding LoRA", UnsupportedFeatureError),
    ("dora", "use_dora", UnsupportedFeatureError),
    ("pissa", "init_lora_weights='pissa'", UnsupportedFeatureError),
    ("nan", "NaN or Inf", AdapterError),
    ("bin", "only safetensors", AdapterError),
    ("rank_0", "q_proj.lora_A.weight has shape (0, 32), expected (2, 32)", AdapterError),
    ("rank_not_config", "q_proj.lora_B.weight has shape (32, 4), expected (32, 2)", AdapterError),
    ("untargeted", "lm_head.lora_A.weight is unexpected: adapter_config.json does not target 'lm_head'",
     AdapterError),
    ("int_tensor", "q_proj.lora_A.weight (int32)", AdapterError),
])
def test_prepare_names_what_does_not_fit(case, needle, error, tmp_path, shapes):
    tensors, config = q_tensors(), {}
    if case == "missing_layer":
        tensors = q_tensors(layers=(0,))
    elif case == "missing_B":
        del tensors[Q.format(0, "B")]
    elif case == "wrong_shape":
        tensors[Q.format(0, "A")] = torch.randn(2, 31)
    elif case == "extra_module":
        tensors["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.randn(2, 32)
        tensors["base_model.model.model.layers.0.self_attn.nope.lora_B.weight"] = torch.randn(32, 2)
    elif case == "embedding":
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(2, 128)
    elif case == "dora":
        config = {"use_dora": True}
    elif case == "pissa":
        config = {"init_lora_weights": "pissa"}
    elif case == "nan":
        tensors[Q.format(1, "B")][0, 0] = float("nan")
    elif case == "rank_0":
        tensors.update(q_tensors(r=0, layers=(0,)))
    elif case == "rank_not_config":
        tensors.update(q_tensors(r=4, layers=(1,)))
    elif case == "untargeted":
        tensors["base_model.model.lm_head.lora_A.weight"] = torch.randn(2, 32)
        tensors["base_model.model.lm_head.lora_B.weight"] = torch.randn(128, 2)
    elif case == "int_tensor":
        tensors[Q.format(0, "A")] = tensors[Q.format(0, "A")].to(torch.int32)
    path = write(tmp_path / case, tensors, **config)
    if case == "bin":
        (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(error, match=needle.replace("(", r"\(").replace(")", r"\)")):
        prepare_adapter(case, path, shapes, torch.float32)
