"""Fast kernels for training, each with its plain reference beside it.

  attention       per-example causal attention for packed rows (a blocked bmm kernel on CPU)
  compiled        torch.compile'd CPU kernels with their eager function as the fallback
  cross_entropy   chunked cross-entropy over the LM head (never holds the full logits)
  gemm            matrix products split in row halves or column pieces where that is faster
  lora_linear     fused LoRA linear autograd node for a frozen base
  rms_norm        Llama-style RMSNorm with a frozen weight, keeping no fp32 copy for backward
  runtime         process-wide CPU settings the trainer applies (denormals, threads)

`reference_paths()` switches every fast path in this package (and `loratune.train.loss`) to its
reference for the duration of a `with` block, so a whole training run can be compared against the
plain computation (bench/train_speed.py does this for its 20-step loss check).

Process-wide state: gemm's per-shape choices, attention's causal-mask strips and last scanned
position_ids, and whether compiled kernels are on. `clear_caches()` resets all of it (each module
registers its part with `on_clear_caches` when it is imported).
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Callable, Iterator

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)  # the dtypes the CPU fast paths are tuned for
_REFERENCE = contextvars.ContextVar("loratune_reference_paths", default=False)
_CLEARERS: list[Callable[[], None]] = []


@contextlib.contextmanager
def reference_paths() -> Iterator[None]:
    """Run the plain reference of every fast path inside the block."""
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def fast_paths_enabled() -> bool:
    """False inside `reference_paths()`."""
    return not _REFERENCE.get()


def switch_forward(model: torch.nn.Module, matches: Callable[[torch.nn.Module], bool],
                   forward: Callable) -> int:
    """Bind `forward` as the forward of every module of `model` that `matches` and has no forward of
    its own yet (so switching twice changes nothing); return how many were switched."""
    switched = 0
    for module in model.modules():
        if matches(module) and "forward" not in vars(module):
            module.forward = types.MethodType(forward, module)
            switched += 1
    return switched


def on_clear_caches(clear: Callable[[], None]) -> Callable[[], None]:
    """Register `clear` to run on `clear_caches()`; return it (usable as a decorator)."""
    _CLEARERS.append(clear)
    return clear


def clear_caches() -> None:
    """Forget every process-wide cache of the fast paths (the next calls start afresh)."""
    for clear in _CLEARERS:
        clear()
