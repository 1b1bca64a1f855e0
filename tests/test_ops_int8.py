"""base_compute: int8 — int8 matmuls of a frozen int8 weight, forward and input gradient."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from loratune import LoraConfig, get_peft_model
from loratune.errors import ConfigError
from loratune.ops import int8_matmul, reference_paths
from loratune.ops import lora_linear as lora_linear_module
from loratune.ops.int8_matmul import int8_linear, int8_linear_reference, quantize_rows
from loratune.quant import smoothing as quant_smoothing
from loratune.quant.int8 import HEAD_CODES, Linear8bit
from loratune.tools.loading import load_base_model
from loratune.train import run
from loratune.train.config import build_config
from test_cli_train import make_model_dir, rows_for, write_rows
from test_train_loop import adapter, assert_same_adapter, losses, settings


def _layer(out_features=48, in_features=64, bias=True, seed=0):
    """An int8-computing layer, its weight rounded to the levels this CPU keeps exact."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return Linear8bit.from_linear(linear, compute_dtype=torch.float32, int8_compute=True)


def test_rows_are_quantized_to_their_absmax_and_zero_rows_stay_zero():
    x = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]])
    codes, scale = quantize_rows(x)
    assert codes.dtype == torch.int8 and codes[0].tolist() == [127, -64, 32] and codes[1].abs().sum() == 0
    assert scale.tolist() == pytest.approx([1 / 127, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmuls_equal_the_float_reference_forward_and_backward(dtype):
    layer = _layer()
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = int8_linear(x, layer.qweight, layer.scale, layer.bias)
    y_ref = int8_linear_reference(x_ref, layer.qweight, layer.scale, layer.bias)
    assert y.shape == (3, 5, 48) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    grad = torch.randn_like(y)
    for out in (y, y_ref):  # the same draws for the stochastic rounding of the gradient
        torch.manual_seed(7)
        out.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)


def test_stochastic_rounding_is_right_on_average_where_rounding_to_nearest_is_not():
    x = torch.full((1, 64), 0.3)
    x[0, 0] = 127.0  # scale 1: every other value is 0.3 of a level, which rounds to nearest as 0
    nearest, _ = int8_matmul._quantize_scratch(x.clone())
    assert nearest[0, 1:].abs().sum() == 0
    torch.manual_seed(0)
    draws = torch.stack([int8_matmul._quantize_scratch(x.clone(), stochastic=True)[0][0, 1:]
                         for _ in range(400)]).float()
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(draws.mean()) - 0.3) < 0.02


def test_stochastic_codes_stay_within_the_levels_and_repeat_under_the_same_seed():
    x = torch.randn(32, 96) * 5
    x[:, 7] = x.abs().amax(1)  # rows that reach their absmax exactly: x / scale = levels
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        results.append(int8_matmul._quantize_scratch(x.clone(), 63, stochastic=True)[0])
    assert torch.equal(results[0], results[1]) and int(results[0].abs().max()) <= 63


def test_the_dither_table_does_not_change_as_it_grows():
    small, large = int8_matmul._Dither(), int8_matmul._Dither()
    small.uniform(torch.Size([10]))
    large.uniform(torch.Size([3 * int8_matmul._Dither.CHUNK]))
    assert large.table.numel() > small.table.numel()
    torch.testing.assert_close(large.table[:small.table.numel()], small.table, rtol=0, atol=0)
    values = large.uniform(torch.Size([4, 5]))
    assert values.shape == (4, 5) and bool(((values >= 0) & (values < 1)).all())
    draws = []
    for table in (small, large):  # what a process ran before (its table's size) changes nothing
        torch.manual_seed(5)
        draws.append(table.uniform(torch.Size([6, 7])))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


def _with_int8(linear):
    return Linear8bit.from_linear(linear, compute_dtype=torch.float32, int8_compute=True)


def test_int8_matmuls_stay_close_to_the_exact_float_product():
    layer = _layer(out_features=256, in_features=512, bias=False)
    x = torch.randn(64, 512, requires_grad=True)
    weight = layer.dequantize(torch.float32)
    exact = x @ weight.T
    y = layer(x)
    rel = (y - exact).norm() / exact.norm()
    assert 0 < rel < 0.01, rel  # activations rounded to 255 levels of their row's absmax
    grad = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, grad)
    dx_exact = grad @ weight
    assert (dx - dx_exact).norm() / dx_exact.norm() < 0.01


def test_lora_on_an_int8_compute_base_trains_only_the_adapter():
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    base = nn.Sequential(_with_int8(net[0]), nn.ReLU(), _with_int8(net[2]))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    model(torch.randn(6, 32)).square().sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_trainer_with_base_compute_int8_tracks_the_exact_run(tmp_path, monkeypatch):
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 16))
    kw = {"max_steps": 4, "lora_dropout": 0.0}
    calls, calibrated = [], []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or int_mm(a, b))
    smoothing = quant_smoothing.activation_smoothing
    monkeypatch.setattr(quant_smoothing, "activation_smoothing",
                        lambda model, rows: calibrated.append(rows) or smoothing(model, rows))
    run(settings(model_dir, data, tmp_path / "exact", **kw))
    assert not calls and not calibrated  # the exact run never multiplies in int8
    run(settings(model_dir, data, tmp_path / "int8", base_compute="int8", **kw))
    assert len(calls) >= 4 * 7 * 2 * 2  # every step: 7 projections x 2 layers, forward and backward
    # ... and the hidden rows' gradient through the LM head: (hidden, vocab) codes of its weight
    assert sum(shape[1] == 1024 for shape in calls) >= 4
    (rows,) = calibrated  # smoothed once, from the training rows (token ids, not empty)
    assert rows and all(rows) and sum(map(len, rows)) <= quant_smoothing.CALIBRATION_TOKENS
    exact, int8 = losses(tmp_path / "exact"), losses(tmp_path / "int8")
    assert exact[0] == pytest.approx(int8[0], rel=0.02)  # the same start, computed in int8
    assert int8[-1] < int8[0]  # and it learns
    assert adapter(tmp_path / "int8").keys() == adapter(tmp_path / "exact").keys()  # a plain PEFT adapter


@pytest.mark.parametrize("native_bf16", [True, False])
def test_int8_on_a_native_bf16_cpu_warns_that_it_does_not_pay(tmp_path, monkeypatch, caplog, native_bf16):
    from loratune.train import build

    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 8))
    monkeypatch.setattr(build, "bf16_supported", lambda device: native_bf16)
    with caplog.at_level("WARNING", logger="loratune"):
        run(settings(model_dir, data, tmp_path / "out", base_compute="int8", bf16=True, max_steps=1))
    warned = [r.getMessage() for r in caplog.records if "computes bf16 natively" in r.getMessage()]
    assert len(warned) == (1 if native_bf16 else 0)
    assert not warned or "1.69x PEFT's tokens/s against 1.96x" in warned[0]


def test_an_int8_base_gives_its_head_8_bit_codes_and_an_exact_base_none(tmp_path):
    model_dir = make_model_dir(tmp_path / "model")
    exact = load_base_model(model_dir, dtype="float32")
    int8 = load_base_model(model_dir, dtype="float32", load_in_8bit=True, int8_compute=True)
    assert getattr(exact.get_output_embeddings(), HEAD_CODES, None) is None
    head = int8.get_output_embeddings()
    codes, scale = getattr(head, HEAD_CODES)
    assert type(head) is nn.Linear and codes.dtype == torch.int8 and codes.shape == head.weight.shape
    assert int(codes.abs().max()) == 127  # the weight is the operand that keeps 8 bits on every CPU
    torch.testing.assert_close(codes.float() * scale[:, None], head.weight, rtol=0,
                               atol=float(scale.max()) / 2)


def test_an_int8_run_resumed_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path):
    """The gradient's stochastic rounding draws from the per-micro-batch generator: a resumed run
    (here after another run in the same process, so with the dither table already grown) draws the same."""
    model_dir = make_model_dir(tmp_path / "model")
    data = write_rows(tmp_path / "train.jsonl", rows_for("messages", 16))
    kw = {"max_steps": 6, "lora_dropout": 0.1, "save_steps": 3, "save_total_limit": None,
          "base_compute": "int8"}
    straight = tmp_path / "straight"
    run(settings(model_dir, data, straight, **kw))
    resumed = tmp_path / "resumed"
    run(settings(model_dir, data, resumed, resume_from_checkpoint=str(straight / "checkpoint-3"), **kw))
    assert_same_adapter(adapter(straight), adapter(resumed))
    assert losses(resumed) == pytest.approx(losses(straight)[3:], rel=1e-6)


@pytest.mark.parametrize(("extra", "needle"), [
    ({"base_compute": "int4"}, "base_compute must be exact or int8, got 'int4'"),
    ({"base_compute": "int8", "load_in_4bit": True}, "cannot be combined with load_in_4bit"),
    ({"base_compute": "int8", "fsdp": True}, "base_compute: int8 is not supported with fsdp"),
])
def test_base_compute_settings_that_cannot_work_are_refused_by_name(extra, needle):
    with pytest.raises(ConfigError) as err:
        build_config({"train_file": "x.jsonl", **extra})
    assert needle in str(err.value)


def test_weights_are_rounded_to_seven_bits_where_int8_products_saturate(monkeypatch):
    """Without VNNI (AVX2 vpmaddubsw) an int8 product is exact only for weights up to 64."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    int8_matmul.int8_weight_levels.cache_clear()
    try:
        assert int8_matmul.int8_weight_levels() == 63
        layer = _layer()
        assert int(layer.qweight.abs().max()) == 63
        plain = Linear8bit.from_linear(nn.Linear(64, 48), compute_dtype=torch.float32)
        assert int(plain.qweight.abs().max()) == 127  # weight-only storage keeps all 8 bits
    finally:
        int8_matmul.int8_weight_levels.cache_clear()


_CAPPED = """
import torch
from torch import nn
from loratune.ops.int8_matmul import int8_linear, int8_linear_reference
from loratune.quant.int8 import Linear8bit
torch.manual_seed(0)
layer = Linear8bit.from_linear(nn.Linear(512, 256), compute_dtype=torch.float32, int8_compute=True)
x = torch.randn(64, 512) * 4
args = (layer.qweight, layer.scale, layer.bias)
torch.testing.assert_close(int8_linear(x, *args), int8_linear_reference(x, *args), rtol=1e-5, atol=1e-5)
# The LM head's gradient product: 8-bit weight codes first, the softmax's codes (7 bits here) second.
from loratune.ops.cross_entropy import int8_softmax_product
from loratune.ops.int8_matmul import int8_weight_levels
w = torch.full((3000, 64), 127, dtype=torch.int8)
p = torch.full((16, 3000), int8_weight_levels(), dtype=torch.int8)
ones = torch.ones(16)
assert torch.equal(int8_softmax_product(p, ones, w).double(), p.double() @ w.double())
print("exact")
"""


def test_int8_products_are_exact_on_an_avx2_only_instruction_set():
    """oneDNN capped at AVX2 runs the kernels an AVX2-only CPU runs (the cap is read at start-up)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CAPPED], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "exact" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("dropout,outliers", [(0.0, False), (0.2, False), (0.0, True), (0.2, True)])
def test_the_fused_lora_op_on_an_int8_base_equals_its_reference_path(dropout, outliers, monkeypatch):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32))
    smooth = torch.rand(64) + 0.5
    if outliers:
        smooth[[5, 40]] = torch.inf  # two input channels computed in float
    smoothed = Linear8bit.from_linear(net[0], compute_dtype=torch.float32, int8_compute=True, smooth=smooth)
    assert (smoothed.outliers is not None) == outliers
    base = nn.Sequential(smoothed, nn.ReLU(), _with_int8(net[2]))
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=dropout, target_modules=["0", "2"],
                                            init_lora_weights=False))
    model.train()
    x = torch.randn(2, 7, 64)
    x[..., 5] *= 50
    fused = []
    apply = lora_linear_module._LoraLinearFn.apply
    monkeypatch.setattr(lora_linear_module._LoraLinearFn, "apply", lambda *a: fused.append(1) or apply(*a))
    results = []
    for ctx in (contextlib.nullcontext, reference_paths):
        torch.manual_seed(1)
        with ctx():
            loss = model(x).square().sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
        model.zero_grad()
    assert len(fused) == 2  # both layers took the fused op on the fast path, none on the reference
    (fast, fast_grads), (ref, ref_grads) = results
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-5)


def test_consecutive_layers_on_the_same_input_quantize_it_once(monkeypatch):
    calls = []
    real = int8_matmul.quantize_rows
    monkeypatch.setattr(int8_matmul, "quantize_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    layers = [_layer(seed=s) for s in range(3)]
    x = torch.randn(4, 64)
    ys = [layer(x) for layer in layers]  # q, k and v read the same normed rows
    assert len(calls) == 1
    x.mul_(2)  # changed in place: quantized again
    layers[0](x)
    assert len(calls) == 2
    second = layers[1]
    torch.testing.assert_close(ys[1], int8_linear_reference(x / 2, second.qweight, second.scale, second.bias))
