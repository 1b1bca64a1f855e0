"""The checks `build_config` runs once every value has its type: impossible values, settings that
contradict each other, and quantization settings nothing will read.

Each returns messages, never raises, so that `build_config` can report every problem at once.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from loratune.dtypes import parse_dtype
from loratune.errors import ConfigError

if TYPE_CHECKING:
    from loratune.train.config import ModelArgs

MAX_SEED = 2**32 - 1  # np.random.seed rejects anything outside [0, 2**32 - 1]


def range_problems(s: dict[str, Any]) -> list[str]:
    """Return every value that has the right type but an impossible value (sections that failed to
    build are skipped; their problems are already reported)."""
    checks: dict[str, list] = {
        "data": lambda d: [
            (d.has_source,
             "no training data: set train_file (a .jsonl/.json/.csv/.parquet file) or dataset_name"),
        ],
        "model": lambda m: [
            (not (m.load_in_4bit and m.load_in_8bit), "load_in_4bit and load_in_8bit are mutually exclusive"),
            (m.base_compute in ("exact", "int8"),
             f"base_compute must be exact or int8, got {m.base_compute!r}"),
            (not (m.base_compute == "int8" and m.load_in_4bit),
             "base_compute: int8 computes with an int8 base; it cannot be combined with load_in_4bit"),
        ],
        "lora": lambda lo: [
            (lo.r > 0, f"r must be > 0, got {lo.r}"),
            (math.isfinite(lo.lora_alpha) and lo.lora_alpha > 0,
             f"lora_alpha must be a finite number > 0, got {lo.lora_alpha}"),
            (0 <= lo.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {lo.lora_dropout}"),
        ],
        "optim": lambda op: [
            (math.isfinite(op.learning_rate) and op.learning_rate > 0,
             f"learning_rate must be a finite number > 0, got {op.learning_rate}"),
            (0 <= op.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {op.warmup_ratio}"),
            (math.isfinite(op.warmup_steps) and op.warmup_steps >= 0
             and (op.warmup_steps < 1 or op.warmup_steps.is_integer()),
             "warmup_steps must be a whole number of steps (>= 1), a fraction of all steps in [0, 1), "
             f"or 0 to use warmup_ratio, got {op.warmup_steps}"),
            (math.isfinite(op.weight_decay) and op.weight_decay >= 0,
             f"weight_decay must be a finite number >= 0, got {op.weight_decay}"),
            (math.isfinite(op.max_grad_norm) and op.max_grad_norm >= 0,
             f"max_grad_norm must be a finite number >= 0 (0 disables clipping), got {op.max_grad_norm}"),
            (op.per_device_train_batch_size >= 1,
             f"per_device_train_batch_size must be >= 1, got {op.per_device_train_batch_size}"),
            (op.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps must be >= 1, got {op.gradient_accumulation_steps}"),
        ],
        "loop": lambda lp: [
            (lp.max_steps == -1 or lp.max_steps > 0,
             f"max_steps must be > 0 or -1 (use epochs), got {lp.max_steps}"),
            (math.isfinite(lp.num_train_epochs) and lp.num_train_epochs > 0,
             f"num_train_epochs must be a finite number > 0, got {lp.num_train_epochs}"),
            (lp.logging_steps >= 1, f"logging_steps must be >= 1, got {lp.logging_steps}"),
            (lp.eval_steps >= 0, f"eval_steps must be >= 0, got {lp.eval_steps}"),
            (lp.eval_max_new_tokens is None or lp.eval_max_new_tokens >= 1,
             f"eval_max_new_tokens must be >= 1 or null, got {lp.eval_max_new_tokens}"),
            (lp.save_steps >= 0, f"save_steps must be >= 0, got {lp.save_steps}"),
            (lp.save_total_limit is None or lp.save_total_limit >= 1,
             f"save_total_limit must be >= 1 or null, got {lp.save_total_limit}"),
            (bool(lp.output_dir), "output_dir must not be empty"),
            (0 <= lp.seed <= MAX_SEED, f"seed must be in [0, 2**32 - 1] (numpy's range), got {lp.seed}"),
            (lp.num_threads >= 0, f"num_threads must be >= 0 (0: torch's default), got {lp.num_threads}"),
        ],
    }
    problems = [msg for name, check in checks.items() if name in s for ok, msg in check(s[name]) if not ok]
    if "model" in s:
        problems.extend(compute_dtype_problems(s["model"].bnb_4bit_compute_dtype))
    problems.extend(_fsdp_problems(s))
    if "loop" in s and "data" in s and s["loop"].eval_metric == "exact_match":
        d = s["data"]
        if not (d.eval_file or d.eval_split or d.eval_samples):
            problems.append("eval_metric: exact_match scores answers to eval rows; set eval_file, eval_split "
                            "or eval_samples")
    return problems


def compute_dtype_problems(value: str) -> list[str]:
    """Say what is wrong with a bnb_4bit_compute_dtype name: [] for "auto" or a float dtype's name."""
    try:
        if value != "auto":
            parse_dtype(value, "bnb_4bit_compute_dtype", allowed="auto, bfloat16, float32, float16")
    except ConfigError as exc:
        return exc.problems
    return []


def unused_quant_settings(m: ModelArgs) -> list[str]:
    """Quantization settings that nothing will read in this config (logged as warnings by build_config:
    a QLoRA config with load_in_4bit switched off for a quick run is common and harmless)."""
    own_dtype = m.bnb_4bit_compute_dtype != "auto" and not compute_dtype_problems(m.bnb_4bit_compute_dtype)
    unused = [
        (m.bnb_4bit_quant_type != "nf4" and not m.load_in_4bit,
         "bnb_4bit_quant_type only applies with load_in_4bit: true; it is not used"),
        (m.bnb_4bit_use_double_quant and not m.load_in_4bit,
         "bnb_4bit_use_double_quant only applies with load_in_4bit: true; it is not used"),
        # Linear8bit with int8_compute multiplies in int8 whatever its compute_dtype says
        (own_dtype and m.base_compute == "int8",
         "bnb_4bit_compute_dtype is not used: base_compute: int8 multiplies in int8"),
        (own_dtype and m.base_compute != "int8" and not (m.load_in_4bit or m.load_in_8bit),
         "bnb_4bit_compute_dtype only applies with load_in_4bit or load_in_8bit: true; it is not used"),
    ]
    return [msg for on, msg in unused if on]


def _fsdp_problems(s: dict[str, Any]) -> list[str]:
    """Settings that only mean something with fsdp, and features the sharded path cannot honour."""
    d = s.get("distributed")
    if d is None:
        return []
    if not d.fsdp:
        return [f"{key}: only applies with fsdp: true" for key, on in
                (("fsdp_cpu_offload", d.fsdp_cpu_offload),
                 ("fsdp_reshard_after_forward", not d.fsdp_reshard_after_forward)) if on]
    problems = []
    lora = s.get("lora")
    if lora is not None and lora.use_dora:
        problems.append("use_dora: not supported with fsdp (the DoRA magnitude is drawn from the whole base "
                        "weight when the adapter is injected, before any rank holds it); use DDP "
                        "(fsdp: false)")
    if lora is not None and lora.modules_to_save:
        problems.append("modules_to_save: not supported with fsdp (the trained copies start from the base "
                        "weights, which no rank holds whole); use DDP (fsdp: false)")
    model = s.get("model")
    if model is not None and model.base_compute == "int8":
        problems.append("base_compute: int8 is not supported with fsdp yet; use DDP (fsdp: false) or "
                        "base_compute: exact")
    return problems
