"""Optimizer and schedule: AdamW on LoRA parameters only; schedules equal transformers' reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from loratune.train.optim import build_optimizer, build_scheduler, warmup_steps_for

REFERENCE = {
    "cosine": get_cosine_schedule_with_warmup,
    "linear": get_linear_schedule_with_warmup,
}


def _lrs(scheduler, optimizer, n):
    out = []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant_with_warmup"])
def test_schedule_matches_transformers(kind):
    total, warmup = 50, warmup_steps_for(50, 0.1)
    p = nn.Parameter(torch.zeros(2, 2))
    ours_opt = torch.optim.AdamW([p], lr=1e-3)
    ref_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=1e-3)
    ours = build_scheduler(ours_opt, kind, warmup, total)
    if kind == "constant_with_warmup":
        ref = get_constant_schedule_with_warmup(ref_opt, warmup)
    else:
        ref = REFERENCE[kind](ref_opt, warmup, total)
    assert _lrs(ours, ours_opt, total) == pytest.approx(_lrs(ref, ref_opt, total), abs=1e-12)


def test_warmup_rounds_up():
    assert warmup_steps_for(100, 0.03) == 3
    assert warmup_steps_for(10, 0.03) == 1
    assert warmup_steps_for(10, 0.0) == 0


def test_warmup_steps_wins_over_the_ratio_as_transformers_counts_it():
    from transformers import TrainingArguments

    for value in (7, 0.1, 0.25):
        args = TrainingArguments(output_dir="unused", warmup_steps=value, use_cpu=True)
        assert warmup_steps_for(33, 0.03, value) == args.get_warmup_steps(33)
    assert warmup_steps_for(33, 0.03, 0) == 1  # 0: the ratio


def test_optimizer_sees_only_trainable_parameters_and_skips_decay_on_vectors():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, 1e-3, 0.1)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == 2 and all(p.requires_grad for p in params)
    decays = {tuple(p.shape): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays == {(4, 4): 0.1, (4,): 0.0}


def test_optimizer_refuses_a_model_with_nothing_to_train():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(RuntimeError, match="no trainable parameters"):
        build_optimizer(model, 1e-3, 0.0)
