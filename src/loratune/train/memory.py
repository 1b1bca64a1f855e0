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

`max_tokens_per_batch: 0` (auto) packs at most ACTIVATION_BUDGET of activations into a
micro-batch: 896 tokens for that model in float32 with dropout (2.66 MiB each), a peak near
3.3 GiB. The budget depends only on the model and the settings, never on free memory at the time,
so a resumed run plans the same batches. Free memory is read once, to refuse up front a run whose
largest micro-batch cannot fit.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from loratune.memory import check_fits, format_bytes

logger = logging.getLogger(__name__)

ACTIVATION_BUDGET = int(2.5 * 2**30)  # bytes of activations an automatic packed micro-batch may hold
BUDGET_STEP = 128  # automatic budgets are a multiple of this many tokens
# Values kept per layer and token, as multiples of (hidden size, intermediate size), calibrated above.
_KEPT = (15, 4)
_KEPT_DROPOUT = (27, 5)
_KEPT_CHECKPOINTED = (9, 1)  # layer inputs, plus one layer recomputed at a time in backward


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
    return int(kept * torch.finfo(dtype).bits // 8)


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
                        device: torch.device | str = "cpu", checkpointed: bool = False) -> int:
    """Estimate the peak of the largest micro-batch; refuse before training when memory cannot hold it.

    `model_bytes` is already resident, so only the growth (adapter state, activations) is compared
    with free memory (`loratune.memory.check_fits`). Returns the estimated peak in bytes.

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
    return model_bytes(model) + growth
