"""How the engine picks each request's next token: greedy argmax, or temperature and top-p sampling.

Greedy (temperature below `GREEDY_BELOW`) takes the argmax, as `generate(do_sample=False)` does, so a
greedy request's tokens equal a single run's; a seeded request samples from its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from loratune.tools.generation import GREEDY_BELOW


@dataclass
class SamplingParams:
    """How one request samples: temperature 0 is greedy; seed makes sampling repeatable."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def finite_rows(logits: Tensor) -> list[bool]:
    """Per row of (N, V) logits: no NaN and no +inf (one pass for the whole step, one host sync)."""
    return (~(logits.isnan() | logits.isposinf()).any(dim=1)).tolist()


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from (V,) logits: argmax when greedy, else temperature + top-p."""
    if params.greedy or generator is None:
        return int(logits.argmax())
    # <= 0 before scaling: no overflow
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(0) - sorted_probs < params.top_p
        # The top token always stays: a top_p below float32's smallest number (1e-300) compares as 0.
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
