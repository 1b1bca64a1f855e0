"""Load a frozen base model, optionally with a saved adapter on top, for generate/chat/eval/merge.

The base defaults to the adapter's `base_model_name_or_path`, and the quantization settings
(`load_in_4bit`, `load_in_8bit`, `bnb_4bit_*`) default to what the adapter was trained with: the
`train_config.yaml` that `loratune train` writes next to the adapter. So `--adapter out/` alone
reloads a QLoRA run exactly as it was trained. Explicit arguments always win.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loratune.adapter_io import check_finite, read_adapter
from loratune.config import LoraConfig
from loratune.errors import AdapterError, ConfigError
from loratune.model import LoraModel
from loratune.tools.loading import load_base_model, load_tokenizer
from loratune.tools.yaml_reader import MAX_YAML_BYTES, load_yaml

logger = logging.getLogger(__name__)

TRAIN_CONFIG_FILE = "train_config.yaml"
QUANT_DEFAULTS: dict[str, Any] = {
    "load_in_4bit": False,
    "load_in_8bit": False,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": "auto",
    "bnb_4bit_use_double_quant": False,
}


@dataclass
class LoadedModel:
    """A ready-to-run model: a LoraModel when an adapter was given, else the plain HF model."""

    model: nn.Module
    tokenizer: Any
    base_name: str
    adapter_dir: str | None = None
    adapter_config: LoraConfig | None = None
    quant: dict[str, Any] = field(default_factory=lambda: dict(QUANT_DEFAULTS))

    @property
    def quantized(self) -> str | None:
        """"4-bit nf4" / "8-bit int8" when the base is quantized, else None."""
        if self.quant["load_in_4bit"]:
            return f"4-bit {self.quant['bnb_4bit_quant_type']}"
        if self.quant["load_in_8bit"]:
            return "8-bit int8"
        return None


def read_train_config(adapter_dir: str) -> dict[str, Any]:
    """Return the flat keys of `train_config.yaml` beside an adapter ({} when there is none).

    Raises:
        ConfigError: the file exists but is not a YAML mapping.
    """
    path = os.path.join(adapter_dir, TRAIN_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            _, data = load_yaml(fh.read(MAX_YAML_BYTES + 1), source=path)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte at offset {exc.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def resolve_quant(adapter_dir: str | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantization settings: defaults, then the adapter's train_config.yaml, then non-None overrides.

    An override that turns on one bit width (`--load_in_8bit`) replaces the one the adapter was
    trained with, rather than clashing with it.

    Raises:
        ConfigError: a value in train_config.yaml of the wrong type (named with the file), or both
            bit widths asked for.
    """
    quant = dict(QUANT_DEFAULTS)
    if adapter_dir is not None:
        trained = read_train_config(adapter_dir)
        quant.update(_typed_quant({k: trained[k] for k in QUANT_DEFAULTS if trained.get(k) is not None},
                                  source=os.path.join(adapter_dir, TRAIN_CONFIG_FILE)))
    given = {k: v for k, v in (overrides or {}).items() if k in QUANT_DEFAULTS and v is not None}
    if given.get("load_in_4bit") or given.get("load_in_8bit"):
        quant.update(load_in_4bit=False, load_in_8bit=False)
    quant.update(given)
    if quant["load_in_4bit"] and quant["load_in_8bit"]:
        raise ConfigError("load_in_4bit and load_in_8bit are both set; pick one")
    return quant


def _typed_quant(values: dict[str, Any], *, source: str) -> dict[str, Any]:
    """Coerce quantization keys by the trainer's field types ("false" is False, not a truthy string).

    Raises:
        ConfigError: naming `source` and every key whose value cannot be one.
    """
    from loratune.train.coerce import coerce
    from loratune.train.config import ModelArgs, field_types, key_owners
    from loratune.train.config_checks import compute_dtype_problems

    hints, owners, out, problems = field_types(ModelArgs), key_owners(), {}, []
    for key, value in values.items():
        try:
            out[key] = coerce(value, hints[key], owners[key][1].metadata.get("choices"))
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    problems += compute_dtype_problems(out.get("bnb_4bit_compute_dtype", "auto"))
    if problems:
        raise ConfigError(problems, source=source)
    return out


def resolve_base_name(model_name_or_path: str | None, adapter_config: LoraConfig | None,
                      adapter_dir: str | None) -> str:
    """The base model to load: the explicit argument, else the adapter config's base model.

    Raises:
        ConfigError: neither is known.
    """
    if model_name_or_path:
        return model_name_or_path
    if adapter_config is not None and adapter_config.base_model_name_or_path:
        return adapter_config.base_model_name_or_path
    if adapter_dir is not None:
        raise ConfigError(f"{adapter_dir}: adapter_config.json has no base_model_name_or_path; "
                          "pass --model_name_or_path")
    raise ConfigError("no model given: pass --model_name_or_path, --adapter, or both")


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is checked and returned.

    Raises:
        ConfigError: an unknown device string, a device type other than cpu and cuda, or CUDA asked
            for but not available.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; expected auto, cpu, cuda or "
                          "cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):  # torch knows meta, mps, xpu...: the loaders run on neither
        raise ConfigError(f"--device {device!r} is not supported; expected auto, cpu, cuda or cuda:N")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r}: no CUDA device is available; use --device cpu")
    return device


def load_model(model_name_or_path: str | None = None, adapter: str | None = None, *, dtype: str = "auto",
               quant: dict[str, Any] | None = None, device: str = "auto") -> LoadedModel:
    """Load the tokenizer, the frozen base (quantized if asked) and, if given, the adapter on top.

    Raises:
        ConfigError: no base model, bad model path, bad quantization settings.
        AdapterError: the adapter directory is missing, corrupt, holds NaN/Inf weights or does not fit
            the base.
    """
    adapter_config = adapter_tensors = None
    if adapter is not None:
        check_adapter_path(adapter)
        adapter_config, adapter_tensors = read_adapter(adapter)  # validate files before the (slow) base load
        check_finite(adapter_tensors, source=adapter)
    base_name = resolve_base_name(model_name_or_path, adapter_config, adapter)
    settings = resolve_quant(adapter, quant)
    device = resolve_device(device)
    tokenizer = load_tokenizer(base_name)
    model = load_base_model(base_name, dtype=dtype, device=device, **settings)
    if adapter is not None:
        model = LoraModel.from_adapter(model, adapter_config, adapter_tensors, source=adapter)
        model.eval()
    logger.debug("loaded %s%s", base_name, f" + adapter {adapter}" if adapter else "")
    return LoadedModel(model, tokenizer, base_name, adapter, adapter_config, settings)


def check_adapter_path(adapter: str) -> None:
    """Refuse a local-looking adapter path that does not exist before anything else loads (a hub id
    "org/name" passes; a file given instead of the directory is refused by `read_adapter`).

    Raises:
        AdapterError: naming the path.
    """
    if not os.path.exists(adapter) and _looks_local(adapter):
        raise AdapterError(f"{adapter}: adapter directory does not exist")


def _looks_local(path: str) -> bool:
    """A path that cannot be a hub id ("org/name"): it is a local directory the user mistyped."""
    return path.count("/") != 1 or path.startswith((".", "/", "~")) or os.path.exists(path)
