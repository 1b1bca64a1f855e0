"""Which adapters the server may load, and reading one into per-layer weights before it is visible.

Lives here: adapter name rules, resolving a requested path under the configured roots, and
`prepare_adapter`, which reads an adapter directory in PEFT's format (safetensors only) and checks
it against the base model both ways: every tensor must name a linear layer of the base with the
right shape, and every layer the config targets must have its tensors. It needs only the base's
layer shapes, so it runs off the engine thread; installing the weights is the engine's job.
Not here: HTTP (api.py) and the model itself (engine.py).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from loratune.config import LoraConfig
from loratune.errors import AdapterError, ConfigError, UnsupportedFeatureError

from .lora_rows import RowAdapterWeights

ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


class RequestError(Exception):
    """A request the server refuses; carries the HTTP status and OpenAI-style error fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | int | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param


@dataclass
class PreparedAdapter:
    """An adapter read and checked against the base, ready for the engine to install."""

    name: str
    path: str
    config: LoraConfig
    layers: dict[str, RowAdapterWeights]
    created: int = field(default_factory=lambda: int(time.time()))


def check_adapter_name(name: object, *, base_name: str) -> str:
    """Return the name if it is a valid adapter name, else raise RequestError (400)."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name in (".", ".."):
        raise RequestError(400, f"invalid adapter name {name!r}: use 1-128 characters from [A-Za-z0-9._-]",
                           type="InvalidUserInput", code=400, param="lora_name")
    if name == base_name or name == "__base__":
        raise RequestError(400, f"adapter name {name!r} is reserved for the base model",
                           type="InvalidUserInput", code=400, param="lora_name")
    return name


def resolve_adapter_path(lora_path: object, roots: list[Path]) -> Path:
    """Resolve a requested adapter path; it must lie under one of the roots (symlinks followed)."""
    if not roots:
        raise RequestError(400, "loading adapters at runtime is disabled: start the server with --adapter-root DIR",
                           type="InvalidUserInput", code=400, param="lora_path")
    if not isinstance(lora_path, str) or not lora_path or "\x00" in lora_path:
        raise RequestError(400, f"invalid lora_path {lora_path!r}", type="InvalidUserInput", code=400,
                           param="lora_path")
    raw = Path(lora_path)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    for candidate in candidates:
        resolved = candidate.resolve()
        if any(resolved.is_relative_to(root) for root in roots):
            return resolved
    shown = ", ".join(str(r) for r in roots)
    raise RequestError(400, f"lora_path {lora_path!r} is outside the adapter roots ({shown})",
                       type="InvalidUserInput", code=400, param="lora_path")


def prepare_adapter(name: str, path: Path, shapes: dict[str, tuple[int, int]],
                    dtype: torch.dtype) -> PreparedAdapter:
    """Read an adapter directory and check it fits a base with these linear layer shapes.

    Raises:
        AdapterError: missing/corrupt files, a missing, extra or misshapen tensor (named).
        UnsupportedFeatureError: DoRA, embedding LoRA, modules_to_save, trained biases.
    """
    config = _read_config(path)
    tensors = _read_tensors(path)
    modules = _group_by_module(tensors, path)
    problems = []
    for module, parts in sorted(modules.items()):
        key = f"{KEY_PREFIX}{module}"
        if module not in shapes:
            problems.append(f"tensor {key}.lora_A.weight targets {module!r}, which is not a linear layer of the base model")
            continue
        if set(parts) != {"A", "B"}:
            missing = "B" if "A" in parts else "A"
            problems.append(f"tensor {key}.lora_{missing}.weight is missing")
            continue
        in_f, out_f = shapes[module]
        a, b = parts["A"], parts["B"]
        r = a.shape[0]
        if a.dim() != 2 or a.shape[1] != in_f:
            problems.append(f"tensor {key}.lora_A.weight has shape {tuple(a.shape)}, expected ({r}, {in_f})")
        if b.dim() != 2 or tuple(b.shape) != (out_f, r):
            problems.append(f"tensor {key}.lora_B.weight has shape {tuple(b.shape)}, expected ({out_f}, {r})")
    for module in sorted(_targeted(config, shapes) - set(modules)):
        problems.append(f"tensor {KEY_PREFIX}{module}.lora_A.weight is missing (adapter_config.json targets {module!r})")
    if problems:
        raise AdapterError(f"adapter {name!r} at {path} does not fit the base model:\n  - " + "\n  - ".join(problems))
    layers = {}
    for module, parts in modules.items():
        r = parts["A"].shape[0]
        alpha = _pattern_value(config.alpha_pattern, module, config.lora_alpha)
        layers[module] = RowAdapterWeights(parts["A"].to(dtype), parts["B"].to(dtype), config.scaling_for(r, alpha))
    return PreparedAdapter(name=name, path=str(path), config=config, layers=layers)


def _read_config(path: Path) -> LoraConfig:
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(f"{config_file} is missing; an adapter directory holds adapter_config.json "
                           "and adapter_model.safetensors")
    try:
        data = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{config_file} must hold a JSON object, got {type(data).__name__}")
    try:
        config = LoraConfig.from_dict(data, source=str(config_file))
    except (ConfigError, TypeError) as exc:
        raise AdapterError(f"{config_file}: {exc}") from None
    refused = []
    if config.use_dora:
        refused.append("use_dora=true (DoRA adapters cannot share a batch; merge them instead)")
    if config.modules_to_save:
        refused.append(f"modules_to_save={config.modules_to_save!r} (serving shares one base model)")
    if config.bias != "none":
        refused.append(f"bias={config.bias!r} (trained biases change the shared base layers)")
    if refused:
        raise UnsupportedFeatureError(f"{config_file}: the server cannot serve " + "; ".join(refused))
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        hint = " (adapter_model.bin is not accepted: the server reads safetensors only)" \
            if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{weights} is missing{hint}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is not a readable safetensors file: {exc}") from None
    for key, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"{weights}: tensor {key} contains NaN or Inf")
    return tensors


def _group_by_module(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key.removeprefix(KEY_PREFIX))
        if not key.startswith(KEY_PREFIX) or m is None:
            what = ("DoRA magnitude" if "lora_magnitude_vector" in key else
                    "embedding LoRA" if "lora_embedding" in key else
                    "a full module copy (modules_to_save)" if "modules_to_save" in key else
                    "a bias" if key.endswith(".bias") else "not a LoRA A/B weight")
            raise UnsupportedFeatureError(f"{path / 'adapter_model.safetensors'}: tensor {key} is {what}; "
                                          "the server serves plain LoRA on linear layers only")
        modules.setdefault(m["module"], {})[m["part"]] = tensor
    return modules


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key applies when the module name ends with it (regex, dot-separated)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _targeted(config: LoraConfig, shapes: dict[str, tuple[int, int]]) -> set[str]:
    """The base's linear layers that the config's target_modules selects (empty when undecidable)."""
    targets = config.target_modules
    if targets is None:
        return set()
    if targets == "all-linear":
        return {n for n in shapes if not n.endswith("lm_head")}
    if isinstance(targets, str):
        chosen = {n for n in shapes if re.fullmatch(targets, n)}
    else:
        chosen = {n for n in shapes if any(n == t or n.endswith(f".{t}") for t in targets)}
    layers = config.layers_to_transform
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        chosen = {n for n in chosen if _layer_index(n) in wanted}
    exclude = config.exclude_modules
    if isinstance(exclude, str):
        chosen = {n for n in chosen if not re.fullmatch(exclude, n)}
    elif exclude:
        chosen = {n for n in chosen if not any(n == t or n.endswith(f".{t}") for t in exclude)}
    return chosen


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None

