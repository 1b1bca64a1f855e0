"""The model a training run starts from: the frozen base, loaded (or sharded as it loads), with a fresh
LoRA adapter injected and the trainer's fast paths switched on.
"""

from __future__ import annotations

import logging
import os
import re
from functools import partial

import torch

from loratune.dtypes import bf16_supported
from loratune.errors import ConfigError
from loratune.train.config import TrainConfig
from loratune.train.distributed import DistEnv

logger = logging.getLogger(__name__)


def base_source(cfg: TrainConfig) -> str:
    """The base as one string (a GGUF file inside a directory becomes its path), as the adapter records
    it: a local path made absolute, so the adapter finds its base from any working directory."""
    from loratune.tools.loading import model_source

    source = model_source(cfg.model.model_name_or_path, cfg.model.gguf_file)
    local = os.path.expanduser(source)
    return os.path.abspath(local) if os.path.exists(local) else source


def build_model(cfg: TrainConfig, env: DistEnv, calibration_rows: list[list[int]] | None = None):
    """Load the frozen base (bf16 where supported) and inject a fresh fp32 LoRA adapter.

    calibration_rows: token rows that set the activation smoothing of a `base_compute: int8` base.
    """
    from loratune.tools.loading import load_base_model

    m = cfg.model
    int8_compute = m.base_compute == "int8"
    if int8_compute and env.device.type != "cpu":
        raise ConfigError(f"base_compute: int8 runs on the CPU only for now (this run is on {env.device}); "
                          "use base_compute: exact or load_in_8bit")
    if int8_compute and m.bf16 and bf16_supported(env.device):
        logger.warning("base_compute: int8 on a CPU that computes bf16 natively: measured no faster than the "
                       "default bf16 run there (SmolLM2 orders demo, Zen 5: 1.69x PEFT's tokens/s against "
                       "1.96x), with eval loss about 1%% off; it pays where bf16 is emulated (AVX2: 1.4x)")
    base = load_base_model(
        base_source(cfg), dtype="auto" if m.bf16 else "float32", device=env.device,
        load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit or int8_compute,
        bnb_4bit_quant_type=m.bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=m.bnb_4bit_compute_dtype,
        bnb_4bit_use_double_quant=m.bnb_4bit_use_double_quant,
        # FSDP2 shards loratune's own quantized layers, not bitsandbytes' packed weights
        quant_backend="torch" if cfg.distributed.fsdp else "auto",
        int8_compute=int8_compute,  # Linear8bit: int8 activations and matmuls (ops/int8_matmul.py)
        calibration_rows=calibration_rows if int8_compute else None,
    )
    return adapt_base(base, cfg, env.device)


def build_sharded_model(cfg: TrainConfig, env: DistEnv):
    """fsdp: the model sharded over the ranks as it loads, and its FSDP root: (model, root).

    From a directory of safetensors files, each rank reads only its own rows of each weight (a
    meta-device skeleton, filled after sharding; fsdp_load.py); any other base (a preset, .bin
    files, a hub id) is loaded whole by every rank first, and a warning says so.
    """
    import transformers

    from loratune.dtypes import resolve_dtype
    from loratune.quant import quantize_model
    from loratune.tools.loading import model_dir
    from loratune.train import fsdp, fsdp_load

    m, d = cfg.model, cfg.distributed
    shard = partial(fsdp.shard_model, env=env, cpu_offload=d.fsdp_cpu_offload,
                    reshard_after_forward=d.fsdp_reshard_after_forward)
    directory = model_dir(base_source(cfg))
    files = fsdp_load.safetensors_files(directory) if os.path.isdir(directory) else None
    if files is None or int(transformers.__version__.split(".")[0]) < 5:
        why = ("not a directory of safetensors files" if files is None
               else "loading shard by shard needs transformers 5")
        logger.warning("fsdp: every rank loads the whole base before sharding it (%s)", why)
        model = build_model(cfg, env)
        return model, shard(model)
    dtype = resolve_dtype("auto" if m.bf16 else "float32", env.device)
    base = fsdp_load.build_skeleton(directory, dtype, base_source(cfg))
    if m.load_in_4bit or m.load_in_8bit:  # empty quantized layers, filled by materialize
        quantize_model(base, bits=4 if m.load_in_4bit else 8, quant_type=m.bnb_4bit_quant_type,
                       compute_dtype=resolve_dtype(m.bnb_4bit_compute_dtype, env.device),
                       double_quant=m.bnb_4bit_use_double_quant, backend="torch")
    model = adapt_base(base, cfg, env.device)
    root = shard(model)
    fsdp_load.materialize(root, model, files, dtype, env)
    return model, root


def adapt_base(base, cfg: TrainConfig, device: torch.device):
    """Inject a fresh fp32 LoRA adapter into a frozen base, with the trainer's fast paths switched on.

    The base may sit on the meta device (sharded loading); the adapter is then drawn on the CPU.
    """
    from loratune import LoraConfig, get_peft_model
    from loratune.ops.attention import enable_varlen_attention
    from loratune.ops.rms_norm import enable_fast_rms_norm
    from loratune.ops.swiglu import enable_fused_mlp

    m, lo = cfg.model, cfg.lora
    if m.gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (no enable_input_require_grads hack) and under DDP.
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora_config = LoraConfig(
        # a whole alpha stays an int in adapter_config.json, as PEFT writes it (the YAML key is a float)
        r=lo.r, lora_alpha=int(lo.lora_alpha) if float(lo.lora_alpha).is_integer() else lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=target_modules_for_peft(lo.target_modules),
        use_rslora=lo.use_rslora, use_dora=lo.use_dora,
        modules_to_save=list(lo.modules_to_save) if lo.modules_to_save else None,
        task_type="CAUSAL_LM", base_model_name_or_path=base_source(cfg),
    )
    check_adapter_memory(base, lora_config, device)
    model = get_peft_model(base, lora_config)
    # Packed rows (the default) attend per example instead of through an N x N block mask.
    enable_varlen_attention(model)
    # Llama-style norms keep no fp32 copy of their input for backward (docs/performance.md).
    enable_fast_rms_norm(model)
    # SwiGLU MLPs keep gate and up outputs for backward, not four (T, intermediate) tensors. Only on a
    # float32 base: SmolLM2's orders demo (docs/performance.md) measured 6% less peak memory for 4% more
    # time in float32 (AVX2 instruction set), but 3% less memory for 12-17% more time in bf16 (Zen 5).
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.weight.dtype == torch.float32:
        enable_fused_mlp(model)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # fp32 master weights whatever the base dtype
    return model


def check_adapter_memory(base, lora_config, device) -> None:
    """Refuse, before allocating, an adapter whose training state cannot fit in free memory.

    Training holds per LoRA parameter fp32 weights, gradients and AdamW's two moments: 16 bytes.

    Raises:
        InsufficientMemoryError: with the estimate and what is free.
    """
    from loratune.inject import find_targets, lora_parameter_count, resolve_config
    from loratune.memory import check_fits
    from loratune.module_patterns import match_budget

    resolved = resolve_config(base, lora_config)
    with match_budget():
        targets = find_targets(base, resolved)
        count = lora_parameter_count(base, resolved, targets)
    check_fits(count * 16, device,
               f"training r={lora_config.r} on {len(targets)} layers ({count:,} LoRA parameters; fp32 "
               "weights, gradients and two AdamW moments)", "lower r or target fewer modules")


def target_modules_for_peft(value: str | list[str] | tuple[str, ...]) -> str | list[str]:
    """The training config's target_modules as LoraConfig takes it.

    A single plain module name (`--target_modules q_proj`, `target_modules: q_proj`) is a list of
    one: in PEFT a single string is a full-match regex on the module path, which a bare name never
    matches. "all-linear" and anything with regex characters stay a string.
    """
    if isinstance(value, (list, tuple)):
        return list(value)
    if value != "all-linear" and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        return [value]
    return value
