"""Cross-entropy summed over rows, computed chunk by chunk over the vocabulary projection.

`chunked_cross_entropy_sum` is the fast path: it never holds the full (N, V) logits. Each chunk's
logits are formed, reduced to a loss, turned into the gradient for the hidden rows right away, and
freed, so the autograd graph keeps only an (N, D) gradient instead of (N, V) logits.
`cross_entropy_sum_reference` is the plain version it is tested against.

Dtype contract (same as the reference): logits are produced by the head in the head's dtype (a bf16
head gives bf16 logits), the softmax is computed in fp32 from them, and the loss is accumulated in
fp32. One fused softmax pass yields the gradient (softmax - onehot) and the loss (-log p[target],
recomputed from the logits where p underflows).

Memory traffic: a chunk's logits are large (512 x 49152 bf16 is 48 MiB), so the fp32 softmax runs
over a few rows at a time (a cache-sized fp32 block) and writes the gradient, rounded to the head
dtype as the reference rounds it, back over the logits it came from. The chunk's only large buffer
is then its logits, and chunks can be big enough for the head products to run near the matmul peak.
The head products go through `ops.gemm.matmul`, which runs them in column pieces or row halves where
that is faster and bitwise the same.

With `base_compute: int8` the trainer also passes the head weight as int8 codes (`int8_weight`), and
the hidden rows' gradient, (softmax - onehot) @ W, is computed in two parts: the other classes'
share, softmax @ W without the target's entry, in int8, and the target's, (p[target] - 1) W[target],
in float. Each softmax block is rounded per row to int8 while it is still in cache (stochastically,
so the gradient is right on average; ops.int8_matmul), and the product of the codes
(`int8_softmax_product`) replaces one of the head's two float products. The logits and the loss stay
in float, so the loss value is unchanged. Measured in docs/performance.md ("int8 base compute").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from loratune.ops.gemm import matmul
from loratune.ops.int8_matmul import int8_weight_levels, quantize_gradient_rows

# Rows per chunk are chosen so one chunk's logits (head dtype) stay near this many bytes: 512 rows of
# a 49152-token bf16 vocabulary, enough rows for the head products to run near the matmul peak
# (docs/performance.md, "ops.cross_entropy").
CHUNK_BYTES = 48 * 2**20
# Rows per fp32 softmax pass: 16 x 49152 fp32 is 3 MiB, small enough to stay in cache.
SOFTMAX_BYTES = 3 * 2**20


def cross_entropy_sum_reference(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                                targets: Tensor) -> Tensor:
    """Return sum_i CE(hidden[i] @ weight.T + bias, targets[i]) in fp32; hidden (N, D), weight (V, D)."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias)  # (N, V)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy_sum(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int | None = None,
    int8_weight: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Return the same fp32 scalar as `cross_entropy_sum_reference` without materialising (N, V).

    Every target must be a valid class index (drop ignored rows before calling).
    Gradients flow to hidden, weight and bias, each only if it requires grad.
    int8_weight: (codes int8 (V, D), scale (V,)) of `weight` (ops.int8_matmul.quantize_rows): the
    hidden rows' gradient is then computed in int8 (module docstring). Used only where neither the
    weight nor the bias needs a gradient.
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (weight.element_size() * weight.shape[0]))
    return _ChunkedCrossEntropySum.apply(hidden, weight, bias, targets, chunk_rows, int8_weight)


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Loss and its input gradients in one pass over the chunks; backward only rescales them.

    Computing the gradient in forward costs nothing extra when a backward follows (the usual case in
    training) and lets each chunk's logits be freed at once. In no-grad use it is skipped.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows, int8_weight):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if need_w or need_b or not need_h:
            int8_weight = None
        n_rows = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        # One logits buffer for every chunk: a new one per chunk is allocated while the last is still
        # held, and each such block lands wherever the heap has room at the end of the forward,
        # raising the peak (docs/performance.md, "The allocator").
        logits = torch.empty(min(chunk_rows, n_rows), weight.shape[0], dtype=weight.dtype,
                             device=hidden.device)
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            h = hidden[start:stop].to(weight.dtype)  # (C, D)
            t = targets[start:stop]  # (C,)
            # (C, V) logits in the head dtype, then their gradient
            d = matmul(h, weight.t(), bias, out=logits[:stop - start])
            if int8_weight is not None:
                loss, p_codes, p_scale, p_target = _loss_and_int8_softmax(d, t, int8_weight[1])
                total += loss
                # (softmax - onehot) @ W: the other classes' share in int8, the target's in float
                grad_h[start:stop] = (int8_softmax_product(p_codes, p_scale, int8_weight[0])
                                      .addcmul_(p_target.sub_(1)[:, None], weight[t].float())
                                      .to(hidden.dtype))
                continue
            total += _loss_and_grad_(d, t, with_grad=need_h or need_w or need_b)
            if not (need_h or need_w or need_b):
                continue
            if need_h and grad_h.dtype == weight.dtype:
                matmul(d, weight, out=grad_h[start:stop])
            elif need_h:
                grad_h[start:stop] = (d @ weight).to(hidden.dtype)
            if need_w:
                grad_w += (d.t() @ h).float()
            if need_b:
                grad_b += d.float().sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.has = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.has
        grad_h = next(saved) * grad_out.to(ctx.saved_tensors[0].dtype) if need_h else None
        grad_w = (next(saved) * grad_out).to(ctx.dtypes[0]) if need_w else None
        grad_b = (next(saved) * grad_out).to(ctx.dtypes[1]) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


def _softmax_blocks(logits: Tensor, targets: Tensor):
    """Yield (block, rows, fp32 softmax, arange over the rows) a few rows of (C, V) logits at a time,
    SOFTMAX_BYTES of fp32 each, so the softmax stays in cache; `block` slices logits and targets."""
    step = max(1, SOFTMAX_BYTES // (4 * logits.shape[1]))
    for r in range(0, logits.shape[0], step):
        part = logits[r:r + step]
        yield slice(r, r + step), part, torch.softmax(part, dim=-1, dtype=torch.float32), \
            torch.arange(part.shape[0], device=logits.device)


def _loss_and_grad_(logits: Tensor, targets: Tensor, with_grad: bool) -> Tensor:
    """Sum of -log softmax(logits)[target] (fp32); with_grad overwrites logits with softmax - onehot.

    A few rows at a time: one fp32 softmax per block gives both the loss, through p[target], and the
    gradient, which is rounded to the logits' dtype as the reference rounds it.
    """
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for block, part, probs, rows in _softmax_blocks(logits, targets):
        t = targets[block]
        total += _nll_from_probs(probs[rows, t], part, t)
        if with_grad:
            probs[rows, t] -= 1.0  # d loss / d logits = softmax - onehot
            part.copy_(probs)
    return total


def _loss_and_int8_softmax(logits: Tensor, targets: Tensor,
                           scale: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(sum of -log softmax(logits)[target] (fp32), codes int8, row scales, p[target] fp32), a few
    rows at a time as in `_loss_and_grad_`: softmax * scale[None, :] with the target's entry set to 0,
    rounded per row to int8, stochastically. Leaving the target out (its share is computed in float)
    sets each row's scale by the other classes alone: a confident row's target probability would
    otherwise take the top level and round all the others to a few."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    levels = int8_weight_levels()  # the second operand's limit (int8_softmax_product)
    codes = torch.empty(logits.shape, dtype=torch.int8, device=logits.device)
    row_scale = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    p_target = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for block, part, probs, rows in _softmax_blocks(logits, targets):
        t = targets[block]
        p_target[block] = probs[rows, t]
        total += _nll_from_probs(p_target[block], part, t)
        probs[rows, t] = 0.0
        codes[block], row_scale[block] = quantize_gradient_rows(probs.mul_(scale[None, :]), levels)
    return total, codes, row_scale, p_target


def int8_softmax_product(codes: Tensor, row_scale: Tensor, weight_codes: Tensor) -> Tensor:
    """fp32 (C, D) ~ (codes * row_scale[:, None]) @ (weight_codes * weight_scale[:, None]), the weight
    scale already folded into the codes. Computed as (weight_codes.T @ codes.T).T: where int8 products
    go through AVX2's vpmaddubsw, only the second operand must stay within 7 bits (ops.int8_matmul),
    so the weight keeps 8 and the rounded softmax, right on average anyway, takes 7; the product in
    this orientation is also the faster one there (460 against 330 GOP/s on SmolLM2's head, Zen 5
    capped at AVX2, 2 threads)."""
    return torch._int_mm(weight_codes.t(), codes.t()).t().mul(row_scale[:, None])


# Below this, -log(p) loses precision to underflow (p is fp32); those rows (a loss above ~69 nats)
# are recomputed exactly from their logits.
_SMALLEST_P = 1e-30


def _nll_from_probs(p_target: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
    """Sum of -log p[target] over rows, exact even where p[target] underflows."""
    nll = -p_target.log()  # (C,)
    tiny = p_target < _SMALLEST_P
    if tiny.any():
        rows = logits[tiny].float()
        nll[tiny] = torch.logsumexp(rows, dim=-1) - rows.gather(1, targets[tiny][:, None]).squeeze(1)
    return nll.sum()
