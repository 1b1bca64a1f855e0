"""The memory estimate behind automatic packed batch sizes and the up-front refusal."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from loratune import LoraConfig, get_peft_model
from loratune import memory as core_memory
from loratune.errors import InsufficientMemoryError
from loratune.train import memory

SMOLLM2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152)


def test_estimate_matches_the_calibration_on_smollm2_shape():
    with_dropout = memory.activation_bytes_per_token(SMOLLM2, torch.float32, lora_dropout=0.05,
                                                     gradient_checkpointing=False)
    without = memory.activation_bytes_per_token(SMOLLM2, torch.float32, lora_dropout=0.0,
                                                gradient_checkpointing=False)
    assert with_dropout / 2**20 == pytest.approx(2.66, abs=0.02)  # measured peak RSS slope, fp32
    assert without / 2**20 == pytest.approx(1.70, abs=0.02)
    half = memory.activation_bytes_per_token(SMOLLM2, torch.bfloat16, lora_dropout=0.0,
                                             gradient_checkpointing=False)
    assert half / 2**20 == pytest.approx(1.07, abs=0.02)  # measured slope, bf16 base (Zen 5)
    checkpointed = memory.activation_bytes_per_token(SMOLLM2, torch.float32, lora_dropout=0.05,
                                                     gradient_checkpointing=True)
    assert checkpointed / 2**20 == pytest.approx(0.77, abs=0.02)  # measured slope with checkpointing


def test_auto_budget_is_896_tokens_for_smollm2_fp32_and_a_multiple_of_the_step():
    per_token = memory.activation_bytes_per_token(SMOLLM2, torch.float32, lora_dropout=0.05,
                                                  gradient_checkpointing=False)
    assert memory.auto_token_budget(per_token, 1024) == 896
    assert memory.auto_token_budget(10**12, 1024) == memory.BUDGET_STEP  # never below one step
    assert memory.auto_token_budget(1, 1024) % memory.BUDGET_STEP == 0


def _model():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    net.requires_grad_(False)
    return get_peft_model(net, LoraConfig(r=4, target_modules=["0", "1"]))


def test_refuses_up_front_with_the_estimate_when_memory_is_short(monkeypatch):
    model = _model()
    monkeypatch.setattr(core_memory, "available_bytes", lambda device: 10 * 2**20)
    with pytest.raises(InsufficientMemoryError) as err:
        memory.check_training_fits(model, longest_batch_tokens=8192, per_token=2**20,
                                   what="micro-batches of 8192 tokens")
    msg = str(err.value)
    assert "micro-batches of 8192 tokens (adapter state" in msg and "needs about 8.0 GiB" in msg
    assert "only 10.0 MiB is available" in msg and "max_tokens_per_batch" in msg


def test_rss_bytes_reads_this_process():
    held = core_memory.rss_bytes()
    try:
        status = open("/proc/self/status").read()
    except OSError:
        assert held is None
        return
    vm_rss = int(status.split("VmRSS:")[1].split()[0]) * 1024
    assert abs(held - vm_rss) < 0.1 * vm_rss


def test_accepts_and_returns_the_peak_when_memory_is_enough(monkeypatch):
    model = _model()
    monkeypatch.setattr(core_memory, "available_bytes", lambda device: 2**40)
    growth = memory.trainable_state_bytes(model) + 100 * 1000
    # On CPU the peak starts from what the process holds (libraries, base, heap), read from /proc...
    monkeypatch.setattr(memory, "rss_bytes", lambda: 700 * 2**20)
    peak = memory.check_training_fits(model, longest_batch_tokens=100, per_token=1000, what="x")
    assert peak == 700 * 2**20 + growth
    # ... or from what it held before the model (libraries, data) plus the model, where that is more
    # (weights mapped from a file are resident only once read)...
    peak = memory.check_training_fits(model, longest_batch_tokens=100, per_token=1000, what="x",
                                      before_model=900 * 2**20)
    assert peak == 900 * 2**20 + memory.model_bytes(model) + growth
    # ... and from the model's own bytes where /proc cannot tell.
    monkeypatch.setattr(memory, "rss_bytes", lambda: None)
    peak = memory.check_training_fits(model, longest_batch_tokens=100, per_token=1000, what="x")
    assert peak == memory.model_bytes(model) + growth
    assert memory.trainable_state_bytes(model) == 3 * 4 * sum(p.numel() for p in model.parameters()
                                                              if p.requires_grad)
