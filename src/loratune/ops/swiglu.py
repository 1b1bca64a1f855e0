"""Llama-style SwiGLU MLP that keeps two (T, I) activations per layer for backward instead of four.

Transformers' Llama MLP (copied verbatim by Qwen2/3, Mistral, Granite, OLMo, SmolLM3, ...) computes

    y = down_proj(h),   h = silu(g) * u,   g = gate_proj(x),   u = up_proj(x)

With LoRA on the projections, plain autograd keeps four (T, I) tensors per layer: g (silu's input),
silu(g) and u (the product's inputs), and h (down_proj keeps it for lora_A's gradient). Only g and u
are needed; silu(g) and h are cheap elementwise functions of them. The switched forward
- computes h through `swiglu`, an autograd node that saves only g and u;
- runs down_proj inside `torch.autograd.graph.saved_tensors_hooks` that keep h (or a view of it) as
  a record pointing at g and u, recomputed as silu(g) * u when backward unpacks it. Every other
  tensor down_proj saves is kept as it is, so this works whatever down_proj is (the fused LoRA op,
  LoraLinear's reference path, a quantized base).
SmolLM-135M shape (30 layers, D 576, I 1536), fp32, 4 x 256 tokens, LoRA r=16 on all seven
projections, trainer's chunked loss: saved activations 1187 -> 827 MiB (2 x 30 x 6 MiB fewer).
The price is one more silu(g) * u per layer in backward. One MLP forward + backward (1024 tokens,
min of 40, AMD EPYC Zen 5 with native bf16, shared with another job, 2026-12-07): fp32 1 thread
116-120 ms before and after; bf16 1 thread 29-31 ms before, +0-2 ms after (+1-2.5 ms with eager
kernels); 2 threads bf16 18.3 -> 19.4 ms, fp32 65.9 -> 65.9 ms. The elementwise part alone: 2.0 ->
2.6 ms (eager 3.4-3.8). On the whole SmolLM2 demo in bf16 it cost 12-17% of the training time, so
the trainer switches it on for a float32 base only (docs/performance.md, "SwiGLU MLP").

Semantics: with eager kernels (other devices, `LORATUNE_COMPILE=0`) the forward and both gradients
run plain autograd's ops on `act_fn(g) * u` (silu, product, aten's silu_backward, in g's dtype):
bitwise the module's own forward. On CPU, kernels inductor fuses from the same code (`ops.compiled`,
fp32 and half dtypes) run instead. bf16: h and both gradients within one ulp (silu(g) is not rounded
to bf16 before the product). fp32: h and grad_u within one ulp, grad_g within 4 ulps of grad_h * u
(silu's slope crosses zero near g = -1.28, so its relative error there is unbounded). The recompute
runs the forward's kernel, so down_proj's backward reads bitwise the h of the forward.

`enable_fused_mlp(model)` switches every module shaped like Transformers' Llama MLP: submodules
gate_proj, up_proj, down_proj, a SiLU act_fn, and a forward that is Llama's byte for byte (so a
variant that computes something else is never switched). A switched module still runs its own
forward inside `loratune.ops.reference_paths()`, without grad (inference), under torch.compile
tracing, when g and u need no grad (keeping h alone is cheaper then), and while saved-tensor hooks
are active: hooks form a stack and ours would hide the outer pair, which is how
torch.utils.checkpoint and `save_on_cpu` work. A model with gradient checkpointing on is not
switched at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaMLP

from loratune.ops import HALF_DTYPES, fast_paths_enabled, switch_forward
from loratune.ops.compiled import compiled

try:  # Transformers 5's ACT2FN["silu"]; older releases use nn.SiLU
    from transformers.activations import SiLUActivation
except ImportError:  # pragma: no cover - depends on the installed Transformers
    SiLUActivation = nn.SiLU

_LLAMA_FORWARD = LlamaMLP.forward.__code__
# Private, so looked up defensively: without them only the enable-time checkpointing check guards us.
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _: None)
_hooks_allowed = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", lambda: True)


def swiglu(g: Tensor, u: Tensor) -> Tensor:
    """Return silu(g) * u (same shape and dtype) through a node that saves only g and u."""
    return _SwigluFn.apply(g, u)


def is_llama_mlp(module: nn.Module) -> bool:
    """True for a gate/up/down MLP with a SiLU act_fn whose forward is Transformers' Llama MLP's."""
    code = getattr(getattr(type(module), "forward", None), "__code__", None)
    return (
        code is not None and code.co_code == _LLAMA_FORWARD.co_code
        and code.co_names == _LLAMA_FORWARD.co_names and code.co_consts == _LLAMA_FORWARD.co_consts
        and all(isinstance(getattr(module, name, None), nn.Module)
                for name in ("gate_proj", "up_proj", "down_proj"))
        and _is_silu(getattr(module, "act_fn", None))
    )


def enable_fused_mlp(model: nn.Module) -> int:
    """Route every Llama-style MLP in `model` through the forward above; return how many were switched.

    Returns 0 and switches nothing when any submodule has gradient checkpointing on.
    """
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        return 0
    return switch_forward(model, is_llama_mlp, _forward)


def _is_silu(act) -> bool:
    return act is F.silu or isinstance(act, (nn.SiLU, SiLUActivation))


def _hooks_free() -> bool:
    """True when no saved-tensor hooks are active and new ones may be pushed."""
    return _hooks_allowed() and _top_hooks(False) is None


def _forward(self: nn.Module, x: Tensor) -> Tensor:
    if (not fast_paths_enabled() or not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or not _is_silu(self.act_fn) or not _hooks_free()):
        return type(self).forward(self, x)
    g, u = self.gate_proj(x), self.up_proj(x)  # (B, T, I) each
    if g.shape != u.shape or g.dtype != u.dtype or not (g.requires_grad or u.requires_grad):
        return self.down_proj(self.act_fn(g) * u)
    h = swiglu(g, u)
    with torch.autograd.graph.saved_tensors_hooks(_pack_as_recompute(h, g, u), _unpack):
        return self.down_proj(h)


class _Recompute:
    """Stands in for h (or a view of it) among down_proj's saved tensors."""

    __slots__ = ("g", "u", "size", "stride", "offset")

    def __init__(self, g: Tensor, u: Tensor, view: Tensor) -> None:
        self.g, self.u = g, u
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()


def _pack_as_recompute(h: Tensor, g: Tensor, u: Tensor):
    """A pack hook that swaps h, and views of h not written to since, for a `_Recompute` record."""
    # Autograd keeps the pack hook until the saved tensor is freed: hold h's address, never h.
    # The address cannot be reused while packing runs, because the caller holds h until then.
    ptr, version, dtype = h.untyped_storage().data_ptr(), h._version, h.dtype

    def pack(t: Tensor):
        if t.dtype == dtype and t._version == version and t.untyped_storage().data_ptr() == ptr:
            return _Recompute(g, u, t)
        return t

    return pack


def _unpack(packed):
    if not isinstance(packed, _Recompute):
        return packed
    with torch.no_grad():
        h = _forward_kernel(packed.g, packed.u)  # the forward's kernel: bitwise h, in h's layout
    return h.as_strided(packed.size, packed.stride, packed.offset)  # the view down_proj saved


def _forward_math(g: Tensor, u: Tensor) -> Tensor:
    return F.silu(g) * u


def _backward_math(g: Tensor, u: Tensor, grad_h: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_g, grad_u): the ops plain autograd runs for silu(g) * u, in the same order."""
    grad_u = grad_h * F.silu(g)
    grad_g = torch.ops.aten.silu_backward(grad_h * u, g)
    return grad_g, grad_u


# CPU rows go through kernels inductor fuses from the same code (ops.compiled): the forward in one
# pass instead of two, the backward in one instead of four; this pays for the recompute.
_forward_kernel = compiled(_forward_math, (torch.float32, *HALF_DTYPES))
_backward_kernel = compiled(_backward_math, (torch.float32, *HALF_DTYPES))


class _SwigluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return _forward_kernel(g, u)

    @staticmethod
    def backward(ctx, grad_h):
        g, u = ctx.saved_tensors
        grad_g, grad_u = _backward_kernel(g, u, grad_h.contiguous())  # (B, T, I) each
        need_g, need_u = ctx.needs_input_grad
        return (grad_g if need_g else None), (grad_u if need_u else None)
