"""Quantized layers on their own: blockwise NF4/FP4 and int8 error bounds, tiled == full matmul,
storage as buffers, quantize_model / dequantize_model on tiny models. LoRA on top: test_quant_lora.py."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from factories import tiny_batch, tiny_model
from loratune.errors import ConfigError, UnsupportedFeatureError
from loratune.quant import (
    Linear4bit,
    Linear8bit,
    bnb_available,
    dequantize_model,
    quantize_model,
    quantized_layers,
)
from loratune.quant import blockwise as bw
from loratune.quant.tiled import plan_tiles, reference_linear

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
EPS = 1e-6   # relative slack for fp32 rounding in the error bounds

weights = st.builds(
    lambda out, inp, log_scale, outlier, seed: _weight(out, inp, 10.0**log_scale, outlier, seed),
    st.integers(1, 40), st.integers(1, 150), st.floats(-6, 4), st.booleans(), st.integers(0, 2**16),
)


def _weight(out: int, inp: int, scale: float, outlier: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * scale
    if outlier:   # one large value per matrix: its block's scale grows, its neighbours' error too
        w.view(-1)[torch.randint(0, w.numel(), (1,), generator=g)] *= 50
    return w


def _per_value_absmax(absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    return absmax.repeat_interleave(blocksize)[:n]


# ----- codebooks and packing ---------------------------------------------------------------------

def test_codebooks():
    nf4 = bw.code_tensor(bw.NF4_CODE)
    assert nf4.numel() == 16 and bool((nf4[1:] > nf4[:-1]).all())
    assert nf4[0] == -1 and nf4[7] == 0 and nf4[15] == 1
    assert bw.max_half_gap(nf4) == pytest.approx((1 - 0.6961928009986877) / 2)   # 0.152
    fp4 = bw.code_tensor(bw.FP4_CODE)
    assert fp4.abs().max() == 1 and fp4.numel() == 16
    assert bw.max_half_gap(fp4) == pytest.approx(1 / 6)   # docs/qlora.md: 0.167 * absmax
    dyn = bw.code_tensor(bw.dynamic_map_8bit())
    assert dyn.numel() == 256 and dyn.unique().numel() == 256
    assert dyn.min() > -1 and dyn.max() == 1 and (dyn == 0).any()
    assert bw.max_half_gap(dyn) < 0.0071   # ~0.7% steps near 1


def test_nibble_order_is_high_first():
    packed = bw.pack_nibbles(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))
    assert packed.tolist() == [0x12, 0xF0]
    idx = torch.randint(0, 16, (64,), dtype=torch.uint8)
    assert torch.equal(bw.unpack_nibbles(bw.pack_nibbles(idx)), idx)


# ----- error bounds ------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(w=weights, quant_type=st.sampled_from(["nf4", "fp4"]))
def test_4bit_error_within_block_bound(w, quant_type):
    code = bw.code_tensor(bw.CODES_4BIT[quant_type])
    idx, absmax = bw.quantize_blockwise(w, code, 64)
    deq = bw.dequantize_blockwise(idx, absmax, code)[: w.numel()]
    x, scale = w.reshape(-1), _per_value_absmax(absmax, w.numel(), 64)
    padded = torch.nn.functional.pad(x, (0, absmax.numel() * 64 - x.numel()))
    assert torch.equal(absmax, padded.view(-1, 64).abs().amax(1))
    err = (x - deq).abs()
    assert bool((err <= bw.max_half_gap(code) * scale * (1 + EPS)).all())
    # and the chosen code is a nearest one, not just within the worst-case bound
    best = (x[:, None] - code[None, :] * scale[:, None]).abs().min(dim=1).values
    assert bool((err <= best + EPS * scale).all())


@settings(max_examples=30, deadline=None)
@given(w=weights)
def test_double_quant_absmax_error_bound(w):
    code = bw.code_tensor(bw.NF4_CODE)
    _, absmax = bw.quantize_blockwise(torch.cat([w.reshape(-1)] * 40), code, 64)   # several 256-groups
    q, scale, offset = bw.quantize_absmax(absmax)
    dyn = bw.code_tensor(bw.dynamic_map_8bit())
    back = bw.dequantize_absmax(q, scale, offset, dyn)
    group_scale = _per_value_absmax(scale, absmax.numel(), 256)
    err = (absmax - back).abs()
    assert bool((err <= bw.max_half_gap(dyn) * group_scale * (1 + EPS) + EPS * absmax.abs().max()).all())


@settings(max_examples=30, deadline=None)
@given(w=weights)
def test_int8_error_within_row_bound(w):
    layer = Linear8bit.from_linear(_linear(w), compute_dtype=torch.float32)
    err = (w - layer.dequantize(torch.float32)).abs()
    absmax = w.abs().amax(dim=1, keepdim=True)
    assert bool((err <= absmax / 254 + absmax * 2**-20).all())   # slack: fp32 rounding of q * scale
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() <= 127
    assert torch.equal(layer.dequantize(torch.bfloat16), layer.dequantize(torch.float32).bfloat16())


@settings(max_examples=25, deadline=None)
@given(w=weights, double_quant=st.booleans())
def test_linear4bit_dequantize_matches_reference(w, double_quant):
    layer = Linear4bit.from_linear(_linear(w), double_quant=double_quant)
    code = bw.code_tensor(bw.NF4_CODE)
    idx, absmax = bw.quantize_blockwise(w, code, 64)
    if double_quant:
        absmax = bw.dequantize_absmax(*bw.quantize_absmax(absmax), bw.code_tensor(bw.dynamic_map_8bit()))
    expected = bw.dequantize_blockwise(idx, absmax, code)[: w.numel()].view_as(w)
    assert torch.equal(layer.dequantize(torch.float32), expected)
    assert torch.equal(layer.dequantize(), expected.bfloat16())   # fp32 product, rounded once


def _linear(w: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    lin.weight.data.copy_(w)
    return lin


# ----- tiled matmul ------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda lin: Linear4bit.from_linear(lin, double_quant=True),
    lambda lin: Linear4bit.from_linear(lin, quant_type="fp4"),
    lambda lin: Linear8bit.from_linear(lin),
])
def test_tiled_forward_and_backward_match_full_dequant(make):
    torch.manual_seed(0)
    lin = nn.Linear(40, 300)            # 40 in: a 64-block spans rows, tiles are multiples of 8 rows
    layer = make(lin)
    layer.tile_elements = 40 * 50       # several tiles, the last one ragged
    tiles = layer.tiles()
    assert len(tiles) > 3 and tiles[-1][1] == 300
    rows = torch.cat([layer.dequantize_rows(r0, r1) for r0, r1 in tiles])
    assert torch.equal(rows, layer.dequantize())   # tiles are exact slices of the full weight

    x = torch.randn(3, 5, 40, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = (reference_linear(x_ref.to(torch.bfloat16), layer.dequantize()) + lin.bias.bfloat16()).float()
    torch.testing.assert_close(y, y_ref, **TOL[torch.bfloat16])
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.bfloat16])
    assert y.dtype == x.dtype == torch.float32


def test_autograd_keeps_no_dequantized_weight():
    layer = Linear4bit.from_linear(nn.Linear(128, 512))
    layer.tile_elements = 128 * 64
    saved: list[torch.Tensor] = []
    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert not any(t.numel() >= 128 * 64 for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_plan_tiles_cover_rows_on_block_boundaries():
    tiles = plan_tiles(1000, 24, row_multiple=8, tile_elements=24 * 100)
    assert tiles[0] == (0, 96) and tiles[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
    assert all(r0 * 24 % 64 == 0 for r0, _ in tiles)


# ----- storage -----------------------------------------------------------------------------------

def test_storage_is_buffers_and_round_trips_state_dict():
    torch.manual_seed(0)
    lin = nn.Linear(96, 70)
    layer = Linear4bit.from_linear(lin, double_quant=True)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]
    assert set(layer.state_dict()) == {"qweight", "absmax_q", "absmax_scale", "absmax_offset", "bias"}
    assert layer.num_weight_elements == 96 * 70
    assert layer.quantized_nbytes() == 96 * 70 // 2 + 105 + 4 + 4   # codes + 105 absmax + 1 scale + offset
    fresh = Linear4bit(96, 70, double_quant=True)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), layer(x))


def test_to_dtype_moves_but_never_rounds_scales():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    before = layer.absmax.clone()
    layer.to(torch.float16)
    assert layer.absmax.dtype == torch.float32 and torch.equal(layer.absmax, before)
    assert layer.bias.dtype == torch.float16 and layer.code.dtype == torch.float32


def test_int8_to_dtype_also_keeps_scales_and_both_layers_describe_themselves():
    layer = Linear8bit.from_linear(nn.Linear(64, 32))
    before = layer.scale.clone()
    layer.to(torch.float16)
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, before)
    assert repr(layer) == ("Linear8bit(in_features=64, out_features=32, bias=True, quant_type=int8, "
                           "compute_dtype=torch.bfloat16)")
    assert "quant_type=nf4, double_quant=True, compute_dtype=torch.bfloat16" in repr(
        Linear4bit.from_linear(nn.Linear(64, 32), double_quant=True))
    int8 = Linear8bit.from_linear(nn.Linear(64, 32)).half()
    assert int8.scale.dtype == torch.float32 and int8.qweight.dtype == torch.int8


# ----- quantize_model / dequantize_model ---------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_quantize_model_replaces_linears_and_stays_close(arch):
    ids = tiny_batch()
    ref = tiny_model(arch)(ids).logits
    errors = {}
    for bits in (4, 8):
        model = quantize_model(tiny_model(arch), bits=bits, double_quant=True)
        layers = quantized_layers(model)
        assert len(layers) == (8 if arch == "gpt2" else 14)
        assert not any("lm_head" in name for name, _ in layers)
        errors[bits] = ((model(ids).logits - ref).norm() / ref.norm()).item()
    assert errors[8] < errors[4] < 0.15, errors


def test_quantize_model_skip_modules_and_errors():
    model = quantize_model(tiny_model(), bits=4, skip_modules=("lm_head", "mlp"))
    names = [n for n, _ in quantized_layers(model)]
    assert len(names) == 8 and not any(".mlp." in n for n in names)
    with pytest.raises(ConfigError) as exc:
        quantize_model(tiny_model(), bits=3, quant_type="nf3", backend="gpu")
    assert len(exc.value.problems) == 2 and "bits" in str(exc.value) and "backend" in str(exc.value)
    with pytest.raises(ConfigError, match="compute_dtype"):
        quantize_model(tiny_model(), bits=4, compute_dtype="int8")
    bad = tiny_model()
    bad.model.layers[1].self_attn.q_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.self_attn\.q_proj"):
        quantize_model(bad, bits=4)
    if not bnb_available():
        with pytest.raises(UnsupportedFeatureError, match="bitsandbytes"):
            quantize_model(tiny_model(), bits=4, backend="bitsandbytes")


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 4, "double_quant": "false"}, "double_quant"),   # a truthy string, not False
    ({"bits": 8, "int8_compute": "no"}, "int8_compute"),
    ({"bits": 4, "int8_compute": True}, "int8_compute"),     # int8 matmuls need an int8 base
    ({"bits": 4, "skip_modules": None}, "skip_modules"),
    ({"bits": 4, "skip_modules": [1]}, "skip_modules"),
])
def test_quantize_model_names_arguments_of_the_wrong_type(kwargs, field):
    with pytest.raises(ConfigError) as exc:
        quantize_model(tiny_model(), **kwargs)
    assert [p.split(":")[0] for p in exc.value.problems] == [field]


def test_a_single_skip_module_string_is_one_name_not_its_letters():
    names = [n for n, _ in quantized_layers(quantize_model(tiny_model(), bits=4, skip_modules="lm_head"))]
    assert names == [n for n, _ in quantized_layers(quantize_model(tiny_model(), bits=4))]
    assert names and "lm_head" not in names


def test_dequantize_model_puts_plain_layers_back():
    from transformers.pytorch_utils import Conv1D

    ids = tiny_batch()
    for arch, plain in (("llama", nn.Linear), ("gpt2", Conv1D)):
        model = quantize_model(tiny_model(arch), bits=4, compute_dtype=torch.float32)
        quantized = model(ids).logits
        dequantize_model(model, dtype=torch.float32)
        assert not quantized_layers(model)
        assert type(model.get_submodule("lm_head")) is nn.Linear
        kinds = {type(m) for n, m in model.named_modules() if n.endswith(("q_proj", "c_attn", "c_fc"))}
        assert kinds == {plain}
        torch.testing.assert_close(model(ids).logits, quantized, **TOL[torch.float32])


def test_string_compute_dtype_and_8bit_ignores_quant_type():
    model = quantize_model(tiny_model(), bits=8, quant_type="nf4", compute_dtype="torch.float16")
    layer = quantized_layers(model)[0][1]
    assert isinstance(layer, Linear8bit) and layer.compute_dtype == torch.float16


# ----- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_cpu():
    lin = nn.Linear(256, 192)
    cpu = Linear4bit.from_linear(lin, double_quant=True)
    gpu = Linear4bit.from_linear(copy.deepcopy(lin).cuda(), double_quant=True)
    assert gpu.qweight.is_cuda and torch.equal(gpu.qweight.cpu(), cpu.qweight)
    x = torch.randn(4, 256)
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), **TOL[torch.bfloat16])
    moved = copy.deepcopy(cpu).to("cuda")
    assert moved.absmax_scale.is_cuda and moved.code.is_cuda
    torch.testing.assert_close(moved(x.cuda()).cpu(), cpu(x), **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_bitsandbytes_backend_agrees_with_reference():
    pytest.importorskip("bitsandbytes")
    from loratune.quant import BnbLinear4bit

    torch.manual_seed(0)
    lin = nn.Linear(256, 192).cuda()
    lin.weight.data = lin.weight.data.bfloat16().float()   # bitsandbytes quantizes the bf16 weight
    ours = Linear4bit.from_linear(lin, double_quant=True)
    model = nn.Sequential(lin)
    quantize_model(model, bits=4, double_quant=True)
    theirs = model[0]
    assert isinstance(theirs, BnbLinear4bit) and theirs.is_quantized
    torch.testing.assert_close(theirs.dequantize(torch.float32), ours.dequantize(torch.float32),
                               atol=1e-2, rtol=1e-2)
    x = torch.randn(4, 256, device="cuda")
    torch.testing.assert_close(theirs(x), ours(x), **TOL[torch.bfloat16])
