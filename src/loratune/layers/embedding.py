"""LoRA on `nn.Embedding`, in PEFT's transposed convention.

y = embed(x) + scaling * (A^T[x]) @ B^T with A: (R, vocab) zero-initialised and B: (dim, R)
random, stored as `lora_embedding_A` / `lora_embedding_B` so files match PEFT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterParameterDict, LoraLayer, adapter_device, refuse_beyond_plain


class LoraEmbedding(LoraLayer):
    """A frozen embedding table plus low-rank adapters."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = AdapterParameterDict()
        self.lora_embedding_B = AdapterParameterDict()
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim

    def update_layer(self, adapter_name: str, *, r: int, lora_alpha: float, lora_dropout: float,
                     init_lora_weights, use_rslora: bool, use_dora: bool) -> None:
        refuse_beyond_plain("nn.Embedding", use_dora=use_dora, init_lora_weights=init_lora_weights)
        device = adapter_device(self.base_layer)
        self._set_scaling(adapter_name, r, lora_alpha, use_rslora)
        self._set_dropout(adapter_name, lora_dropout)  # kept for bookkeeping; PEFT applies none here
        A = torch.zeros(r, self.in_features, device=device)
        B = torch.empty(self.out_features, r, device=device)
        if init_lora_weights is False:
            nn.init.normal_(A)
        nn.init.normal_(B)
        self.lora_embedding_A[adapter_name] = nn.Parameter(A)
        self.lora_embedding_B[adapter_name] = nn.Parameter(B)

    def delta_weight(self, adapter_name: str) -> Tensor:
        A = self.lora_embedding_A[adapter_name].float()
        B = self.lora_embedding_B[adapter_name].float()
        return (B @ A).T * self.scaling[adapter_name]  # (vocab, dim)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        y = self.base_layer(x, *args, **kwargs)  # (B, T, D)
        return self.routed_delta(x, y, self._adapter_delta)

    def _adapter_delta(self, x: Tensor, adapter_name: str) -> Tensor:
        base = self.base_layer
        A, B = self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]
        after_A = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                              base.scale_grad_by_freq, base.sparse)  # (B, T, R)
        return (after_A @ B.T) * self.scaling[adapter_name]

    def _describe(self) -> str:
        return f"Embedding({self.in_features}, {self.out_features})"
