"""Padding-free attention for packed batches: causal attention run per example, never across.

A packed batch is one row (1, N) holding several examples, with position_ids restarting at 0 for
each. Transformers' sdpa path makes attention block-diagonal with an (N x N) mask, so the kernel
still computes all N^2 scores and cannot use its causal fast path. `varlen_sdpa_attention` instead
cuts the row at the restarts and runs causal attention on each example: the work is sum(T_i^2 / 2)
instead of N^2. Anything that is not a packed training batch (padded batches, a single sequence,
decoding with a cache, dropout, a sliding window shorter than an example, soft-capping) goes to
Transformers' own sdpa function unchanged, so the reference for this fast path is
`sdpa_attention_forward` with its block-diagonal mask; tests/test_ops_attention.py compares the two
(outputs and LoRA gradients).

On CPU the whole row goes through `packed_causal_attention`, one autograd node that replaces the
sdpa flash kernel (whose backward runs far below the machine's matmul rate, docs/performance.md).
It is attention written as batched matrix products over blocks of 128 query rows of each example:
- block i reads keys [example start, end of block i) only, so most of the masked upper triangle is
  never computed (the products are 62% of the full T x T ones at T = 512, 75% at T = 256);
- the query heads that share a key/value head go through one product, as rows of one matrix (row
  t * rep + g is head g of the group at position t), so keys and values are never repeated per query
  head and their gradients come out already summed over the group;
- scores are fp32 (fp32 q and k, the causal mask added inside the same product; for bf16 inputs
  oneDNN runs that product at the bf16 rate, which is exact for them, see `_bf16_inputs_exact`),
  the softmax is fp32, and the probabilities are kept in the input dtype for the value product and
  for backward, which therefore recomputes nothing;
- the output is written token-major, as Transformers wants it, and the gradients of q, k and v are
  written per example into one buffer each (no per-example slices under autograd, whose backward
  would zero-fill a whole-row gradient once per example).
Its timings against the flash kernel are in docs/performance.md ("ops.attention"). Its reference
is `F.scaled_dot_product_attention(is_causal=True)` per example, which is also what runs on other
devices and for rows with an example longer than `BLOCKED_MAX_LENGTH` tokens (the kept
probabilities grow with T^2; flash memory is linear).

`enable_varlen_attention(model)` registers the function under the name "loratune_sdpa" and switches a
Transformers model that uses "sdpa" to it (its masks are still built by the sdpa mask function).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from loratune.ops import HALF_DTYPES, fast_paths_enabled, on_clear_caches

logger = logging.getLogger(__name__)
NAME = "loratune_sdpa"


def varlen_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[Tensor, None]:
    """Transformers attention function: (B, H, T, hd) q/k/v -> ((B, T, H, hd) output, None)."""
    bounds = packed_bounds(kwargs.get("position_ids"), query, key)
    if bounds is None or not fast_paths_enabled() or not _plain_causal(module, dropout, bounds, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    q, k, v = query[0], key[0], value[0]  # (H, N, hd), (KV, N, hd): views, no copies
    cpu = query.device.type == "cpu"
    if cpu and max(e - s for s, e in bounds) <= BLOCKED_MAX_LENGTH:
        return packed_causal_attention(q, k, v, bounds, scale).unsqueeze(0), None
    # Elsewhere, and for long examples on CPU, the sdpa kernel per example. On CPU its fp32 path is
    # faster than its bf16 one (docs/performance.md); q/k/v are small next to the weights.
    compute = torch.float32 if cpu else q.dtype
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    gqa = q.shape[0] != k.shape[0]
    outs = [F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scale,
                                           enable_gqa=gqa) for s, e in bounds]
    return torch.cat(outs, dim=1).to(query.dtype).transpose(0, 1).unsqueeze(0).contiguous(), None


# Keyword arguments of a Transformers attention call that change what attention computes.
_CHANGING_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "head_mask", "alibi", "attention_bias")


def _plain_causal(module: nn.Module, dropout: float, bounds: list[tuple[int, int]], kwargs: dict) -> bool:
    """True when per-example causal attention is exactly what the module asks for."""
    if dropout or kwargs.get("output_attentions") or kwargs.get("is_causal") is False:
        return False
    if not getattr(module, "is_causal", True):
        return False
    window = kwargs.get("sliding_window")
    if window is not None and max(e - s for s, e in bounds) > window:
        return False  # the window cuts into an example: the mask function's block-diagonal mask handles it
    return all(kwargs.get(key) is None for key in _CHANGING_KWARGS)


BLOCK = 128  # query rows per block, chosen by timing 64, 128 and 256 (docs/performance.md, "ops.attention")
# The blocked kernel keeps its probabilities for backward: H x T^2 / 2 values per example and layer,
# about the flash kernel's fp32 q/k/v/output copies at T = 512, 1.7x them at 1024 and growing with T.
# Rows with a longer example take the flash kernel, whose memory is linear in T.
BLOCKED_MAX_LENGTH = 1024


def packed_causal_attention(q: Tensor, k: Tensor, v: Tensor, bounds: list[tuple[int, int]], scale: float,
                            block: int = BLOCK) -> Tensor:
    """Causal attention within each example of a packed row -> (N, H, hd), token-major.

    q (H, N, hd), k and v (KV, N, hd) with H % KV == 0 (any strides); bounds: [(start, stop), ...]
    covering [0, N). The fast path described in the module doc; the same result as running
    `F.scaled_dot_product_attention(..., is_causal=True, scale=scale, enable_gqa=True)` per example.
    """
    if q.dim() != 3 or q.shape[0] % k.shape[0] or k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"packed_causal_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    bounds = tuple((int(s), int(e)) for s, e in bounds)
    edges = [0] + [e for _, e in bounds]
    if (not bounds or [s for s, _ in bounds] != edges[:-1] or edges[-1] != q.shape[1]
            or any(e <= s for s, e in bounds)):
        raise ValueError(f"packed_causal_attention: bounds {list(bounds)} must split [0, {q.shape[1]}) into "
                         "consecutive non-empty examples")
    return _PackedCausalAttentionFn.apply(q, k, v, bounds, float(scale), int(block))


def _blocks(bounds: tuple[tuple[int, int], ...], block: int) -> list[tuple[int, int, int, int]]:
    """(example start, example stop, block start, block stop) for every block of query rows."""
    return [(s0, e0, s, min(s + block, e0)) for s0, e0 in bounds for s in range(s0, e0, block)]


_STRIPS: dict[tuple, Tensor] = {}


def _causal_bias(rows: int, cols: int, block: int, dtype: torch.dtype, device: torch.device,
                 rep: int = 1) -> Tensor:
    """(rows * rep, cols) additive mask for the last `rows` of `cols` positions: -inf where a key is
    in the future. Each query position owns `rep` consecutive rows (the query heads of one KV head).

    A view into one cached (block * rep x width) strip whose -inf triangle sits at its right end, so
    every block shape is a slice of it: memory is block * rep x (longest example + block), whatever
    the lengths.
    """
    key = (dtype, device, block, rep)
    strip = _STRIPS.get(key)
    if strip is None or strip.shape[1] - block < cols:
        width = block + max(cols, 512, 2 * (0 if strip is None else strip.shape[1] - block))
        last_allowed = width - block + torch.arange(block, device=device)[:, None]
        future = torch.arange(width, device=device) > last_allowed
        strip = torch.zeros(block, width, dtype=dtype, device=device).masked_fill_(future, float("-inf"))
        strip = strip.repeat_interleave(rep, dim=0) if rep > 1 else strip
        _STRIPS[key] = strip
    start = strip.shape[1] - block - cols + rows  # position i then allows keys [0, cols - rows + i]
    return strip[:rows * rep, start:start + cols]


_MKLDNN_MATMUL = getattr(torch.backends.mkldnn, "matmul", None)  # older torch: absent, products stay fp32


@contextlib.contextmanager
def _bf16_inputs_exact(enabled: bool) -> Iterator[None]:
    """Let oneDNN run fp32 products with bf16 inputs inside the block (its "bf16" fp32 precision).

    For the score product only: its fp32 operands are copies of bf16 q and k, so rounding them to
    bf16 is exact, the products of bf16 pairs are exact in fp32 and the sums stay fp32. The result
    is the fp32 product's up to the order of the sums, at the bf16 rate (timings in
    docs/performance.md, "ops.attention"). fp16 inputs do not round to bf16 exactly and keep the
    fp32 product. Where torch has no such setting the block runs as it is. The setting is
    process-wide; it is put back when the block ends.
    """
    if not enabled or _MKLDNN_MATMUL is None or not hasattr(_MKLDNN_MATMUL, "fp32_precision"):
        yield
        return
    before = _MKLDNN_MATMUL.fp32_precision
    _MKLDNN_MATMUL.fp32_precision = "bf16"
    try:
        yield
    finally:
        _MKLDNN_MATMUL.fp32_precision = before


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in HALF_DTYPES else dtype


def _grouped(t: Tensor, kv_heads: int, dtype: torch.dtype | None = None) -> Tensor:
    """(H, N, hd), any strides -> contiguous (KV, N, rep, hd), rep = H // KV.

    Row t * rep + g of KV group j is query head j * rep + g at position t, so one product per KV head
    covers its whole group of query heads (no repeated keys or values), and a block of positions is
    one contiguous run of rows.
    """
    heads, n, dim = t.shape
    view = t.unflatten(0, (kv_heads, heads // kv_heads)).transpose(1, 2)
    if view.is_contiguous() and dtype in (None, t.dtype):
        return view  # e.g. one query head per KV head, already head-major
    return torch.empty(view.shape, dtype=dtype or t.dtype, device=t.device).copy_(view)


class _PackedCausalAttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bounds, scale, block):
        heads, n, dim = q.shape
        kvh = k.shape[0]
        rep = heads // kvh
        sdt = _score_dtype(q.dtype)
        qs, ks, vc = _grouped(q, kvh, sdt), k.to(sdt).contiguous(), v.contiguous()
        out = torch.empty(n, heads, dim, dtype=q.dtype, device=q.device)
        out_groups = out.view(n, kvh, rep, dim).transpose(0, 1)  # (KV, N, rep, hd) view
        probs = []
        with _bf16_inputs_exact(q.dtype == torch.bfloat16):
            for s0, _, s, e in _blocks(bounds, block):
                rows = (e - s) * rep
                scores = torch.baddbmm(_causal_bias(e - s, e - s0, block, sdt, q.device, rep),
                                       qs[:, s:e].view(kvh, rows, dim), ks[:, s0:e].transpose(1, 2),
                                       alpha=scale)  # (KV, rows, keys)
                p = torch.softmax(scores, dim=-1).to(q.dtype)
                del scores
                out_groups[:, s:e].copy_(torch.bmm(p, vc[:, s0:e]).view(kvh, e - s, rep, dim))
                probs.append(p)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.bounds, ctx.scale, ctx.block = bounds, scale, block
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *probs = ctx.saved_tensors
        heads, n, dim = q.shape
        kvh = k.shape[0]
        rep = heads // kvh
        qg, kc, vc = _grouped(q, kvh), k.contiguous(), v.contiguous()
        go = _grouped(grad_out.transpose(0, 1), kvh, q.dtype)  # (KV, N, rep, hd)
        acc = _score_dtype(q.dtype)
        grad_q = torch.empty(n, heads, dim, dtype=q.dtype, device=q.device)
        grad_q_groups = grad_q.view(n, kvh, rep, dim).transpose(0, 1)
        grad_k = torch.empty(kvh, n, dim, dtype=acc, device=q.device)
        grad_v = torch.empty(kvh, n, dim, dtype=acc, device=q.device)
        # Last block of each example first: it covers all the example's keys, so it initialises the
        # fp32 key/value gradients (no zero fill) and the earlier blocks add into prefixes of them.
        for (s0, e0, s, e), p in reversed(list(zip(_blocks(ctx.bounds, ctx.block), probs))):
            rows = (e - s) * rep
            g = go[:, s:e].view(kvh, rows, dim)
            grad_p = torch.bmm(g, vc[:, s0:e].transpose(1, 2))  # (KV, rows, keys)
            grad_s = torch._softmax_backward_data(grad_p, p, -1, p.dtype)
            del grad_p
            grad_q_groups[:, s:e].copy_(torch.bmm(grad_s, kc[:, s0:e]).view(kvh, e - s, rep, dim))
            part_v = torch.bmm(p.transpose(1, 2), g)  # sums over the group's query heads
            part_k = torch.bmm(grad_s.transpose(1, 2), qg[:, s:e].view(kvh, rows, dim))
            if e == e0:  # the example's last block, the first one seen here
                grad_v[:, s0:e].copy_(part_v)
                grad_k[:, s0:e].copy_(part_k)
            else:
                grad_v[:, s0:e] += part_v
                grad_k[:, s0:e] += part_k
        grad_q.mul_(ctx.scale)
        grad_k.mul_(ctx.scale)
        return grad_q.transpose(0, 1), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def packed_bounds(position_ids: Tensor | None, query: Tensor, key: Tensor) -> list[tuple[int, int]] | None:
    """[(start, stop), ...] of the examples in a packed (1, N) row, or None if it is not one."""
    if position_ids is None or query.shape[0] != 1 or position_ids.shape[0] != 1:
        return None
    n = query.shape[2]
    if n < 2 or key.shape[2] != n or position_ids.shape[-1] != n:
        return None
    starts = _example_starts(position_ids)
    if len(starts) < 2 or starts[0] != 0:
        return None
    return list(zip(starts, starts[1:] + [n]))


# [weak reference to the last position_ids, its version, its starts]: a weak reference, so the
# cache never keeps a batch's tensor alive after the batch.
_LAST_STARTS: list = [None, None, None]


def _example_starts(position_ids: Tensor) -> list[int]:
    """Where position ids restart at 0. Every layer of a forward passes the same position_ids
    tensor, so the scan (and on GPU its host sync) happens once per batch, not once per layer."""
    ref, version, starts = _LAST_STARTS
    if ref is not None and ref() is position_ids and version == position_ids._version:
        return starts
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    _LAST_STARTS[:] = [weakref.ref(position_ids), position_ids._version, starts]
    return starts


@on_clear_caches
def _clear_caches() -> None:
    _STRIPS.clear()
    _LAST_STARTS[:] = [None, None, None]


def enable_varlen_attention(model: nn.Module) -> bool:
    """Switch a Transformers model from "sdpa" to per-example attention for packed rows.

    Returns True if switched; False (model untouched) when it does not use sdpa.
    """
    AttentionInterface.register(NAME, varlen_sdpa_attention)
    if NAME not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(hf, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(hf, "set_attn_implementation"):
        return False
    try:
        hf.set_attn_implementation(NAME)
    except (ValueError, ImportError, AttributeError) as exc:
        logger.info("per-example attention not enabled: %s", exc)
        return False
    return True
