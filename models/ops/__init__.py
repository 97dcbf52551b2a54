"""Kernel sets. Each set offers the same functions with the same signatures; "torch" is the reference.

    residual_norm                                                             (norm.py, spec §2)
    causal_conv, causal_conv_step, selective_scan, selective_state_step       (scan.py, spec §6)
    pool_sweep, pool_insert, pool_attention, pool_read                        (pool.py, spec §3-§5, §8)
    fused_memory_read      a whole layer's §3-§5 prefill at once (ũ = u + r_tok + r_cross, the pool after it), or
                           None where the set has no such path (the reference: Layer.memory_read composes the ops);
                           lengths [B]: row b's tokens past lengths[b] are padding, which enters no pool
    causal_conv, selective_scan and fused_memory_read take `lengths` (rows of different lengths in one batch); the
    model passes it only for such rows, so a kernel set without it still runs every prefill of whole rows
"""
from __future__ import annotations

import types

import torch

from . import norm, pool, scan

KERNEL_SETS = ("torch", "triton")


def is_integer(t: torch.Tensor) -> bool:
    """Whether a tensor holds integers (token ids, lengths, row indices): not float, complex or bool."""
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def no_fused_memory_read(layer, u, pool0, prio0, group, u_is_scratch=False, lengths=None):
    """The reference composes the memory path from the ops (Layer.memory_read); nothing is fused."""
    return None


TORCH_OPS = types.SimpleNamespace(
    name="torch",
    residual_norm=norm.residual_norm_ref,
    causal_conv=scan.causal_conv_ref,
    causal_conv_step=scan.causal_conv_step_ref,
    selective_scan=scan.selective_scan_ref,
    selective_state_step=scan.selective_state_step_ref,
    pool_sweep=pool.pool_sweep_ref,
    pool_insert=pool.pool_insert_ref,
    pool_attention=pool.pool_attention_ref,
    pool_read=pool.pool_read_ref,
    fused_memory_read=no_fused_memory_read,
)


def needs_grad(*tensors) -> bool:
    """Whether autograd records an op on these tensors (None allowed): where a kernel has no backward of its
    own, the kernel set runs its reference instead."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


TRITON_ON_CPU = ("the Triton kernels run on a CUDA GPU (on the CPU only in Triton's slow interpreter: "
                 "TRITON_INTERPRET=1 set before the process first imports triton); use the torch kernels on the CPU")


def check_kernels_on(name: str, device) -> None:
    """Raise ValueError, before any work, where kernel set `name` cannot run on `device` in this process (the
    Triton kernels on the CPU, unless this process runs Triton interpreted)."""
    try:
        cpu = torch.device(device).type == "cpu"
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: use cpu, cuda or cuda:N") from None
    if name != "triton" or not cpu:
        return
    try:
        from .triton import INTERPRETED        # how the triton this process imported runs
    except ImportError:
        return                                 # load_ops names what is missing
    if not INTERPRETED:
        raise ValueError(TRITON_ON_CPU)


def load_ops(name: str) -> types.SimpleNamespace:
    if name == "torch":
        return TORCH_OPS
    if name == "triton":
        try:
            from .triton import TRITON_OPS
        except ImportError as e:
            raise ImportError(f"kernels='triton' needs the Triton kernels and the triton package "
                              f"(pip install 'memmamba-deploy[triton]'): {e}") from None
        return TRITON_OPS
    raise ValueError(f"unknown kernel set {name!r}; choose one of {list(KERNEL_SETS)}")
