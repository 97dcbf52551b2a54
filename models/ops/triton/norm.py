"""Residual add + RMSNorm in Triton (reference: models.ops.norm.residual_norm_ref).

One read of the fp32 residual stream and of the mixer's output, one write of the new stream and of the normalised
row: the reference's seven elementwise and reduction kernels per layer become one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memmamba_deploy.models.ops.norm import residual_norm_ref  # noqa: F401 (reference)

from .launch import _after_predecessor, pdl_meta


@triton.jit
def residual_norm_kernel(
    h_ptr, y_ptr, w_ptr, h_out_ptr, u_ptr, rows, d, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_Y: tl.constexpr, USE_PDL: tl.constexpr,
):
    """grid (cdiv(rows, BLOCK_R),). h, h_out [rows, d] fp32; y [rows, d] (HAS_Y); w [d]; u [rows, d] in w's
    dtype; all contiguous. h_out = h + y; u = w * round(h_out * rsqrt(mean(h_out^2) + eps)) in fp32, rounded."""
    _after_predecessor(USE_PDL)
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_r < rows)[:, None] & (offs_d < d)[None, :]
    off = offs_r[:, None] * d + offs_d[None, :]
    h = tl.load(h_ptr + off, mask=mask, other=0.0)
    if HAS_Y:
        h += tl.load(y_ptr + off, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_out_ptr + off, h, mask=mask)
    inv = tl.rsqrt(tl.sum(h * h, axis=1) / d + eps)
    w = tl.load(w_ptr + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
    xn = (h * inv[:, None]).to(u_ptr.dtype.element_ty).to(tl.float32)       # the reference's rounding
    tl.store(u_ptr + off, (w[None, :] * xn).to(u_ptr.dtype.element_ty), mask=mask)


def norm_rows(block_d: int) -> int:
    """Rows a program of residual_norm_kernel takes (BLOCK_R) for BLOCK_D columns (cpp/aot_kernels.py too)."""
    return max(1, min(16, 4096 // block_d))


def residual_norm(h, y, weight, eps: float):
    """Same signature and results as residual_norm_ref (inference: no autograd)."""
    d = h.shape[-1]
    if h.dtype != torch.float32 or weight.shape != (d,) or (y is not None and y.shape != h.shape):
        raise ValueError(f"residual_norm wants h [..., d] fp32, y like h, weight [d]; got h {list(h.shape)} "
                         f"{h.dtype}, y {None if y is None else list(y.shape)}, weight {list(weight.shape)}")
    h = h.contiguous()
    rows = h.numel() // max(d, 1)
    h_out = torch.empty_like(h) if y is not None else h
    u = torch.empty(h.shape, device=h.device, dtype=weight.dtype)
    if rows:
        block_d = triton.next_power_of_2(d)
        block_r = norm_rows(block_d)
        residual_norm_kernel[(triton.cdiv(rows, block_r),)](
            h, h if y is None else y.contiguous(), weight.contiguous(), h_out, u, rows, d, eps,
            BLOCK_R=block_r, BLOCK_D=block_d, HAS_Y=y is not None, num_warps=4, **pdl_meta(h.device))
    return h_out, u
