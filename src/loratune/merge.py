"""Combining adapters: `add_weighted_adapter` and the NaN/Inf check behind `safe_merge`.

Weighted combinations follow PEFT's definitions, so a combined adapter means the same in both:
- "cat":    A = concat_i(w_i * s_i * A_i) along R, B = concat_i(B_i) along R; exact:
            B @ A = sum_i w_i * s_i * B_i @ A_i (with weights 1 it equals all adapters active).
- "linear": A = sum_i sign * sqrt(|w_i s_i|) A_i, B = sum_i sqrt(|w_i s_i|) B_i; needs equal ranks;
            not exact (cross terms), as in PEFT.
- "svd":    delta = sum_i w_i * s_i * B_i @ A_i, truncated to rank `svd_rank` (default: the
            largest rank) by SVD: B = U S, A = V^T.
The new adapter has scaling 1 (lora_alpha = r per module); weights and scalings live in A and B.
"""

from __future__ import annotations

import math
from dataclasses import replace
from numbers import Integral, Real

import torch
from torch import Tensor, nn

from .base_layers import is_quantized
from .errors import ConfigError, MergeError, UnsupportedFeatureError
from .layers import LoraEmbedding, LoraLayer
from .module_patterns import shown

COMBINATIONS = ("svd", "cat", "linear")
SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")  # torch.linalg.svd's (cuSOLVER) drivers
# PEFT's pruning-based combinations, refused by name.
PEFT_ONLY_COMBINATIONS = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                          "magnitude_prune", "magnitude_prune_svd")


def check_not_tied(model: nn.Module, layers: list[LoraLayer], adapter_names: list[str]) -> None:
    """Raise MergeError if a weight about to be merged is shared with another module.

    Tied input/output embeddings (Qwen2, Gemma, GPT-2) share one tensor: merging a LoRA on the
    embedding into it would silently change the output head too (PEFT does exactly that).
    """
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name)
    for layer in layers:
        if is_quantized(layer.base_layer):
            continue
        if not any(n in layer.r and n not in layer.merged_adapters for n in adapter_names):
            continue
        names = owners.get(id(layer.base_layer.weight), [])
        if len(names) > 1:
            raise MergeError(
                f"cannot merge into {names[0]}: it is tied to {', '.join(names[1:])}, "
                "which would change too; untie them first (give the other module its own copy and set "
                "config.tie_word_embeddings=False)"
            )


def _get_AB(layer: LoraLayer, name: str) -> tuple[Tensor, Tensor]:
    if isinstance(layer, LoraEmbedding):
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None,
                         density: float | None = None, majority_sign_method: str = "total") -> None:
    """Create `adapter_name` on `model` (a LoraModel) from a weighted combination of adapters.

    Takes PEFT's arguments: `svd_clamp` clamps the SVD factors to the given quantile of their values,
    `svd_driver` goes to torch.linalg.svd, and `svd_full_matrices` is accepted but has no effect (the
    factors are truncated to the rank either way, so the reduced SVD is always used). PEFT's pruning
    combinations (ties, dare, magnitude_prune) and their `density` / `majority_sign_method` are
    refused by name.
    """
    refused = [f"combination_type={combination_type!r}"] if combination_type in PEFT_ONLY_COMBINATIONS else []
    refused += [f"density={density!r}"] if density is not None else []
    refused += [f"majority_sign_method={majority_sign_method!r}"] if majority_sign_method != "total" else []
    if refused:  # PEFT's pruning combinations and their options
        raise UnsupportedFeatureError(f"add_weighted_adapter: {', '.join(refused)} is not supported; "
                                      f"use one of {COMBINATIONS}")
    problems = _argument_problems(model, adapters, weights, combination_type, svd_rank, svd_clamp, svd_driver)
    try:
        model._check_new_adapter_name(adapter_name)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems, source="add_weighted_adapter")
    if any(model.peft_config[a].use_dora for a in adapters):
        raise UnsupportedFeatureError("add_weighted_adapter does not support DoRA adapters")

    layers = [(path, m) for path, m in model.model.named_modules()
              if isinstance(m, LoraLayer) and any(a in m.r for a in adapters)]
    ranks = {path: _combined_rank(path, m, adapters, combination_type, svd_rank) for path, m in layers}
    first = model.peft_config[adapters[0]]
    r = max(ranks.values())
    config = replace(
        first, r=r, lora_alpha=r, use_rslora=False, use_dora=False, init_lora_weights=True,
        # The layers it covers by full path: the sources' layer selections (layers_to_transform,
        # exclude_modules, a regex) are not carried over, and a bare name would claim every such layer.
        target_modules=sorted(path for path, _ in layers),
        rank_pattern={p: k for p, k in ranks.items() if k != r},
        alpha_pattern={p: k for p, k in ranks.items() if k != r},
        modules_to_save=None, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
    )
    for path, layer in layers:
        layer.update_layer(adapter_name, r=ranks[path], lora_alpha=ranks[path],
                           lora_dropout=first.lora_dropout,
                           init_lora_weights=True, use_rslora=False, use_dora=False)
        A, B = _combine(layer, adapters, weights, combination_type, ranks[path],
                        clamp=svd_clamp, driver=svd_driver)
        new_A, new_B = _get_AB(layer, adapter_name)
        with torch.no_grad():
            new_A.copy_(A.reshape(new_A.shape))
            new_B.copy_(B.reshape(new_B.shape))
    model.peft_config[adapter_name] = config
    model._apply_active()
    model._follow_mode()


def _argument_problems(model, adapters, weights, combination_type: str, svd_rank, svd_clamp,
                       svd_driver) -> list[str]:
    """Everything wrong with add_weighted_adapter's arguments, checked before any layer changes."""
    problems = []
    if svd_clamp is not None and not (_is_number(svd_clamp) and 0 < svd_clamp <= 1):
        problems.append(f"svd_clamp must be in (0, 1], got {shown(svd_clamp)}")
    rank_ok = isinstance(svd_rank, Integral) and not isinstance(svd_rank, bool) and svd_rank > 0
    if svd_rank is not None and not rank_ok:
        problems.append(f"svd_rank must be a positive integer, got {shown(svd_rank)}")
    if svd_driver not in SVD_DRIVERS:
        problems.append(f"svd_driver must be one of {SVD_DRIVERS}, got {svd_driver!r}")
    elif svd_driver is not None and any(p.device.type != "cuda" for p in model.model.parameters()):
        problems.append(f"svd_driver={svd_driver!r} needs the model on CUDA (torch.linalg.svd takes a driver "
                        "only there); leave it None")
    if combination_type not in COMBINATIONS:
        problems.append(f"combination_type must be one of {COMBINATIONS}, got {combination_type!r}")
    if not isinstance(adapters, (list, tuple)) or not all(isinstance(a, str) for a in adapters):
        return problems + [f"adapters must be a list of adapter names, got {shown(adapters)}"]
    missing = [a for a in adapters if a not in model.peft_config]
    if missing:
        problems.append(f"unknown adapter(s) {missing}; loaded: {sorted(model.peft_config)}")
    if not isinstance(weights, (list, tuple)) or not all(_is_finite(w) for w in weights):
        problems.append(f"weights must be a list of finite numbers, got {shown(weights)}")
    elif len(weights) != len(adapters) or not adapters:
        problems.append(f"need one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)  # numpy scalars too


def _is_finite(value: object) -> bool:
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:  # an int beyond any float
        return False


def _combined_rank(path: str, layer: LoraLayer, adapters: list[str], combination_type: str,
                   svd_rank: int | None) -> int:
    present = [layer.r[a] for a in adapters if a in layer.r]
    if combination_type == "cat":
        return sum(present)
    if combination_type == "linear":
        if len(set(present)) != 1 or len(present) != len(adapters):
            raise ConfigError(f"combination_type='linear' needs every adapter on {path} with one rank; "
                              f"got {present}")
        return present[0]
    return int(svd_rank) if svd_rank else max(present)  # int(): a numpy integer is not a LoraConfig r


def _combine(layer: LoraLayer, adapters: list[str], weights: list[float], combination_type: str,
             rank: int, clamp: float | None = None, driver: str | None = None) -> tuple[Tensor, Tensor]:
    """Return the new (A, B) for one layer, flattened to (R, -1) and (-1, R)."""
    pairs = []
    for name, w in zip(adapters, weights):
        if name in layer.r:
            A, B = _get_AB(layer, name)
            pairs.append((A.detach().float().reshape(A.shape[0], -1),
                          B.detach().float().reshape(B.shape[0], -1), w * layer.scaling[name]))
    if combination_type == "cat":
        return torch.cat([ws * A for A, _, ws in pairs], 0), torch.cat([B for _, B, _ in pairs], 1)
    if combination_type == "linear":
        A = sum(math.copysign(math.sqrt(abs(ws)), ws) * A for A, _, ws in pairs)
        B = sum(math.sqrt(abs(ws)) * B for _, B, ws in pairs)
        return A, B
    delta = sum(ws * (B @ A) for A, B, ws in pairs)  # (out, in*k) or (dim, vocab)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False, driver=driver)
    k = min(rank, S.numel())
    A, B = Vh[:k], U[:, :k] * S[:k]
    if clamp is not None:  # PEFT's clamp: both factors to the quantile of all their values
        high = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        A, B = A.clamp(-high, high), B.clamp(-high, high)
    return _pad_rank(A, B, rank)


def _pad_rank(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    if A.shape[0] == rank:
        return A, B
    A = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], 0)
    B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], 1)
    return A, B
