"""GPTQ rounding of the int8-computing base's weights: each column's rounding error is spread over
the columns not yet rounded, weighted by how the layer's inputs correlate.

Round to nearest makes each weight as close as it can be on its own. What the layer's output
suffers is E @ x, E the rounding error, and the inputs x have correlated channels, so errors that
cancel against each other over those inputs are worth more than small ones. GPTQ (Frantar et al.
2023) rounds the columns one at a time and moves each column's error onto the remaining ones
through the inverse of H = sum x x^T over calibration rows, which keeps sum |E x|^2 near its
least. The row scales stay those of round to nearest (absmax / levels), so the codes are a
drop-in for `quantize_rows`' and the int8 products are unchanged; codes are clamped to the levels
the CPU's int8 products keep exact (`int8_weight_levels`).

Measured on SmolLM2-135M (Zen 5 capped at AVX2, 7-bit weights, smoothed, outlier channels in
float; docs/performance.md, "int8 base compute"), with the trainer's 1024 calibration tokens: the
KL of the int8 model's next-token distribution to float32's on the demo eval rows 0.0158 -> 0.0108
nats a token, the bench's LoRA-gradient error 15.9% -> 15.1%, and the int8 base's load 3.1 s ->
13.1 s (of which the rounding about 5.5 s, each calibration pass about 2 s). More rows would pay:
with H from 3116 tokens a prototype reached a KL of 0.0049 and a gradient error of 11.2%.

`gptq_codes(model, rows, smooth, levels)` runs the float model on the calibration rows (the ones
smoothing used), gathers H per group of layers reading one input, in as many passes as keep the
matrices under HESSIAN_BYTES, and returns {name: (codes, scale)} for `quantize_model`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from loratune.ops.int8_matmul import quantize_rows
from loratune.quant.smoothing import weight_factors

logger = logging.getLogger(__name__)

HESSIAN_BYTES = 256 << 20  # the input correlations one calibration pass holds (fp32 in x in each)
DAMPING = 0.01  # added to H's diagonal, as a share of its mean: calibration rows are few
BLOCK = 128  # columns rounded between two updates of the rest of the weight


@torch.no_grad()
def gptq_codes(model: nn.Module, rows: list[list[int]], smooth: dict[str, Tensor],
               levels: int) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (codes int8 (out, in), scale fp32 (out,))} for every nn.Linear named in `smooth`, with
    the weight smoothed as `Linear8bit.from_linear` stores it (W * s, outlier columns 0).

    Layers that share one smoothing tensor read one input (quant/smoothing.py) and share its H.
    """
    linears = {n: m for n, m in model.named_modules() if n in smooth and type(m) is nn.Linear}
    groups: dict[int, list[str]] = {}
    for name in linears:
        groups.setdefault(id(smooth[name]), []).append(name)
    codes: dict[str, tuple[Tensor, Tensor]] = {}
    for chunk in _passes(list(groups.values()), linears):
        hessians = _input_hessians(model, rows, {group[0]: linears[group[0]] for group in chunk})
        for group in chunk:
            h = hessians.pop(group[0])
            factor = weight_factors(smooth[group[0]])
            h.mul_(factor[:, None]).mul_(factor[None, :])  # H of x / s; an outlier channel's row is 0
            # One pass over the columns for the whole group: rows are rounded independently.
            weights = [linears[name].weight.detach().float() * factor for name in group]
            group_codes, group_scale = gptq_round(torch.cat(weights), h, levels)
            sizes = [w.shape[0] for w in weights]
            for name, c, s in zip(group, group_codes.split(sizes), group_scale.split(sizes)):
                codes[name] = (c, s)
    logger.info("int8 weights rounded by GPTQ: %d layers, %d calibration rows", len(codes), len(rows))
    return codes


def gptq_round(weight: Tensor, hessian: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """(codes int8, scale fp32) of an fp32 (out, in) weight, scale = row absmax / levels as in
    `quantize_rows`, the codes rounded column by column against the input correlations `hessian`
    (in, in). Falls back to round to nearest when H is not finite or cannot be factored."""
    nearest, scale = quantize_rows(weight, levels)
    n_in = weight.shape[1]
    h = hessian.to(weight.device, torch.float32, copy=True)
    dead = h.diagonal() == 0  # channels the calibration rows never reached: rounded to nearest
    h[dead, dead] = 1.0
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    try:
        if not torch.isfinite(h).all():
            raise RuntimeError("non-finite input correlations")
        factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError as exc:  # not positive definite even when damped, or NaN/inf activations
        logger.debug("GPTQ rounding fell back to round to nearest: %s", exc)
        return nearest, scale
    step = scale.clamp_min(torch.finfo(torch.float32).tiny)
    rest = weight.float().t().contiguous()  # (in, out): a column of the weight is a contiguous row
    codes = torch.empty_like(rest, dtype=torch.int8)
    for c0 in range(0, n_in, BLOCK):
        c1 = min(c0 + BLOCK, n_in)
        block, inv = rest[c0:c1], factor[c0:c1, c0:c1]
        errors = torch.empty_like(block)
        for j in range(c1 - c0):
            q = block[j].div(step).round_().clamp_(-levels, levels)
            codes[c0 + j] = q
            torch.sub(block[j], q.mul_(step), out=errors[j]).div_(inv[j, j])
            block[j + 1:].addr_(inv[j, j + 1:], errors[j], alpha=-1)
        rest[c1:].addmm_(factor[c0:c1, c1:].t(), errors, alpha=-1)
    return codes.t().contiguous(), scale


def _passes(groups: list[list[str]], linears: dict[str, nn.Linear]) -> list[list[list[str]]]:
    """Groups in order, split so each pass's matrices stay under HESSIAN_BYTES (at least one group)."""
    passes: list[list[list[str]]] = [[]]
    held = 0
    for group in groups:
        size = linears[group[0]].in_features ** 2 * 4
        if passes[-1] and held + size > HESSIAN_BYTES:
            passes.append([])
            held = 0
        passes[-1].append(group)
        held += size
    return [p for p in passes if p]


def _input_hessians(model: nn.Module, rows: list[list[int]],
                    layers: dict[str, nn.Linear]) -> dict[str, Tensor]:
    """{name: sum over the rows' tokens of x x^T (in, in) fp32} of each layer's input x. Each row's
    forward stops once every one of `layers` has seen it: the later layers' work would be wasted."""
    sums = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
            for name, m in layers.items()}
    seen: set[str] = set()

    def hook(name: str):
        def add(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name].addmm_(x.t(), x)
            seen.add(name)
            if len(seen) == len(layers):
                raise _PassDone
        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    device = next(model.parameters()).device
    try:
        for ids in rows:
            seen.clear()
            try:
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            except _PassDone:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return sums


class _PassDone(Exception):
    """Raised by the last layer of a calibration pass to end the row's forward there."""
