"""The training configuration: one frozen dataclass per concern, addressed by flat keys.

Users write flat keys (TRL / HF `TrainingArguments` / PEFT names) in YAML or as `--key value`
flags; `build_config` maps each key to the section that owns it, coerces the value by the field's
type (YAML `1e-4` is a string to PyYAML, "true" from a flag is a bool), and reports every problem
at once as a `ConfigError`. Every default lives here, next to the one-line help that feeds
`loratune train --help`. The data section is `loratune.data.DataConfig`, owned by the data package.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import yaml

from loratune.data import DataConfig
from loratune.errors import ConfigError
from loratune.quant.dispatch import QUANT_TYPES_4BIT
from loratune.train.coerce import coerce
from loratune.train.config_checks import range_problems, unused_quant_settings

logger = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
EVAL_METRICS = ("loss", "exact_match")


def _help(text: str, **extra) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class ModelArgs:
    """Which base model to load, and how."""

    model_name_or_path: str = field(
        default="preset:tiny-llama",
        metadata=_help("local HF model directory, .gguf file, hub id, or preset:NAME "
                       "(preset:smollm2-135m-instruct is a real model; preset:tiny-llama a random one)"),
    )
    gguf_file: str | None = field(
        default=None,
        metadata=_help("a GGUF file inside model_name_or_path (a directory) to load as the base"),
    )
    bf16: bool = field(
        default=True,
        metadata=_help("keep the frozen base in bf16 where the device supports it (LoRA weights stay fp32)"),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_help("recompute activations in backward to save memory")
    )
    load_in_4bit: bool = field(default=False, metadata=_help("quantize the frozen base to 4 bits (QLoRA)"))
    load_in_8bit: bool = field(default=False, metadata=_help("quantize the frozen base to 8 bits"))
    bnb_4bit_quant_type: str = field(default="nf4", metadata=_help("4-bit data type: nf4 or fp4",
                                                                     choices=QUANT_TYPES_4BIT))
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata=_help("dtype of the 4-bit matmuls: auto (bf16 where the device computes it natively, "
                       "else float32), bfloat16, float16 or float32"),
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata=_help("quantize the 4-bit scales too (saves ~0.4 bit/parameter)")
    )
    base_compute: str = field(
        default="exact",
        metadata=_help("exact, or int8: store the frozen base as int8 and run its matmuls in int8 "
                       "(forward and input gradient; CPU; activation outliers smoothed from the first "
                       "training rows), faster, slightly less exact"),
    )


@dataclass(frozen=True)
class LoraArgs:
    """The adapter: PEFT `LoraConfig` names and current-practice defaults."""

    r: int = field(default=16, metadata=_help("rank of the update B @ A"))
    lora_alpha: float = field(default=32, metadata=_help("scaling numerator: scaling = lora_alpha / r"))
    lora_dropout: float = field(default=0.05, metadata=_help("dropout on the LoRA branch input"))
    target_modules: str | list[str] = field(
        default="all-linear",
        metadata=_help('"all-linear", a list of module names/suffixes (q_proj,v_proj) or a full-match regex'),
    )
    use_rslora: bool = field(default=False, metadata=_help("rank-stabilised scaling lora_alpha / sqrt(r)"))
    use_dora: bool = field(default=False, metadata=_help("weight-decomposed LoRA (DoRA)"))
    modules_to_save: list[str] | None = field(
        default=None, metadata=_help("extra modules trained in full and saved with the adapter")
    )


@dataclass(frozen=True)
class OptimArgs:
    """AdamW on the LoRA parameters, with warmup and a decaying schedule."""

    learning_rate: float = field(default=2e-4, metadata=_help("peak learning rate"))
    lr_scheduler_type: str = field(
        default="cosine", metadata=_help(f"learning-rate schedule after warmup: {', '.join(SCHEDULERS)}",
                                         choices=SCHEDULERS)
    )
    warmup_ratio: float = field(default=0.03, metadata=_help("fraction of steps with linear warmup"))
    warmup_steps: float = field(
        default=0,
        metadata=_help("warmup as in Transformers 5: N >= 1 steps, or a fraction < 1 of all steps; "
                       "when > 0 it replaces warmup_ratio (0: use warmup_ratio)"),
    )
    weight_decay: float = field(default=0.0, metadata=_help("AdamW decoupled weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=_help("clip the gradient norm to this (0: off)"))
    per_device_train_batch_size: int = field(
        default=8,
        metadata=_help("examples per micro-batch per process (unpacked); packed rows hold this many rows' "
                       "worth of tokens")
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata=_help("micro-batches per optimizer step (loss normalised by trained tokens)")
    )


@dataclass(frozen=True)
class LoopArgs:
    """How long to train, what to write, and where."""

    output_dir: str = field(default="outputs/lora",
                            metadata=_help("where the adapter, checkpoints and logs go"))
    num_train_epochs: float = field(default=3.0, metadata=_help("passes over the training data"))
    max_steps: int = field(default=-1,
                           metadata=_help("optimizer steps to run; overrides num_train_epochs when > 0"))
    logging_steps: int = field(default=10,
                               metadata=_help("log loss, learning rate and tokens/s every N steps"))
    eval_steps: int = field(default=0,
                            metadata=_help("evaluate every N steps and at the end (0: only at the end)"))
    eval_metric: str = field(
        default="loss",
        metadata=_help("loss: eval loss and perplexity; exact_match: also the share of eval rows whose "
                       "greedy answer equals the completion / last assistant turn (eval_exact_match)",
                       choices=EVAL_METRICS),
    )
    eval_max_new_tokens: int | None = field(
        default=None,
        metadata=_help("exact_match: tokens generated per answer at most (null: the longest eval answer in "
                       "tokens + 16)"),
    )
    save_steps: int = field(default=500, metadata=_help("write checkpoint-<step>/ every N steps (0: never)"))
    save_total_limit: int | None = field(default=2, metadata=_help("keep only the newest N checkpoints"))
    seed: int = field(default=42, metadata=_help("seed for adapter init, data order and dropout"))
    resume_from_checkpoint: bool | str = field(
        default=False,
        metadata=_help("true: continue from the newest checkpoint in output_dir; or a checkpoint path")
    )
    report_to: str = field(default="none", metadata=_help("extra metric sink: none or tensorboard",
                                                          choices=("none", "tensorboard")))
    disable_tqdm: bool = field(default=False, metadata=_help("hide the progress bar"))
    num_threads: int = field(
        default=0,
        metadata=_help("CPU intra-op threads (0: torch's default, one per core; 1 wins on a busy machine)")
    )


@dataclass(frozen=True)
class DistributedArgs:
    """How several processes under `torchrun` share the work: DDP (the default) or FSDP2."""

    fsdp: bool = field(
        default=False,
        metadata=_help("shard the frozen base and the adapter over the processes with FSDP2 (fully_shard per "
                       "decoder layer, then the root) instead of a full copy per process (DDP); checkpoints "
                       "are sharded and resume with any number of processes"),
    )
    fsdp_cpu_offload: bool = field(
        default=False,
        metadata=_help("fsdp on GPUs: keep the parameter shards, gradients and optimizer state in host "
                       "memory and copy each layer to the GPU when it runs"),
    )
    fsdp_reshard_after_forward: bool = field(
        default=True,
        metadata=_help("fsdp: free each layer's gathered weights after its forward and gather them again for "
                       "backward (false: keep them, more memory, less communication)"),
    )


SECTIONS: dict[str, type] = {
    "model": ModelArgs, "lora": LoraArgs, "data": DataConfig, "optim": OptimArgs, "loop": LoopArgs,
    "distributed": DistributedArgs,
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; build it with `build_config`, read it as sections."""

    model: ModelArgs
    lora: LoraArgs
    data: DataConfig
    optim: OptimArgs
    loop: LoopArgs
    distributed: DistributedArgs = field(default_factory=DistributedArgs)

    def to_flat_dict(self) -> dict[str, Any]:
        """Return {flat key: value}, the form written to train_config.yaml."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **flat: Any) -> TrainConfig:
        """Return a copy with some flat keys changed (validated like any config)."""
        # its settings were warned about when it was built: not again
        return build_config({**self.to_flat_dict(), **canonical_keys(flat)}, warn_unused=False)


# TRL's SFTConfig names for keys that mean exactly what ours mean.
KEY_ALIASES = {"max_length": "max_seq_length", "dataset_text_field": "text_column"}
# TRL / TrainingArguments / PEFT keys with no counterpart, and what loratune does instead (said when
# one is used).
TRL_ONLY = {
    "assistant_only_loss": "conversations train only their assistant turns by default (completion_only_loss: "
                           "true, which also covers prompt/completion rows); completion_only_loss: false "
                           "trains every token",
    "packing_strategy": "packing: true packs whole examples, each attending only to itself",
    "padding_free": "packed batches are already padding-free (packing: true)",
    "truncation_mode": "examples longer than max_seq_length keep their first tokens",
    "eos_token": "the tokenizer's own EOS token is used",
    "save_strategy": "checkpoints are written every save_steps steps; save_steps: 0 writes none",
    "eval_strategy": "with eval data, eval_steps: N evaluates every N steps (0: only at the end)",
    "logging_strategy": "logging_steps: N logs every N steps",
    "optim": "the optimizer is always AdamW (fused where the device has a kernel) with weight_decay",
    "lr_scheduler_kwargs": f"lr_scheduler_type is one of {', '.join(SCHEDULERS)}, which take no arguments",
    "neftune_noise_alpha": "NEFTune embedding noise is not supported; leave it out",
    "fp16": "bf16: true keeps the frozen base in bf16 where the device computes it; fp16 is not offered",
    "per_device_eval_batch_size": "evaluation uses per_device_train_batch_size",
    "gradient_checkpointing_kwargs": "gradient_checkpointing: true recomputes each decoder layer, "
                                     "non-reentrant; it takes no arguments",
    "use_cpu": "the device is chosen automatically (a CUDA GPU when present); hide GPUs with "
               "CUDA_VISIBLE_DEVICES= to train on the CPU",
    "init_lora_weights": "the adapter starts as PEFT's default (init_lora_weights: true: A kaiming-uniform, "
                         "B zero); other initialisations are in the library (loratune.LoraConfig)",
}


def canonical_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with TRL's names for our keys (`max_length`, ...) renamed to ours. When both names are
    given, both stay, and `build_config` reports it."""
    out = {}
    for key, value in raw.items():
        canonical = KEY_ALIASES.get(key, key)
        out[key if canonical in raw and canonical != key else canonical] = value
    return out


def key_owners() -> dict[str, tuple[str, dataclasses.Field]]:
    """Map every flat key to (section name, dataclass field)."""
    owners: dict[str, tuple[str, dataclasses.Field]] = {}
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in owners:  # two sections claiming a key is our bug, not the user's
                raise AssertionError(f"config key {f.name!r} defined in {owners[f.name][0]} and {name}")
            owners[f.name] = (name, f)
    return owners


def field_types(cls: type) -> dict[str, Any]:
    """Resolve a dataclass's (possibly string) annotations to real types."""
    return typing.get_type_hints(cls)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of flat keys; raise ConfigError naming the file on any problem."""
    from loratune.tools.yaml_reader import MAX_YAML_BYTES, load_yaml

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_YAML_BYTES + 1)  # load_yaml refuses more: bounded size, depth and aliases
        node, data = load_yaml(text, source=path)
        _refuse_duplicate_keys(node, path)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config path is a directory, not a YAML file: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a UTF-8 text file (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "save the config as UTF-8", source=path) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of key: value, got {type(data).__name__}", source=path)
    return data


def _refuse_duplicate_keys(node, path: str) -> None:
    """YAML keeps the last of two equal keys silently; a config that sets a key twice is a mistake."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for key, _ in node.value:
        name, line = str(key.value), key.start_mark.line + 1
        if name in seen:
            raise ConfigError(f"key {name!r} is set twice (lines {seen[name]} and {line}); keep one",
                              source=path)
        seen[name] = line


def build_config(raw: dict[str, Any], *, source: str | None = None, warn_unused: bool = True) -> TrainConfig:
    """Validate flat keys, coerce values by field type, and build the frozen TrainConfig.

    Raises:
        ConfigError: listing every unknown key (with close matches), every value of the wrong
            type, and every out-of-range value, all at once.
    """
    owners = key_owners()
    problems: list[str] = [f"{alias} and {key} are the same setting (TRL's name and ours); keep one"
                           for alias, key in KEY_ALIASES.items() if alias in raw and key in raw]
    raw = canonical_keys(raw)
    per_section: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    hints = {name: field_types(cls) for name, cls in SECTIONS.items()}
    for key, value in raw.items():
        if key in KEY_ALIASES:
            continue  # given under both names: reported above
        if key not in owners:
            problems.append(unknown_key_message(str(key), owners))
            continue
        section, f = owners[key]
        if isinstance(value, np.generic):  # np.int64(8) from a sweep is the integer 8
            value = value.item()
        try:
            per_section[section][key] = coerce(value, hints[section][key], f.metadata.get("choices"))
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**per_section[name])
        except ConfigError as exc:
            problems.extend(exc.problems)
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    problems.extend(range_problems(sections))
    if problems:
        raise ConfigError(problems, source=source)
    for message in unused_quant_settings(sections["model"]) if warn_unused else []:
        logger.warning("%s%s", f"{source}: " if source else "", message)
    return TrainConfig(**sections)


def unknown_key_message(key: str, owners: dict, *, as_flag: bool = False) -> str:
    """Say that a key (or --flag) is unknown, suggest close ones, and list all valid keys."""
    show = (lambda k: f"--{k}") if as_flag else repr
    if key in TRL_ONLY:
        return f"{show(key)} is a TRL / PEFT setting with no counterpart here: {TRL_ONLY[key]}"
    close = difflib.get_close_matches(key, list(owners), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(show(c) for c in close)}?" if close else "."
    return f"unknown {'flag' if as_flag else 'key'} {show(key)}{hint} Valid keys: {', '.join(sorted(owners))}"


def describe_keys() -> list[tuple[str, list[tuple[str, str, Any, str]]]]:
    """Return [(section, [(key, type name, default, help)])] for `--help`."""
    out = []
    for name, cls in SECTIONS.items():
        hints = field_types(cls)
        rows = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            rows.append((f.name, _flag_type(hints[f.name]), default, f.metadata.get("help", "")))
        out.append((name, rows))
    return out


def _flag_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(_flag_type(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return "list"
    if origin is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")
