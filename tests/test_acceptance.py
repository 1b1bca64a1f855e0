"""vLLM and LoRAX acceptance rules: each rule refuses what the server refuses, and only that."""

from __future__ import annotations

import pytest
import torch

from loratune.adapter_io import PREFIX
from loratune.config import LoraConfig
from loratune.tools.acceptance import (
    VLLM_MAX_LORA_RANKS,
    check_llama_cpp,
    check_lorax,
    check_vllm,
    vllm_max_lora_rank_for,
)
from loratune.tools.inspection import summarize_adapter
from test_inspection import write_adapter

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def summary(tmp_path, config: LoraConfig, ranks=None, extra=None):
    ranks = ranks or {f"model.layers.{i}.self_attn.{t}": config.r
                      for i in range(2) for t in ("q_proj", "v_proj")}
    return summarize_adapter(write_adapter(tmp_path / "a", config, ranks, extra=extra))


def test_plain_llama_adapter_is_accepted_by_both(tmp_path):
    targets = list(LLAMA_TARGETS[:3])
    ranks = {f"model.layers.{i}.self_attn.{t}": 16 for i in range(2) for t in targets}  # a tensor per target
    s = summary(tmp_path, LoraConfig(r=16, lora_alpha=32, target_modules=targets), ranks)
    for verdict in (check_vllm(s), check_lorax(s)):
        assert verdict.accepted, verdict.reasons
        assert verdict.notes == []


@pytest.mark.parametrize(("rank", "needed"),
                         [(1, 1), (2, 8), (8, 8), (12, 16), (24, 32), (300, 320), (512, 512),
                                              (513, None)])
def test_vllm_max_lora_rank_rounds_up_to_an_allowed_value(rank, needed):
    assert vllm_max_lora_rank_for(rank) == needed
    assert needed is None or needed in VLLM_MAX_LORA_RANKS


def test_vllm_rank_rules(tmp_path):
    big = check_vllm(summary(tmp_path / "1", LoraConfig(r=1024)))
    assert not big.accepted and "rank 1024" in big.reasons[0] and "512" in big.reasons[0]
    odd = check_vllm(summary(tmp_path / "2", LoraConfig(r=24)))
    assert odd.accepted
    assert any("--max-lora-rank 32" in n for n in odd.notes)
    assert check_vllm(summary(tmp_path / "3", LoraConfig(r=4))).notes == []  # fits the default 16


def test_vllm_counts_rank_pattern(tmp_path):
    cfg = LoraConfig(r=8, rank_pattern={"v_proj": 64})
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 64}
    v = check_vllm(summary(tmp_path, cfg, ranks))
    assert v.accepted and any("rank 64 needs --max-lora-rank 64" in n for n in v.notes)


@pytest.mark.parametrize(("config", "vllm_reason", "lorax_reason"), [
    (LoraConfig(r=8, use_dora=True), "DoRA", "DoRA"),
    (LoraConfig(r=8, bias="all"), "bias='all'", "bias='all'"),
    (LoraConfig(r=8, bias="lora_only"), "bias='lora_only'", "bias='lora_only'"),
    (LoraConfig(r=8, modules_to_save=["lm_head"]), "modules_to_save ['lm_head']", "modules_to_save"),
    (LoraConfig(r=8, init_lora_weights="pissa"), "init_lora_weights='pissa'", "init_lora_weights='pissa'"),
])
def test_feature_refusals(tmp_path, config, vllm_reason, lorax_reason):
    s = summary(tmp_path, config)
    v, lx = check_vllm(s), check_lorax(s)
    assert not v.accepted and any(vllm_reason in r for r in v.reasons), v.reasons
    assert not lx.accepted and any(lorax_reason in r for r in lx.reasons), lx.reasons
    assert len(v.reasons) == 1


def test_vllm_accepts_a_classifier_head_in_modules_to_save(tmp_path):
    assert check_vllm(summary(tmp_path, LoraConfig(r=8, modules_to_save=["score"]))).accepted


def test_embedding_and_unknown_targets(tmp_path):
    cfg = LoraConfig(r=8, target_modules=["q_proj", "embed_tokens", "lm_head", "my_proj"])
    ranks = {"model.layers.0.self_attn.q_proj": 8, "lm_head": 8, "model.layers.0.mlp.my_proj": 8}
    extra = {f"{PREFIX}model.embed_tokens.lora_embedding_A": torch.zeros(8, 100),
             f"{PREFIX}model.embed_tokens.lora_embedding_B": torch.zeros(16, 8)}
    s = summary(tmp_path, cfg, ranks, extra)
    v = check_vllm(s)
    assert any("['embed_tokens', 'lm_head']" in r for r in v.reasons)
    assert any("['my_proj']" in r for r in v.reasons)
    lx = check_lorax(s)
    assert any("embedding layers ['embed_tokens']" in r for r in lx.reasons)
    assert any("['my_proj']" in r for r in lx.reasons)
    assert not any("lm_head" in r for r in lx.reasons)  # LoRAX adapts lm_head


def test_gpt2_conv1d_targets_are_refused_by_vllm_only(tmp_path):
    cfg = LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True)
    s = summary(tmp_path, cfg, {"transformer.h.0.attn.c_attn": 8, "transformer.h.1.attn.c_attn": 8})
    assert not check_vllm(s).accepted
    assert check_lorax(s).accepted


def test_lorax_specific_rules(tmp_path):
    pattern = check_lorax(summary(tmp_path / "1", LoraConfig(r=8, alpha_pattern={"v_proj": 32})))
    assert any("alpha_pattern" in r for r in pattern.reasons)
    partial = check_lorax(summary(tmp_path / "2", LoraConfig(r=8, layers_to_transform=[0])))
    assert any("layers_to_transform=[0]" in r for r in partial.reasons)
    small = check_lorax(summary(tmp_path / "3", LoraConfig(r=4)))
    assert small.accepted and any("SGMV" in n for n in small.notes)


def test_a_broken_adapter_is_rejected_by_both_with_the_reason(tmp_path):
    cfg = LoraConfig(r=8, target_modules=["q_proj"])
    s = summary(tmp_path, cfg, {"model.layers.0.self_attn.q_proj": 4})  # config says r=8, tensors are rank 4
    for verdict in (check_vllm(s), check_lorax(s)):
        assert not verdict.accepted
        assert verdict.reasons[0].startswith("tensor ranks differ from adapter_config.json (r=8)")


def test_llama_cpp_accepts_rank_pattern_and_single_rank_rslora_with_a_note(tmp_path):
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.self_attn.v_proj": 4}
    plain = check_llama_cpp(summary(tmp_path / "1", LoraConfig(r=8, rank_pattern={"v_proj": 4}), ranks))
    assert plain.accepted and plain.notes == []
    rs = check_llama_cpp(summary(tmp_path / "2", LoraConfig(r=16, lora_alpha=8, use_rslora=True)))
    assert rs.accepted
    assert rs.notes == ["rsLoRA: written with adapter.lora.alpha = lora_alpha * sqrt(r) = 32, "
                        "so llama.cpp's alpha / r is lora_alpha / sqrt(r)"]


def test_llama_cpp_refuses_what_it_cannot_express(tmp_path):
    same = check_llama_cpp(summary(tmp_path / "1", LoraConfig(r=8, lora_alpha=16,
                                                              alpha_pattern={"v_proj": 16})))
    assert same.accepted  # an alpha_pattern equal to lora_alpha changes nothing
    gpt2 = check_llama_cpp(summary(tmp_path / "2", LoraConfig(r=8, target_modules=["c_attn"]),
                                   {"transformer.h.0.attn.c_attn": 8}))
    assert gpt2.reasons == ["modules ['transformer.h.0.attn.c_attn'] have no llama.cpp tensor (GGUF export "
                            "covers Llama, Mistral and Qwen2 attention and MLP projections)"]


def test_llama_cpp_refuses_an_adapter_with_lora_alpha_zero(tmp_path):
    """PEFT scales it by 0 (it does nothing); llama.cpp reads alpha 0 as unset and applies it at scale 1."""
    s = summary(tmp_path, LoraConfig(r=4, lora_alpha=0, target_modules=["q_proj", "v_proj"]))
    verdict = check_llama_cpp(s)
    assert not verdict.accepted and any("lora_alpha 0" in r for r in verdict.reasons)
