"""Float dtypes by name, and the "auto" choice: bf16 where the device computes it natively, else fp32.

The one table of dtype names for the trainer, the verbs, quantization and export. This is a core
module: `loratune.tools.loading` and `loratune.quant` both import it, and it imports neither.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from .errors import ConfigError

logger = logging.getLogger(__name__)

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) below AVX512-BF16: under one of them torch's
# bf16 matmuls take the emulated path even on a CPU that has the instructions.
_ISA_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                          "AVX512_CORE_VNNI"}


def onednn_isa_cap() -> str:
    """oneDNN's instruction-set cap (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA), upper
    case; "" when unset."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()


def cpu_has_flag(*names: str) -> bool:
    """True when /proc/cpuinfo lists any of these flags (False where it cannot be read)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(name in flags for name in names)


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    """True when torch computes bf16 natively on this CPU.

    That is: /proc/cpuinfo lists AVX512-BF16 or AMX-BF16, and no `onednn_isa_cap()` below them.
    The cap is how an AVX2-only CPU is reproduced on a newer one (bench/train_speed.py --cpu_isa avx2).
    """
    return onednn_isa_cap() not in _ISA_CAPS_WITHOUT_BF16 and cpu_has_flag("avx512_bf16", "amx_bf16")


# Caps below AVX512-FP16 (the first oneDNN ISA whose fp16 matmuls are native).
_ISA_CAPS_WITHOUT_FP16 = _ISA_CAPS_WITHOUT_BF16 | {"AVX512_CORE_BF16"}


@functools.lru_cache(maxsize=1)
def _cpu_has_fp16() -> bool:
    """True when torch computes fp16 natively on this CPU: AVX512-FP16 or AMX-FP16, and no lower cap."""
    return onednn_isa_cap() not in _ISA_CAPS_WITHOUT_FP16 and cpu_has_flag("avx512_fp16", "amx_fp16")


def bf16_supported(device: str | torch.device) -> bool:
    """Return whether `device` computes in bf16 natively (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_bf16()
    return False


def resolve_dtype(spec: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """Turn "auto" | "bfloat16" | "float32" | "float16" (or a torch.dtype) into a torch.dtype.

    "auto" is bf16 where `bf16_supported(device)`, else fp32. bf16 asked for by name on a CPU
    without native bf16 is honoured with a warning: torch emulates it there (measured on an AVX2-only
    EPYC: a 256x576 @ 576x1536 product 7.6x slower than fp32 on a loaded core, ~100x on a quiet one).
    fp16 on a CPU without AVX512-FP16 or AMX-FP16 warns the same way (80x slower than fp32 on a Zen 5).
    """
    if isinstance(spec, torch.dtype):
        dtype = spec
    elif spec == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    else:
        dtype = parse_dtype(spec, "dtype", allowed="auto, bfloat16, float32, float16")
    on_cpu = torch.device(device).type == "cpu"
    if dtype == torch.bfloat16 and on_cpu and not bf16_supported(device):
        _warn_emulated_bf16()
    if dtype == torch.float16 and on_cpu and not _cpu_has_fp16():
        _warn_emulated_fp16()
    return dtype


@functools.lru_cache(maxsize=1)
def _warn_emulated_bf16() -> None:
    logger.warning("bfloat16 was asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX): torch "
                   "emulates it, and bf16 matmuls run several to ~100 times slower than float32; use "
                   "'auto' or float32")


@functools.lru_cache(maxsize=1)
def _warn_emulated_fp16() -> None:
    # Measured on a Zen 5 EPYC (AVX512-BF16, no AVX512-FP16), 512^3, 2 threads: fp16 2.7 GFLOP/s,
    # float32 216, bf16 948.
    logger.warning("float16 was asked for, but this CPU has no native fp16 (AVX512-FP16 or AMX-FP16): torch "
                   "emulates it, and fp16 matmuls run up to ~80 times slower than float32; use 'auto'")


def parse_dtype(value: str | torch.dtype, field: str = "dtype", *,
                allowed: str = "bfloat16, float32, float16") -> torch.dtype:
    """A float dtype from a torch.dtype or a name ('bfloat16', 'bf16', 'torch.float16', 'half', ...).

    Raises:
        ConfigError: naming `field`, for anything else.
    """
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise ConfigError(f"{field} {value!r} is not one of: {allowed}")
