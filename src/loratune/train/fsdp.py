"""Sharded training with FSDP2 (`fsdp: true` under torchrun): build, run and save a sharded model.

Here: loading a base so that no rank ever holds all of it (a meta-device skeleton, the adapter
drawn on the CPU as usual, `fully_shard` on each decoder layer and then on the loss root, and each
rank reading only its own rows of every weight from the safetensors files), the context that
gathers the root's weights for evaluation and generation, and the
adapter gathered on every rank for a PEFT-format save. The loop is loop.py; the sharded
checkpoint (torch.distributed.checkpoint) is resume.py.

Invariant: every rank calls every function here, in the same order: each one runs collectives.
The root of the FSDP tree is a `LossModule` around the LoraModel, so the training forward (which
calls the decoder body and reads the LM head's weight directly, loss.py) runs inside the root's
forward; anything else that runs the model (evaluation, generation) does so inside `gathered_root`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from loratune.errors import ConfigError
from loratune.train.distributed import DistEnv
from loratune.train.loss import LossModule

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def shard_model(model: nn.Module, env: DistEnv, *, cpu_offload: bool,
                reshard_after_forward: bool) -> nn.Module:
    """Apply `fully_shard` to each decoder layer, then to a `LossModule` root around `model`; return the root.

    Parameters keep their own dtypes (a bf16 base is gathered in bf16, the adapter stays fp32, as
    on one device); gradients are reduce-scattered in fp32.

    Raises:
        ConfigError: CPU offload without a GPU, or a model whose decoder layers cannot be found.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if cpu_offload and env.device.type != "cuda":
        raise ConfigError("fsdp_cpu_offload: moves shards between host and GPU memory; this run is on "
                          f"{env.device.type}, where the shards already live in host memory; set it to false")
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    options = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    root = LossModule(model)
    fully_shard(root, **options)
    if not any(p.device.type == "meta" for p in root.parameters()):
        _init_as_root(root)  # else once `materialize` has filled it
    # Transformers' generate then keeps ranks stepping together until all have finished (synced_gpus).
    hf_model(model)._is_fsdp_managed_module = True
    logger.info("fsdp: %d decoder layers and the root sharded over %d processes%s", len(layers),
                env.world_size, ", parameters offloaded to the CPU" if cpu_offload else "")
    return root


def hf_model(model: nn.Module) -> nn.Module:
    """The Transformers model inside a LoraModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class Transformers says never to split.

    Raises:
        ConfigError: the model names no such class, or none is in it.
    """
    hf = hf_model(model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    layers = [m for m in hf.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"fsdp: cannot find the decoder layers of {type(hf).__name__} (its "
                          f"_no_split_modules is {sorted(names)}); train it without fsdp")
    return layers


def _init_as_root(root: nn.Module) -> None:
    """Make `root` FSDP's root now: it must be before anything runs a layer on its own (generation)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard.state(root)._lazy_init()


def is_sharded_model(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP shards (DTensors)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def is_sharded(module: nn.Module | None) -> bool:
    """True for a module `shard_model` returned."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered_root(root: nn.Module | None) -> Iterator[None]:
    """Hold the root's own weights (embeddings, final norm, LM head) whole on every rank for the block.

    Needed to run the model other than through the root's forward (evaluation, generation); the
    decoder layers still gather and free themselves. A no-op for an unsharded model.
    """
    if not is_sharded(root):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a (possibly sharded) tensor as a CPU copy; sharded ones are all-gathered."""
    whole = t.full_tensor() if isinstance(t, DTensor) else t
    return whole.detach().to("cpu", copy=True).contiguous()


def adapter_tensors(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors in PEFT's key layout, gathered whole on every rank (a collective)."""
    from loratune import adapter_io

    config = model.peft_config[adapter_name]
    params = adapter_io.adapter_param_map(model.model, adapter_name, config.bias)
    return {key: full_tensor(p) for key, p in params.items()}


def save_adapter(model: nn.Module, directory: str, env: DistEnv) -> None:
    """Write the adapter in PEFT format into `directory` from the gathered weights (rank 0 writes)."""
    from dataclasses import replace

    from loratune import adapter_io

    tensors = adapter_tensors(model)
    config = replace(model.peft_config["default"], inference_mode=True)
    if env.is_main:
        adapter_io.save_adapter(directory, config, tensors)


# ----- loading: each rank reads only its own rows -----------------------------------------------


def safetensors_files(directory: str) -> dict[str, str] | None:
    """{tensor name: file} of a Hugging Face model directory, or None when it holds no safetensors."""
    root = Path(directory)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return {name: str(root / file) for name, file in weight_map.items()}
    if (root / WEIGHTS_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(root / WEIGHTS_FILE), framework="pt") as fh:
            return {name: str(root / WEIGHTS_FILE) for name in fh.keys()}
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


def materialize(root: nn.Module, model: nn.Module, files: dict[str, str], env: DistEnv) -> None:
    """Give the sharded meta skeleton real memory and fill it: this rank's rows of every base weight from
    `files`, the adapter as drawn at injection, buffers recomputed.

    Raises:
        ConfigError: a weight the model has and the files lack.
    """
    drawn = {name: p.to_local().detach().clone() for name, p in root.named_parameters()
             if p.device.type != "meta"}  # the adapter, already drawn on the CPU
    root.to_empty(device=env.device)
    params = dict(root.named_parameters())
    with torch.no_grad():
        for name, value in drawn.items():
            params[name].to_local().copy_(value)
    hf = hf_model(model)
    _init_non_persistent_buffers(hf)
    _load_rows(hf, files, env)
    _init_as_root(root)


def _init_non_persistent_buffers(hf: nn.Module) -> None:
    """Recompute buffers that are not in the weight files (rotary tables) the way Transformers does."""
    for module in hf.modules():
        if any(name in module._non_persistent_buffers_set for name, _ in module.named_buffers(recurse=False)):
            hf._init_weights(module)


def _load_rows(hf: nn.Module, files: dict[str, str], env: DistEnv) -> None:
    """Copy this rank's rows of every frozen parameter (and every persistent buffer) from the files."""
    wanted = [(n, t) for n, t in hf.named_parameters() if "lora_" not in n]
    persistent = [(n, t) for n, t in hf.named_buffers() if n.rsplit(".", 1)[-1] not in
                  hf.get_submodule(n.rsplit(".", 1)[0] if "." in n else "")._non_persistent_buffers_set]
    keys = {n: n.replace(".base_layer.", ".") for n, _ in wanted + persistent}
    missing = sorted(k for k in keys.values() if k not in files)
    if missing:
        raise ConfigError(f"fsdp: the weight files lack {len(missing)} tensor(s) the model has, e.g. "
                          f"{', '.join(missing[:3])}; train this model without fsdp")
    readers: dict[str, _RowReader] = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for name, tensor in wanted + persistent:
            file = files[keys[name]]
            if file not in readers:
                readers[file] = stack.enter_context(_RowReader(file))
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            start = _first_row(tensor, env) if isinstance(tensor, DTensor) else 0
            if local.numel():
                readers[file].read_rows(keys[name], start, local)


# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, format)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


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
        target = out if out.dtype == dtype and out.is_contiguous() else torch.empty(out.shape, dtype=dtype)
        view = target.reshape(-1).view(torch.uint8).numpy()
        if self.fh.readinto(view) != view.nbytes:
            raise ConfigError(f"fsdp: {self.path} ends inside {key}: the file is truncated")
        if target is not out:
            out.copy_(target)


def _first_row(tensor: DTensor, env: DistEnv) -> int:
    """Row of the whole tensor where this rank's shard starts (FSDP2 splits dim 0 like torch.chunk)."""
    rows = tensor.shape[0]
    per_rank = math.ceil(rows / env.world_size)
    start = min(env.rank * per_rank, rows)
    assert tensor.to_local().shape[0] == max(0, min(per_rank, rows - start)), "unexpected FSDP2 shard layout"
    return start
