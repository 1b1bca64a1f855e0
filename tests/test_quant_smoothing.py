"""Activation smoothing of an int8-computing base: factors, groups, and the products they leave unchanged."""

from __future__ import annotations

import torch
from torch import nn

from factories import tiny_model
from loratune.ops.int8_matmul import int8_linear, int8_linear_reference
from loratune.quant import quantize_model
from loratune.quant.int8 import Linear8bit
from loratune.quant.smoothing import _shared_inputs, activation_smoothing, calibration_rows
from loratune.tools.loading import load_base_model
from test_cli_train import make_model_dir


def test_layers_called_in_a_row_on_one_tensor_share_a_group():
    calls = [("q", 1, (2, 4)), ("k", 1, (2, 4)), ("v", 1, (2, 4)), ("o", 2, (2, 4)),
             ("gate", 3, (2, 4)), ("up", 3, (2, 4)), ("down", 1, (2, 8)), ("q", 1, (2, 4))]
    assert _shared_inputs(calls) == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


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
    assert all(bool(torch.isfinite(s).all() and (s > 0).all()) for s in smooth.values())
    assert "lm_head" not in smooth  # the head is never quantized


def _outlier_rows(n=32, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, 3] *= 40  # one outlier channel, as language models have
    return x


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

    def error(layer):
        return float((layer(x).detach() - exact).norm() / exact.norm())
    assert error(smoothed) < 0.5 * error(plain)


def test_a_smoothed_int8_product_equals_its_float_reference_forward_and_backward():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = _outlier_rows().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    s = torch.rand(64) + 0.5
    layer = Linear8bit.from_linear(linear, compute_dtype=torch.float32, int8_compute=True, smooth=s)
    args = (layer.qweight, layer.scale, layer.bias, layer.smooth)
    y, y_ref = int8_linear(x, *args), int8_linear_reference(x_ref, *args)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_loading_an_int8_compute_base_with_calibration_rows_smooths_its_layers(tmp_path):
    directory = make_model_dir(tmp_path / "model")
    model = load_base_model(directory, dtype="float32", load_in_8bit=True, int8_compute=True,
                            calibration_rows=[[5, 9, 2, 7, 1, 3]])
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Linear8bit) and attn.q_proj.int8_compute
    assert attn.q_proj.smooth is not None and attn.q_proj.smooth is attn.k_proj.smooth is attn.v_proj.smooth
    q_proj = load_base_model(directory, dtype="float32", load_in_8bit=True).model.layers[0].self_attn.q_proj
    assert q_proj.smooth is None and not q_proj.int8_compute


def test_quantize_model_without_int8_compute_ignores_smoothing():
    model = tiny_model()
    smooth = {"model.layers.0.self_attn.q_proj": torch.ones(model.config.hidden_size)}
    quantize_model(model, bits=8, smooth=smooth)
    assert model.model.layers[0].self_attn.q_proj.smooth is None
