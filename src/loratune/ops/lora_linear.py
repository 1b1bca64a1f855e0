"""Fused LoRA linear: y = x W^T + b + scaling * (x A^T) B^T for a frozen base, in one autograd node.

`lora_linear` is the fast path; `lora_linear_reference` is the plain composition it is tested against
(base linear plus an fp32 low-rank branch, the way an unfused LoraLinear computes it).

What the fused node does differently:
- saves only x (already alive as the caller's input; no copy), h = x A^T (N x R, small), the
  factors as cast for the products (small; backward does not cast them again) and references to
  the weights; the reference also keeps an fp32 copy of x for A's gradient;
- runs the two frozen-weight products (x W^T forward, g W backward) through `ops.gemm.matmul`,
  which splits a product into row halves where oneDNN would run it on one thread (bitwise the
  same result);
- never forms B @ A and never copies or casts the frozen weight; only the rank-R factors are cast
  (R x in and out x R, tiny) to the input's dtype, so a bf16 base runs all products in bf16
  (fp32 accumulation inside the kernels) and the fp32 gradients of A and B are cast back from them,
  as autocast does; an fp32 base runs everything in fp32;
- adds the low-rank product into the base output in place (addmm) instead of allocating a second
  (N x out) tensor and a sum;
- returns gradients for x, lora_A and lora_B only.

Conditions (`lora_linear` checks them and falls back to the reference otherwise, so calling it is
always correct): the base weight and bias do not require grad, x has the base weight's dtype (or
is a float tensor, for an int8 base), and we are not inside `loratune.ops.reference_paths()`.
Inference (no grad) with factors in another dtype than x (an fp32 adapter on a bf16 base) also takes
the reference, which is PEFT's arithmetic: eval and generation then give PEFT's logits bit for bit
(tests/test_parity.py), while training keeps its bf16 products.
An int8 base (`base_compute: int8`) passes its codes as `weight` with `weight_scale` (out,),
optional `weight_smooth` (in,) and `weight_outliers` (its float outlier channels): both frozen
products then run in `ops.int8_matmul`.
Callers (LoraLinear.forward) use it for a single active, unmerged, non-DoRA adapter:

    y = lora_linear(x, base.weight, base.bias, lora_A.weight, lora_B.weight, scaling,
                    fan_in_fan_out=isinstance(base, Conv1D),
                    x_lora=dropout(x) if dropout is active else None)

Shapes: x (..., in); weight (out, in), or (in, out) when fan_in_fan_out (Transformers' Conv1D);
bias (out,) or None; lora_A (R, in), lora_B (out, R), usually fp32; y (..., out) in x's dtype.
`x_lora`, when given, is what the low-rank branch reads instead of x (e.g. x after dropout); its
gradient is returned to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from loratune.ops import fast_paths_enabled
from loratune.ops.gemm import matmul
from loratune.ops.int8_matmul import Outliers, int8_forward, int8_input_grad, int8_linear


def lora_linear_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    fan_in_fan_out: bool = False, x_lora: Tensor | None = None, weight_scale: Tensor | None = None,
    weight_smooth: Tensor | None = None, weight_outliers: Outliers | None = None,
) -> Tensor:
    """Return base(x) + scaling * B(A(x_lora)) computed the plain way, PEFT's: the low-rank branch in
    A's dtype, added to the base output in that dtype and rounded to the output's dtype once."""
    if weight_scale is not None:  # an int8 base computed in int8, through its own autograd node
        y = int8_linear(x, weight, weight_scale, bias, weight_smooth, weight_outliers)
    else:
        y = F.linear(x, weight.t() if fan_in_fan_out else weight, bias)  # (..., out)
    h = (x if x_lora is None else x_lora).to(lora_A.dtype)
    # y + B(A(h)) * scaling, summed in place in the branch's own tensor: the same bits, one buffer fewer
    return F.linear(F.linear(h, lora_A), lora_B).mul_(scaling).add_(y).to(y.dtype)


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, scaling: float,
    fan_in_fan_out: bool = False, x_lora: Tensor | None = None, weight_scale: Tensor | None = None,
    weight_smooth: Tensor | None = None, weight_outliers: Outliers | None = None,
) -> Tensor:
    """Return the same y as `lora_linear_reference` through one fused autograd node (see module doc)."""
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    same_dtype = x.dtype == weight.dtype if weight_scale is None else x.is_floating_point()
    # Inference on a half-precision base takes PEFT's arithmetic (fp32 branch, one rounding), so that
    # eval and generation give what PEFT gives; training keeps the all-bf16 products.
    peft_inference = not torch.is_grad_enabled() and weight_scale is None and x.dtype != lora_A.dtype
    if (not frozen or not fast_paths_enabled() or not same_dtype or peft_inference
            or (x_lora is not None and x_lora.dtype != x.dtype)):
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, x_lora,
                                     weight_scale, weight_smooth, weight_outliers)
    return _LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, float(scaling), fan_in_fan_out, x_lora,
                               weight_scale, weight_smooth, weight_outliers)


class _LoraLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, fan_in_fan_out, x_lora, weight_scale,
                weight_smooth, weight_outliers):
        w = weight.t() if fan_in_fan_out else weight  # (out, in), a view
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xl = x2 if x_lora is None else x_lora.reshape(x2.shape)
        a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)  # rank-R factors only; the base is never cast
        h = xl @ a.t()  # (N, R)
        if weight_scale is not None:  # int8 codes, rows of x rounded to int8 (ops.int8_matmul)
            y = int8_forward(x, weight, weight_scale, bias, weight_smooth, weight_outliers).to(x.dtype)
        else:
            y = matmul(x2, w.t(), bias)  # (N, out), in row halves where that is faster (ops.gemm)
        y.addmm_(h, b.t(), alpha=scaling)
        # The cast factors too (small): backward reuses them instead of casting again.
        ctx.save_for_backward(xl, weight, lora_A, lora_B, h, a, b, weight_scale, weight_smooth,
                              *(weight_outliers or (None, None)))
        ctx.scaling, ctx.fan_in_fan_out, ctx.separate = scaling, fan_in_fan_out, x_lora is not None
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        xl, weight, lora_A, lora_B, h, a, b, weight_scale, weight_smooth, index, columns = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        need_xl = ctx.needs_input_grad[7]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(xl.dtype)  # (N, out)
        g_h = g @ b  # (N, R): gradient of h, before scaling
        grad_x = grad_xl = grad_a = grad_b = None
        if need_x:
            if weight_scale is not None:
                outliers = None if index is None else (index, columns)
                grad_x = int8_input_grad(g, weight, weight_scale, weight_smooth, outliers).to(g.dtype)
            else:
                grad_x = matmul(g, weight.t() if ctx.fan_in_fan_out else weight)  # (N, in)
            if ctx.separate:
                grad_xl = (g_h @ a).mul_(s) if need_xl else None
            else:
                grad_x.addmm_(g_h, a, alpha=s)
            grad_x = grad_x.reshape(*grad_y.shape[:-1], grad_x.shape[-1])
        elif ctx.separate and need_xl:
            grad_xl = (g_h @ a).mul_(s)
        if grad_xl is not None:
            grad_xl = grad_xl.reshape(*grad_y.shape[:-1], grad_xl.shape[-1])
        if need_a:
            grad_a = (g_h.t() @ xl).to(lora_A.dtype).mul_(s)  # (R, in)
        if need_b:
            # (h^T g)^T, not g^T h: the same (out, R) product, 30-45% faster in this orientation on CPU
            grad_b = (h.t() @ g).t().to(lora_B.dtype, memory_format=torch.contiguous_format).mul_(s)
        return grad_x, None, None, grad_a, grad_b, None, None, grad_xl, None, None, None
