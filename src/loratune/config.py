"""`LoraConfig` and `TaskType`: PEFT's field names and defaults for every feature loratune supports.

The user's config object is never mutated: `get_peft_model` validates it and keeps its own copy,
with `target_modules` resolved (e.g. "all-linear" expanded to real module names).
`to_dict()` / `from_dict()` speak PEFT's `adapter_config.json`: a config written by a newer PEFT
loads with a warning for unknown fields, and one that switches on a feature we cannot honour is
refused by name. PEFT's fields for such features are real fields at PEFT's defaults (so PEFT code
that passes them runs unchanged), marked `peft_only` in their metadata and never written.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .adapter_files import CONFIG_NAME, read_json_file, resolve_adapter_file
from .errors import AdapterError, ConfigError, UnsupportedFeatureError
from .module_patterns import pattern_problem, shown

logger = logging.getLogger(__name__)

INIT_METHODS = (True, False, "gaussian", "pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")
_FLAGS = ("fan_in_fan_out", "use_rslora", "use_dora", "inference_mode")  # true/false in the JSON
_FLOAT32_MAX = 3.4028234663852886e38  # LoRA weights are float32 (or narrower) when scaling applies


class TaskType(str, enum.Enum):
    """The model head an adapter is trained for (PEFT's names)."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    def __str__(self) -> str:
        return self.value


def _help(text: str, **extra) -> dict[str, Any]:
    return {"help": text, **extra}


def _peft_only(default: Any, text: str, *, also_off: tuple[Any, ...] = ()) -> Any:
    """A PEFT field loratune does not implement: taken at PEFT's default (or an equivalent "off"
    value), refused by name otherwise (`problems`); never written to adapter_config.json."""
    off = ({} if default is dict else default, *also_off)
    if default is dict:
        return field(default_factory=dict, repr=False, metadata=_help(text, peft_only="refused", off=off))
    return field(default=default, repr=False, metadata=_help(text, peft_only="refused", off=off))


def _inert(default: Any, text: str) -> Any:
    """A PEFT field that carries no behaviour here: any value is accepted, and none is written."""
    return field(default=default, repr=False, compare=False, metadata=_help(text, peft_only="ignored"))


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The factor applied to B @ A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _regex_problems(what: str, pattern: object) -> list[str]:
    problem = pattern_problem(what, pattern)
    if problem:
        return [problem]
    try:
        re.compile(pattern)
    except re.error as exc:
        return [f"{what} is not a valid regular expression: {exc}"]
    return []


def _alpha_problem(what: str, alpha: object, ranks: list[int], use_rslora: bool) -> str | None:
    """A lora_alpha must be finite, and alpha / r (or / sqrt(r)) must fit float32 for every rank."""
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return f"{what} must be a number, got {shown(alpha)}"
    try:
        finite = math.isfinite(alpha)
    except OverflowError:  # an int beyond any float
        finite = False
    if not finite:
        return f"{what} must be a finite number, got {shown(alpha)}"
    for r in ranks:
        scaling = lora_scaling(r, alpha, use_rslora)
        if not abs(scaling) <= _FLOAT32_MAX:
            return (f"{what}={shown(alpha)} gives scaling {scaling:.3g} at r={r}, which overflows float32 "
                    f"(largest {_FLOAT32_MAX:.3g}); typical values are r to 2*r")
    return None


def _module_spec_problems(name: str, spec: object) -> list[str]:
    """target_modules / exclude_modules: None, a regex string, or a list of module names."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return _regex_problems(name, spec)
    if not isinstance(spec, (list, tuple, set)):
        return [f"{name} must be a list of module names or a regex string, got {spec!r}"]
    bad = [m for m in spec if not isinstance(m, str)]
    return [f"{name} entries must be strings, got {bad!r}"] if bad else []


def _modules_to_save_problems(spec: object) -> list[str]:
    """modules_to_save: None or a list of module names (a single name was made a list of one)."""
    if spec is None:
        return []
    if not isinstance(spec, (list, tuple, set)):
        return [f"modules_to_save must be a list of module names, got {shown(spec)}"]
    bad = [m for m in spec if not isinstance(m, str) or not m.strip(".")]
    return [f"modules_to_save entries must be module names, got {shown(bad)}"] if bad else []


def _layer_selection_problems(layers: object, pattern: object) -> list[str]:
    """layers_to_transform: None, a layer index or a list of them; layers_pattern: None, a name or a
    list of names."""
    out = []
    indices = layers if isinstance(layers, (list, tuple)) else [layers]
    if layers is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in indices):
        out.append(f"layers_to_transform must be a layer index or a list of them, got {shown(layers)}")
    names = pattern if isinstance(pattern, (list, tuple)) else [pattern]
    if pattern is not None and not all(isinstance(v, str) for v in names):
        out.append(f"layers_pattern must be a layer-list name or a list of them, got {shown(pattern)}")
    return out


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter; field names, meanings and defaults are PEFT's.

    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora. Each field's help text is in
    its metadata (`dataclasses.fields(LoraConfig)`). PEFT's fields for features loratune does not
    implement are declared too (`peft_only` in their metadata), so PEFT code that passes them at
    their defaults runs unchanged; any other value is refused by name.
    """

    r: int = field(default=8, metadata=_help("rank of the update (the inner dimension R of B @ A)"))
    lora_alpha: float = field(default=8, metadata=_help("numerator of the scaling factor"))
    lora_dropout: float = field(
        default=0.0, metadata=_help("dropout applied to the layer input on the LoRA branch only"))
    target_modules: list[str] | str | None = field(default=None, metadata=_help(
        'module names or dotted suffixes, a full-match regex string, "all-linear", or None for the '
        "architecture's defaults"))
    exclude_modules: list[str] | str | None = field(
        default=None, metadata=_help("names/suffixes or a full-match regex of modules never adapted"))
    bias: str = field(default="none", metadata=_help(
        'which biases train and are saved: "none", "all" or "lora_only" (biases of adapted layers)'))
    fan_in_fan_out: bool = field(default=False, metadata=_help(
        "the base stores weights as (in, out) (GPT-2's Conv1D); detected automatically"))
    modules_to_save: list[str] | None = field(default=None, metadata=_help(
        "extra modules (e.g. a classifier head) trained in full and saved with the adapter"))
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata=_help("only adapt these layer indices"))
    layers_pattern: list[str] | str | None = field(default=None, metadata=_help(
        'name of the layer list (e.g. "layers", "h") that layers_to_transform indexes'))
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata=_help("per-module rank overrides: {name or regex suffix: r}"))
    alpha_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata=_help("per-module lora_alpha overrides: {name or regex suffix: alpha}"))
    init_lora_weights: bool | str = field(default=True, metadata=_help(
        'True (A kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r)), False (random B; tests), '
        '"pissa" / "pissa_niter_N" (principal singular vectors) or "olora" (QR); the last two rewrite '
        "the base weights"))
    use_rslora: bool = field(default=False, metadata=_help("rank-stabilised scaling lora_alpha / sqrt(r)"))
    use_dora: bool = field(default=False, metadata=_help(
        "weight-decomposed LoRA (magnitude vector per output row); Linear layers only"))
    task_type: TaskType | str | None = field(
        default=None, metadata=_help("the model head: CAUSAL_LM, SEQ_CLS, ..."))
    base_model_name_or_path: str | None = field(
        default=None, metadata=_help("where the base model comes from; filled in when saving"))
    revision: str | None = field(default=None, metadata=_help("revision of the base model"))
    inference_mode: bool = field(
        default=False, metadata=_help("adapter weights are frozen (loaded for inference)"))
    peft_type: str = field(default="LORA", metadata=_help('always "LORA"'))

    # ----- PEFT's fields for features loratune does not implement: refused unless off -----------
    loftq_config: dict = _peft_only(dict, "LoftQ initialisation of a quantized base", also_off=(None,))
    megatron_config: dict | None = _peft_only(None, "Megatron-LM parallel linear layers")
    trainable_token_indices: list[int] | dict | None = _peft_only(
        None, "training only some embedding rows", also_off=([], {}))
    eva_config: dict | None = _peft_only(None, "EVA initialisation")
    corda_config: dict | None = _peft_only(None, "CorDA initialisation")
    astra_config: dict | None = _peft_only(None, "Astra initialisation")
    lora_ga_config: dict | None = _peft_only(None, "LoRA-GA initialisation")
    velora_config: dict | None = _peft_only(None, "VeLoRA")
    alora_invocation_tokens: list[int] | None = _peft_only(None, "activated LoRA (aLoRA)", also_off=([],))
    use_qalora: bool = _peft_only(False, "QA-LoRA", also_off=(None,))
    monteclora_config: dict | None = _peft_only(None, "MonteCLoRA")
    layer_replication: list | None = _peft_only(None, "replicating base layers", also_off=([],))
    lora_bias: bool = _peft_only(False, "a trainable bias on lora_B", also_off=(None,))
    target_parameters: list[str] | None = _peft_only(None, "LoRA on bare parameters", also_off=([],))
    use_bdlora: bool | None = _peft_only(None, "BD-LoRA", also_off=(False,))
    arrow_config: dict | None = _peft_only(None, "Arrow routing between adapters")
    kasa_config: dict | None = _peft_only(None, "KaSA")
    ensure_weight_tying: bool = _peft_only(False, "keeping tied weights tied in adapters", also_off=(None,))

    # ----- PEFT's fields that carry no behaviour here: any value accepted, none written ----------
    auto_mapping: dict | None = _inert(None, "PEFT's auto-class bookkeeping")
    peft_version: str | None = _inert(None, "the PEFT version that wrote the file")
    megatron_core: str | None = _inert("megatron.core",
                                       "module for megatron_config (unused while that is off)")
    qalora_group_size: int = _inert(16, "group size for use_qalora (unused while that is off)")
    runtime_config: Any = _inert(None,
                                 "PEFT's runtime options (ephemeral_gpu_offload); not saved by PEFT either")
    use_dora_on_embeddings: bool | None = _inert(None, "DoRA on embeddings (refused by the layer itself)")

    @property
    def rewrites_base(self) -> bool:
        """PiSSA and OLoRA: the init derives A and B from the base weight and rewrites it."""
        init = self.init_lora_weights
        return isinstance(init, str) and (init.startswith("pissa") or init == "olora")

    def __post_init__(self) -> None:
        """Validate; raise UnsupportedFeatureError for PEFT-only features, ConfigError for the rest."""
        if hasattr(self.task_type, "value") and not isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value  # e.g. peft.TaskType.CAUSAL_LM
        if isinstance(self.modules_to_save, str):  # one name ("lm_head"), not its letters
            self.modules_to_save = [self.modules_to_save]
        refused = self.unsupported_features()
        if refused:
            raise UnsupportedFeatureError(
                f"LoraConfig: uses PEFT features loratune does not support: {', '.join(refused)}")
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source="LoraConfig")
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            self.task_type = TaskType(self.task_type)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)

    def unsupported_features(self) -> list[str]:
        """Return "name=value" for each PEFT-only field set to something other than its default."""
        return _switched_on(self.__dict__)

    def problems(self) -> list[str]:
        """Return every problem with this config (empty when valid), PEFT-only features first."""
        out = [f"{f}: a PEFT feature loratune does not support" for f in self.unsupported_features()]
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            out.append(f"r must be a positive integer, got {shown(self.r)}")
        ranks = [self.r] if isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0 else []
        if isinstance(self.rank_pattern, dict):
            ranks += [v for v in self.rank_pattern.values() if isinstance(v, int) and v > 0]
        problem = _alpha_problem("lora_alpha", self.lora_alpha, ranks, self.use_rslora)
        if problem:
            out.append(problem)
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            out.append(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        for name in _FLAGS:
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name} must be true or false, got {shown(getattr(self, name))}")
        for name in ("base_model_name_or_path", "revision"):
            if not isinstance(getattr(self, name), (str, type(None))):
                out.append(f"{name} must be a string or null, got {shown(getattr(self, name))}")
        init = self.init_lora_weights
        known = init in INIT_METHODS or (isinstance(init, str) and init.startswith("pissa_niter_"))
        if not known or not isinstance(init, (bool, str)):  # 1 and 1.0 compare equal to True
            hint = " (loftq, eva and corda are not supported)" if isinstance(init, str) else ""
            out.append(f"init_lora_weights must be one of {INIT_METHODS} or 'pissa_niter_N', "
                       f"got {init!r}{hint}")
        if self.task_type is not None and str(self.task_type) not in TaskType._value2member_map_:
            out.append(f"task_type must be one of {[t.value for t in TaskType]}, got {self.task_type!r}")
        if self.peft_type not in ("LORA", None):
            out.append(f"peft_type must be 'LORA', got {self.peft_type!r}")
        out += _layer_selection_problems(self.layers_to_transform, self.layers_pattern)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            out.append("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            out.append("layers_pattern is only used together with layers_to_transform")
        if isinstance(init, str) and init.startswith("pissa_niter_") \
                and not init[len("pissa_niter_"):].isdigit():
            out.append(f"init_lora_weights {init!r}: the pissa_niter_ suffix must be a number of iterations")
        for name in ("target_modules", "exclude_modules"):
            out += _module_spec_problems(name, getattr(self, name))
        out += _modules_to_save_problems(self.modules_to_save)
        layers_pattern = self.layers_pattern
        for pattern in layers_pattern if isinstance(layers_pattern, (list, tuple)) else [layers_pattern]:
            if isinstance(pattern, str):
                out += _regex_problems("layers_pattern", pattern)
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                out.append(f"{name} must be a dict of module pattern -> value, got {pattern!r}")
                continue
            for key, value in pattern.items():
                out += _regex_problems(f"{name} key {key!r}", key)
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                positive_int = isinstance(value, int) and not isinstance(value, bool) and value > 0
                if name == "rank_pattern" and not positive_int:
                    out.append(f"rank_pattern[{shown(key)}] must be a positive integer, got {shown(value)}")
                elif name == "alpha_pattern" and not number:
                    out.append(f"alpha_pattern[{shown(key)}] must be a number, got {shown(value)}")
                elif name == "alpha_pattern":
                    problem = _alpha_problem(f"alpha_pattern[{shown(key)}]", value, ranks, self.use_rslora)
                    if problem:
                        out.append(problem)
        return out

    def scaling_for(self, r: int, lora_alpha: float) -> float:
        """The factor applied to B @ A for a module of rank r."""
        return lora_scaling(r, lora_alpha, self.use_rslora)

    # ----- PEFT's adapter_config.json -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict in PEFT's adapter_config.json layout (PEFT-only fields left out)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if "peft_only" not in f.metadata}
        d["task_type"] = None if self.task_type is None else str(self.task_type)
        d["peft_type"] = "LORA"
        if isinstance(d["target_modules"], (set, tuple)):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "adapter config") -> LoraConfig:
        """Build a config from PEFT's JSON layout, warning on unknown fields.

        Raises:
            UnsupportedFeatureError: a PEFT feature loratune does not implement is switched on.
            ConfigError: a field has a bad value.
        """
        if data.get("peft_type", "LORA") != "LORA":
            raise UnsupportedFeatureError(
                f"{source}: peft_type {data.get('peft_type')!r} is not supported; "
                "loratune reads LoRA adapters only"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        refused = _switched_on(data)
        init = data.get("init_lora_weights")
        if isinstance(init, str) and init not in INIT_METHODS and not init.startswith("pissa_niter_"):
            # PEFT's loftq, eva, corda, ...: they start from other base weights
            refused.insert(0, f"init_lora_weights={init!r}")
        unknown = [k for k in data if k not in known]
        kwargs = {k: v for k, v in data.items() if k in known}
        if refused:
            raise UnsupportedFeatureError(
                f"{source}: uses PEFT features loratune does not support: {', '.join(refused)}"
            )
        if unknown:
            logger.warning("%s: ignoring fields unknown to loratune (newer PEFT?): %s", source,
                           ", ".join(sorted(unknown)))
        try:
            return cls(**kwargs)
        except ConfigError as err:
            raise ConfigError(err.problems, source=source) from None

    @classmethod
    def from_pretrained(cls, path: str, *, subfolder: str | None = None,
                        revision: str | None = None) -> LoraConfig:
        """Read `adapter_config.json` from a local adapter directory or a hub repository."""
        given = {"adapter path": path, "subfolder": subfolder, "revision": revision}
        bad = [f"{k} must be a string or path, got {shown(v)}" for k, v in given.items()
               if not isinstance(v, (str, os.PathLike)) and (v is not None or k == "adapter path")]
        if bad:
            raise ConfigError(bad, source="LoraConfig.from_pretrained")
        config_file = resolve_adapter_file(path, CONFIG_NAME, subfolder=subfolder, revision=revision)
        if config_file is None:
            raise AdapterError(f"{path}: no {CONFIG_NAME} found (is this a LoRA adapter directory?)")
        return cls.from_json_file(config_file)

    @classmethod
    def from_json_file(cls, config_file: str) -> LoraConfig:
        """Read and validate one adapter_config.json file."""
        data = read_json_file(config_file, what=CONFIG_NAME)
        if not isinstance(data, dict):
            raise AdapterError(f"{config_file}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=os.fspath(config_file))

    def save_json(self, path: str) -> None:
        """Write this config as adapter_config.json at `path` (not atomic; callers write to temp)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")


def _switched_on(values: dict[str, Any]) -> list[str]:
    """Return "name=value" for each PEFT-only field in `values` that is not at an off value."""
    return [f"{f.name}={values[f.name]!r}" for f in dataclasses.fields(LoraConfig)
            if f.metadata.get("peft_only") == "refused" and f.name in values
            and not any(values[f.name] == off for off in f.metadata["off"])]

