"""PEFT's extra keyword arguments: the same rule at get_peft_model, from_pretrained, load_adapter and
save_pretrained (ignored with a warning when they change nothing here, refused by name otherwise)."""

from __future__ import annotations

import logging

import pytest

from factories import tiny_model
from loratune import LoraConfig, PeftModel, get_peft_model
from loratune.errors import UnsupportedFeatureError
from loratune.peft_kwargs import check_peft_kwargs

CFG = dict(target_modules=["q_proj"])


def warnings_of(caplog) -> str:
    return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_defaults_pass_silently(caplog):
    with caplog.at_level(logging.WARNING):
        check_peft_kwargs("f", dict(mixed=False, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                                    ephemeral_gpu_offload=False, key_mapping=None, torch_device=None,
                                    save_embedding_layers="auto"))
    assert not warnings_of(caplog)


def test_inert_arguments_warn_by_name(caplog):
    with caplog.at_level(logging.WARNING):
        check_peft_kwargs("f", dict(low_cpu_mem_usage=True, torch_device="cpu", mixed=False))
    assert "f: ignoring low_cpu_mem_usage=True, torch_device='cpu'" in warnings_of(caplog)


@pytest.mark.parametrize("name,value", [
    ("mixed", True), ("autocast_adapter_dtype", False), ("key_mapping", {"a": "b"}),
    ("path_initial_model_for_weight_conversion", "init"), ("convert_pissa_to_lora", "init"),
])
def test_arguments_that_change_the_result_are_refused_by_name(name, value):
    with pytest.raises(UnsupportedFeatureError, match=f"f: not supported: {name}={value!r}"):
        check_peft_kwargs("f", {name: value, "low_cpu_mem_usage": True})


def test_get_peft_model(caplog):
    with pytest.raises(UnsupportedFeatureError, match="get_peft_model: .*mixed=True"):
        get_peft_model(tiny_model(), LoraConfig(**CFG), mixed=True)
    with caplog.at_level(logging.WARNING):
        get_peft_model(tiny_model(), LoraConfig(**CFG), mixed=False, autocast_adapter_dtype=True,
                       low_cpu_mem_usage=True)
    assert "get_peft_model: ignoring low_cpu_mem_usage=True" in warnings_of(caplog)


def test_from_pretrained_and_load_adapter(tmp_path, caplog):
    get_peft_model(tiny_model(), LoraConfig(**CFG)).save_pretrained(str(tmp_path))
    refused = "PeftModel.from_pretrained: .*autocast_adapter_dtype=False"
    with pytest.raises(UnsupportedFeatureError, match=refused):
        PeftModel.from_pretrained(tiny_model(), str(tmp_path), autocast_adapter_dtype=False)
    with caplog.at_level(logging.WARNING):
        model = PeftModel.from_pretrained(tiny_model(), str(tmp_path), ephemeral_gpu_offload=True)
    assert "PeftModel.from_pretrained: ignoring ephemeral_gpu_offload=True" in warnings_of(caplog)
    with pytest.raises(UnsupportedFeatureError, match="load_adapter: .*key_mapping"):
        model.load_adapter(str(tmp_path), "other", key_mapping={"q_proj": "k_proj"})
    assert list(model.peft_config) == ["default"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model.load_adapter(str(tmp_path), "other", torch_device="cpu", low_cpu_mem_usage=False)
    assert "load_adapter: ignoring torch_device='cpu'" in warnings_of(caplog)


def test_save_pretrained(tmp_path, caplog):
    model = get_peft_model(tiny_model(), LoraConfig(**CFG))
    with pytest.raises(UnsupportedFeatureError, match="save_pretrained: .*convert_pissa_to_lora"):
        model.save_pretrained(str(tmp_path / "a"), convert_pissa_to_lora=str(tmp_path / "init"))
    assert not (tmp_path / "a").exists()
    with caplog.at_level(logging.WARNING):
        model.save_pretrained(str(tmp_path / "b"), save_embedding_layers=True)
    assert "save_pretrained: ignoring save_embedding_layers=True" in warnings_of(caplog)
