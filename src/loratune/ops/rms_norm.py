"""RMSNorm with a frozen weight in one autograd node, for the Llama family's norm.

Transformers' Llama RMSNorm (copied verbatim by Mistral, Qwen2/3, Phi-3, Granite, ...) computes

    y = weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)

with plain autograd, which keeps an fp32 copy of x for backward: (T, D) fp32 per norm, two norms per
layer (~140 MB for the benchmark model's 1024-token step, twice that at 2048). `rms_norm` computes
the same forward and keeps only x, which the residual stream holds anyway, and the (T, 1) fp32
inverse root. Its backward is the closed form

    g = (grad_y * weight) in x's dtype, as autograd rounds it, then in fp32:
    grad_x = r * (g - x_hat * mean(g * x_hat)),   x_hat = x_fp32 * r

It is also faster than plain autograd (timings in docs/performance.md, "ops.rms_norm").
On CPU, bf16/fp16 rows run the same code as kernels compiled by inductor (`ops.compiled`), which
sum a row in another order: within one ulp of Llama's forward rather than bit for bit. fp32 rows,
other devices and the eager fallback run the ops as written, bit for bit.
The reference is the module's own forward; tests/test_ops_rms_norm.py compares the two.

`enable_fast_rms_norm(model)` switches every norm module whose forward is exactly Llama's (same
bytecode, so renamed copies qualify and variants such as Gemma's `1 + weight` or OLMo-2's fp32
weight product do not). A switched norm still runs its own forward when its weight is trainable
(modules_to_save) or inside `loratune.ops.reference_paths()`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loratune.ops import HALF_DTYPES, fast_paths_enabled, switch_forward
from loratune.ops.compiled import compiled

_LLAMA_FORWARD = LlamaRMSNorm.forward.__code__


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm of x (..., D) with a frozen weight (D,); the module doc gives the formula."""
    return _RmsNormFn.apply(x, weight, float(eps))


def is_llama_rms_norm(module: nn.Module) -> bool:
    """True when the module's forward is Transformers' Llama RMSNorm forward, byte for byte."""
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    return (
        code is not None and code.co_code == _LLAMA_FORWARD.co_code
        and code.co_names == _LLAMA_FORWARD.co_names and code.co_consts == _LLAMA_FORWARD.co_consts
        and isinstance(getattr(module, "weight", None), Tensor) and hasattr(module, "variance_epsilon")
    )


def enable_fast_rms_norm(model: nn.Module) -> int:
    """Route every Llama-style RMSNorm in `model` through `rms_norm`; return how many were switched."""
    return switch_forward(model, is_llama_rms_norm, _forward)


def _forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    if self.weight.requires_grad or not fast_paths_enabled():
        return type(self).forward(self, hidden_states)
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _forward_math(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y, inv): Llama's forward, op for op, and the (..., 1) fp32 inverse root backward needs."""
    xf = x.float()
    inv = torch.rsqrt(xf.square().mean(-1, keepdim=True).add(eps))
    return weight * (xf * inv).to(x.dtype), inv


def _backward_math(x: Tensor, weight: Tensor, inv: Tensor, grad_y: Tensor) -> Tensor:
    """grad_x from the closed form in the module doc."""
    g = (grad_y * weight).to(x.dtype).float()  # rounded to x's dtype first, as plain autograd does
    x_hat = x * inv  # promoted to fp32
    dot = (g * x_hat).mean(-1, keepdim=True)
    return ((g - x_hat * dot) * inv).to(x.dtype)


# Half-precision CPU rows go through kernels inductor fuses from the same code (ops.compiled): the
# forward in two passes over memory instead of six, the backward in one (docs/performance.md).
_forward_kernel = compiled(_forward_math, HALF_DTYPES)
_backward_kernel = compiled(_backward_math, HALF_DTYPES)


class _RmsNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, inv = _forward_kernel(x, weight, eps)
        ctx.save_for_backward(x, weight, inv)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, inv = ctx.saved_tensors
        grad_x = _backward_kernel(x, weight, inv, grad_y)
        return grad_x, None, None
