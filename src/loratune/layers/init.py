"""Initialisations that derive A and B from the base weight and rewrite it: PiSSA and OLoRA.

Both keep the layer's output unchanged at init: W_res = W - scaling * B @ A, so
W_res + scaling * B @ A == W (up to the base dtype's rounding). They follow PEFT's formulas so
adapters trained this way match PEFT's, with the same caveat: the saved A, B only reproduce the
model on top of the rewritten base (see PEFT's docs on converting PiSSA/OLoRA adapters).
"""

from __future__ import annotations

import torch


def init_from_base(layer, adapter_name: str, method: str) -> None:
    """Set A, B of `layer` from its base weight by PiSSA (SVD) or OLoRA (QR) and rewrite W."""
    base = layer.base_layer.weight
    w = base.detach().float()
    w = w.T if layer.fan_in_fan_out else w  # (out, in)
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    if method == "olora":
        Q, R = torch.linalg.qr(w)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    elif method == "pissa" or method.startswith("pissa_niter_"):
        if method == "pissa":
            V, S, Uh = torch.linalg.svd(w, full_matrices=False)
            Vr, Sr, Uhr = V[:, :r], S[:r], Uh[:r]
        else:
            niter = int(method.removeprefix("pissa_niter_"))
            Vr, Sr, Ur = torch.svd_lowrank(w, q=r, niter=niter)
            Uhr = Ur.T
        Sr = Sr / scaling
        A = torch.diag(Sr.sqrt()) @ Uhr  # (R, in)
        B = Vr @ torch.diag(Sr.sqrt())  # (out, R)
    else:
        raise ValueError(f"unknown init_lora_weights {method!r}")
    layer.lora_A[adapter_name].weight.data.copy_(A)
    layer.lora_B[adapter_name].weight.data.copy_(B)
    residual = w - scaling * (B @ A)
    base.data.copy_((residual.T if layer.fan_in_fan_out else residual).to(base.dtype))
