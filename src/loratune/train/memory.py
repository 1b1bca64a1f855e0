"""How much memory a training micro-batch needs, and the token budget packed batches are cut to.

Training memory is the frozen base plus what autograd keeps per token for backward. The per-token
part is estimated from the model's shape (`activation_bytes_per_token`), a formula calibrated on
SmolLM2-135M (D 576, I 1536, 30 layers) in float32 on CPU, peak RSS of one forward + backward of
a packed row (docs/training.md, "Memory"):

    without LoRA dropout   1.70 MiB per token   (15 D + 4 I values per layer and token)
    with LoRA dropout      2.66 MiB per token   (27 D + 5 I: dropout keeps a masked copy and a mask
                                                 of every LoRA input)

    with gradient checkpointing 0.77 MiB per token  (9 D + 1 I: peak 1.47 / 1.84 / 2.63 GB at 512 /
                                                 1024 / 2048 tokens, against 3.84 GB at 1024 without)

A bf16 base keeps 0.63 of those bytes, not half (SmolLM2, r 64 on every linear, no dropout,
native-bf16 Zen 5, 2026-12-07: peak RSS 1540 / 2013 / 2925 MiB at 432 / 864 / 1728 tokens, 1.07 MiB
a token; the same runs in float32, capped at AVX2, grew by 1.51 MiB a token).

`max_tokens_per_batch: 0` (auto) packs at most ACTIVATION_BUDGET of activations into a
micro-batch: 896 tokens for that model in float32 with dropout (2.66 MiB each), a peak near
3.3 GiB; 2304 tokens in bf16 without dropout. The budget depends only on the model and the
settings, never on free memory at the time, so a resumed run plans the same batches. Free memory
is read once, to refuse up front a run whose largest micro-batch cannot fit.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from loratune.memory import check_fits, format_bytes, rss_bytes

logger = logging.getLogger(__name__)

ACTIVATION_BUDGET = int(2.5 * 2**30)  # bytes of activations an automatic packed micro-batch may hold
BUDGET_STEP = 128  # automatic budgets are a multiple of this many tokens
# Values kept per layer and token, as multiples of (hidden size, intermediate size), calibrated above.
_KEPT = (15, 4)
_KEPT_DROPOUT = (27, 5)
_KEPT_CHECKPOINTED = (9, 1)  # layer inputs, plus one layer recomputed at a time in backward
# A bf16 or fp16 base keeps this share of float32's bytes a token, not half: the LoRA branch, the
# norms' statistics and the loss keep float32 tensors (calibrated above).
_HALF_SHARE = 0.63


def activation_bytes_per_token(config, dtype: torch.dtype, *, lora_dropout: float,
                               gradient_checkpointing: bool) -> int:
    """Bytes autograd keeps per trained-sequence token across the whole model (estimate)."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1)
    if gradient_checkpointing:
        per_layer = _KEPT_CHECKPOINTED
    else:
        per_layer = _KEPT_DROPOUT if lora_dropout > 0 else _KEPT
    kept = layers * (per_layer[0] * hidden + per_layer[1] * inter)
    size = torch.finfo(dtype).bits // 8
    return int(kept * 4 * _HALF_SHARE) if size == 2 else int(kept * size)


def auto_token_budget(per_token: int, max_seq_length: int) -> int:
    """Tokens of one automatic packed micro-batch: ACTIVATION_BUDGET worth, at least one max-length row."""
    tokens = ACTIVATION_BUDGET // max(per_token, 1) // BUDGET_STEP * BUDGET_STEP
    return max(tokens, BUDGET_STEP, min(max_seq_length, BUDGET_STEP))


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (frozen base, adapter, quantized storage) this process holds:
    of a sharded one, its shard."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(_local(t).numel() * t.element_size() for t in tensors)


def trainable_state_bytes(model: nn.Module) -> int:
    """Bytes of the trainable weights' gradients and AdamW's two moments (all fp32) this process holds."""
    return sum(3 * _local(p).numel() * 4 for p in model.parameters() if p.requires_grad)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def check_training_fits(model: nn.Module, *, longest_batch_tokens: int, per_token: int, what: str,
                        device: torch.device | str = "cpu", checkpointed: bool = False,
                        before_model: int = 0) -> int:
    """Estimate the peak of the largest micro-batch; refuse before training when memory cannot hold it.

    What the process holds already is not compared with free memory, only the growth (adapter state,
    activations) is (`loratune.memory.check_fits`). Returns the estimated peak in bytes: what is held
    plus the growth. On CPU, what is held is what was resident before the model was built
    (`before_model`: the libraries and the data) plus the model's bytes, or the resident memory now
    where that is more (weights mapped from a file count only once read); on a GPU, the model's bytes.

    Raises:
        InsufficientMemoryError: with the estimate, what is free and what would bring it down.
    """
    state = trainable_state_bytes(model)
    growth = state + longest_batch_tokens * per_token
    check_fits(growth, device,
               f"{what} (adapter state {format_bytes(state)}, activations at {per_token / 2**20:.2f} MiB "
               "a token)",
               "lower max_seq_length, per_device_train_batch_size, max_tokens_per_batch or r"
               + ("" if checkpointed else ", or set gradient_checkpointing: true"))
    held = model_bytes(model)
    if torch.device(device).type == "cpu":
        held = max(before_model + held, rss_bytes() or 0)
    return held + growth
