"""Merge an adapter into its base and write a standard Hugging Face model directory, then prove it.

`merge_to_directory` takes an adapter model loaded in float32 (`loratune.tools.load_trained.load_model`;
a quantized base computing in float32) and:
  1. computes reference logits of the adapter model on a fixed probe batch;
  2. for a quantized base (QLoRA), replaces the quantized layers by float32 ones holding exactly
     the weights they computed with (`loratune.quant.dequantize_model`), since merging never
     writes into quantized weights;
  3. merges (`merge_and_unload`: W += scaling * B @ A) and checks the merged model's logits
     against the reference: this is the PASS/FAIL check, in float32 so that only summation order
     differs (TOLERANCE);
  4. casts to the output dtype and writes config.json, model.safetensors, generation_config.json
     and the tokenizer files into a temp directory, loads it back with plain
     `AutoModelForCausalLM.from_pretrained`, checks the loaded weights are bitwise the ones
     written, and measures the written model's logits against the reference (in bf16 this is the
     rounding of every weight, reported, not judged: a random test model amplifies it a lot);
  5. publishes the directory (rename) only when both checks pass.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM

from loratune.atomic import atomic_directory, nearest_existing
from loratune.dtypes import bf16_supported, parse_dtype
from loratune.errors import ConfigError, MergeError
from loratune.quant import dequantize_model
from loratune.tools.evaluation import model_vocab_size

logger = logging.getLogger(__name__)

PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b  # LoRA merges W + s*B@A",
)
PROBE_LENGTH = 16
# (atol, rtol): pass when max|merged - reference| <= atol + rtol * max|reference|, both in float32.
TOLERANCE = (1e-4, 1e-4)


@dataclass(frozen=True)
class MergeReport:
    """What was written and how close the merged model is to the adapter model."""

    output_dir: str
    dtype: str
    files: list[str]
    reference: str  # what the logits were compared against, in words
    max_abs_diff: float  # merged (float32) vs adapter model: the PASS/FAIL number
    tolerance: float
    max_abs_logit: float
    written_diff: float  # the written model vs the adapter model (in float32 where bf16 is emulated)
    weights_identical: bool  # the reloaded directory holds exactly the merged weights
    published: bool

    @property
    def passed(self) -> bool:
        return check_passed(self.max_abs_diff, self.tolerance, self.weights_identical)


def check_passed(max_abs_diff: float, tolerance: float, weights_identical: bool) -> bool:
    """The PASS/FAIL verdict, and the one condition for publishing the directory (a NaN diff fails)."""
    return max_abs_diff <= tolerance and weights_identical


def check_tolerance(tolerance: float | None) -> None:
    """Refuse a --tolerance that is NaN, infinite or negative (None means the default).

    Raises:
        ConfigError: naming --tolerance and the value.
    """
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise ConfigError(f"--tolerance must be a finite number >= 0, got {tolerance!r} "
                          "(omit it for the default 1e-4 + 1e-4 * max |logit|)")


def probe_batch(tokenizer, vocab_size: int) -> Tensor:
    """A fixed (B, T) batch: the probe texts tokenized, cut or filled to PROBE_LENGTH tokens."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for text in PROBE_TEXTS:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])[:PROBE_LENGTH]
        fill = torch.randint(0, vocab_size, (PROBE_LENGTH - len(ids),), generator=g).tolist()
        rows.append(ids + fill)
    rows.append(torch.randint(0, vocab_size, (PROBE_LENGTH,), generator=g).tolist())
    return torch.tensor(rows, dtype=torch.long)  # (3, PROBE_LENGTH)


@torch.no_grad()
def logits_of(model: nn.Module, input_ids: Tensor) -> Tensor:
    """fp32 logits (B, T, V) of a model on the probe batch."""
    device = next(model.parameters()).device
    out = model(input_ids=input_ids.to(device), use_cache=False)
    return out.logits.float().cpu()


def tolerance_for(reference: Tensor) -> float:
    atol, rtol = TOLERANCE
    return atol + rtol * float(reference.abs().max())


def check_merge_output_dir(output_dir: str, adapter_dir: str | None) -> None:
    """Refuse to write into a non-empty directory, into the adapter itself, or below a file.

    An empty path is refused too: it means the current directory, which is rarely empty.

    Raises:
        ConfigError: naming the directory.
    """
    if not output_dir:
        raise ConfigError("--output_dir is empty; name a new directory for the output")
    if adapter_dir is not None and os.path.abspath(output_dir) == os.path.abspath(adapter_dir):
        raise ConfigError(f"--output_dir {output_dir!r} is the adapter directory; choose a new directory")
    if os.path.lexists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise ConfigError(f"--output_dir {output_dir!r} already exists and is not empty; remove it or choose "
                          "another directory (output is never written over other files)")
    parent = nearest_existing(output_dir)
    if not os.path.isdir(parent):
        raise ConfigError(f"--output_dir {output_dir!r} cannot be created: {parent!r} is a file, not a "
                          "directory")


def merge_to_directory(loaded, output_dir: str, *, dtype: str = "bfloat16",
                       tolerance: float | None = None) -> MergeReport:
    """Merge `loaded.model` (a float32 LoraModel) into its base, write `output_dir`, check the logits.

    The model is consumed: it is merged and unloaded in place. The directory is published only
    when the checks pass (`report.published`).

    Raises:
        ConfigError: bad dtype, tolerance or output_dir, or no adapter.
        MergeError: NaN/Inf in a merged weight.
    """
    torch_dtype = parse_dtype(dtype, "--dtype")
    check_tolerance(tolerance)
    if not hasattr(loaded.model, "merge_and_unload"):
        raise ConfigError("merging needs an adapter (--adapter DIR)")
    check_merge_output_dir(output_dir, loaded.adapter_dir)
    # the embedding's rows, resized or not
    probe = probe_batch(loaded.tokenizer, model_vocab_size(loaded.model))
    reference = logits_of(loaded.model, probe)
    reference_name = "the adapter model" + (f" on its {loaded.quantized} base" if loaded.quantized else "")
    merged = merge_into_base(loaded)
    diff = float((logits_of(merged, probe) - reference).abs().max())
    tol = tolerance if tolerance is not None else tolerance_for(reference)
    merged = merged.to(torch_dtype)
    merged.config.dtype = torch_dtype
    check_finite_weights(merged, dtype)
    published = False
    try:
        with atomic_directory(output_dir) as tmp:
            merged.save_pretrained(tmp)
            loaded.tokenizer.save_pretrained(tmp)
            files = sorted(os.listdir(tmp))
            reloaded = _reload(tmp, torch_dtype).to(next(merged.parameters()).device)
            identical = _same_weights(merged, reloaded)
            written_diff = float((logits_of(_computable(reloaded), probe) - reference).abs().max())
            if not check_passed(diff, tol, identical):
                raise _CheckFailed
        published = True
    except _CheckFailed:
        pass
    return MergeReport(output_dir, dtype, files, reference_name, diff, tol, float(reference.abs().max()),
                       written_diff, identical, published)


class _CheckFailed(Exception):
    """Raised inside the atomic block so that nothing is published."""


def merge_into_base(loaded) -> nn.Module:
    """Merge a loaded adapter into its base (a quantized base is made float32 first); the plain model."""
    model = loaded.model
    if loaded.quantized:
        dequantize_model(model.get_base_model(), dtype=torch.float32)
    merged = model.merge_and_unload(safe_merge=True).eval()
    untie_a_trained_head(merged)
    return merged


def untie_a_trained_head(model: nn.Module) -> None:
    """A tied base whose output head was trained in full (modules_to_save lm_head) has, once merged,
    a head of its own: say so in its config. Left tied, save_pretrained, GGUF export (which writes
    no output head for a tied model) and loaders that honour the flag would use the embedding."""
    config, head, embed = model.config, model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or head is None or embed is None:
        return
    if head.weight is not embed.weight:
        logger.info("the output head was trained apart from the tied embedding: writing it untied")
        config.tie_word_embeddings = False


def check_finite_weights(model: nn.Module, dtype: str) -> None:
    """Raise MergeError naming the first weight that the cast to `dtype` made Inf or NaN (a merged
    weight beyond float16's 65504, say), before anything is written."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not bool(torch.isfinite(param).all()):
            raise MergeError(f"merged weight {name} does not fit {dtype} (it becomes Inf or NaN); merge to "
                             "a wider dtype (--dtype bfloat16 or float32)")


def _reload(directory: str, torch_dtype: torch.dtype) -> nn.Module:
    """Load the written directory the way users will."""
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).eval()


def _computable(model: nn.Module) -> nn.Module:
    """The model itself, or made float32 where its bf16 would be emulated (a CPU without AVX512-BF16 or
    AMX, ~100x slower): the written weights, exactly, computed in float32 instead of bf16."""
    param = next(model.parameters())
    if param.dtype == torch.bfloat16 and not bf16_supported(param.device):
        return model.float()
    return model


def _same_weights(expected: nn.Module, loaded: nn.Module) -> bool:
    want, got = expected.state_dict(), loaded.state_dict()
    if set(want) != set(got):
        logger.error("written model has different tensors: missing %s, extra %s",
                     sorted(set(want) - set(got))[:5], sorted(set(got) - set(want))[:5])
        return False
    return all(torch.equal(want[k].cpu(), got[k].cpu()) for k in want)
