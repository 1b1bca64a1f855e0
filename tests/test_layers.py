"""LoRA layers against their closed forms, one layer at a time.

For every layer type (Linear, GPT-2 Conv1D, Embedding, Conv1d, Conv2d, DoRA Linear):
fresh == base bitwise; layer == closed form (hypothesis over shapes, r, alpha, rsLoRA);
merged == unmerged and unmerge restores the weight; safe_merge refuses NaN/Inf untouched.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from loratune.errors import MergeError, UnsupportedFeatureError
from loratune.layers import LoraConv, LoraEmbedding, LoraLinear, build_lora_layer
from tolerances import assert_changed, assert_close

SETTINGS = settings(max_examples=25, deadline=None)
KINDS = ["linear", "conv1d_gpt2", "embedding", "conv1d", "conv2d", "dora", "dora_gpt2"]


def make_base(kind: str, fin: int, fout: int, *, dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind in ("linear", "dora"):
        base = nn.Linear(fin, fout)
    elif kind in ("conv1d_gpt2", "dora_gpt2"):
        base = Conv1D(fout, fin)
        nn.init.normal_(base.weight, std=0.3)
        nn.init.normal_(base.bias, std=0.1)
    elif kind == "embedding":
        base = nn.Embedding(fin, fout)
    elif kind == "conv1d":
        base = nn.Conv1d(fin, fout, kernel_size=3, padding=1)
    elif kind == "conv2d":
        base = nn.Conv2d(fin, fout, kernel_size=3, stride=2, padding=1)
    else:
        raise ValueError(kind)
    return base.to(dtype).requires_grad_(False)


def make_layer(kind: str, fin: int = 6, fout: int = 5, *, r: int = 2, alpha: float = 4.0,
               rslora: bool = False, init=True, dtype=torch.float32, seed: int = 0, name: str = "default"):
    layer = build_lora_layer(make_base(kind, fin, fout, dtype=dtype, seed=seed), "layer")
    layer.update_layer(name, r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=init,
                       use_rslora=rslora, use_dora=kind.startswith("dora"))
    layer.set_active([name], trainable=False)
    return layer


def make_input(kind: str, fin: int, batch: int = 2, *, dtype=torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        return torch.randint(0, fin, (batch, 4), generator=g)
    if kind == "conv1d":
        return torch.randn(batch, fin, 7, generator=g).to(dtype)
    if kind == "conv2d":
        return torch.randn(batch, fin, 5, 6, generator=g).to(dtype)
    return torch.randn(batch, 3, fin, generator=g).to(dtype)


def perturb_B(layer, name: str = "default", std: float = 0.5, seed: int = 2) -> None:
    """Give the adapter a non-zero update (lora_B starts at zero; embedding A does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if isinstance(layer, LoraEmbedding):
            A = layer.lora_embedding_A[name]
            A.copy_(torch.randn(A.shape, generator=g) * std)
        else:
            B = layer.lora_B[name].weight
            B.copy_(torch.randn(B.shape, generator=g) * std)


def get_AB(layer, name: str = "default"):
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name].double(), layer.lora_embedding_B[name].double()
    return layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()


def closed_form(layer, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """The textbook formula for the layer's output, in float64, from its raw tensors."""
    base = layer.base_layer
    s = layer.scaling[name]
    A, B = get_AB(layer, name)
    W = base.weight.double()
    bias = base.bias.double() if getattr(base, "bias", None) is not None else None
    xd = x if x.dtype == torch.long else x.double()
    if isinstance(layer, LoraEmbedding):
        return W[xd] + s * (A.T[xd] @ B.T)
    if isinstance(layer, LoraConv):
        delta = torch.einsum("or,ri...->oi...", B.flatten(1), A)  # (out, in, *k)
        conv = F.conv1d if layer.ndim == 1 else F.conv2d
        return conv(xd, W + s * delta, bias, base.stride, base.padding, base.dilation)
    W_out_in = W.T if isinstance(base, Conv1D) else W  # (out, in)
    if name in layer.lora_magnitude_vector:
        combined = W_out_in + s * (B @ A)
        m = layer.lora_magnitude_vector[name].weight.double()
        y = (m / combined.norm(dim=1)) * (xd @ combined.T)
        return y if bias is None else y + bias
    y = xd @ W_out_in.T + s * (xd @ A.T) @ B.T
    return y if bias is None else y + bias


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_layer_equals_base_bitwise(kind, dtype):
    layer = make_layer(kind, dtype=dtype)
    x = make_input(kind, 6, dtype=dtype)
    base_out = layer.base_layer(x)
    assert torch.equal(layer(x), base_out)
    perturb_B(layer)
    assert_changed(layer(x), base_out)


@pytest.mark.parametrize("kind", KINDS)
@given(fin=st.integers(1, 8), fout=st.integers(1, 8), r=st.integers(1, 4),
       alpha=st.floats(0.25, 32), rslora=st.booleans(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
@SETTINGS
def test_layer_matches_closed_form(kind, fin, fout, r, alpha, rslora, batch, seed):
    layer = make_layer(kind, fin, fout, r=r, alpha=alpha, rslora=rslora, init=False, seed=seed)
    # a magnitude different from the row norms exercises the m / ||W + sBA|| factor
    if kind.startswith("dora"):
        with torch.no_grad():
            layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    expected_scaling = alpha / math.sqrt(r) if rslora else alpha / r
    assert layer.scaling["default"] == pytest.approx(expected_scaling)
    x = make_input(kind, fin, batch, seed=seed + 1)
    assert_close(layer(x), closed_form(layer, x).float())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_equals_unmerged_and_unmerge_restores(kind, dtype):
    layer = make_layer(kind, init=False, dtype=dtype)
    perturb_B(layer)
    x = make_input(kind, 6, dtype=dtype)
    unmerged = layer(x)
    base_out = layer.base_layer(x)
    assert_changed(unmerged, base_out)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(["default"])
    assert layer.merged_adapters == ["default"]
    assert layer.base_layer.weight.dtype == dtype
    assert_close(layer(x), unmerged)  # forward skips the merged adapter: no double counting
    assert_close(layer.base_layer(x), unmerged)
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.base_layer.weight, w0)
    assert_close(layer(x), unmerged)


@pytest.mark.parametrize("kind", KINDS)
@given(fin=st.integers(1, 8), fout=st.integers(1, 8), r=st.integers(1, 4), alpha=st.floats(0.25, 32),
       rslora=st.booleans(), seed=st.integers(0, 2**16))
@SETTINGS
def test_merge_round_trip(kind, fin, fout, r, alpha, rslora, seed):
    layer = make_layer(kind, fin, fout, r=r, alpha=alpha, rslora=rslora, init=False, seed=seed)
    perturb_B(layer, seed=seed)
    x = make_input(kind, fin, seed=seed + 1)
    unmerged = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge(["default"])
    assert_close(layer.base_layer(x), unmerged)
    assert_close(layer(x), unmerged)
    layer.unmerge()
    assert_close(layer.base_layer.weight, w0)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_exact_in_fp32_arithmetic(kind):
    # Merge computes W + delta in fp32 and casts back once: in bf16 that is one rounding of the sum.
    layer = make_layer(kind, init=False, dtype=torch.bfloat16)
    perturb_B(layer)
    w_fp32 = layer.base_layer.weight.float().clone()
    delta = None if kind.startswith("dora") else layer.delta_weight("default")
    layer.merge(["default"])
    if delta is not None:
        assert torch.equal(layer.base_layer.weight, (w_fp32 + delta).to(torch.bfloat16))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_safe_merge_refuses_non_finite_and_leaves_weight(kind, bad):
    layer = make_layer(kind, init=False)
    with torch.no_grad():
        A, B = (layer.lora_embedding_A, layer.lora_embedding_B) if kind == "embedding" else (
            {"default": layer.lora_A["default"].weight}, {"default": layer.lora_B["default"].weight})
        B["default"][0, 0] = bad
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="NaN/Inf"):
        layer.merge(["default"], safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
def test_conv_padding_modes_merge_exactly(padding_mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode).requires_grad_(False)
    layer = build_lora_layer(conv, "c")
    layer.update_layer("default", r=2, lora_alpha=2, lora_dropout=0.0, init_lora_weights=False,
                       use_rslora=False, use_dora=False)
    layer.set_active(["default"], False)
    x = make_input("conv2d", 2)
    unmerged = layer(x)
    layer.merge(["default"])
    assert_close(layer.base_layer(x), unmerged)


def test_conv1d_gpt2_is_detected_as_fan_in_fan_out():
    layer = make_layer("conv1d_gpt2", fin=6, fout=5, init=False)
    assert isinstance(layer, LoraLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (6, 5)
    assert layer.lora_A["default"].weight.shape == (2, 6)
    assert layer.lora_B["default"].weight.shape == (5, 2)
    assert layer.delta_weight("default").shape == layer.base_layer.weight.shape == (6, 5)


def test_shapes_follow_peft_conventions():
    lin = make_layer("linear", 6, 5, r=3)
    assert lin.lora_A["default"].weight.shape == (3, 6) and lin.lora_B["default"].weight.shape == (5, 3)
    assert torch.count_nonzero(lin.lora_B["default"].weight) == 0
    emb = make_layer("embedding", 10, 4, r=3)
    assert emb.lora_embedding_A["default"].shape == (3, 10)  # zero-init, transposed convention
    assert emb.lora_embedding_B["default"].shape == (4, 3)
    assert torch.count_nonzero(emb.lora_embedding_A["default"]) == 0
    dora = make_layer("dora", 6, 5, r=3)
    m = dora.lora_magnitude_vector["default"].weight
    assert_close(m, dora.base_layer.weight.norm(dim=1))
    layer = make_layer("linear", dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in layer.lora_A.parameters())


def test_gaussian_init_std_is_one_over_r():
    torch.manual_seed(0)
    layer = make_layer("linear", 256, 4, r=4, init="gaussian")
    A = layer.lora_A["default"].weight
    assert A.std().item() == pytest.approx(1 / 4, rel=0.1)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


@pytest.mark.parametrize("kind", ["embedding", "conv2d"])
def test_dora_outside_linear_is_refused_by_name(kind):
    layer = build_lora_layer(make_base(kind, 6, 5), "layer")
    with pytest.raises(UnsupportedFeatureError, match="use_dora"):
        layer.update_layer("default", r=2, lora_alpha=2, lora_dropout=0.0, init_lora_weights=True,
                           use_rslora=False, use_dora=True)


def test_unsupported_module_type_is_named():
    with pytest.raises(UnsupportedFeatureError, match="my.norm.*LayerNorm"):
        build_lora_layer(nn.LayerNorm(4), "my.norm")


def test_several_active_adapters_add_up():
    layer = make_layer("linear", init=False)
    layer.update_layer("other", r=3, lora_alpha=2, lora_dropout=0.0, init_lora_weights=False,
                       use_rslora=False, use_dora=False)
    x = make_input("linear", 6)
    base = layer.base_layer(x)
    layer.set_active(["default"], False)
    d1 = layer(x) - base
    layer.set_active(["other"], False)
    d2 = layer(x) - base
    layer.set_active(["default", "other"], False)
    assert_close(layer(x), base + d1 + d2)


def test_dropout_only_on_the_lora_branch():
    layer = build_lora_layer(make_base("linear", 6, 5), "layer")
    layer.update_layer("default", r=2, lora_alpha=2, lora_dropout=0.5, init_lora_weights=True,
                       use_rslora=False, use_dora=False)
    layer.set_active(["default"], trainable=True)
    layer.train()
    x = make_input("linear", 6)
    assert torch.equal(layer(x), layer.base_layer(x))  # B == 0: dropout cannot leak into the base path


@pytest.mark.parametrize("kind", KINDS)
@given(names=st.lists(st.sampled_from(["default", "other", "__base__"]), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
@SETTINGS
def test_mixed_rows_equal_per_adapter_runs(kind, names, seed):
    layer = make_layer(kind, init=False, seed=seed)
    layer.update_layer("other", r=3, lora_alpha=5, lora_dropout=0.0, init_lora_weights=False,
                       use_rslora=False, use_dora=kind.startswith("dora"))
    perturb_B(layer, "default", seed=seed)
    perturb_B(layer, "other", seed=seed + 1)
    x = make_input(kind, 6, batch=len(names), seed=seed)
    separate = {"__base__": layer.base_layer(x)}
    for name in ("default", "other"):
        layer.set_active([name], trainable=False)
        separate[name] = layer(x)
    groups = [(n, torch.tensor([i for i, m in enumerate(names) if m == n])) for n in dict.fromkeys(names)]
    layer.batch_groups = groups
    try:
        mixed = layer(x)
    finally:
        layer.batch_groups = None
    for row, name in enumerate(names):
        assert_close(mixed[row], separate[name][row])
