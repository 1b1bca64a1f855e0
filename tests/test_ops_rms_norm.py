"""The fused RMSNorm node against Transformers' Llama RMSNorm, and the model-wide switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from factories import tiny_batch, tiny_model
from loratune import LoraConfig, get_peft_model
from loratune.ops import HALF_DTYPES, reference_paths
from loratune.ops.rms_norm import enable_fast_rms_norm, is_llama_rms_norm, rms_norm

# Backward sums in another order: fp32 within an ulp or two, bf16 within one bf16 ulp.
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=1e-3)}


def norm_and_input(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = LlamaRMSNorm(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g) + 0.5)
    norm.weight.requires_grad_(False)
    x = (3 * torch.randn(2, 7, 24, generator=g)).to(dtype)
    return norm, x


def ulp_close(actual, expected):
    """Equal up to one unit in the last place of the dtype (a row summed in another order)."""
    finfo = torch.finfo(expected.dtype)
    step = finfo.eps * expected.abs().float().clamp_min(finfo.tiny)
    assert ((actual.float() - expected.float()).abs() <= step).all()


@pytest.fixture
def eager_kernels(monkeypatch):
    import loratune.ops.compiled as compiled

    monkeypatch.setitem(compiled._STATE, "enabled", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_rms_norm_matches_llama_forward_and_backward(dtype, kernels, request):
    if kernels == "eager":
        request.getfixturevalue("eager_kernels")
    norm, x0 = norm_and_input(dtype)
    grad = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for fn in (lambda x: rms_norm(x, norm.weight, norm.variance_epsilon), norm):
        x = x0.clone().requires_grad_()
        y = fn(x)
        y.backward(grad)
        results.append((y.detach(), x.grad))
    (y, gx), (y_ref, gx_ref) = results
    assert y.dtype == y_ref.dtype and gx.dtype == gx_ref.dtype == dtype
    if kernels == "eager" or dtype == torch.float32:  # fp32 always runs the eager ops
        assert torch.equal(y, y_ref)  # the same operations in the same order
    else:
        ulp_close(y, y_ref)  # the compiled kernel may sum a row in another order
    assert not torch.equal(y, x0)  # not vacuous: the norm changed its input
    torch.testing.assert_close(gx, gx_ref, **TOL[dtype])


def test_bf16_kernels_are_compiled_and_agree_with_the_eager_ops_on_training_shapes():
    import loratune.ops.compiled as compiled
    import loratune.ops.rms_norm as module

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 1000, 576, generator=g).to(torch.bfloat16)
    weight = (torch.rand(576, generator=g) + 0.5).to(torch.bfloat16)
    grad = torch.randn(x.shape, generator=g).to(torch.bfloat16)
    y, inv = module._forward_kernel(x, weight, 1e-5)
    y_eager, inv_eager = module._forward_math(x, weight, 1e-5)
    assert compiled.enabled() and module._forward_kernel.proven  # the compiled kernel ran, no fallback
    ulp_close(y, y_eager)
    torch.testing.assert_close(inv, inv_eager, rtol=1e-6, atol=0)
    grad_x = module._backward_kernel(x, weight, inv_eager, grad)
    assert module._backward_kernel.proven
    torch.testing.assert_close(grad_x, module._backward_math(x, weight, inv_eager, grad),
                               **TOL[torch.bfloat16])


def test_fp32_rows_never_compile():
    import loratune.ops.compiled as compiled

    x, weight = torch.randn(4, 8), torch.ones(8)
    assert compiled.use_compiled((x.bfloat16(), weight.bfloat16(), 1e-5), (torch.bfloat16,))
    assert not compiled.use_compiled((x, weight, 1e-5), (torch.bfloat16,))


def test_a_kernel_that_cannot_compile_falls_back_to_the_eager_ops(monkeypatch, caplog):
    import loratune.ops.compiled as compiled

    monkeypatch.setitem(compiled._STATE, "enabled", True)

    def broken(fn, **kwargs):
        def kernel(*args):
            raise RuntimeError("no C++ compiler")
        return kernel

    monkeypatch.setattr(torch, "compile", broken)
    double = compiled.compiled(lambda t: t * 2, (torch.float32,))
    x = torch.arange(4.0)
    with caplog.at_level("WARNING", logger="loratune.ops.compiled"):
        assert torch.equal(double(x), x * 2)
        assert torch.equal(double(x), x * 2)
    assert not compiled.enabled()
    switched_off = [r.getMessage() for r in caplog.records if "switched off" in r.getMessage()]
    assert switched_off[0].count("no C++ compiler") == 1
    assert len([r for r in caplog.records if "switched off" in r.getMessage()]) == 1  # said once


def test_rms_norm_input_untouched_in_fp32():
    norm, x = norm_and_input(torch.float32)
    before = x.clone()
    x.requires_grad_()
    rms_norm(x, norm.weight, 1e-5).sum().backward()
    assert torch.equal(x.detach(), before)


def saved_bytes(fn, x):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(total)


def test_rms_norm_keeps_no_fp32_copy_of_the_input():
    norm, x = norm_and_input(torch.bfloat16)
    x = x.requires_grad_()
    fast = saved_bytes(lambda t: rms_norm(t, norm.weight, 1e-5), x)
    ref = saved_bytes(norm, x)
    x_bytes = x.numel() * x.element_size()
    assert fast < x_bytes + 2 * 4 * 14 + 2 * 24 + 1  # x, the (2, 7, 1) fp32 inverse root, the weight
    assert ref >= 2 * x_bytes  # the reference keeps at least an fp32 copy of x


class GemmaLikeNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (normed * (1 + self.weight.float())).type_as(x)


def test_only_exact_llama_norms_qualify():
    assert is_llama_rms_norm(LlamaRMSNorm(8))
    assert not is_llama_rms_norm(GemmaLikeNorm(8))
    assert not is_llama_rms_norm(nn.LayerNorm(8))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_switched_model_trains_like_the_reference(arch):
    batch = tiny_batch(2, 9)

    def lora_grads(switch):
        model = get_peft_model(tiny_model(arch, dtype=torch.bfloat16),
                               LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter, so every path carries gradient
        if switch:
            layers = model.get_base_model().config.num_hidden_layers
            assert enable_fast_rms_norm(model) == 2 * layers + 1
            assert enable_fast_rms_norm(model) == 0  # idempotent
        model(input_ids=batch, labels=batch).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fast, ref = lora_grads(True), lora_grads(False)
    assert fast.keys() == ref.keys() and fast
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=5e-2, atol=5e-3, msg=name)


def test_trainable_norm_and_reference_paths_use_the_module_forward(monkeypatch):
    import loratune.ops.rms_norm as module

    calls = []
    monkeypatch.setattr(module, "rms_norm", lambda *a: calls.append(1) or rms_norm(*a))
    norm, x = norm_and_input(torch.float32)
    enable_fast_rms_norm(norm)
    norm(x)
    assert calls == [1]
    with reference_paths():
        norm(x)
    norm.weight.requires_grad_(True)  # e.g. modules_to_save: the weight needs its gradient
    norm(x).sum().backward()
    assert calls == [1] and norm.weight.grad is not None


@pytest.mark.gpu
def test_cuda_rows_run_the_eager_kernels():
    import loratune.ops.compiled as compiled
    import loratune.ops.rms_norm as module

    norm, x = norm_and_input(torch.bfloat16)
    x, weight = x.cuda(), norm.weight.cuda()
    assert not compiled.use_compiled((x, weight, 1e-5), HALF_DTYPES)
    y, _ = module._forward_kernel(x, weight, 1e-5)
    assert torch.equal(y, module._forward_math(x, weight, 1e-5)[0])


def test_an_error_after_the_kernel_has_run_is_raised_not_hidden(monkeypatch):
    import loratune.ops.compiled as compiled

    monkeypatch.setitem(compiled._STATE, "enabled", True)
    calls = []

    def flaky(fn, **kwargs):
        def kernel(*args):
            calls.append(1)
            if len(calls) > 1:
                raise ValueError("bad input")
            return fn(*args)
        return kernel

    monkeypatch.setattr(torch, "compile", flaky)
    double = compiled.compiled(lambda t: t * 2, (torch.float32,))
    assert torch.equal(double(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="bad input"):
        double(torch.ones(2))
    assert compiled.enabled()  # the caller's error does not switch compiling off


@pytest.mark.parametrize("value,expected,warns",
                         [("0", False, False), ("off", False, False), ("1", True, False),
                                                  ("", True, False), ("maybe", True, True)])
def test_the_environment_switch(monkeypatch, caplog, value, expected, warns):
    import loratune.ops.compiled as compiled

    monkeypatch.setenv("LORATUNE_COMPILE", value)
    with caplog.at_level("WARNING", logger="loratune.ops.compiled"):
        assert compiled._enabled_by_env() is expected
    assert any("LORATUNE_COMPILE='maybe'" in r.getMessage() for r in caplog.records) is warns
