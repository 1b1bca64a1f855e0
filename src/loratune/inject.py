"""Resolve `target_modules` to real module names and inject LoRA layers into a model.

Matching follows PEFT exactly, so a config means the same thing in both libraries:
- a string is a regex that must match the whole module name (`re.fullmatch`);
- a list matches a module whose name equals an entry or ends with "." + entry;
- "all-linear" means every Linear/Conv1D except the output head, expanded to the set of their
  last name components (what PEFT writes into the saved config);
- None means the architecture's defaults (DEFAULT_TARGET_MODULES, keyed by `config.model_type`).
Unlike PEFT, every list entry must match something: a typo raises with names that look close.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import replace

from torch import nn

from . import module_patterns
from .config import LoraConfig, TaskType
from .errors import ConfigError, TargetNotFoundError
from .layers import LoraLayer, LoraLinear, ModulesToSave, build_lora_layer, inside_wrapper, is_linear_like
from .memory import check_fits

ALL_LINEAR = "all-linear"

# PEFT's per-architecture defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "stablelm": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "t5": ["q", "v"],
}
# The head names PEFT (0.22 on) adds to modules_to_save for classification tasks; `pre_classifier`
# is the randomly initialised first layer of DistilBERT-style heads.
SEQ_CLS_HEADS = ("classifier", "score", "pre_classifier")


def module_names(model: nn.Module) -> list[str]:
    """The model's own module paths, as target_modules and modules_to_save entries are matched
    against: the root and the insides of LoRA / modules_to_save wrappers left out."""
    return [n for n, _ in model.named_modules() if n and not inside_wrapper(n)]


def matches(patterns: list[str] | str | None, name: str) -> bool:
    """PEFT's matching rule for target_modules / exclude_modules / modules_to_save entries."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return module_patterns.fullmatch(patterns, name)
    return any(name == p or name.endswith("." + p) for p in patterns)


def saved_in_full(entries: list[str] | None, name: str) -> bool:
    """PEFT's modules_to_save rule (0.22 on): the module path is an entry or ends with "." + entry.

    PEFT up to 0.21 took any plain-text suffix ("norm" also selected every input_layernorm); the
    files it wrote that way load through `legacy_saved_modules`.
    """
    return bool(entries) and matches(list(entries), name)


def under_saved(entries: list[str] | None, name: str) -> bool:
    """PEFT's rule for keeping LoRA off a module trained in full: the module, or one of the modules
    that contain it, is selected by a modules_to_save entry."""
    return bool(entries) and any(re.match(rf"(^|.*\.){re.escape(e)}($|\..*)", name) for e in entries)


def legacy_saved_modules(names: list[str], entries: list[str] | None, has_copy) -> list[str]:
    """The modules an adapter written by PEFT up to 0.21 saved in full beyond today's rule.

    Those versions matched modules_to_save entries as plain suffixes. The modules selected only that
    way, and whose copy the file holds (`has_copy(name)`), are returned as full paths: listed in
    modules_to_save, they load the same under every PEFT version.
    """
    if not entries:
        return []
    return [n for n in names if any(n.endswith(e) for e in entries)
            and not saved_in_full(entries, n) and has_copy(n)]


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index that follows the layer-list name in a module path (model.layers.3.mlp -> 3).

    PEFT's rule: without layers_pattern, the first numbered segment of the path
    (model.decoder_blocks.1.0 -> 1, layers.1.experts.0.w1 -> 1); with it, the first index after one
    of the given list names.
    """
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    for pattern in patterns:
        found = module_patterns.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def pattern_value(patterns: dict, name: str, default):
    """Look up a rank/alpha override as PEFT does: the first key, in the dict's order, that matches
    the end of the name as a regex (an exact module path is such a regex too)."""
    for key, value in patterns.items():
        if module_patterns.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def output_head_names(model: nn.Module) -> set[str]:
    """Names of modules that produce the logits (never part of "all-linear")."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if module is head or name.split(".")[-1] in ("lm_head", "embed_out"):
            names.add(name)
    return names


def expand_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    """Turn None / "all-linear" into explicit names; other values are returned unchanged."""
    target = config.target_modules
    if isinstance(target, str) and target.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        return sorted({
            name.split(".")[-1] for name, module in model.named_modules()
            if (is_linear_like(module) or isinstance(module, LoraLinear))
            and name not in heads and not inside_wrapper(name)
        })
    if target is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ConfigError(
                f"target_modules is None and there are no default targets for model_type {model_type!r}; "
                f"pass target_modules (e.g. 'all-linear' or a list of module names)"
            )
        return list(DEFAULT_TARGET_MODULES[model_type])
    return target


def resolve_config(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """Return a validated copy of `config` with explicit target_modules (the user's is untouched)."""
    modules_to_save = list(config.modules_to_save or [])
    if config.task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        # PEFT saves every head name it knows (SEQ_CLS_HEADS) for these tasks; keep the
        # ones this model has, so its files load, and add them when the user did not list them.
        names = {n.split(".")[-1] for n, _ in model.named_modules()}
        modules_to_save = [m for m in modules_to_save if m not in SEQ_CLS_HEADS or m in names]
        modules_to_save += [h for h in SEQ_CLS_HEADS if h in names and h not in modules_to_save]
    modules_to_save = modules_to_save or None
    return replace(config, target_modules=expand_target_modules(model, config),
                   modules_to_save=modules_to_save)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules `config` adapts (config.target_modules must be resolved).

    Raises:
        TargetNotFoundError: an entry (or the regex) matches no module; close names are listed.
    """
    names = module_names(model)
    target = config.target_modules
    # A module trained in full (modules_to_save) is not also given LoRA, as in PEFT.
    matched = [n for n in names if matches(target, n) and not matches(config.exclude_modules, n)
               and not under_saved(config.modules_to_save, n)]
    if not isinstance(target, str) and not target:
        raise TargetNotFoundError("target_modules is an empty list: name the modules to adapt, or leave it "
                                  "unset for the architecture's defaults")
    if isinstance(target, str) and not any(matches(target, n) for n in names):
        raise TargetNotFoundError(_regex_not_found_message(target, names))
    for entry in [] if isinstance(target, str) else target:
        if not any(matches([entry], n) for n in names):
            raise TargetNotFoundError(_not_found_message(entry, names))
    if config.layers_to_transform is not None:
        wanted = config.layers_to_transform
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        matched = [n for n in matched if layer_index(n, config.layers_pattern) in wanted]
    if not matched:
        raise TargetNotFoundError(
            f"target_modules {target!r} matched modules, "
            "but exclude_modules/layers_to_transform removed them all"
        )
    return matched


def _not_found_message(entry: str, names: list[str]) -> str:
    return f"no module matches target_modules entry {entry!r}; {_close_names(entry, names)}"


def _regex_not_found_message(pattern: str, names: list[str]) -> str:
    """Explain PEFT's rule that a single string is a full-match regex on the module path."""
    try:
        partial = [n for n in names if module_patterns.search(pattern, n)]
    except ConfigError:  # too slow or not a valid regex: the hint is optional
        partial = []
    example = f" (it matches only part of paths such as {partial[0]!r})" if partial else ""
    hint = ""
    if re.escape(pattern) == pattern:  # a plain name, most likely meant as a module name
        hint = (f"; to target modules by name, pass a list (target_modules: [\"{pattern}\"]) "
                f"or a regex like '.*{pattern}'")
    return (f"no module matches target_modules {pattern!r}: a single string is a regex that must match "
            f"the whole module path, as in PEFT{example}{hint}; {_close_names(pattern, names)}")


def _close_names(entry: str, names: list[str]) -> str:
    suffixes = sorted({n.split(".")[-1] for n in names})
    close = difflib.get_close_matches(entry, suffixes, n=5, cutoff=0.5)
    close += [n for n in difflib.get_close_matches(entry, names, n=3, cutoff=0.5) if n not in close]
    hint = ", ".join(repr(c) for c in close) if close else ", ".join(repr(s) for s in suffixes[:12])
    label = "modules that look close" if close else "some module names"
    return f"{label}: {hint}"


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    """Wrap every target of `config` (resolved) with a LoRA layer holding `adapter_name`.

    Layers already wrapped by another adapter get the new adapter added beside the old one.
    Returns the adapted module names.
    """
    with module_patterns.match_budget():
        return _inject(model, config, adapter_name)


def _inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> list[str]:
    targets = find_targets(model, config)
    count = lora_parameter_count(model, config, targets)
    check_fits(count * 4, _device_of(model), f"adapter {adapter_name!r} ({count:,} LoRA parameters in fp32)",
               "lower r (or rank_pattern) or target fewer modules")
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = build_lora_layer(module, name)
            set_submodule(model, name, module)
        module.update_layer(
            adapter_name,
            r=pattern_value(config.rank_pattern, name, config.r),
            lora_alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
        )
    for name in find_modules_to_save(model, config):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_submodule(model, name, module)
        module.update_layer(adapter_name)
    return targets


def lora_parameter_count(model: nn.Module, config: LoraConfig, targets: list[str]) -> int:
    """How many parameters LoRA adds on these targets: r * (in + out) per layer (A and B)."""
    total = 0
    for name in targets:
        module = model.get_submodule(name)
        r = pattern_value(config.rank_pattern, name, config.r)
        base = getattr(module, "base_layer", module)
        if hasattr(base, "in_features") and hasattr(base, "out_features"):
            fan_in, fan_out = int(base.in_features), int(base.out_features)
        elif getattr(base, "weight", None) is not None and base.weight.dim() >= 2:
            shape = base.weight.shape  # Linear/Embedding (out, in), Conv1D (in, out), Conv (out, in, k...)
            fan_in, fan_out = base.weight[0].numel(), shape[0]
        else:
            continue
        total += r * (fan_in + fan_out)
    return total


def _device_of(model: nn.Module):
    param = next(model.parameters(), None)
    return param.device if param is not None else "cpu"


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules trained in full for this adapter."""
    if not config.modules_to_save:
        return []
    names = module_names(model)
    found = [n for n in names if saved_in_full(config.modules_to_save, n)]
    missing = [e for e in config.modules_to_save if not any(saved_in_full([e], n) for n in found)]
    if missing:
        message = _not_found_message(missing[0], names)
        raise TargetNotFoundError(message.replace("target_modules", "modules_to_save"))
    return found


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted path `name` of `model` (the counterpart of `get_submodule`)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
