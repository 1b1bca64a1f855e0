"""GPTQ rounding of the `base_compute: int8` weights (quant/gptq.py)."""

from __future__ import annotations

import pytest
import torch

from loratune.ops.int8_matmul import int8_weight_levels, quantize_rows
from loratune.quant import gptq as quant_gptq
from loratune.quant.gptq import gptq_codes, gptq_round
from loratune.quant.int8 import Linear8bit
from loratune.quant.smoothing import activation_smoothing
from loratune.tools.loading import load_base_model
from test_cli_train import make_model_dir


def _correlated_inputs(n: int, k: int = 96, seed: int = 0) -> torch.Tensor:
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(100)) / k ** 0.5 + torch.eye(k)
    samples = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return samples @ mix  # channels correlated (the same way for every seed), as activations are


def _output_error(codes, scale, weight, x) -> float:
    return float(((codes.float() * scale[:, None] - weight) @ x.t()).norm() / (weight @ x.t()).norm())


@pytest.mark.parametrize("levels", [63, 127])
def test_gptq_keeps_round_to_nearest_scales_and_the_levels_and_cuts_the_output_error(levels):
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    calibration, held_out = _correlated_inputs(512), _correlated_inputs(512, seed=2)
    codes, scale = gptq_round(weight, calibration.t() @ calibration, levels)
    nearest, nearest_scale = quantize_rows(weight, levels)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape
    assert torch.equal(scale, nearest_scale)  # a drop-in for the codes the int8 products expect
    assert int(codes.abs().max()) <= levels  # past 63, an AVX2 product would saturate
    assert not torch.equal(codes, nearest)
    # on inputs it was not fitted to, from the same distribution
    gptq_error = _output_error(codes, scale, weight, held_out)
    assert gptq_error < 0.8 * _output_error(nearest, scale, weight, held_out)


def test_uncorrelated_inputs_give_round_to_nearest():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    codes, scale = gptq_round(weight, torch.diag(torch.rand(32) + 0.5), 63)
    assert torch.equal(codes, quantize_rows(weight, 63)[0])


def test_channels_the_calibration_never_reached_are_still_rounded():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    x = _correlated_inputs(256, k=32)
    x[:, 5] = 0  # never fires
    codes, scale = gptq_round(weight, x.t() @ x, 63)
    nearest = quantize_rows(weight, 63)[0]
    assert torch.equal(codes[:, 5], nearest[:, 5])  # nothing moved onto it, nothing moved from it
    assert not torch.equal(codes, nearest)


@pytest.mark.parametrize("hessian", [-torch.eye(16), torch.full((16, 16), float("nan"))],
                         ids=["not positive definite", "nan activations"])
def test_a_matrix_that_cannot_be_used_falls_back_to_round_to_nearest(hessian):
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
    codes, scale = gptq_round(weight, hessian, 63)
    nearest, nearest_scale = quantize_rows(weight, 63)
    assert torch.equal(codes, nearest) and torch.equal(scale, nearest_scale)


def _rows(n_rows: int = 4, length: int = 48, vocab: int = 64) -> list[list[int]]:
    g = torch.Generator().manual_seed(6)
    return torch.randint(3, vocab, (n_rows, length), generator=g).tolist()


def test_passes_under_a_small_budget_give_the_same_codes(tmp_path, monkeypatch):
    model = load_base_model(make_model_dir(tmp_path / "model"), dtype="float32")
    rows = _rows()
    smooth = activation_smoothing(model, rows)
    one_pass = gptq_codes(model, rows, smooth, 63)
    calls = []
    forward = type(model).forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(quant_gptq, "HESSIAN_BYTES", 1)  # one group a pass
    monkeypatch.setattr(type(model), "forward", counted)
    several = gptq_codes(model, rows, smooth, 63)
    groups = len({id(s) for s in smooth.values()})
    assert len(calls) == groups * len(rows)
    assert one_pass.keys() == several.keys() == smooth.keys()
    for name in one_pass:
        assert torch.equal(one_pass[name][0], several[name][0])


def test_a_loaded_int8_compute_base_has_gptq_codes_closer_to_float_than_rounding(tmp_path, monkeypatch):
    directory = make_model_dir(tmp_path / "model")
    rows = _rows()
    float_model = load_base_model(directory, dtype="float32")
    model = load_base_model(directory, dtype="float32", load_in_8bit=True, int8_compute=True,
                            calibration_rows=rows)
    expected = gptq_codes(float_model, rows, activation_smoothing(float_model, rows), int8_weight_levels())
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Linear8bit) and q_proj.int8_compute
    assert torch.equal(q_proj.qweight, expected["model.layers.0.self_attn.q_proj"][0])
    monkeypatch.setattr(quant_gptq, "gptq_codes", lambda *args: None)  # round to nearest, as before
    nearest = load_base_model(directory, dtype="float32", load_in_8bit=True, int8_compute=True,
                              calibration_rows=rows)
    ids = torch.tensor(rows)
    with torch.no_grad():
        exact = float_model(ids).logits
        gptq_error = float((model(ids).logits - exact).norm() / exact.norm())
        nearest_error = float((nearest(ids).logits - exact).norm() / exact.norm())
    assert gptq_error < nearest_error

