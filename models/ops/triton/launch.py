"""Programmatic dependent launch (PDL, sm_90+) for a sequence of kernels on one stream.

A kernel launched with `launch_pdl=True` may be scheduled while the kernel before it still runs; it calls
_after_predecessor first, which waits until that kernel has finished (its writes visible) and then lets the next
kernel be scheduled in turn. Nothing a kernel reads or writes is touched before that wait, so stream order holds
transitively, and a CUDA graph keeps the edges. What it buys is part of the launch gap: the next kernel's
programs are resident, waiting, when this one ends. The 130m's prefill (13 such kernels a layer) measured 4.53 ->
4.40 ms at 2k tokens on an H100, unchanged at 16k and 64k (BENCHMARKS.md, thirteenth session).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

PDL = True               # the prefill kernels launch with PDL where the GPU has it (False: to measure what it buys)


@triton.jit
def _after_predecessor(USE_PDL: tl.constexpr):
    """Wait until the previous kernel on the stream has finished, then let the next kernel launch (and start its
    own prefetch). No-op without PDL: stream order already serialises."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _has_pdl(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_meta(device: torch.device) -> dict:
    """Launch options of a kernel that starts with _after_predecessor(USE_PDL)."""
    return dict(USE_PDL=True, launch_pdl=True) if PDL and _has_pdl(torch.device(device)) else dict(USE_PDL=False)
