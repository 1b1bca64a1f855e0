"""How quantized weights live as module state.

Quantized storage (codes, scales) is registered as buffers: saved in the state dict and moved by
`.to(device)` with the module, never returned by `.parameters()`, so never trained. One gotcha:
`Module.to(dtype)` / `.half()` cast every floating buffer, which would silently round the fp32
scales; `move_keeping_dtypes` lets a layer's `_apply` move those buffers without casting them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError


def move_keeping_dtypes(module: nn.Module, fn: Callable[[Tensor], Tensor],
                        super_apply: Callable) -> nn.Module:
    """Run nn.Module._apply(fn) but only move (never cast) the module's floating buffers."""
    kept = {name: buf for name, buf in module._buffers.items() if buf is not None and buf.is_floating_point()}
    for name in kept:
        module._buffers[name] = None
    super_apply(fn)
    for name, buf in kept.items():
        moved = fn(buf)  # a cast is undone: only the device change is kept
        module._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
    return module


def storage_nbytes(module: nn.Module) -> int:
    """Bytes held by the module's persistent buffers (the quantized weight), bias excluded."""
    skip = module._non_persistent_buffers_set
    return sum(b.numel() * b.element_size() for n, b in module._buffers.items()
               if b is not None and n not in skip)


def check_weight(weight: Tensor, name: str) -> None:
    """Refuse to quantize a weight holding NaN/Inf: its block scale would poison every neighbour."""
    if not torch.isfinite(weight).all():
        raise ConfigError(f"cannot quantize {name or 'layer'}: its weight holds NaN or Inf values")
