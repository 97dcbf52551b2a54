"""RMSNorm references (spec §1, §2): the layer norm on the fp32 residual stream, and the residual add fused with it.

The residual stream is fp32; the norm computes in fp32 and returns the weight's dtype, as Hugging Face's
MambaRMSNorm (the normalised row is rounded to that dtype before the weight multiplies it).
"""
from __future__ import annotations

import torch


def rms_norm_ref(x, weight, eps: float):
    """x [..., d] (any float dtype) -> weight * (x / rms(x)) in weight's dtype."""
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(weight.dtype)


def residual_norm_ref(h, y, weight, eps: float):
    """The start of a layer: h' = h + y (fp32 residual stream; y None: h' = h), u = RMSNorm(h').
    Returns (h', u)."""
    if y is not None:
        h = h + y
    return h, rms_norm_ref(h, weight, eps)
