"""Merging: merged == unmerged == merge_and_unload on fp32/bf16/fp16 bases, unmerge restores,
unload gives the base back, safe_merge refuses NaN/Inf with every weight untouched, and
add_weighted_adapter's "cat" (exact), "svd" (exact at full rank) and "linear" combinations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factories import tiny_batch, tiny_model
from loratune import LoraConfig, get_peft_model
from loratune.errors import ConfigError, MergeError, UnsupportedFeatureError
from loratune.layers import LoraLayer
from tolerances import assert_changed, assert_close

CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(target_modules=["embed_tokens", "o_proj"], use_rslora=True)),
    ("llama", dict(target_modules=["q_proj", "up_proj"], use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"], use_dora=True)),
    ("qwen2", dict(target_modules="all-linear", modules_to_save=["lm_head"])),
]
IDS = ["llama-linear", "llama-embedding", "llama-dora", "gpt2-conv1d", "gpt2-dora", "qwen2-all-linear"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def perturb(model: nn.Module, std: float = 0.2, seed: int = 3) -> None:
    """Offset adapter tensors: lora_* by `std`, full modules_to_save copies at their init scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or ".modules_to_save." in name:
                scale = std if "lora_" in name else 0.02
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_merged_equals_unmerged_equals_merge_and_unload(arch, kw, dtype):
    x = tiny_batch()
    model = get_peft_model(tiny_model(arch, dtype=dtype), LoraConfig(r=4, lora_alpha=8, **kw))
    with model.disable_adapter():
        base = logits(model, x)
    perturb(model)
    unmerged = logits(model, x)
    assert_changed(unmerged, base)
    before = base_weights(model)
    model.merge_adapter()
    merged_weights = base_weights(model)
    assert_close(logits(model, x), unmerged, dtype)
    model.merge_adapter()  # merging again is a no-op, not a double add
    assert_close(logits(model, x), unmerged, dtype)
    model.unmerge_adapter()
    # W -> round(W + d) -> round(round(W + d) - d) (DoRA: a row rescale around it): each rounding
    # costs at most half an ulp of the largest magnitude involved, so W comes back within 2 ulps
    # (DoRA's rescale by n / m and back adds a few fp32 roundings of its own).
    eps = torch.finfo(dtype).eps * (8 if kw.get("use_dora") else 2)
    for name, w in base_weights(model).items():
        largest = max(merged_weights[name].float().abs().max(), before[name].float().abs().max())
        assert (w.float() - before[name].float()).abs().max() <= eps * largest, name
    assert_close(logits(model, x), unmerged, dtype)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert not any("lora_" in n or "modules_to_save" in n for n, _ in plain.named_parameters())
    assert all(p.dtype == dtype for p in plain.parameters())
    assert_close(logits(plain, x), unmerged, dtype)


@pytest.mark.parametrize("arch,kw", CASES, ids=IDS)
def test_unload_gives_the_base_back_bitwise(arch, kw):
    x = tiny_batch()
    reference = tiny_model(arch)
    model = get_peft_model(tiny_model(arch), LoraConfig(r=4, **kw))
    perturb(model)
    assert_changed(logits(model, x), logits(reference, x))
    plain = model.unload()
    assert torch.equal(logits(plain, x), logits(reference, x))
    assert set(plain.state_dict()) == set(reference.state_dict())


def nan_in_last_layer(model, bad=float("nan")):
    last = [m for m in model.modules() if isinstance(m, LoraLayer)][-1]
    with torch.no_grad():
        last.lora_B["default"].weight[0, 0] = bad


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_safe_merge_refuses_non_finite_and_touches_nothing(how, bad):
    x = tiny_batch()
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb(model)
    nan_in_last_layer(model, bad)
    before = base_weights(model)
    with pytest.raises(MergeError, match="NaN/Inf"):
        if how == "merge_and_unload":
            model.merge_and_unload(safe_merge=True)
        else:
            model.merge_adapter(safe_merge=True)
    after = base_weights(model)
    assert all(torch.equal(after[n], before[n]) for n in before), "a base weight changed"
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))
    assert any(isinstance(m, LoraLayer) for m in model.model.modules())  # still a LoraModel
    with torch.no_grad():
        model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = 0.0
    logits(model, x)


def test_merging_into_a_tied_embedding_is_refused():
    # Qwen2's embed_tokens and lm_head share one tensor; merging would silently change the head too.
    x = tiny_batch()
    model = get_peft_model(tiny_model("qwen2"), LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    perturb(model)
    before_out, before_w = logits(model, x), base_weights(model)
    with pytest.raises(MergeError, match="tied to .*lm_head"):
        model.merge_and_unload()
    assert all(torch.equal(w, before_w[n]) for n, w in base_weights(model).items())
    assert torch.equal(logits(model, x), before_out)
    head = model.model.lm_head  # untied, the merge is exact
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.model.config.tie_word_embeddings = False
    assert_close(logits(model.merge_and_unload(), x), before_out)


def test_unsafe_merge_writes_what_it_is_given():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["v_proj"]))
    nan_in_last_layer(model)
    model.merge_adapter()
    assert not torch.isfinite(model.model.model.layers[1].self_attn.v_proj.base_layer.weight).all()


class FakeQuantLinear(nn.Module):
    """The quantized-base protocol: is_quantized, in/out_features, dequantize() -> (out, in)."""

    is_quantized = True

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("w", linear.weight.detach().clone())

    def dequantize(self):
        return self.w

    def forward(self, x):
        return x @ self.w.T


def test_merge_into_a_quantized_base_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(FakeQuantLinear(nn.Linear(6, 5)))
    x = torch.randn(2, 6)
    base = net(x)
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    adapted = model(x)
    assert_changed(adapted, base)
    with pytest.raises(MergeError, match="quantized"):
        model.merge_adapter()
    assert torch.equal(model(x), adapted)


def test_adding_an_adapter_while_merged_is_refused():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    model.merge_adapter()
    with pytest.raises(MergeError, match="unmerge"):
        model.add_adapter("b", LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(MergeError, match="unmerge"):
        with model.disable_adapter():
            pass


# ----- add_weighted_adapter -----------------------------------------------------------------------

WEIGHTED = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"])),
]


def two_adapters(arch, kw, r_b=2, seed=0):
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw)
    model = get_peft_model(tiny_model(arch, seed=seed), config, "a")
    model.add_adapter("b", LoraConfig(r=r_b, lora_alpha=3, use_rslora=True, init_lora_weights=False, **kw))
    perturb(model)
    return model


def as_logits(model, names, x):
    model.set_adapter(names)
    return logits(model, x)


@pytest.mark.parametrize("arch,kw", WEIGHTED, ids=["llama", "gpt2"])
def test_cat_equals_both_adapters_active(arch, kw):
    x = tiny_batch()
    model = two_adapters(arch, kw)
    both = as_logits(model, ["a", "b"], x)
    assert_changed(both, as_logits(model, "a", x))
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    assert_close(as_logits(model, "ab", x), both)
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer) and "ab" in m.r)
    assert layer.r["ab"] == 6 and layer.scaling["ab"] == 1.0


@pytest.mark.parametrize("arch,kw", WEIGHTED, ids=["llama", "gpt2"])
def test_cat_with_weights_scales_each_delta(arch, kw):
    model = two_adapters(arch, kw)
    model.add_weighted_adapter(["a", "b"], [0.5, -2.0], "ab", combination_type="cat")
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        expected = 0.5 * layer.delta_weight("a") - 2.0 * layer.delta_weight("b")
        assert_close(layer.delta_weight("ab"), expected)


@pytest.mark.parametrize("arch,kw", WEIGHTED, ids=["llama", "gpt2"])
def test_svd_at_full_rank_is_exact_and_truncation_is_best_rank_r(arch, kw):
    model = two_adapters(arch, kw)
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "full", combination_type="svd", svd_rank=6)
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "trunc", combination_type="svd", svd_rank=3)
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        target = (layer.delta_weight("a") + 0.5 * layer.delta_weight("b")).double()
        norm = target.abs().max()  # an fp32 SVD is accurate relative to the largest entry
        assert_close(layer.delta_weight("full").double() / norm, target / norm, torch.float32)
        flat = target.reshape(target.shape[0], -1)
        U, S, Vh = torch.linalg.svd(flat, full_matrices=False)
        best3 = (U[:, :3] * S[:3]) @ Vh[:3]
        truncated = layer.delta_weight("trunc").double().reshape(flat.shape)
        assert_close(truncated / norm, best3 / norm, torch.float32)
        assert layer.r["trunc"] == 3


def test_svd_of_a_single_rank_r_adapter_reproduces_it():
    x = tiny_batch()
    model = two_adapters("llama", WEIGHTED[0][1])
    a = as_logits(model, "a", x)
    model.add_weighted_adapter(["a"], [1.0], "single", combination_type="svd")  # default rank: a's r=4
    assert_close(as_logits(model, "single", x), a)


def test_linear_is_peft_definition_on_equal_ranks():
    model = two_adapters("llama", dict(target_modules=["q_proj"]), r_b=4)
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "lin", combination_type="linear")
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
        sa, sb = (0.7 * layer.scaling["a"]) ** 0.5, (0.3 * layer.scaling["b"]) ** 0.5
        A = sa * layer.lora_A["a"].weight + sb * layer.lora_A["b"].weight
        B = sa * layer.lora_B["a"].weight + sb * layer.lora_B["b"].weight
        assert_close(layer.delta_weight("lin"), B @ A)


def test_weighted_adapter_input_errors():
    model = two_adapters("llama", dict(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="4 problems"):
        model.add_weighted_adapter(["a", "zzz"], [1.0], "a", combination_type="nope")
    for bad_name in ("__base__", "has/slash", "copy", "keys"):
        with pytest.raises(ConfigError, match=bad_name):
            model.add_weighted_adapter(["a"], [1.0], bad_name, combination_type="cat")
    with pytest.raises(ConfigError, match="one rank"):
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "lin", combination_type="linear")
    assert "lin" not in model.peft_config
    dora = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(UnsupportedFeatureError, match="DoRA"):
        dora.add_weighted_adapter(["default"], [1.0], "x")


def test_weighted_adapter_takes_a_dotted_name():
    x = tiny_batch()
    model = two_adapters("llama", dict(target_modules=["q_proj"]))
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab.v2", combination_type="cat")
    assert_close(as_logits(model, "ab.v2", x), as_logits(model, ["a", "b"], x))


def test_weighted_adapter_saves_and_reloads(tmp_path):
    x = tiny_batch()
    model = two_adapters("llama", WEIGHTED[0][1])
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    expected = as_logits(model, "ab", x)
    model.save_pretrained(str(tmp_path), selected_adapters=["ab"])
    from loratune import PeftModel

    again = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "ab"))
    assert_close(logits(again, x), expected)


@pytest.mark.parametrize("kw", [
    dict(target_modules=["q_proj"], layers_to_transform=[1]),
    dict(target_modules=["q_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=r"model\.layers\.1\.self_attn\.q_proj"),
], ids=["layers_to_transform", "exclude_modules", "regex"])
def test_a_combination_of_adapters_on_some_layers_names_those_layers_and_reloads(tmp_path, kw):
    """Before: the combined config said target_modules ["q_proj"], claiming layer 0 too, so its own file
    failed to load (2 missing tensors)."""
    from loratune import PeftModel

    x = tiny_batch()
    model = two_adapters("llama", kw)
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="svd")
    assert model.peft_config["ab"].target_modules == ["model.layers.1.self_attn.q_proj"]
    expected = as_logits(model, "ab", x)
    model.save_pretrained(str(tmp_path), selected_adapters=["ab"])
    assert_close(logits(PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "ab")), x), expected)


@pytest.mark.parametrize("how", ["add_adapter", "add_weighted_adapter"])
def test_an_adapter_added_to_a_model_in_eval_mode_is_in_eval_mode(how):
    """Its dropout would otherwise make every eval forward random (PEFT's model is deterministic)."""
    x = tiny_batch()
    model = get_peft_model(tiny_model("llama"), LoraConfig(target_modules=["q_proj"], lora_dropout=0.5), "a")
    model.eval()
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.5,
                                      init_lora_weights=False))
    if how == "add_weighted_adapter":
        model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="svd")
    name = "b" if how == "add_adapter" else "new"
    model.set_adapter(name)
    assert not any(m.training for m in model.modules())
    assert torch.equal(logits(model, x), logits(model, x))
    model.train()
    model.add_adapter("c", LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5))
    layer = model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_dropout["c"].training  # and in training mode, training mode


def test_layer_safe_merge_of_several_adapters_writes_nothing_when_one_is_bad():
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_model(), config, "good")
    model.add_adapter("bad", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["bad"].weight.fill_(float("inf"))
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="NaN/Inf"):
        layer.merge(["good", "bad"], safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == []
    layer.merge(["good"], safe_merge=True)
    assert not torch.equal(layer.base_layer.weight, before) and layer.merged_adapters == ["good"]
