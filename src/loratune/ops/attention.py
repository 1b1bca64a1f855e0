"""Padding-free attention for packed batches: causal attention run per example, never across.

A packed batch is one row (1, N) holding several examples, with position_ids restarting at 0 for
each. Transformers' sdpa path makes attention block-diagonal with an (N x N) mask, so the kernel
still computes all N^2 scores and cannot use its causal fast path. `varlen_sdpa_attention` instead
cuts the row at the restarts and runs `scaled_dot_product_attention(is_causal=True)` on each example:
the work is sum(T_i^2 / 2) instead of N^2. On CPU the per-example products run in fp32 (faster there
than the bf16 flash backward, and no less exact). Anything that is not a packed training batch (padded
batches, a single sequence, decoding with a cache) goes to Transformers' own sdpa function
unchanged, so the reference for this fast path is `sdpa_attention_forward` with its block-diagonal
mask; tests/test_ops_attention.py compares the two (outputs and LoRA gradients).

`enable_varlen_attention(model)` registers the function under the name "loratune_sdpa" and switches a
Transformers model that uses "sdpa" to it (its masks are still built by the sdpa mask function).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from loratune.ops import fast_paths_enabled

logger = logging.getLogger(__name__)
NAME = "loratune_sdpa"


def varlen_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[Tensor, None]:
    """Transformers attention function: (B, H, T, hd) q/k/v -> ((B, T, H, hd) output, None)."""
    bounds = packed_bounds(kwargs.get("position_ids"), query, key)
    if bounds is None or not fast_paths_enabled() or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    # On CPU the flash kernel's backward is faster in fp32 than in bf16 (docs/performance.md:
    # a whole step -5%); q/k/v are small next to the weights, so the casts cost little.
    compute = torch.float32 if query.device.type == "cpu" else query.dtype
    q, k, v = query.to(compute), key.to(compute), value.to(compute)
    outs = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                       dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        for s, e in bounds
    ]
    out = torch.cat(outs, dim=2).to(query.dtype)  # (1, H, N, hd)
    return out.transpose(1, 2).contiguous(), None


def packed_bounds(position_ids: Tensor | None, query: Tensor, key: Tensor) -> list[tuple[int, int]] | None:
    """[(start, stop), ...] of the examples in a packed (1, N) row, or None if it is not one."""
    if position_ids is None or query.shape[0] != 1 or position_ids.shape[0] != 1:
        return None
    n = query.shape[2]
    if n < 2 or key.shape[2] != n or position_ids.shape[-1] != n:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    if len(starts) < 2 or starts[0] != 0:
        return None
    return list(zip(starts, starts[1:] + [n]))


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
