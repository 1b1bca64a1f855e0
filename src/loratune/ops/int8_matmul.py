"""A frozen int8 weight used in int8 matmuls, forward and input gradient (`base_compute: int8`).

The weight is quantized once, per output row (quant/int8.py: W[o, i] ~ q[o, i] * s_w[o]). Each
call quantizes the activations per row in the same way (x[t, i] ~ p[t, i] * s_x[t]), multiplies
the int8 codes with `torch._int_mm` (int32 accumulation: exact) and scales the result:

    y[t, o] = s_x[t] * s_w[o] * sum_i p[t, i] q[o, i]

Backward needs only the input gradient (the weight is frozen): g' = g * s_w is quantized per row
the same way and dx = s_g' * (p_g' @ q). Nothing of x is kept for backward, only the weight.

Rounding each activation to one of 255 levels of its row's absmax gives a relative error of about
0.4% per value, which mostly averages out in the sums; the cost on training is measured in
docs/performance.md. CPUs with int8 dot products (AVX2 `vpmaddubsw`, AVX-VNNI, AVX512-VNNI, AMX)
run these matmuls several times faster than fp32. `int8_linear_reference` computes the same
numbers with float matmuls of the dequantized codes, for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

INT8_MAX = 127


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(codes int8 (m, k), scale fp32 (m,)) with x[t] ~ codes[t] * scale[t]; an all-zero row gets scale 0."""
    x = x.float()
    scale = x.abs().amax(dim=1) / INT8_MAX
    codes = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None])
    return codes.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


class _Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
        shape = x.shape
        codes, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
        y = torch._int_mm(codes, qweight.t()).float()  # (m, out), exact int32 sums
        y = y.mul_(x_scale[:, None]).mul_(scale[None, :])
        if bias is not None:
            y = y.add_(bias.float())
        ctx.save_for_backward(qweight, scale)
        ctx.x_dtype = x.dtype
        return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        qweight, scale = ctx.saved_tensors
        shape = grad.shape
        g = grad.reshape(-1, shape[-1]).float() * scale[None, :]  # fold s_w into the gradient
        codes, g_scale = quantize_rows(g)
        dx = torch._int_mm(codes, qweight).float().mul_(g_scale[:, None])  # (m, in)
        return dx.to(ctx.x_dtype).reshape(*shape[:-1], qweight.shape[1]), None, None, None


def int8_linear(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., in) @ (qweight * scale[:, None]).T (+ bias), computed in int8 (module docstring)."""
    return _Int8Linear.apply(x, qweight, scale, bias)


def int8_linear_reference(x: Tensor, qweight: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """The same numbers from float matmuls of the dequantized codes (differentiable in x)."""

    class _Reference(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            shape = x.shape
            codes, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
            y = (codes.double() @ qweight.double().t()) * x_scale.double()[:, None] * scale.double()[None, :]
            y = y.float() + (bias.float() if bias is not None else 0)
            ctx.x_dtype = x.dtype
            return y.to(x.dtype).reshape(*shape[:-1], qweight.shape[0])

        @staticmethod
        def backward(ctx, grad):
            shape = grad.shape
            codes, g_scale = quantize_rows(grad.reshape(-1, shape[-1]).float() * scale[None, :])
            dx = (codes.double() @ qweight.double()) * g_scale.double()[:, None]
            return dx.float().to(ctx.x_dtype).reshape(*shape[:-1], qweight.shape[1])

    return _Reference.apply(x)
