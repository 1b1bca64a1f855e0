"""`summarize_adapter`: what an adapter directory holds, read from its files alone (no base model).

Targets and ranks come from the tensors, not only the config: the rank of a module is the first
dimension of its `lora_A` (or `lora_embedding_A`), so a `rank_pattern` shows up as it was saved.
Tensor keys follow PEFT's layout: `base_model.model.<module path>.lora_A.weight`,
`<path>.lora_embedding_A`, `<path>.lora_magnitude_vector` (DoRA); anything else is a full tensor
saved with the adapter (modules_to_save, biases).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor

from loratune.adapter_io import BIN_NAME, PREFIX, SAFETENSORS_NAME, nonfinite_keys, read_adapter
from loratune.config import CONFIG_NAME, LoraConfig
from loratune.inject import ALL_LINEAR, matches, pattern_value

ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, "README.md")
_LORA_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_EMBED_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")
_DORA_KEY = re.compile(r"^(?P<path>.+)\.lora_magnitude_vector$")


@dataclass(frozen=True)
class ModuleInfo:
    """One adapted module: its path in the model, rank, and whether it is an embedding."""

    path: str
    r: int
    embedding: bool

    @property
    def name(self) -> str:
        """The last component ("q_proj"), what target_modules usually names."""
        return self.path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class AdapterSummary:
    """Everything `loratune inspect` reports about one adapter directory."""

    path: str
    config: LoraConfig
    modules: list[ModuleInfo]
    num_parameters: int
    dtypes: dict[str, int]  # dtype name -> number of tensors
    size_bytes: int  # the adapter's files: config, weights, model card
    dora_modules: list[str] = field(default_factory=list)
    extra_tensors: list[str] = field(default_factory=list)  # full tensors: modules_to_save, biases
    problems: list[str] = field(default_factory=list)  # why no loader accepts the files (`adapter_problems`)

    @property
    def ranks(self) -> dict[int, int]:
        """rank -> number of modules with that rank."""
        return dict(sorted(Counter(m.r for m in self.modules).items()))

    @property
    def max_rank(self) -> int:
        return max((m.r for m in self.modules), default=self.config.r)

    @property
    def target_names(self) -> list[str]:
        return sorted({m.name for m in self.modules})

    def to_dict(self) -> dict:
        c = self.config
        return {
            "path": self.path,
            "base_model_name_or_path": c.base_model_name_or_path,
            "r": c.r,
            "lora_alpha": c.lora_alpha,
            "ranks": {str(k): v for k, v in self.ranks.items()},
            "rank_pattern": dict(c.rank_pattern),
            "alpha_pattern": dict(c.alpha_pattern),
            "target_modules": c.target_modules,
            "targets": self.target_names,
            "num_modules": len(self.modules),
            "modules": {m.path: m.r for m in self.modules},
            "num_parameters": self.num_parameters,
            "size_bytes": self.size_bytes,
            "dtypes": self.dtypes,
            "use_dora": c.use_dora,
            "use_rslora": c.use_rslora,
            "bias": c.bias,
            "modules_to_save": c.modules_to_save,
            "extra_tensors": self.extra_tensors,
            "problems": self.problems,
            "task_type": None if c.task_type is None else str(c.task_type),
        }


def summarize_adapter(path: str) -> AdapterSummary:
    """Read an adapter directory and describe it.

    Raises:
        AdapterError / UnsupportedFeatureError / ConfigError: as `read_adapter` (missing or corrupt files).
    """
    config, tensors = read_adapter(path)
    modules: dict[str, ModuleInfo] = {}
    dora, extra = [], []
    for key, tensor in sorted(tensors.items()):
        name = key.removeprefix(PREFIX)
        if m := _LORA_KEY.match(name):
            if m["kind"] == "lora_A":
                modules[m["path"]] = ModuleInfo(m["path"], int(tensor.shape[0]), embedding=False)
        elif m := _EMBED_KEY.match(name):
            if m["kind"] == "lora_embedding_A":
                modules[m["path"]] = ModuleInfo(m["path"], int(tensor.shape[0]), embedding=True)
        elif m := _DORA_KEY.match(name):
            dora.append(m["path"])
        else:
            extra.append(name)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    found = sorted(modules.values(), key=lambda m: m.path)
    return AdapterSummary(
        path=path, config=config, modules=found,
        num_parameters=sum(t.numel() for t in tensors.values()), dtypes=dict(sorted(dtypes.items())),
        size_bytes=_dir_size(path), dora_modules=dora, extra_tensors=extra,
        problems=adapter_problems(config, tensors, found),
    )


def adapter_problems(config: LoraConfig, tensors: dict[str, Tensor], modules: list[ModuleInfo]) -> list[str]:
    """What makes loratune (and any loader) refuse these files, read without the base model.

    No LoRA tensors; a rank that is not the config's (r or rank_pattern); target_modules that do
    not match the modules the tensors are for (either way); NaN/Inf values.
    """
    if not modules:
        return [f"no LoRA tensors (lora_A/lora_B): the weights file holds {len(tensors)} tensor(s)"]
    problems = []
    wrong = [f"{m.path} has r={m.r}" for m in modules
             if m.r != pattern_value(config.rank_pattern, m.path, config.r)]
    if wrong:
        problems.append(f"tensor ranks differ from adapter_config.json (r={config.r}"
                        + (f", rank_pattern {config.rank_pattern}" if config.rank_pattern else "")
                        + f"): {_listed(wrong)}")
    problems += _target_problems(config, [m.path for m in modules])
    bad = nonfinite_keys(tensors)
    if bad:
        problems.append(f"{len(bad)} tensor(s) hold NaN or Inf values: "
                        f"{_listed([k.removeprefix(PREFIX) for k in bad])}")
    return problems


def _target_problems(config: LoraConfig, paths: list[str]) -> list[str]:
    """target_modules entries matching none of `paths`, and paths no entry matches."""
    target = config.target_modules
    if target is None or (isinstance(target, str) and target.lower() == ALL_LINEAR):
        return []  # resolved against the model when loaded; nothing to compare the tensors with
    names = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))
    entries = ([target] if isinstance(target, str)
               else [e for e in target if not matches(config.modules_to_save, e)])
    problems = [f"target_modules entry {e!r} in adapter_config.json matches none of the adapter's modules "
                f"({names})"
                for e in entries if not any(matches(e if isinstance(target, str) else [e], p) for p in paths)]
    unmatched = [p for p in paths if not matches(target, p) or matches(config.exclude_modules, p)]
    if unmatched:
        problems.append(f"tensors for modules that target_modules {target!r} does not select: "
                        f"{_listed(unmatched)}")
    return problems


def _listed(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _dir_size(path: str) -> int:
    """Bytes of the adapter's own files (a training output_dir also holds metrics, plots, checkpoints)."""
    files = [os.path.join(path, f) for f in ADAPTER_FILES]
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f))


def human_size(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
