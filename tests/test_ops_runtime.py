"""tune_cpu_runtime: applies what it reports and changes no numerics above the denormal range."""

from __future__ import annotations

import torch

from loratune.ops import runtime


def test_tune_cpu_runtime_reports_and_restores_threads():
    before = torch.get_num_threads()
    try:
        applied = runtime.tune_cpu_runtime(threads=1)
        assert applied["threads"] == 1 == torch.get_num_threads()
        assert "flush_denormal" in applied and "allocator" in applied
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)


def test_tuned_cpu_runtime_puts_threads_and_flushing_back():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with runtime.tuned_cpu_runtime(threads=target) as applied:
        assert torch.get_num_threads() == target == applied["threads"]
        if applied["flush_denormal"]:
            assert torch.tensor([1e-39]).item() == 0.0
    assert torch.get_num_threads() == before
    assert torch.tensor([1e-39]).item() != 0.0  # denormals are kept again


def test_flush_denormal_only_touches_denormals():
    try:
        if not torch.set_flush_denormal(True):
            return  # this CPU cannot flush; nothing to check
        tiny = torch.tensor([1e-39, 1e-30], dtype=torch.float32)
        assert tiny[0].item() == 0.0 and tiny[1].item() == torch.tensor(1e-30).item()
    finally:
        torch.set_flush_denormal(False)


def test_allocator_setting_keeps_tensors_correct():
    runtime.keep_freed_memory()
    for _ in range(3):
        x = torch.ones(1024, 4096)
        assert x.sum().item() == 1024 * 4096
        del x
