"""`LoraModel` (alias `PeftModel`): a model with LoRA adapters injected, PEFT's API on top.

It wraps the user's model in place (its targets become LoRA layers) and forwards every unknown
attribute, `forward` and `generate` to it. No hidden state changes: `eval()` does not merge,
`forward()` does not unmerge, a mixed-batch call always clears its routing, and loading never
skips keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import Tensor, nn

from . import adapter_io, merge
from .adapter_files import CONFIG_NAME
from .adapter_names import BASE_ADAPTER, adapter_list, adapter_name_problem
from .base_layers import is_quantized
from .config import LoraConfig
from .errors import AdapterError, ConfigError, MergeError, TargetNotFoundError
from .inject import inject_adapter, resolve_config, set_submodule
from .layers import LoraLayer, LoraLinear, ModulesToSave, module_key, owned_by_adapter
from .module_patterns import shown
from .peft_kwargs import check_peft_kwargs

logger = logging.getLogger(__name__)


class LoraModel(nn.Module):
    """A frozen base model plus named LoRA adapters; the active ones (summed) apply by default."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> None:
        super().__init__()
        _check_model(model)
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._active: list[str] = []
        self.add_adapter(adapter_name, peft_config)  # first: a bad config leaves the user's model untouched
        for param in model.parameters():
            param.requires_grad_(False)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ----- PEFT-compatible accessors -------------------------------------------------------------

    @property
    def base_model(self) -> LoraModel:
        """PEFT's `peft_model.base_model`; `.base_model.model` is the wrapped model."""
        return self

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    @property
    def peft_type(self) -> str:
        return "LORA"

    def _layers(self) -> Iterator[LoraLayer | ModulesToSave]:
        for module in self.model.modules():
            if isinstance(module, (LoraLayer, ModulesToSave)):
                yield module

    # ----- adapters ------------------------------------------------------------------------------

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Inject a new, inactive adapter (`set_adapter` activates it)."""
        if not isinstance(peft_config, LoraConfig):
            raise ConfigError(f"expected a loratune LoraConfig, got {type(peft_config).__name__}")
        self._check_new_adapter_name(adapter_name)
        self._refuse_if_merged("add an adapter")
        config = resolve_config(self.model, peft_config)
        try:
            targets = inject_adapter(self.model, config, adapter_name)
        except Exception:
            self._remove_adapter_weights(adapter_name)
            self._unwrap_empty_layers()
            raise
        layers = [self.model.get_submodule(t) for t in targets]
        if any(isinstance(layer, LoraLinear) and layer.fan_in_fan_out for layer in layers):
            config = replace(config, fan_in_fan_out=True)  # what PEFT writes for Conv1D bases
        if config.base_model_name_or_path is None:
            name_or_path = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
            config = replace(config, base_model_name_or_path=name_or_path)
        self.peft_config[adapter_name] = config
        self._apply_active()
        self._follow_mode()

    def _follow_mode(self) -> None:
        """New adapter modules start in training mode (torch's default); added to a model switched to
        eval (`.eval()`), they follow it, or their dropout would make every eval forward random."""
        if not self.training:
            self.eval()

    def _check_new_adapter_name(self, adapter_name: str) -> None:
        """Raise ConfigError unless `adapter_name` can name a new adapter (see adapter_names)."""
        problem = adapter_name_problem(adapter_name)
        if problem:
            raise ConfigError(problem)
        # Adapter names become keys of nn.ModuleDict/ParameterDict, which refuse their own attribute
        # names ("train", "eval", "keys", "copy", ...) with a bare KeyError deep inside injection.
        key = module_key(adapter_name)
        if hasattr(nn.ModuleDict(), key) or hasattr(nn.ParameterDict(), key):
            raise ConfigError(f"adapter name {adapter_name!r} is reserved by torch.nn.ModuleDict; "
                              "choose another name")
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists; delete_adapter() it first")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active (a list sums them); only active adapters are trainable."""
        names = adapter_list(adapter_name, "adapter_name")
        self._require_known(names)
        self._active = names
        self._apply_active()

    def _apply_active(self) -> None:
        trainable = any(not self.peft_config[n].inference_mode for n in self._active)
        for layer in self._layers():
            layer.set_active(self._active, trainable)
        for name, param in self.model.named_parameters():
            # a modules_to_save original stays frozen, as in PEFT
            if name.endswith("bias") and not owned_by_adapter(name) \
                    and ".original_module." not in name:
                param.requires_grad_(trainable and self._bias_trains(name))

    def _bias_trains(self, param_name: str) -> bool:
        modes = {self.peft_config[n].bias for n in self._active}
        return "all" in modes or ("lora_only" in modes and ".base_layer." in param_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter's weights; if it was active, the remaining active ones stay."""
        self._require_known([adapter_name])
        self._refuse_if_merged(f"delete adapter {adapter_name!r}", adapter_name)
        self._remove_adapter_weights(adapter_name)
        del self.peft_config[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]
        self._apply_active()

    def _unwrap_empty_layers(self) -> None:
        """Put the original module back wherever a wrapper holds no adapter (after a failed add)."""
        for name, module in list(self.model.named_modules()):
            if isinstance(module, (LoraLayer, ModulesToSave)) and not module.adapter_names:
                original = module.base_layer if isinstance(module, LoraLayer) else module.original_module
                set_submodule(self.model, name, original)

    def _require_known(self, names: list[str], *, argument: str | None = None) -> None:
        """Raise ConfigError naming the adapters in `names` that are not loaded."""
        unknown = [n for n in dict.fromkeys(names) if n not in self.peft_config]
        if unknown:
            where = f"{argument} has " if argument else ""
            raise ConfigError(f"{where}unknown adapter(s) {unknown}; "
                              f"loaded adapters: {sorted(self.peft_config)}")

    def _refuse_if_merged(self, action: str, adapter_name: str | None = None) -> None:
        """Raise MergeError if any adapter (or `adapter_name`) is merged: `action` needs them apart."""
        layers = [layer for layer in self._layers() if isinstance(layer, LoraLayer)]
        if adapter_name is None:
            merged, what = any(layer.merged for layer in layers), "adapters are"
        else:
            merged, what = any(adapter_name in layer.merged_adapters for layer in layers), "it is"
        if merged:
            raise MergeError(f"cannot {action}: {what} merged into the base weights; "
                             "call unmerge_adapter() first")

    def _remove_adapter_weights(self, adapter_name: str) -> None:
        for layer in self._layers():
            layer.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the plain base model inside the block; state is restored even if it raises."""
        self._refuse_if_merged("disable adapters")
        layers = list(self._layers())
        previous = [layer.disable_adapters for layer in layers]
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer, flag in zip(layers, previous):
                layer.disable_adapters = flag

    def disable_adapter_layers(self) -> None:
        """PEFT's non-context form of disable_adapter(): LoRA updates off until enable_adapter_layers()."""
        self._set_adapter_layers(enabled=False)

    def enable_adapter_layers(self) -> None:
        """Undo disable_adapter_layers()."""
        self._set_adapter_layers(enabled=True)

    def _set_adapter_layers(self, *, enabled: bool) -> None:
        self._refuse_if_merged(f"{'enable' if enabled else 'disable'} adapter layers")
        for layer in self._layers():
            layer.disable_adapters = not enabled

    # ----- running -------------------------------------------------------------------------------

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.model.generate(*args, **kwargs)

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: list[str], args, kwargs) -> Iterator[None]:
        """Route rows to adapters for one call: one group of row indices per distinct name."""
        names = adapter_list(adapter_names, "adapter_names")
        self._require_known([n for n in names if n != BASE_ADAPTER], argument="adapter_names")
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if isinstance(inputs, Tensor) and inputs.shape[0] != len(names):
            raise ConfigError(f"adapter_names has {len(names)} entries "
                              f"but the batch has {inputs.shape[0]} rows")
        self._refuse_if_merged("route rows with adapter_names")
        layers = list(self._layers())
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        groups = []
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            rows = torch.tensor(rows, dtype=torch.long, device=device)
            groups.append((name, rows))
        for layer in layers:
            layer.batch_groups = groups
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_groups = None

    # ----- merging -------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None, *, safe_merge: bool = False) -> None:
        """Add the (active) adapters into the base weights; forward then skips them."""
        names = self._merge_names(adapter_names)
        layers = [layer for layer in self._layers() if isinstance(layer, LoraLayer)]
        merge.check_not_tied(self.model, layers, names)
        if safe_merge:  # check every layer before touching any weight; the merge itself need not recheck
            for layer in layers:
                layer.check_finite_merge(names)
        for layer in layers:
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged adapter from the base weights."""
        for layer in self._layers():
            if isinstance(layer, LoraLayer):
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the active adapters and return the plain model (LoRA layers removed)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(keep_saved_copies=True)

    def unload(self) -> nn.Module:
        """Return the plain model with LoRA layers removed, without merging."""
        return self._unload(keep_saved_copies=False)

    def _merge_names(self, adapter_names: list[str] | None) -> list[str]:
        if adapter_names is None:
            return list(self._active)
        names = adapter_list(adapter_names, "adapter_names")
        self._require_known(names)
        return names

    def _unload(self, keep_saved_copies: bool) -> nn.Module:
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoraLayer):
                replacement = module.base_layer
            elif isinstance(module, ModulesToSave):
                replacement = module.original_module
                if keep_saved_copies and module.active_adapters:
                    replacement = module.modules_to_save[module.active_adapters[0]]
            else:
                continue
            set_submodule(self.model, name, replacement)
        return self.model

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             **svd_options) -> None:
        """Create `adapter_name` as a weighted combination of existing adapters (see merge.py; PEFT's
        svd_clamp, svd_full_matrices and svd_driver are taken)."""
        merge.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type, svd_rank,
                                   **svd_options)

    # ----- parameters ----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; quantized weights count their logical elements."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        total += sum(m.num_weight_elements for m in self.model.modules() if is_quantized(m))
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    # ----- files ---------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, **kwargs) -> None:
        """Write each adapter in PEFT's format; non-default names go to a sub-folder.

        Of PEFT's other keyword arguments, `is_main_process=False` writes nothing (other ranks of a
        distributed run); the rest go through `check_peft_kwargs`: PiSSA/OLoRA -> LoRA conversion
        (`path_initial_model_for_weight_conversion`) is refused by name, and
        `save_embedding_layers=True` and the like are ignored with a warning.
        """
        is_main_process = kwargs.pop("is_main_process", True)
        check_peft_kwargs("save_pretrained", kwargs)
        if not is_main_process:
            return
        if not safe_serialization:
            logger.warning("loratune writes safetensors only; ignoring safe_serialization=False")
        if not isinstance(save_directory, (str, os.PathLike)):
            raise ConfigError(f"save_directory must be a string or path, got {shown(save_directory)}")
        names = (adapter_list(selected_adapters, "selected_adapters") if selected_adapters is not None
                 else list(self.peft_config))
        self._require_known(names, argument="selected_adapters")
        for name in names:
            config = replace(self.peft_config[name], inference_mode=True)
            tensors = adapter_io.adapter_state_dict(self.model, name, config.bias)
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            adapter_io.save_adapter(directory, config, tensors)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        subfolder: str | None = None, revision: str | None = None, **kwargs) -> LoraModel:
        """Wrap `model` and load a saved adapter into it (strictly: every tensor must fit).

        PEFT's other keyword arguments go through `check_peft_kwargs` (ignored with a warning, or
        refused by name when they would change the result).
        """
        check_peft_kwargs("PeftModel.from_pretrained", kwargs)
        file_config, tensors = adapter_io.read_adapter(model_id, subfolder=subfolder, revision=revision)
        return cls.from_adapter(model, config or file_config, tensors, source=str(model_id),
                                adapter_name=adapter_name, is_trainable=is_trainable)

    @classmethod
    def from_adapter(cls, model: nn.Module, config: LoraConfig, tensors: dict, *, source: str,
                     adapter_name: str = "default", is_trainable: bool = False) -> LoraModel:
        """`from_pretrained` for an adapter already read with `adapter_io.read_adapter` (no second read).

        On a load error the user's model is left as it came (modules and trainable flags).
        """
        _check_model(model)
        if not isinstance(config, LoraConfig):
            raise ConfigError(f"config must be a loratune LoraConfig, got {type(config).__name__}")
        adapter_io.check_ranks(config, tensors, source=source)
        config = adapter_io.with_legacy_saves(model, config, tensors)
        config = adapter_io.without_unmatched_targets(model, config, source)
        config = replace(config, inference_mode=not is_trainable)
        trainable = {param: param.requires_grad for param in model.parameters()}
        # Injected with the plain init: nothing of the user's model changes until the file has fit.
        with _naming_adapter(source), adapter_io.generator_kept(config):
            self = cls(model, replace(config, init_lora_weights=True), adapter_name)
        try:
            self._fill_adapter(adapter_name, config, tensors, source)
        except AdapterError:
            self.unload()  # the user's model as it came: its own modules and trainable flags
            for param, flag in trainable.items():
                param.requires_grad_(flag)
            raise
        if not is_trainable:
            self.eval()  # as PEFT: a model loaded for inference runs without dropout
        return self

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False,
                     subfolder: str | None = None, revision: str | None = None, **kwargs) -> None:
        """Load a saved adapter under a new name (inactive); on any error the model is unchanged.

        PEFT's other keyword arguments go through `check_peft_kwargs`, as in `from_pretrained`.
        """
        check_peft_kwargs("load_adapter", kwargs)
        file_config, tensors = adapter_io.read_adapter(model_id, subfolder=subfolder, revision=revision)
        adapter_io.check_ranks(file_config, tensors, source=str(model_id))  # before anything is allocated
        config = adapter_io.with_legacy_saves(self.model, file_config, tensors)
        config = replace(adapter_io.without_unmatched_targets(self.model, config, str(model_id)),
                         inference_mode=not is_trainable)
        with _naming_adapter(str(model_id)), adapter_io.generator_kept(config):
            self.add_adapter(adapter_name, replace(config, init_lora_weights=True))
        try:
            self._fill_adapter(adapter_name, config, tensors, str(model_id))
        except AdapterError:
            self.delete_adapter(adapter_name)
            self._unwrap_empty_layers()
            raise
        if not is_trainable:
            self.eval()  # as PEFT: the new adapter's dropout modules would otherwise start in training mode

    def _fill_adapter(self, adapter_name: str, config: LoraConfig, tensors: dict, source: str) -> None:
        """Load saved tensors into an adapter injected with plain init; record its real init method."""
        adapter_io.load_adapter_weights(self.model, adapter_name, config, tensors, source=source)
        self.peft_config[adapter_name] = replace(self.peft_config[adapter_name],
                                                 init_lora_weights=config.init_lora_weights)
        self._apply_active()


@contextlib.contextmanager
def _naming_adapter(source: str) -> Iterator[None]:
    """Name the adapter whose config selects no module of the model (the error names only the entry)."""
    try:
        yield
    except TargetNotFoundError as err:
        raise TargetNotFoundError(f"{source} ({CONFIG_NAME}): {err}") from None


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected the base model as a torch.nn.Module, got {type(model).__name__}"
                          + (" (load it first, e.g. AutoModelForCausalLM.from_pretrained)"
                             if isinstance(model, (str, os.PathLike)) else ""))


PeftModel = LoraModel
PeftModelForCausalLM = LoraModel


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   **kwargs) -> LoraModel:
    """Inject a LoRA adapter into `model` (in place) and return the wrapping LoraModel.

    PEFT's other keyword arguments (`mixed`, `autocast_adapter_dtype`, `revision`,
    `low_cpu_mem_usage`) go through `check_peft_kwargs`: ignored with a warning, or refused by name.
    """
    check_peft_kwargs("get_peft_model", kwargs)
    return LoraModel(model, peft_config, adapter_name)
