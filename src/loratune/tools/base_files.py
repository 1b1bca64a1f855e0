"""Checks of a local base model's files, before and after Transformers loads them.

Transformers meets a hostile file with a traceback from deep inside it, or worse, goes on: a tensor
missing from the checkpoint is drawn at random, an integer tensor is cast to float, a config.json
that asks for 10^12-wide layers starts allocating. These checks turn each case into a `ConfigError`
naming the file and the field or tensor, and refuse a config too large for memory before anything
is allocated (`InsufficientMemoryError`). Used by `loading` (local directories, converted GGUF
folders) and `gguf_base` (the conversion itself).
Not here: resolving a name to a directory, and reading the weights (loading.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from transformers import CONFIG_MAPPING, AutoConfig, PreTrainedModel

from loratune.errors import ConfigError
from loratune.memory import check_fits
from loratune.module_patterns import first_few

logger = logging.getLogger(__name__)

# What AutoTokenizer reads a vocabulary from; a directory with none of these has no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_BLOCK_INDEX = re.compile(r"\.\d+\.")  # model.layers.3.mlp..., transformer.h.3.attn...
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Sizes every causal LM is built from (GPT-2's n_embd, n_layer, n_head answer to these names too);
# None means "derived from the others" and is left to Transformers.
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "num_key_value_heads", "head_dim")


def check_tokenizer_dir(directory: Path) -> None:
    """Refuse a local directory without tokenizer files, or with one that is not a JSON object."""
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        raise ConfigError(f"model directory {str(directory)!r} has no tokenizer files (one of "
                          f"{', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model "
                          "(tokenizer.save_pretrained)")
    for name in TOKENIZER_JSON_FILES:
        if (directory / name).exists():
            _read_json_object(directory / name)


def check_load_report(info: dict, source: str) -> None:
    """Refuse a load that left tensors missing, unused or of another shape (Transformers only warns).

    `info` is what `from_pretrained(..., output_loading_info=True, ignore_mismatched_sizes=True)`
    returns beside the model.

    Raises:
        ConfigError: naming the first few tensors of each kind.
    """
    problems = []
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        problems.append(f"{_tensors(len(missing))} the model has but the checkpoint lacks (they would be "
                        f"random): {first_few(missing)}")
    # Unused tensors inside the repeated blocks mean the config describes another model (fewer layers,
    # no biases); others (a value head, an old rotary buffer) are left out with a warning, as
    # Transformers does.
    unused = sorted(k for k in info.get("unexpected_keys") or () if not k.endswith(".inv_freq"))
    in_blocks = [k for k in unused if _BLOCK_INDEX.search(k)]
    if in_blocks:
        problems.append(f"{_tensors(len(in_blocks))} the checkpoint has but the model lacks (the config "
                        f"describes another model): {first_few(in_blocks)}")
    elif unused:
        logger.warning("%s: %s in the checkpoint are not part of the model and are left out: %s", source,
                       _tensors(len(unused)), first_few(unused))
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        problems.append(f"{_tensors(len(mismatched))} of another shape than the config gives: " + first_few(
            [f"{k} is {tuple(found)} in the checkpoint, {tuple(expected)} in the model"
             for k, found, expected in mismatched]))
    if problems:
        raise ConfigError(problems, source=source)


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _read_json_object(path: Path) -> dict:
    """The JSON object in `path`.

    Raises:
        ConfigError: naming the file: missing, a directory, not UTF-8 JSON, or not an object.
    """
    if path.is_dir():
        raise ConfigError(f"{path} is a directory; expected a JSON file")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path} is not a readable JSON file: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{path} holds a JSON {type(value).__name__}; expected an object ({{...}})")
    return value


def check_model_dir(directory: Path, dtype: torch.dtype, trust_remote_code: bool) -> None:
    """Refuse a local model directory whose files cannot describe a loadable model, before allocating.

    Raises:
        ConfigError: naming the file and field: config.json or a checkpoint index unreadable, an unknown
            model_type, a size that is not a positive integer, a weight file that is a directory, shard
            files missing.
        InsufficientMemoryError: the sizes in config.json need more memory than is available.
    """
    config_path = directory / "config.json"
    raw = _read_json_object(config_path)
    model_type = raw.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if not known and not trust_remote_code:
        raise ConfigError(f"{config_path}: model_type {model_type!r} is not a model type Transformers knows; "
                          "expected one like 'llama', 'qwen2' or 'gpt2' (or pass trust_remote_code for a "
                          "model that ships its own code)")
    _check_sizes(raw, CONFIG_MAPPING[model_type].attribute_map if known else {}, config_path)
    for name in SINGLE_WEIGHT_FILES:
        if (directory / name).is_dir():
            raise ConfigError(f"{directory / name} is a directory; expected a weight file")
    if not any((directory / name).exists() for name in SINGLE_WEIGHT_FILES):
        index = next((directory / n for n in INDEX_FILES if (directory / n).exists()), None)
        if index is not None:
            _check_index(index)
    try:  # the config class's own checks: heads that do not divide hidden_size, a string for a number
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, ArithmeticError, StrictDataclassError) as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc
    _check_fits(config, config_path, dtype)


def _check_index(path: Path) -> None:
    """Refuse a checkpoint index that is not {"metadata": {...}, "weight_map": {tensor: shard file}}."""
    index = _read_json_object(path)
    problems = []
    if not isinstance(index.get("metadata"), dict):
        problems.append(f"'metadata' is {index.get('metadata')!r}; expected an object (it may be empty)")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        problems.append("'weight_map' must map each tensor name to the name of its shard file")
    else:
        missing = sorted({f for f in weight_map.values() if not (path.parent / f).is_file()})
        if missing:
            problems.append(f"'weight_map' names shard files that are not files in {path.parent}: "
                            f"{first_few(missing)}")
    if problems:
        raise ConfigError(problems, source=str(path))


def _check_sizes(raw: dict, attribute_map: dict[str, str], config_path: Path) -> None:
    """Refuse sizes in config.json that build no model: each one given must be a positive integer.

    `attribute_map` names a size as this model's config file does (GPT-2: hidden_size -> n_embd).
    """
    problems = []
    for field in SIZE_FIELDS:
        key = attribute_map.get(field, field)
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{key}: {value!r} is not a positive integer")
    if problems:
        raise ConfigError(problems, source=str(config_path))


def _check_fits(config, config_path: Path, dtype: torch.dtype) -> None:
    """Refuse a config whose weights cannot fit in memory, before anything is allocated.

    The size is a lower bound, so no real model is refused by mistake: the embedding plus, per layer,
    two (D, D) attention maps and two (D, I) MLP maps, which Llama, Qwen2 and GPT-2 all have.
    """
    d = getattr(config, "hidden_size", None) or 0
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d
    params = (getattr(config, "vocab_size", None) or 0) * d + (
        getattr(config, "num_hidden_layers", None) or 0) * (2 * d * d + 2 * d * inner)
    check_fits(params * dtype.itemsize, "cpu", f"the model {config_path} describes ({params:,} parameters "
               f"at least, in {dtype})",
               "check the sizes in config.json: one is far larger than the model it came with")


def check_weight_dtypes(directory: Path, model: PreTrainedModel, source: str) -> None:
    """Refuse integer or bool tensors for float weights (Transformers would cast them in silence)."""
    floats = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    problems = []
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                dtype = fh.get_slice(key).get_dtype()
                if key in floats and not dtype.startswith(("F", "BF")):
                    problems.append(f"{path.name}: tensor {key!r} is {dtype}; expected a float type")
    if problems:
        raise ConfigError(problems, source=f"model {source!r}")
