"""Loading a base for sharded training so that no rank ever holds all of it.

The model is built on the meta device (shapes, no memory), the adapter is injected (and drawn on the
CPU, as on one device), fsdp.shard_model shards the skeleton, and `materialize` gives each rank
memory for its shards only and fills them: rows start..end of each weight, read from the
safetensors files with plain reads (nothing memory-mapped, so RSS holds only what is kept).
A quantized base (load_in_4bit / load_in_8bit) is quantized one layer at a time: each rank reads
one whole weight, quantizes it as on one device, keeps its rows of the codes and scales, and frees
the rest; so a rank peaks at its shards plus one dense weight.

Invariant: a rank's shard of a tensor is rows [rank * ceil(n / world), ...) of dim 0, as FSDP2
splits it (torch.chunk); `_first_row` asserts it against the shard it was given.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from loratune.base_layers import is_quantized
from loratune.errors import ConfigError
from loratune.train.distributed import DistEnv
from loratune.train.fsdp import hf_model, init_as_root

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def safetensors_files(directory: str) -> dict[str, str] | None:
    """{tensor name: file} of a Hugging Face model directory, or None when it holds no safetensors."""
    root = Path(directory)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return {name: str(root / file) for name, file in weight_map.items()}
    if (root / WEIGHTS_FILE).is_file():
        with _RowReader(str(root / WEIGHTS_FILE)) as reader:
            return {name: str(root / WEIGHTS_FILE) for name in reader.header if name != "__metadata__"}
    return None


def build_skeleton(directory: str, dtype: torch.dtype, name: str) -> nn.Module:
    """The model of a Hugging Face directory on the meta device: shapes and structure, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(directory)
    model.config._name_or_path = model.name_or_path = name
    model.requires_grad_(False)
    return model.eval()


def materialize(root: nn.Module, model: nn.Module, files: dict[str, str], dtype: torch.dtype,
                env: DistEnv) -> None:
    """Give the sharded skeleton real memory and fill it: this rank's rows of every base weight from
    `files` (quantized layers quantized from them in `dtype`), the adapter as drawn at injection,
    buffers recomputed.

    Raises:
        ConfigError: a weight the model has and the files lack, or one of another shape.
    """
    drawn = {name: p.to_local().detach().clone() for name, p in root.named_parameters()
             if p.device.type != "meta"}  # the adapter, already drawn on the CPU
    root.to_empty(device=env.device)
    params = dict(root.named_parameters())
    with torch.no_grad():
        for name, value in drawn.items():
            params[name].to_local().copy_(value)
    hf = hf_model(model)
    _init_buffers(hf)
    quantized = {name: m for name, m in hf.named_modules() if is_quantized(m)}
    with _Readers() as readers:
        _load_rows(hf, quantized, files, readers, env)
        for name, layer in quantized.items():
            _load_quantized(name, layer, files, readers, dtype, env)
    init_as_root(root)


def _init_buffers(hf: nn.Module) -> None:
    """Recompute buffers that are not in the weight files: quantization tables, and the rest (rotary
    tables) the way Transformers does."""
    for module in hf.modules():
        if is_quantized(module):
            module.init_tables()
        elif any(n in module._non_persistent_buffers_set for n, _ in module.named_buffers(recurse=False)):
            hf._init_weights(module)


def _load_rows(hf: nn.Module, quantized: dict[str, nn.Module], files: dict[str, str], readers: _Readers,
               env: DistEnv) -> None:
    """Copy this rank's rows of every frozen parameter and persistent buffer outside quantized storage."""
    def stored(name: str) -> bool:  # quantized codes and scales are made from the dense weight instead
        owner, _, leaf = name.rpartition(".")
        return owner in quantized and leaf != "bias"

    wanted = [(n, t) for n, t in hf.named_parameters() if "lora_" not in n and not stored(n)]
    wanted += [(n, t) for n, t in hf.named_buffers() if not stored(n) and _persistent(hf, n)]
    keys = {n: _file_key(n) for n, _ in wanted}
    keys.update({name: _file_key(f"{name}.weight") for name in quantized})
    missing = sorted(k for k in keys.values() if k not in files)
    if missing:
        raise ConfigError(f"fsdp: the weight files lack {len(missing)} tensor(s) the model has, e.g. "
                          f"{', '.join(missing[:3])}; train this model without fsdp")
    with torch.no_grad():
        for name, tensor in wanted:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            if local.numel():
                readers.get(files[keys[name]]).read_rows(keys[name], _first_row(tensor, env), local)


def _load_quantized(name: str, layer: nn.Module, files: dict[str, str], readers: _Readers,
                    dtype: torch.dtype, env: DistEnv) -> None:
    """Quantize one layer from its whole dense weight (in `dtype`, as on one device) and keep this rank's
    rows of every storage tensor."""
    key = _file_key(f"{name}.weight")
    shape = (layer.in_features, layer.out_features) if getattr(layer, "from_conv1d", False) else \
        (layer.out_features, layer.in_features)
    dense = torch.empty(shape, dtype=dtype)
    readers.get(files[key]).read_rows(key, 0, dense)
    dense = dense.t() if getattr(layer, "from_conv1d", False) else dense  # Conv1D stores W as (in, out)
    options = {"compute_dtype": layer.compute_dtype, "name": name}
    if layer.bits == 4:
        options.update(quant_type=layer.quant_type, double_quant=layer.double_quant)
    whole = type(layer).from_linear(SimpleNamespace(weight=dense, bias=None, in_features=layer.in_features,
                                                    out_features=layer.out_features), **options)
    with torch.no_grad():
        for leaf, value in whole.state_dict().items():
            if leaf == "bias":
                continue
            target = getattr(layer, leaf)
            local = target.to_local() if isinstance(target, DTensor) else target
            start = _first_row(target, env)
            local.copy_(value[start:start + len(local)] if local.dim() else value)


def _persistent(hf: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf not in hf.get_submodule(owner)._non_persistent_buffers_set


def _file_key(name: str) -> str:
    """The name a base tensor has in the weight files: LoRA's `base_layer` level taken out."""
    return name.replace(".base_layer.", ".")


def _first_row(tensor: torch.Tensor, env: DistEnv) -> int:
    """Row of the whole tensor where this rank's shard starts (FSDP2 splits dim 0 like torch.chunk)."""
    if not isinstance(tensor, DTensor):
        return 0
    rows = tensor.shape[0]
    per_rank = math.ceil(rows / env.world_size)
    start = min(env.rank * per_rank, rows)
    assert tensor.to_local().shape[0] == max(0, min(per_rank, rows - start)), "unexpected FSDP2 shard layout"
    return start


class _Readers(contextlib.ExitStack):
    """One open `_RowReader` per weight file, all closed together."""

    def __init__(self):
        super().__init__()
        self._open: dict[str, _RowReader] = {}

    def get(self, path: str) -> _RowReader:
        if path not in self._open:
            self._open[path] = self.enter_context(_RowReader(path))
        return self._open[path]


class _RowReader:
    """Reads row ranges of tensors from a safetensors file with plain reads: only the bytes asked for
    are read, and nothing is memory-mapped (mapped pages would count in RSS until the file closes)."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> _RowReader:
        self.fh = open(self.path, "rb")  # closed in __exit__
        size = int.from_bytes(self.fh.read(8), "little")
        self.header = json.loads(self.fh.read(size))
        self.data_start = 8 + size
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()

    def read_rows(self, key: str, start: int, out: torch.Tensor) -> None:
        """Fill `out` (rows, ...) with rows start.. of tensor `key`, cast to out's dtype."""
        entry = self.header[key]
        dtype, shape = _DTYPES.get(entry["dtype"]), entry["shape"] or [1]  # a scalar reads as one row
        rows = out.shape[0] if out.dim() else 1
        if dtype is None or tuple(shape[1:]) != tuple(out.shape[1:]) or start + rows > shape[0]:
            raise ConfigError(f"fsdp: {key} in {self.path} is {entry['dtype']} {entry['shape']}; the model "
                              f"expects rows {start}..{start + rows} of {tuple(out.shape[1:])}")
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.fh.seek(self.data_start + entry["data_offsets"][0] + start * row_bytes)
        direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        target = out if direct else torch.empty(out.shape, dtype=dtype)  # read on the CPU, then cast/move
        view = target.reshape(-1).view(torch.uint8).numpy()
        if self.fh.readinto(view) != view.nbytes:
            raise ConfigError(f"fsdp: {self.path} ends inside {key}: the file is truncated")
        if target is not out:
            out.copy_(target)
