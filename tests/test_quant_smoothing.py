"""Activation smoothing of an int8-computing base: factors, groups, and the products they leave unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factories import tiny_model
from loratune.ops.int8_matmul import int8_linear, int8_linear_reference
from loratune.quant import quantize_model
from loratune.quant import smoothing as quant_smoothing
from loratune.quant.int8 import Linear8bit
from loratune.quant.smoothing import (
    OUTLIER_CHANNELS,
    OUTLIER_RATIO,
    _shared_inputs,
    activation_smoothing,
    calibration_rows,
    outlier_channels,
)
from loratune.tools.loading import load_base_model
from test_cli_train import make_model_dir


def test_layers_called_in_a_row_on_one_tensor_share_a_group():
    calls = [("q", 1), ("k", 1), ("v", 1), ("o", 2), ("gate", 3), ("up", 3), ("down", 4), ("q", 5)]
    assert _shared_inputs(calls) == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


class _TwoInputs(nn.Module):
    """o then gate/up, as in a decoder layer: o's input is freed before gate's is made, same shape."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 64)
        self.o, self.gate, self.up = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, input_ids, **kwargs):
        x = self.o(self.embed(input_ids) * 2.0) * 0.5  # o's input dies; x may take its freed block
        return self.gate(x) + self.up(x)


def test_layers_group_by_input_tensor_even_where_a_freed_address_is_reused(monkeypatch):
    # The allocator may hand o's freed input block to gate's input; every address being the same is
    # the worst case of that, made certain.
    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: 0)
    smooth = activation_smoothing(_TwoInputs(), [[1, 2, 3, 4]])
    assert smooth["gate"] is smooth["up"] and smooth["o"] is not smooth["gate"]


def test_calibration_rows_stop_at_the_token_budget_and_cut_long_rows():
    examples = [{"input_ids": list(range(10))}, {"input_ids": []}, {"input_ids": list(range(7))}]
    assert calibration_rows(examples, max_seq_length=6, tokens=9) == [list(range(6)), list(range(3))]


def test_smoothing_factors_are_shared_by_the_layers_reading_one_input():
    model = tiny_model()
    rows = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]
    smooth = activation_smoothing(model, rows)
    layer = "model.layers.0"
    attn = [smooth[f"{layer}.self_attn.{p}_proj"] for p in "qkv"]
    mlp = [smooth[f"{layer}.mlp.{p}_proj"] for p in ("gate", "up")]
    assert attn[0] is attn[1] is attn[2] and mlp[0] is mlp[1]
    assert smooth[f"{layer}.self_attn.o_proj"] is not attn[0]
    for s in smooth.values():  # at most min(8, in // 16) outlier channels (inf), every other factor finite
        outliers = torch.isinf(s)
        assert int(outliers.sum()) <= min(OUTLIER_CHANNELS, s.numel() // 16)
        assert bool(torch.isfinite(s[~outliers]).all() and (s[~outliers] > 0).all())
    assert "lm_head" not in smooth  # the head is never quantized


def _outlier_rows(n=32, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, 3] *= 40  # one outlier channel, as language models have
    return x


def _error(layer, x, exact):
    return float((layer(x).detach() - exact).norm() / exact.norm())


def test_smoothing_leaves_the_product_unchanged_and_cuts_the_rounding_error():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = _outlier_rows()
    exact = linear(x).detach()
    s = x.abs().amax(0).sqrt() / linear.weight.detach().abs().amax(0).sqrt()
    plain = Linear8bit.from_linear(linear, compute_dtype=torch.float32, int8_compute=True)
    smoothed = Linear8bit.from_linear(linear, compute_dtype=torch.float32, int8_compute=True, smooth=s)
    weight = linear.weight.detach()
    torch.testing.assert_close(smoothed.dequantize(torch.float32), weight, rtol=0.05, atol=0.02)
    assert _error(smoothed, x, exact) < 0.5 * _error(plain, x, exact)


def test_outlier_channels_are_those_with_the_largest_activation_times_weight():
    x_amax = torch.ones(32)
    x_amax[1] = 50.0
    w_amax = torch.ones(32)
    w_amax[2] = 100.0
    assert sorted(outlier_channels(x_amax, w_amax, k=2).tolist()) == [1, 2]
    assert outlier_channels(x_amax, w_amax, k=8).numel() == 2  # at most one channel in 16
    x_amax[1] = OUTLIER_RATIO - 1  # below OUTLIER_RATIO times the median: not an outlier
    assert outlier_channels(x_amax, w_amax, k=2).tolist() == [2]
    assert outlier_channels(torch.ones(32), torch.ones(32)).numel() == 0  # no outliers, no float columns


def _outlier_layer(linear, x, outliers=(3,)):
    s = x.abs().amax(0).sqrt() / linear.weight.detach().abs().amax(0).sqrt()
    s[list(outliers)] = torch.inf
    return Linear8bit.from_linear(linear, compute_dtype=torch.float32, int8_compute=True, smooth=s)


def test_outlier_channels_leave_the_int8_product_and_cut_its_error():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = _outlier_rows()
    x[:, 3] *= 10  # 400x the other channels: smoothing alone cannot absorb it
    exact = linear(x).detach()
    smooth = x.abs().amax(0).sqrt() / linear.weight.detach().abs().amax(0).sqrt()
    smoothed = Linear8bit.from_linear(linear, compute_dtype=torch.float32, int8_compute=True, smooth=smooth)
    split = _outlier_layer(linear, x)
    assert split.outlier_index.tolist() == [3] and split.qweight[:, 3].abs().sum() == 0
    torch.testing.assert_close(split.outlier_weight[:, 0], linear.weight.detach()[:, 3])
    dequantized = split.dequantize(torch.float32)
    torch.testing.assert_close(dequantized[:, 3], linear.weight.detach()[:, 3])  # the float column, exact
    torch.testing.assert_close(dequantized, linear.weight.detach(), rtol=0.05, atol=0.02)
    assert _error(split, x, exact) < 0.3 * _error(smoothed, x, exact)


@pytest.mark.parametrize("outliers", [(), (3, 17)])
def test_a_smoothed_int8_product_equals_its_float_reference_forward_and_backward(outliers):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = _outlier_rows().requires_grad_(True)
    layer = _outlier_layer(linear, x.detach(), outliers=outliers)
    assert (layer.outliers is not None) == bool(outliers)
    x_ref = x.detach().clone().requires_grad_(True)
    args = (layer.qweight, layer.scale, layer.bias, layer.smooth, layer.outliers)
    y, y_ref = int8_linear(x, *args), int8_linear_reference(x_ref, *args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    grad = torch.randn_like(y)
    for out in (y, y_ref):  # the same draws for the stochastic rounding of the gradient
        torch.manual_seed(7)
        out.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # The outlier channels' input gradient is the float product with their exact columns.
    columns = list(outliers)
    torch.testing.assert_close(x.grad[:, columns], grad @ linear.weight.detach()[:, columns],
                               rtol=1e-5, atol=1e-5)


def test_loading_an_int8_compute_base_with_calibration_rows_smooths_its_layers(tmp_path):
    directory = make_model_dir(tmp_path / "model")
    model = load_base_model(directory, dtype="float32", load_in_8bit=True, int8_compute=True,
                            calibration_rows=[[5, 9, 2, 7, 1, 3]])
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Linear8bit) and attn.q_proj.int8_compute
    assert attn.q_proj.smooth is not None and attn.q_proj.smooth is attn.k_proj.smooth is attn.v_proj.smooth
    for layer in (attn.q_proj, attn.k_proj):  # the inf factors are the channels computed in float
        index = layer.outlier_index if layer.outliers is not None else torch.empty(0, dtype=torch.long)
        assert index.tolist() == torch.isinf(layer.smooth).nonzero().flatten().tolist()


def test_outlier_channels_reach_the_loaded_layers_and_their_forward(tmp_path, monkeypatch):
    """Every channel above the median counts as an outlier here, so every layer has some."""
    monkeypatch.setattr(quant_smoothing, "OUTLIER_RATIO", 0)
    directory = make_model_dir(tmp_path / "model")
    rows = [[5, 9, 2, 7, 1, 3]]
    model = load_base_model(directory, dtype="float32", load_in_8bit=True, int8_compute=True,
                            calibration_rows=rows)
    mlp = model.model.layers[0].mlp
    for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        assert layer.outliers is not None and layer.qweight[:, layer.outlier_index].abs().sum() == 0
    assert mlp.gate_proj.outlier_index.tolist() == mlp.up_proj.outlier_index.tolist()
    float_model = load_base_model(directory, dtype="float32")
    ids = torch.tensor(rows)
    with torch.no_grad():
        exact = float_model(ids).logits
        error = float((model(ids).logits - exact).norm() / exact.norm())
        for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            layer.outlier_weight.zero_()  # the float columns no longer added back
        dropped = float((model(ids).logits - exact).norm() / exact.norm())
    assert error < 0.05 and dropped > 2 * error
    q_proj = load_base_model(directory, dtype="float32", load_in_8bit=True).model.layers[0].self_attn.q_proj
    assert q_proj.smooth is None and not q_proj.int8_compute


def test_quantize_model_without_int8_compute_ignores_smoothing():
    model = tiny_model()
    smooth = {"model.layers.0.self_attn.q_proj": torch.ones(model.config.hidden_size)}
    quantize_model(model, bits=8, smooth=smooth)
    assert model.model.layers[0].self_attn.q_proj.smooth is None
