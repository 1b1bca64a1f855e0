"""Which adapters the server may load, and reading one into per-layer weights before it is visible.

Lives here: checking a requested adapter name (the rule itself is loratune.adapter_names),
resolving a requested path under the configured roots, and `prepare_adapter`, which reads an
adapter directory in PEFT's format (safetensors only) and checks it against the base model both
ways: every tensor must name a linear layer of the base with the right shape, and every layer the
config targets must have its tensors. It needs only the base's
layer shapes, so it runs off the engine thread; installing the weights is the engine's job.
Not here: HTTP (api.py) and the model itself (engine.py).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratune.adapter_files import BIN_NAME
from loratune.adapter_io import PREFIX, SAFETENSORS_NAME, check_finite, read_adapter
from loratune.adapter_names import adapter_name_problem
from loratune.config import CONFIG_NAME, LoraConfig
from loratune.errors import AdapterError, UnsupportedFeatureError
from loratune.inject import ALL_LINEAR, layer_index, matches, pattern_value
from loratune.module_patterns import match_budget, shown

from .lora_rows import RowAdapterWeights

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
    """Return the name if it is a valid adapter name and not the base's, else raise RequestError (400)."""
    problem = adapter_name_problem(name)
    if problem is None and name == base_name:
        problem = f"adapter name {name!r} is reserved for the base model"
    if problem:
        raise RequestError(400, problem, type="InvalidUserInput", code=400, param="lora_name")
    return name


def resolve_adapter_path(lora_path: object, roots: list[Path]) -> Path:
    """Resolve a requested adapter path; it must lie under one of the roots (symlinks followed)."""
    if not roots:
        raise RequestError(400, "loading adapters at runtime is disabled: start the server with "
                           "--adapter-root DIR",
                           type="InvalidUserInput", code=400, param="lora_path")
    problem = _path_problem(lora_path)
    if problem:
        raise RequestError(400, f"invalid lora_path {shown(lora_path)}: {problem}", type="InvalidUserInput",
                           code=400, param="lora_path")
    raw = Path(lora_path)
    candidates = [raw] if raw.is_absolute() else [root / raw for root in roots]
    for candidate in candidates:
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
            raise RequestError(400, f"lora_path {shown(lora_path)} cannot be resolved "
                               f"({getattr(exc, 'strerror', None) or type(exc).__name__})",
                               type="InvalidUserInput", code=400, param="lora_path") from None
        if inside_roots(resolved, roots):
            return resolved
    raise RequestError(400, f"lora_path {shown(lora_path)} is outside the adapter roots "
                       "(--adapter-root); give a path relative to a root",
                       type="InvalidUserInput", code=400, param="lora_path")


MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255   # NAME_MAX: the longest file or folder name


def _path_problem(lora_path: object) -> str | None:
    if not isinstance(lora_path, str) or not lora_path:
        return "expected a non-empty string"
    if len(lora_path) > MAX_PATH_CHARS:
        return f"{len(lora_path)} characters, over the limit of {MAX_PATH_CHARS}"
    if any(ord(c) < 32 or c == "\x7f" for c in lora_path):
        return "it holds control characters"
    try:
        parts = [part.encode("utf-8") for part in lora_path.split("/")]
    except UnicodeEncodeError:
        return "it is not valid Unicode (a lone surrogate)"
    longest = max(len(part) for part in parts)
    if longest > MAX_NAME_BYTES:
        return f"a path component of {longest} bytes, over the limit of {MAX_NAME_BYTES}"
    return None


def inside_roots(path: Path | str, roots: list[Path]) -> bool:
    """True when `path`, with every symlink resolved, lies inside one of the (resolved) roots."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(os.path.realpath(root)) for root in roots)


def check_files_inside(path: Path, roots: list[Path]) -> None:
    """Refuse an adapter folder whose files resolve outside the roots (a symlink to /etc/passwd...).

    Raises:
        AdapterError: naming the file by its name in the folder, never where it points.
    """
    for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        file = path / name
        if (file.is_symlink() or file.exists()) and not inside_roots(file, roots):
            raise AdapterError(f"{name} in the adapter folder is a link to a file outside the adapter "
                               "roots; copy the file into the folder instead")


def prepare_adapter(name: str, path: Path, shapes: dict[str, tuple[int, int]],
                    dtype: torch.dtype, *, roots: list[Path] | None = None) -> PreparedAdapter:
    """Read an adapter directory and check it fits a base with these linear layer shapes.

    With `roots`, every file read must resolve inside one of them. Regex matching shares one time
    budget (module_patterns), so a backtracking target_modules fails fast instead of stalling.

    Raises:
        AdapterError: missing/corrupt files, a missing, extra or misshapen tensor (named), targets
            that match nothing, a scaling or weights the serving dtype cannot hold.
        UnsupportedFeatureError: DoRA, embedding LoRA, modules_to_save, trained biases.
        ConfigError: a config field with a bad value, or a regex that takes too long.
    """
    if roots is not None:
        check_files_inside(path, roots)
    with match_budget():
        return _prepare(name, path, shapes, dtype)


def _prepare(name: str, path: Path, shapes: dict[str, tuple[int, int]],
             dtype: torch.dtype) -> PreparedAdapter:
    config, tensors = _read(path)
    modules = _group_by_module(tensors, path)
    targeted = _targeted(config, shapes)
    if targeted is not None and not targeted:
        raise AdapterError(f"adapter {name!r}: target_modules {shown(config.target_modules)} (with "
                           "exclude_modules / layers_to_transform) match no linear layer of the base model")
    problems = []
    for module, parts in sorted(modules.items()):
        key = f"{PREFIX}{module}"
        if module not in shapes:
            problems.append(f"tensor {key}.lora_A.weight targets {module!r}, "
                            "which is not a linear layer of the base model")
            continue
        if targeted is not None and module not in targeted:
            problems.append(f"tensor {key}.lora_A.weight is unexpected: "
                            f"adapter_config.json does not target {module!r}")
            continue
        if set(parts) != {"A", "B"}:
            missing = "B" if "A" in parts else "A"
            problems.append(f"tensor {key}.lora_{missing}.weight is missing")
            continue
        in_f, out_f = shapes[module]
        r = pattern_value(config.rank_pattern, module, config.r)  # the rank the config gives this layer
        for part, t, want in (("A", parts["A"], (r, in_f)), ("B", parts["B"], (out_f, r))):
            if tuple(t.shape) != want:  # (read_adapter refused non-float dtypes already)
                problems.append(f"tensor {key}.lora_{part}.weight has shape {tuple(t.shape)}, "
                                f"expected {want} "
                                f"(adapter_config.json gives this layer r={r})")
    for module in sorted((targeted or set()) - set(modules)):
        problems.append(f"tensor {PREFIX}{module}.lora_A.weight is missing "
                        f"(adapter_config.json targets {module!r})")
    if problems:
        raise AdapterError(f"adapter {name!r} at {path} does not fit the base model:\n  - "
                           + "\n  - ".join(problems))
    layers = {}
    for module, parts in modules.items():
        r = parts["A"].shape[0]
        alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
        layers[module] = _row_weights(name, module, parts, config.scaling_for(r, alpha), dtype)
    return PreparedAdapter(name=name, path=str(path), config=config, layers=layers)


def _row_weights(name: str, module: str, parts: dict[str, torch.Tensor], scaling: float,
                 dtype: torch.dtype) -> RowAdapterWeights:
    """One layer's weights in `update_dtype(dtype)`; refuse what the serving dtype cannot hold."""
    limit = torch.finfo(dtype).max
    if not math.isfinite(scaling) or abs(scaling) > limit:
        raise AdapterError(f"adapter {name!r}: layer {module!r} has scaling {scaling:.3g} (lora_alpha / r), "
                           f"beyond what {dtype} holds (largest {limit:.3g}); lower lora_alpha")
    a, b = parts["A"].to(update_dtype(dtype)), parts["B"].to(update_dtype(dtype))
    for part, t in (("A", a), ("B", b)):
        if not bool(torch.isfinite(t.to(dtype)).all()):
            raise AdapterError(f"adapter {name!r}: tensor {PREFIX}{module}.lora_{part}.weight overflows "
                               f"{dtype} (values beyond its range); serve it in a wider dtype")
    return RowAdapterWeights(a, b, scaling)


def update_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter weights are served in: float32 under a narrower float base (as PEFT keeps them)."""
    return torch.promote_types(dtype, torch.float32)


def _read(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read the adapter with the library's strict reader (safetensors only), then the serving rules."""
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    config, tensors = read_adapter(str(path), safetensors_only=True)
    refused = []
    if config.use_dora:
        refused.append("use_dora=true (DoRA adapters cannot share a batch; merge them instead)")
    if config.modules_to_save:
        refused.append(f"modules_to_save={config.modules_to_save!r} (serving shares one base model)")
    if config.bias != "none":
        refused.append(f"bias={config.bias!r} (trained biases change the shared base layers)")
    if config.rewrites_base:
        refused.append(f"init_lora_weights={config.init_lora_weights!r} (its factors belong to a "
                       "rewritten base; merge it with "
                       "`loratune merge` and serve the result)")
    if refused:
        raise UnsupportedFeatureError(f"{path / CONFIG_NAME}: the server cannot serve " + "; ".join(refused))
    check_finite(tensors, source=str(path / SAFETENSORS_NAME))
    return config, tensors


def _group_by_module(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.fullmatch(key.removeprefix(PREFIX))
        if not key.startswith(PREFIX) or m is None:
            what = ("DoRA magnitude" if "lora_magnitude_vector" in key else
                    "embedding LoRA" if "lora_embedding" in key else
                    "a full module copy (modules_to_save)" if "modules_to_save" in key else
                    "a bias" if key.endswith(".bias") else "not a LoRA A/B weight")
            raise UnsupportedFeatureError(f"{path / 'adapter_model.safetensors'}: tensor {key} is {what}; "
                                          "the server serves plain LoRA on linear layers only")
        modules.setdefault(m["module"], {})[m["part"]] = tensor
    return modules


def _targeted(config: LoraConfig, shapes: dict[str, tuple[int, int]]) -> set[str] | None:
    """The base's linear layers that the config's target_modules selects (None when undecidable)."""
    targets = config.target_modules
    if targets is None:
        return None
    if targets == ALL_LINEAR:
        return {n for n in shapes if not n.endswith("lm_head")}
    chosen = {n for n in shapes if matches(targets, n) and not matches(config.exclude_modules, n)}
    layers = config.layers_to_transform
    if layers is not None:
        wanted = {layers} if isinstance(layers, int) else set(layers)
        chosen = {n for n in chosen if layer_index(n, config.layers_pattern) in wanted}
    return chosen
