"""AdamW over the trainable (LoRA) parameters and its learning-rate schedule.

Only parameters with `requires_grad` reach the optimizer, so the frozen base carries no optimizer
state. Trainable parameters are kept in fp32 (the master weights) even when the base is bf16.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

logger = logging.getLogger(__name__)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Return (name, parameter) for every parameter that trains, in a stable order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW on the trainable parameters: fused where the device has a kernel, else the plain loop.

    Weight decay skips 1-D parameters (biases, DoRA magnitudes), as is customary.
    """
    named = trainable_parameters(model)
    if not named:
        raise RuntimeError("the model has no trainable parameters; was the adapter injected?")
    for name, p in named:
        assert p.dtype == torch.float32, (f"trainable parameter {name} is {p.dtype}, "
                                          "expected fp32 master weights")
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    device = named[0][1].device
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, fused=True)
    except (RuntimeError, TypeError) as exc:  # no fused kernel for this device/dtype
        # On CPU the plain loop beats foreach (docs/performance.md: 20 vs 33 ms per step).
        logger.debug("fused AdamW unavailable on %s (%s); using the plain loop", device, exc)
        return torch.optim.AdamW(groups, lr=learning_rate, foreach=False)


def lr_lambda(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak learning rate at `step`: linear warmup, then cosine/linear/constant.

    Same shapes as transformers' get_cosine_schedule_with_warmup and friends.
    """
    if kind != "constant" and step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int,
                    total_steps: int) -> LambdaLR:
    """A LambdaLR over `lr_lambda`; its state_dict goes into every checkpoint."""
    return LambdaLR(optimizer,
                    lambda s: lr_lambda(s, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps))


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: float = 0) -> int:
    """Number of warmup steps: `warmup_steps` when > 0, read as Transformers 5 reads it (N >= 1 is N
    steps, a value below 1 a fraction of `total_steps`), else `warmup_ratio`; fractions round up."""
    if warmup_steps >= 1:
        return int(warmup_steps)
    return math.ceil(total_steps * (warmup_steps or warmup_ratio))


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, learning_rate: float,
                          weight_decay: float) -> None:
    """Give a restored optimizer and scheduler this run's peak learning rate and weight decay.

    A checkpoint's optimizer and scheduler state hold the values they were saved with; loading them
    would silently keep those, so a diverged run resumed with a lower learning_rate (as its error
    suggests) would not get it. The schedule itself (lr_lambdas) is always this run's.
    """
    saved_lr, saved_wd = scheduler.base_lrs[0], optimizer.param_groups[0]["weight_decay"]
    if (saved_lr, saved_wd) != (learning_rate, weight_decay):
        logger.warning("resuming with learning_rate %g and weight_decay %g (the checkpoint was trained with "
                       "%g and %g)", learning_rate, weight_decay, saved_lr, saved_wd)
    scheduler.base_lrs = [learning_rate] * len(optimizer.param_groups)
    for i, (group, factor) in enumerate(zip(optimizer.param_groups, scheduler.lr_lambdas)):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(scheduler.last_epoch)  # as LambdaLR.get_lr computes it
        if i == 0:  # build_optimizer: the first group decays, the second (1-D parameters) never does
            group["weight_decay"] = weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what LRScheduler.step() sets
