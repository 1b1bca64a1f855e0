"""Sharded training with FSDP2 (`fsdp: true` under torchrun): shard, run and save a sharded model.

Here: `fully_shard` on each decoder layer and then on the loss root (quantized codes and scales
made frozen parameters first, since FSDP2 shards parameters only), the context that gathers the
root's weights for evaluation and generation, and the adapter gathered on every rank for a
PEFT-format save. Loading a base shard by shard is fsdp_load.py; the loop is loop.py; the sharded
checkpoint (torch.distributed.checkpoint) is resume.py.

Invariant: every rank calls every function here, in the same order: each one runs collectives.
The root of the FSDP tree is a `LossModule` around the LoraModel, so the training forward (which
calls the decoder body and reads the LM head's weight directly, loss.py) runs inside the root's
forward; anything else that runs the model (evaluation, generation) does so inside `gathered_root`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from loratune.base_layers import is_quantized
from loratune.errors import ConfigError
from loratune.train.distributed import DistEnv
from loratune.train.loss import LossModule

logger = logging.getLogger(__name__)


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
    quantized_storage_as_parameters(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    root = LossModule(model)
    fully_shard(root, **options)
    if not any(p.device.type == "meta" for p in root.parameters()):
        init_as_root(root)  # else once fsdp_load.materialize has filled it
    # Transformers' generate then keeps ranks stepping together until all have finished (synced_gpus).
    hf_model(model)._is_fsdp_managed_module = True
    logger.info("fsdp: %d decoder layers and the root sharded over %d processes%s", len(layers),
                env.world_size, ", parameters offloaded to the CPU" if cpu_offload else "")
    return root


def quantized_storage_as_parameters(model: nn.Module) -> None:
    """Make the codes and scales of quantized layers frozen parameters, so FSDP2 shards them too.

    They are buffers on one device (quant.storage); a scalar (double quantization's mean) stays one.
    The state dict keeps the same keys, and the layers read them by the same names.
    """
    from loratune.quant.layer import TiledQuantizedLinear

    for module in model.modules():
        if not is_quantized(module):
            continue
        if not isinstance(module, TiledQuantizedLinear):
            raise ConfigError(f"fsdp: cannot shard {type(module).__name__} (bitsandbytes' packed weights); "
                              "quantize with loratune's own layers (they are used with fsdp on any device)")
        for name, buf in list(module._buffers.items()):
            if buf is not None and name not in module._non_persistent_buffers_set and buf.dim() > 0:
                del module._buffers[name]
                module.register_parameter(name, nn.Parameter(buf, requires_grad=False))


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


def init_as_root(root: nn.Module) -> None:
    """Make `root` FSDP's root now: it must be before anything runs a layer on its own (generation).

    FSDP2 makes the first module whose forward runs the root, and has no public call to say which.
    """
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
