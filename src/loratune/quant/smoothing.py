"""Activation smoothing for `base_compute: int8`: per-channel factors moved from inputs into weights.

Rounding an activation row to int8 spends its levels on the row's largest value. The inputs of a
language model's projections have a few outlier channels (SmolLM2-135M on the orders rows: the
row absmax is 6-15 times the row RMS at the q/k/v and gate/up inputs, up to 29 at down_proj), so
every other channel of the row gets only a few levels. Smoothing (SmoothQuant, Xiao et al. 2023)
divides input channel j by s_j and multiplies column j of the frozen weight by s_j: the product is
unchanged, and with

    s_j = max|x_j| ** ALPHA / max|W_j| ** (1 - ALPHA)

the outliers are shared between the activations and the weight, which is rounded once, at load.
Measured on SmolLM2 (orders rows, calibration on other rows, activations 8-bit, weights 7-bit):
the relative error of a projection's output falls from 6.6% to 2.1% at v_proj, 2.9% to 1.4% at
q_proj, 3.0% to 2.1% at up_proj and 3.4% to 2.9% at down_proj; o_proj is unchanged (2.2%).

`activation_smoothing(model, rows)` runs the float model on a few token rows (the trainer passes its
first training rows, up to CALIBRATION_TOKENS) and returns {module name: s}. Layers that read the
same input (q/k/v, gate/up) get one shared tensor, made with the largest weight column of the group,
so their common input is divided and rounded once (ops.int8_matmul's shared-input cache).

Smoothing alone leaves much of the error at down_proj, whose input (act(gate) * up) has a few
channels far above the rest; rounding down_proj alone to int8 raised SmolLM2's eval loss on the
demo chat rows (examples/data) by 1.3%, every other projection by 0.6% at most. So in each group
the channels whose max|x_j| * max|W_j| is more than OUTLIER_RATIO times the median (at most
OUTLIER_CHANNELS of them; on SmolLM2 the largest is 5-490 times the median) get s_j = inf: they
leave the int8 product and are computed in float (quant/int8.py, ops.int8_matmul). A group without
such channels pays nothing. The thresholds were 16 and 8 at first; at 4 and 32 SmolLM2 gets 2802
float channels over its 210 layers instead of 246, and the relative error of its LoRA gradient
falls from 19.3% to 15.9% (Zen 5 capped at AVX2: 7-bit weights, float32). Measured in
docs/performance.md ("int8 base compute").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ALPHA = 0.5
OUTLIER_CHANNELS = 32  # at most this many input channels per layer group computed in float, not int8
OUTLIER_RATIO = 4  # ... those whose max|x| * max|W| is above this many times the group's median
CALIBRATION_TOKENS = 1024
_FLOOR = 1e-5  # a channel that never fires (or a zero weight column) must not give s = 0 or inf


@torch.no_grad()
def activation_smoothing(model: nn.Module, rows: list[list[int]], names: set[str] | None = None,
                         alpha: float = ALPHA) -> dict[str, Tensor]:
    """{name: s (in,) fp32} for every plain nn.Linear of `model` but its LM head (never quantized;
    only those in `names`, if given) that the rows reach; each row (token ids) runs alone, unpadded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {n: m for n, m in model.named_modules()
               if type(m) is nn.Linear and m is not head and (names is None or n in names)}
    amax: dict[str, Tensor] = {}
    calls: list[tuple[str, int]] = []  # (name, input number), in call order
    previous: Tensor | None = None  # the last call's input, held so that "the same tensor" is identity

    def hook(name: str):
        def record(module, args, output):
            nonlocal previous
            x = args[0]
            seen = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            amax[name] = seen if name not in amax else torch.maximum(amax[name], seen)
            # Not the data address: a tensor freed between two calls (o_proj's input, before the
            # post-attention norm) can hand its address to the next one (gate/up's input).
            calls.append((name, calls[-1][1] if x is previous else len(calls)))
            previous = x
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    device = next(model.parameters()).device
    try:
        for ids in rows:
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        previous = None
    smooth = {}
    for group in _shared_inputs(calls):
        w_amax = torch.stack([linears[n].weight.abs().amax(dim=0).float() for n in group]).amax(dim=0)
        x_amax = amax[group[0]]
        s = x_amax.clamp_min(_FLOOR).pow(alpha) / w_amax.clamp_min(_FLOOR).pow(1 - alpha)
        s[outlier_channels(x_amax, w_amax)] = torch.inf
        for name in group:
            smooth[name] = s
    return smooth


def weight_factors(smooth: Tensor) -> Tensor:
    """The factors the stored int8 weight's columns are multiplied by: s, and 0 in the outlier
    channels (inf in s), which leave the int8 product for a float one."""
    return smooth.float().masked_fill(torch.isinf(smooth), 0.0)


def outlier_channels(x_amax: Tensor, w_amax: Tensor, k: int = OUTLIER_CHANNELS) -> Tensor:
    """Indices of the channels (at most min(k, in // 16)) whose max|x_j| * max|W_j| is above
    OUTLIER_RATIO times its median: for any alpha, max|x_j / s_j| and max|W_j * s_j| both grow with it."""
    size = x_amax * w_amax
    top = size.topk(min(k, size.numel() // 16))
    return top.indices[top.values > OUTLIER_RATIO * size.median()]


def _shared_inputs(calls: list[tuple[str, int]]) -> list[list[str]]:
    """Groups of layers that read one tensor: consecutive calls with the same input number.

    Only consecutive calls are joined. The first call of each layer decides.
    """
    groups: list[list[str]] = []
    placed: set[str] = set()
    last = None
    for name, number in calls:
        if name in placed:
            last = None
            continue
        if last is not None and number == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        placed.add(name)
        last = number
    return groups


def calibration_rows(examples, max_seq_length: int, tokens: int = CALIBRATION_TOKENS) -> list[list[int]]:
    """The first rows of `examples` (dicts with input_ids), each cut to max_seq_length, until `tokens`."""
    rows, total = [], 0
    for example in examples:
        ids = list(example["input_ids"])[:max_seq_length]
        if not ids:
            continue
        rows.append(ids[:tokens - total])
        total += len(rows[-1])
        if total >= tokens:
            break
    return rows
