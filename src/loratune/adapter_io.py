"""Adapters on disk, in PEFT's exact format.

A directory holds `adapter_config.json`, `adapter_model.safetensors` and a short README.md
model card. Tensor keys are the wrapped model's parameter paths under `base_model.model.`, with
the adapter name removed: `...q_proj.lora_A.weight`, `...embed_tokens.lora_embedding_A`,
`...q_proj.lora_magnitude_vector` (DoRA), `...lm_head.weight` (modules_to_save) and biases
(`bias="all"|"lora_only"`). A non-default adapter name saves into a sub-folder of that name.

Loading is strict: the file's keys must equal the keys the model expects for that config, both
ways, with matching shapes; every discrepancy is named. `adapter_model.bin` is read only with
`torch.load(weights_only=True)`; writing is safetensors only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .adapter_files import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME, resolve_adapter_file
from .atomic import atomic_directory, nearest_existing
from .base_layers import is_quantized
from .config import LoraConfig
from .errors import AdapterError, ConfigError
from .inject import legacy_saved_modules, matches, module_names, pattern_value
from .layers import LoraLayer, LoraLinear, ModulesToSave, owned_by_adapter
from .module_patterns import first_few, match_budget, shown

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."  # every tensor key of PEFT's format starts with it
_DORA_SUFFIX = "lora_magnitude_vector.weight"
# PEFT also saves the full base weight of adapted embedding layers (vocabulary may be resized);
# such a file is valid, so these keys are accepted (and loaded) when present, never required.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")


def adapter_param_map(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, nn.Parameter]:
    """Map each PEFT file key of one adapter to the live parameter it loads into / saves from.

    `model` is the wrapped (injected) model, i.e. `LoraModel.model`.
    """
    out: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            for key, param in module.adapter_parameters(adapter_name).items():
                if key.endswith(_DORA_SUFFIX):
                    key = key[: -len(".weight")]
                out[f"{PREFIX}{path}.{key}"] = param
            if bias == "lora_only" and isinstance(module, LoraLayer):
                b = getattr(module.base_layer, "bias", None)
                if isinstance(b, nn.Parameter) and module.adapter_parameters(adapter_name):
                    out[f"{PREFIX}{path}.base_layer.bias"] = b
    if bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and not owned_by_adapter(name):
                out[f"{PREFIX}{name}"] = param
    return out


def adapter_state_dict(model: nn.Module, adapter_name: str, bias: str = "none") -> dict[str, Tensor]:
    """Return one adapter's tensors in PEFT's key layout (contiguous CPU copies)."""
    return {
        key: param.detach().to("cpu", copy=True).contiguous()
        for key, param in adapter_param_map(model, adapter_name, bias).items()
    }


# ----- writing ------------------------------------------------------------------------------------


def save_adapter(directory: str, config: LoraConfig, tensors: dict[str, Tensor]) -> None:
    """Write an adapter directory atomically: config, safetensors weights and a model card.

    Raises:
        ConfigError: `directory` (or a folder above it) is an existing file; nothing is written.
    """
    _check_directory_target(directory)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_directory(directory, size_hint=size) as tmp:
        save_file(tensors, os.path.join(tmp, SAFETENSORS_NAME), metadata={"format": "pt"})
        config.save_json(os.path.join(tmp, CONFIG_NAME))
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as fh:
            fh.write(model_card(config, tensors))


def _check_directory_target(directory: str) -> None:
    """Refuse a save into a path that is a file, or under one, before anything is written."""
    path = nearest_existing(directory)
    if not os.path.isdir(path):
        where = "is" if path == os.path.abspath(os.fspath(directory)) else f"is under {path}, which is"
        raise ConfigError(f"cannot save an adapter to {os.fspath(directory)}: it {where} a file, not a "
                          "directory; choose another save_directory")


def model_card(config: LoraConfig, tensors: dict[str, Tensor]) -> str:
    """A short README.md for the hub: what this adapter is and how to load it."""
    base = config.base_model_name_or_path or "unknown"
    n_params = sum(t.numel() for t in tensors.values())
    targets = config.target_modules
    targets = targets if isinstance(targets, str) else ", ".join(targets or [])
    return (
        "---\n"
        f"base_model: {base}\n"
        "library_name: peft\n"
        "tags:\n- lora\n- loratune\n"
        "---\n\n"
        "# LoRA adapter\n\n"
        f"A LoRA adapter for `{base}` (r={config.r}, lora_alpha={config.lora_alpha}, "
        f"{n_params:,} parameters) on: {targets}.\n\n"
        "Saved in PEFT's format; load it with either library:\n\n"
        "```python\n"
        "from loratune import PeftModel  # or: from peft import PeftModel\n"
        "model = PeftModel.from_pretrained(base_model, \"path/to/this/adapter\")\n"
        "```\n"
    )


# ----- reading ------------------------------------------------------------------------------------


def read_adapter(path: str, *, subfolder: str | None = None, revision: str | None = None,
                 safetensors_only: bool = False) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read and validate an adapter directory: (config, tensors keyed as in the file).

    Raises:
        AdapterError: missing/corrupt files or keys outside PEFT's `base_model.model.` layout.
        UnsupportedFeatureError: the config switches on a feature loratune does not support.
    """
    config = LoraConfig.from_pretrained(path, subfolder=subfolder, revision=revision)
    weights = resolve_adapter_file(path, SAFETENSORS_NAME, subfolder=subfolder, revision=revision)
    if weights is not None:
        try:
            tensors = load_file(weights)
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterError(f"{weights}: not a readable safetensors file ({err})") from None
    else:
        bin_file = None if safetensors_only else resolve_adapter_file(path, BIN_NAME, subfolder=subfolder,
                                                                      revision=revision)
        if bin_file is None:
            has_bin = os.path.isfile(os.path.join(path, subfolder or "", BIN_NAME))
            only = (f" (only safetensors is accepted here; {BIN_NAME} is not)"
                    if safetensors_only and has_bin else "")
            raise AdapterError(f"{path}: no {SAFETENSORS_NAME}{only}")
        try:
            tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise AdapterError(f"{bin_file}: cannot be read safely with torch.load(weights_only=True): "
                               f"{err}") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                    for k, v in tensors.items()):
            raise AdapterError(f"{bin_file}: expected a dict of tensors keyed by name")
    source = weights or bin_file
    _check_dtypes(tensors, source=source)
    return config, _normalise_keys(tensors, source=source)


def _check_dtypes(tensors: dict[str, Tensor], *, source: str) -> None:
    """Refuse integer, bool and complex tensors: LoRA weights are real floating point, and casting an
    int8 or bool tensor into float32 would load numbers nobody trained (float64 and float8 are cast)."""
    bad = [f"{k} ({str(t.dtype).removeprefix('torch.')})" for k, t in tensors.items()
           if not t.is_floating_point()]
    if bad:
        raise AdapterError(f"{source}: {len(bad)} tensor(s) are not floating point: {first_few(bad, 3)}; "
                           "adapter weights are float32, float16 or bfloat16")


# the tensors whose rank dimension is dim 0 (A) or dim 1 (B)
_RANK_DIM = {".lora_A.weight": 0, ".lora_embedding_A": 0, ".lora_B.weight": 1, ".lora_embedding_B": 1}


def check_ranks(config: LoraConfig, tensors: dict[str, Tensor], *, source: str) -> None:
    """Check every LoRA tensor's rank dimension against the config's r, before anything is allocated.

    A config saying r=1000000000 over small tensors must fail here, not after injecting a terabyte
    of zeros for the load to overwrite.

    Raises:
        AdapterError: naming the first tensors whose shape disagrees with the config.
    """
    wrong = []
    with match_budget():
        for key, tensor in tensors.items():
            suffix = next((s for s in _RANK_DIM if key.endswith(s)), None)
            if suffix is None:
                continue
            module = key[len(PREFIX): -len(suffix)]
            r = pattern_value(config.rank_pattern, module, config.r)
            dim = _RANK_DIM[suffix]
            if tensor.dim() <= dim:
                continue  # no rank dimension at all: the full shape check names it
            if tensor.shape[dim] != r:
                want = list(tensor.shape)
                want[dim] = r
                wrong.append(f"{key} has shape {tuple(tensor.shape)}, expected {tuple(want)} "
                             f"(adapter_config.json gives this layer r={shown(r)})")
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise AdapterError(f"{source}: {len(wrong)} tensor(s) of the wrong shape for the config's rank: "
                           + "; ".join(wrong[:3]) + more)


def _normalise_keys(tensors: dict[str, Tensor], *, source: str) -> dict[str, Tensor]:
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterError(f"{source}: tensor keys must start with {PREFIX!r} (PEFT layout); "
                           f"got e.g. {bad[0]!r}")
    # Older PEFT files store DoRA magnitudes with a trailing ".weight"; accept both spellings.
    return {(k[: -len(".weight")] if k.endswith(_DORA_SUFFIX) else k): v for k, v in tensors.items()}


def load_adapter_tensors(model: nn.Module, adapter_name: str, bias: str, tensors: dict[str, Tensor],
                         *, source: str, trained_on: str | None = None) -> None:
    """Copy file tensors into the injected adapter, checking key sets both ways and every shape.

    Raises:
        AdapterError: naming missing, unexpected and misshapen tensors (nothing is copied then).
    """
    expected = adapter_param_map(model, adapter_name, bias)
    missing = sorted(set(expected) - set(tensors))
    optional = _embedding_base_weights(model) | _saved_copy_aliases(model, adapter_name)
    expected.update({k: v for k, v in optional.items() if k in tensors})
    unexpected = sorted(set(tensors) - set(expected))
    misshapen = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors)) if tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
        if items:
            more = f"\n    ... and {len(items) - 8} more" if len(items) > 8 else ""
            shown = "\n    ".join(items[:8]) + more
            problems.append(f"{len(items)} {label} tensor(s):\n    {shown}")
    if problems:
        if misshapen:  # the usual cause: another base than the one it was trained on
            here = getattr(getattr(model, "config", None), "name_or_path", None) or "this model"
            if trained_on and trained_on != here:
                problems.append(f"(trained on {trained_on!r}, loaded on {here!r}: load it on its own base)")
            else:
                problems.append("(was the adapter trained on another base model?)")
        raise AdapterError(f"{source}: adapter does not fit the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.dtype))


def load_adapter_weights(model: nn.Module, adapter_name: str, config: LoraConfig, tensors: dict[str, Tensor],
                         *, source: str) -> None:
    """Load saved tensors into an adapter injected with plain init, then redo a base-rewriting init.

    A PiSSA or OLoRA adapter's factors belong to the residual base W - scaling * B0 @ A0 that its
    init made. As in PEFT, that init runs again once the file has fit (rewriting the base), and
    the saved factors go back over the ones it set, so the loaded model is the trained one.

    Raises:
        AdapterError: the tensors do not fit (see `load_adapter_tensors`), or a base-rewriting init
            meets a quantized base.
    """
    load_adapter_tensors(model, adapter_name, config.bias, tensors, source=source,
                         trained_on=config.base_model_name_or_path)
    if not config.rewrites_base:
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and adapter_name in m.r]
    if any(is_quantized(m.base_layer) for m in layers):  # before any base is rewritten
        raise AdapterError(f"{source}: init_lora_weights={config.init_lora_weights!r} adapters need an "
                           "unquantized base (their init rewrites the base weights)")
    for layer in layers:
        factors = (layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight)
        saved = [t.detach().clone() for t in factors]
        if _draws_at_init(config):
            _redraw_creation(factors)
        layer.reset_lora_parameters(adapter_name, config.init_lora_weights)  # rewrites W into the residual
        with torch.no_grad():
            for t, value in zip(factors, saved):
                t.copy_(value)


def _draws_at_init(config: LoraConfig) -> bool:
    """pissa_niter_N: the init's low-rank SVD starts from a random sketch (torch.svd_lowrank)."""
    return str(config.init_lora_weights).startswith("pissa_niter_")


@contextlib.contextmanager
def generator_kept(config: LoraConfig) -> Iterator[None]:
    """Inject an adapter being loaded without moving torch's random generators, when its init draws.

    Creating a pissa_niter_N adapter draws A and B (nn.Linear's init), then the SVD sketch, layer
    by layer, as PEFT does. `load_adapter_weights` draws the same, in the same order, from the
    generator state the load started from: loaded from the state the adapter was created in (a
    seeded run), the sketch and so the residual base are the trained ones, as in PEFT.
    """
    with torch.random.fork_rng() if _draws_at_init(config) else contextlib.nullcontext():
        yield


def _redraw_creation(factors: tuple[Tensor, Tensor]) -> None:
    """Draw what creating A and B draws (nn.Linear's kaiming init), leaving them unchanged."""
    for weight in factors:
        nn.init.kaiming_uniform_(torch.empty_like(weight), a=math.sqrt(5))


def with_legacy_saves(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor]) -> LoraConfig:
    """`config` with the modules a file from PEFT up to 0.21 saved in full listed by their full path.

    Those versions read a modules_to_save entry as a plain suffix ("norm" also took every
    input_layernorm); the file then holds those copies, which today's rule would call unexpected.
    """
    entries = config.modules_to_save
    if not entries:
        return config
    names = module_names(model)

    def has_copy(name: str) -> bool:
        return any(f"{PREFIX}{name}.{p}" in tensors for p, _ in model.get_submodule(name).named_parameters())

    extra = legacy_saved_modules(names, entries, has_copy)
    if not extra:
        return config
    logger.info("the adapter saves %d module(s) in full under PEFT's older suffix rule for modules_to_save "
                "(%s); listing them by full path", len(extra), shown(extra))
    return replace(config, modules_to_save=list(entries) + extra)


def without_unmatched_targets(model: nn.Module, config: LoraConfig, source: str) -> LoraConfig:
    """`config` without the target_modules entries that name no module of `model`, with a warning.

    PEFT loads such a file (a list written for several architectures, say, with "c_attn" beside
    "q_proj"): it adapts what matches, and the file's tensors are what was trained. The strict rule
    for a config one writes (every entry must match) stays for `get_peft_model` and `add_adapter`.
    """
    target = config.target_modules
    if isinstance(target, str) or not target:
        return config
    names = module_names(model)
    kept = [entry for entry in target if any(matches([entry], n) for n in names)]
    if not kept or len(kept) == len(target):
        return config  # nothing matches: the strict check names the entries and close names
    missing = [entry for entry in target if entry not in kept]
    logger.warning("%s: target_modules %s match no module of this model; the adapter is loaded on %s",
                   source, shown(missing), shown(kept))
    return replace(config, target_modules=kept)


def _saved_copy_aliases(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """PEFT with bias="all" also saves a modules_to_save copy's bias as `<module>.modules_to_save.bias`."""
    return {
        f"{PREFIX}{path}.modules_to_save.{key}": param
        for path, module in model.named_modules() if isinstance(module, ModulesToSave)
        for key, param in module.adapter_parameters(adapter_name).items()
    }


def _embedding_base_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        f"{PREFIX}{path}.base_layer.weight": module.base_layer.weight
        for path, module in model.named_modules()
        if isinstance(module, LoraLayer) and path.split(".")[-1] in EMBEDDING_LAYER_NAMES
    }


def nonfinite_keys(tensors: dict[str, Tensor]) -> list[str]:
    """The keys of the floating-point tensors that hold a NaN or an Inf, sorted."""
    def finite(t: Tensor) -> bool:
        if t.dtype.itemsize == 1:  # float8: torch has no isfinite for it
            t = t.float()
        return bool(torch.isfinite(t).all())

    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not finite(t))


def check_finite(tensors: dict[str, Tensor], *, source: str) -> None:
    """Refuse adapter weights holding NaN/Inf: every output would be NaN (a diverged run saved them).

    Raises:
        AdapterError: naming the adapter and the first tensors at fault.
    """
    bad = nonfinite_keys(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise AdapterError(f"{source}: {len(bad)} of {len(tensors)} adapter tensor(s) hold NaN or Inf values "
                           f"({shown}); the run that saved it diverged: retrain, "
                           "or use an earlier checkpoint")
