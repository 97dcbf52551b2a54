"""Triton kernels, each beside (importing) its PyTorch reference in models/ops/ (spec §6, §3-§5, §8).

    norm.py     residual add + RMSNorm                                                 (ref: ops/norm.py)
    scan.py     causal conv, selective scan forward/backward, one-token state step     (ref: ops/scan.py)
    pool.py     pool sweep, sparse pool attention                                      (ref: ops/pool.py)
    memory.py   a layer's memory path fused for half-precision prefill               (ref: Layer.memory_read)
    decode.py           the fused per-layer decode kernels (the C++ runtime's fused plan; TritonBackend's layered mode)
    decode_step.py      the whole decode step as one persistent kernel (TritonBackend step_kernel='persistent')

TRITON_OPS offers exactly the functions and signatures of TORCH_OPS (a few reuse the reference where a kernel buys
nothing; each says so). CUDA tensors run the compiled kernels. CPU tensors run the same kernels in Triton's
interpreter, which must be chosen before the first `import triton` of the process (TRITON_INTERPRET=1): Triton
decorates its own `tl.*` library once, so one process is either interpreted or compiled. INTERPRETED says which;
AOT builds (AOT_KERNELS) need a compiled process.
"""
from __future__ import annotations

import contextlib
import os
import types

import torch

import triton.language as tl

from .. import TRITON_ON_CPU, needs_grad


def _triton_is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(tl.zeros, InterpretedFunction)      # one of Triton's own @jit library functions


INTERPRETED = _triton_is_interpreted()


if INTERPRETED:
    from ._interpreter import patch_interpreter
    patch_interpreter()


@contextlib.contextmanager
def _same_mode_as_triton():
    """Decorate our kernels the way Triton decorated its library, whatever TRITON_INTERPRET says now."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if INTERPRETED else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


with _same_mode_as_triton():
    from . import decode, decode_step, memory, norm, pool, scan  # noqa: E402

_KERNELS = types.SimpleNamespace(norm=norm, scan=scan, pool=pool, memory=memory, decode=decode, step=decode_step)


def kernels_for(device) -> types.SimpleNamespace:
    """The kernel modules, after checking that this process can run them on `device`."""
    if getattr(device, "type", str(device)) == "cpu" and not INTERPRETED:
        # a ValueError: the caller chose the kernels and the device (the CLI prints it as one line)
        raise ValueError(TRITON_ON_CPU + " (this process imported triton compiled)")
    return _KERNELS


# ---- the kernel set (same names and signatures as TORCH_OPS) --------------------------------------------------
def residual_norm(h, y, weight, eps: float):
    """The kernel for inference; with gradients, the reference (autograd through torch ops)."""
    if needs_grad(h, y, weight):
        from ..norm import residual_norm_ref
        return residual_norm_ref(h, y, weight, eps)
    return kernels_for(h.device).norm.residual_norm(h, y, weight, eps)


def causal_conv(x, weight, bias, window, lengths=None):
    """The kernel for inference; with gradients, the reference (cuDNN's conv is differentiable, ours is not)."""
    if needs_grad(x, weight, bias, window):
        from ..scan import causal_conv_ref
        return causal_conv_ref(x, weight, bias, window, lengths)
    return kernels_for(x.device).scan.causal_conv(x, weight, bias, window, lengths)


def causal_conv_step(x, weight, bias, window):
    """Reference implementation; the fast decode path fuses the step conv into decode.py instead."""
    from ..scan import causal_conv_step_ref
    return causal_conv_step_ref(x, weight, bias, window)


def selective_scan(x, dt, A, B, C, D, z=None, dt_bias=None, h0=None, dt_softplus=True, last_only=False, lengths=None):
    return kernels_for(x.device).scan.selective_scan(x, dt, A, B, C, D, z, dt_bias, h0, dt_softplus, last_only,
                                                     lengths)


def selective_state_step(h, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=True):
    """The kernel for inference; with gradients (training through step), the reference: the kernel has no
    backward."""
    if needs_grad(h, x, dt, A, B, C, D, z, dt_bias):
        from ..scan import selective_state_step_ref
        return selective_state_step_ref(h, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    return kernels_for(x.device).scan.selective_state_step(h, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def pool_sweep(scores, prio0, tau1):
    return kernels_for(scores.device).pool.pool_sweep(scores, prio0, tau1)


def pool_insert(pool, prio, score, summary, tau1):
    """Reference implementation (five tensor ops on [B,K]); the fast decode path fuses the insert into decode.py."""
    from ..pool import pool_insert_ref
    return pool_insert_ref(pool, prio, score, summary, tau1)


def _dots(t):
    """The kernels of the pool reads multiply with tl.dot, which Triton 3.6's interpreter gets wrong in bf16 (it
    multiplies bf16's raw bits): refuse there rather than return garbage."""
    if INTERPRETED and t.dtype == torch.bfloat16:
        raise ValueError("bf16 with kernels='triton' needs a GPU: Triton's CPU interpreter computes bf16 tl.dot "
                         "wrongly (use fp32 or fp16 there, or kernels='torch')")
    return kernels_for(t.device)


def pool_attention(q, keys, values, index, heads: int):
    return _dots(q).pool.pool_attention(q, keys, values, index, heads)


def pool_read(u, bank, index, w_q, w_k, w_v, heads: int, gain, residual=None):
    return _dots(u).pool.pool_read(u, bank, index, w_q, w_k, w_v, heads, gain, residual)


def fused_memory_read(layer, u, pool0, prio0, group, u_is_scratch=False, lengths=None):
    """fp16/bf16 inference: the fused path (memory.py); otherwise None, and Layer.memory_read composes the ops
    above."""
    return _dots(u).memory.fused_memory_read(layer, u, pool0, prio0, group, u_is_scratch, lengths=lengths)


TRITON_OPS = types.SimpleNamespace(
    name="triton",
    residual_norm=residual_norm,
    causal_conv=causal_conv,
    causal_conv_step=causal_conv_step,
    selective_scan=selective_scan,
    selective_state_step=selective_state_step,
    pool_sweep=pool_sweep,
    pool_insert=pool_insert,
    pool_attention=pool_attention,
    pool_read=pool_read,
    fused_memory_read=fused_memory_read,
)



def __getattr__(name):
    # AOT_KERNELS is built on first use; an interpreted process cannot compile, so it says so instead
    if name == "AOT_KERNELS":
        if INTERPRETED:
            raise RuntimeError("AOT_KERNELS needs the compiled kernels, but this process imported triton with "
                               "TRITON_INTERPRET=1; build ahead-of-time kernels in a process without it")
        from .aot import aot_kernels
        globals()["AOT_KERNELS"] = table = aot_kernels()
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
