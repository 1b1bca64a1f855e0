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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from loratune.ops.gemm import matmul

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
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int | None = None
) -> Tensor:
    """Return the same fp32 scalar as `cross_entropy_sum_reference` without materialising (N, V).

    Every target must be a valid class index (drop ignored rows before calling).
    Gradients flow to hidden, weight and bias, each only if it requires grad.
    """
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_BYTES // (weight.element_size() * weight.shape[0]))
    return _ChunkedCrossEntropySum.apply(hidden, weight, bias, targets, chunk_rows)


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Loss and its input gradients in one pass over the chunks; backward only rescales them.

    Computing the gradient in forward costs nothing extra when a backward follows (the usual case in
    training) and lets each chunk's logits be freed at once. In no-grad use it is skipped.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_rows = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start in range(0, n_rows, chunk_rows):
            stop = min(start + chunk_rows, n_rows)
            h = hidden[start:stop].to(weight.dtype)  # (C, D)
            t = targets[start:stop]  # (C,)
            d = matmul(h, weight.t(), bias)  # (C, V) logits in the head dtype, then their gradient
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
        return grad_h, grad_w, grad_b, None, None


def _loss_and_grad_(logits: Tensor, targets: Tensor, with_grad: bool) -> Tensor:
    """Sum of -log softmax(logits)[target] (fp32); with_grad overwrites logits with softmax - onehot.

    A few rows at a time: one fp32 softmax per block gives both the loss, through p[target], and the
    gradient, which is rounded to the logits' dtype as the reference rounds it.
    """
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    step = max(1, SOFTMAX_BYTES // (4 * logits.shape[1]))
    for r in range(0, logits.shape[0], step):
        part, t = logits[r:r + step], targets[r:r + step]
        probs = torch.softmax(part, dim=-1, dtype=torch.float32)
        rows = torch.arange(part.shape[0], device=probs.device)
        total += _nll_from_probs(probs[rows, t], part, t)
        if with_grad:
            probs[rows, t] -= 1.0  # d loss / d logits = softmax - onehot
            part.copy_(probs)
    return total


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
