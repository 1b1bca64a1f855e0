"""The training loss: next-token cross-entropy summed over trained tokens.

`token_loss_sum(model, batch)` is what the trainer calls. It runs the model body for hidden states
and a chunked cross-entropy over the LM head (`loratune.ops.cross_entropy`), so the full
(tokens x vocab) logits never exist and rows whose label is ignored are never projected.
`token_loss_sum_reference` is the obvious version (full logits, shift, cross-entropy); the fast path
falls back to it for heads it does not recognise (LoRA on the head, logit soft-capping, ...) and
inside `loratune.ops.reference_paths()`.

Batches (HF convention, labels UNSHIFTED, IGNORE_INDEX = -100) are either padded (B, T) with an
attention_mask, or packed padding-free (1, N) with position_ids restarting per example and no
attention_mask; in packed batches the first token of each example already has label -100, so no
prediction crosses an example boundary. Both paths pass `use_cache=False`: with a cache object,
Transformers skips its packed-sequence detection and attention would cross example boundaries.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from loratune.data.tokenize import IGNORE_INDEX
from loratune.ops import fast_paths_enabled
from loratune.ops.cross_entropy import chunked_cross_entropy_sum
from loratune.quant.int8 import HEAD_CODES

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class LossModule(nn.Module):
    """Wraps the model so one forward returns (token loss sum, n tokens): what DDP and FSDP wrap.

    token_loss_sum may call the decoder body and read the LM head's weight directly; going through
    this module keeps DDP's gradient hooks and FSDP's gathering in charge whatever it does inside.
    """

    def __init__(self, model: nn.Module, loss_fn=None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn or token_loss_sum

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        return self.loss_fn(self.model, batch)


def token_loss_sum(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """Return (fp32 scalar sum of next-token CE over trained tokens, number of trained tokens).

    `model` is a LoraModel (anything with `get_base_model()`) or a plain HF causal LM.
    """
    split = _body_and_head(model, batch)
    if split is None:
        return token_loss_sum_reference(model, batch)
    body, head = split
    out = body(**_model_inputs(batch), use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (B, T, D)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = labels != IGNORE_INDEX
    rows = hidden[:, :-1][keep]  # (N, D), only trained positions
    loss = chunked_cross_entropy_sum(rows, head.weight, head.bias, labels[keep],
                                     int8_weight=getattr(head, HEAD_CODES, None))
    return loss, rows.shape[0]  # the boolean index already counted them


def token_loss_sum_reference(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
    """The same result from full logits: model(...).logits -> shift -> cross-entropy sum."""
    logits = model(**_model_inputs(batch), use_cache=False).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    loss = F.cross_entropy(
        shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum())


def _model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def _body_and_head(model: nn.Module, batch: dict) -> tuple[nn.Module, nn.Linear] | None:
    """Find the decoder body and a plain Linear LM head, or None when the fast path does not apply."""
    if batch.get("adapter_names") is not None or not fast_paths_enabled():
        return None  # mixed-adapter batches go through LoraModel.forward
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(hf, "get_decoder", None)
    get_head = getattr(hf, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    config = getattr(hf, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # the head does more than a projection
    try:
        body, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    # Exactly nn.Linear: a LoRA-wrapped or modules_to_save head takes the reference path.
    if body is None or body is hf or type(head) is not nn.Linear:
        return None
    return body, head
