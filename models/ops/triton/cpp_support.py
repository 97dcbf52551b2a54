"""Kernels the C++ native runtime (cpp/) needs beside the model's own (scan.py, decode.py):

  conv_step  the Mamba causal-conv step on its own (window shift + depthwise conv + bias + SiLU), for the runtime's
             cuBLAS plan, where in_proj is a cuBLAS GEMM (decode.py fuses the conv step with in_proj instead);
  sample     the token sampler (greedy / temperature / top-k / top-p) that keeps generation on the GPU;
  gained_add, cross_index
             the two pieces of the parallel prefill's memory path (spec §4-§5, §8) that the runtime does not find in
             scan.py, pool.py or memory.py: a read's end (residual + gain · o, gained_read) and one group member's
             share of the §5 index (cross_layer_bank).

Each kernel's PyTorch reference sits beside it (causal_conv_step_ref, sample_ref, gained_add_ref, cross_index_ref);
tests/test_cpp_support_kernels.py checks one against the other in the Triton interpreter and compiles them ahead of
time. The C++ host sampler
(cpp/src/sampling.cpp) implements sample_ref again, so the GPU sampler can be checked without Python.

Sampling (deterministic given seed and step counter):
  temperature 0  argmax, lowest token id on ties (as torch.argmax)
  otherwise      x = logits / temperature; keep {x >= k-th largest x} if top_k; then keep the tokens whose value
                 v has  mass(x > v) <= top_p  (probabilities renormalised over the top-k set) -- a *value*
                 threshold, so tokens tied at the boundary are all kept (memmamba_deploy.sampling keeps an
                 arbitrary subset of such ties); then draw by inverse CDF in token-id order with one uniform
                 u = (philox4x32_10(ctr=(row, step, 0, 0), key=seed)[0] >> 8) / 2**24.
The thresholds are found without sorting: an exact 16-ary search over the fp32 values' order-preserving 32-bit
keys (8 rounds of 16 candidates, one pass over the vocabulary per round).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from memmamba_deploy.models.ops.pool import cross_layer_bank, gained_read
from memmamba_deploy.models.ops.scan import causal_conv_step_ref  # noqa: F401 (the reference of conv_step)

PHILOX_M0 = tl.constexpr(0xD2511F53)      # Random123 philox4x32 multipliers ...
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)      # ... and Weyl key increments
PHILOX_W1 = tl.constexpr(0xBB67AE85)
SAMPLE_BLOCK = 1024


# ----------------------------------------------------------------------------------------------------------------
# Causal conv step
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _round(x, like_ptr):
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def conv_step_kernel(x_ptr, w_ptr, bias_ptr, win_in_ptr, win_out_ptr, out_ptr, Di, KW, stride_x_b,
                     BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    """grid (cdiv(Di, BLOCK_C), B). x [B, Di] (row stride stride_x_b, e.g. the x half of in_proj's output),
    w [Di, KW], bias [Di], windows [B, Di, KW-1] contiguous (oldest first), out [B, Di]. out = SiLU(Σ_k window·w
    + bias) over [window, x], rounded where causal_conv_step_ref's model-dtype tensors round (products, sum,
    + bias, SiLU); win_out = the window shifted by one with x last. win_out must not alias win_in."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < Di
    tap = tl.arange(0, BLOCK_W)
    x = tl.load(x_ptr + b * stride_x_b + ch, mask=mask_c, other=0.0)
    win = win_in_ptr + (b * Di + ch[:, None]) * (KW - 1)
    mask_w = mask_c[:, None] & (tap < KW - 1)[None, :]
    xt = tl.load(win + tap[None, :], mask=mask_w, other=0.0).to(tl.float32)
    xt = tl.where(tap[None, :] == KW - 1, x.to(tl.float32)[:, None], xt)
    w = tl.load(w_ptr + ch[:, None] * KW + tap[None, :], mask=mask_c[:, None] & (tap < KW)[None, :],
                other=0.0).to(tl.float32)
    s = _round(tl.sum(_round(xt * w, out_ptr), axis=1), out_ptr)
    s = _round(s + tl.load(bias_ptr + ch, mask=mask_c, other=0.0).to(tl.float32), out_ptr)
    tl.store(out_ptr + b * Di + ch, (s * tl.sigmoid(s)).to(out_ptr.dtype.element_ty), mask=mask_c)
    shifted = tl.load(win + tap[None, :] + 1, mask=mask_c[:, None] & (tap < KW - 2)[None, :], other=0.0)
    shifted = tl.where(tap[None, :] == KW - 2, x[:, None].to(shifted.dtype), shifted)
    tl.store(win_out_ptr + (b * Di + ch[:, None]) * (KW - 1) + tap[None, :], shifted, mask=mask_w)


def conv_blocks(d_inner: int, d_conv: int) -> dict:
    return dict(BLOCK_C=min(256, triton.next_power_of_2(d_inner)), BLOCK_W=triton.next_power_of_2(d_conv))


def conv_step(x, weight, bias, window):
    """Same arguments and results as causal_conv_step_ref (x [B,Di], weight [Di,k], bias [Di], window [B,Di,k-1])."""
    B, Di = x.shape
    KW = weight.shape[1]
    blocks = conv_blocks(Di, KW)
    out = torch.empty_like(x)
    win_out = torch.empty(B, Di, KW - 1, dtype=window.dtype, device=x.device)
    grid = (triton.cdiv(Di, blocks["BLOCK_C"]), B)
    conv_step_kernel[grid](x, weight.contiguous(), bias, window.contiguous(), win_out, out, Di, KW, x.stride(0),
                           **blocks)
    return out, win_out


# ----------------------------------------------------------------------------------------------------------------
# The parallel prefill's memory-path glue
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def gained_add_kernel(res_ptr, o_ptr, gain_ptr, out_ptr, d, stride_gain, BLOCK_D: tl.constexpr):
    """grid (rows,): out[r] = res[r] + round(o[r] · round(gain[r · stride_gain])) over rows of d, rounded to out's
    dtype where gained_read's model-dtype tensors round (gain fp32; stride_gain 0: one gain for every row, e.g. the
    §5 read's α). out may alias res (each program reads its row before writing it)."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < d
    g = _round(tl.load(gain_ptr + r * stride_gain), out_ptr)
    o = tl.load(o_ptr + r * d + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + r * d + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + r * d + offs, (res + _round(o * g, out_ptr)).to(out_ptr.dtype.element_ty), mask=mask)


def gained_add_ref(res, o, gain):
    """res + gain · o as the reference's read ends (gained_read): res, o [B,T,d]; gain [B,T] fp32."""
    return gained_read(o, gain, res)


def gained_add(res, o, gain, out=None):
    """gained_add_ref with gained_add_kernel; gain [B,T] fp32, or a one-element tensor for every row."""
    B, T, d = o.shape
    out = torch.empty_like(o) if out is None else out
    per_row = gain.numel() != 1
    gained_add_kernel[(B * T,)](res.contiguous(), o.contiguous(), gain.float().contiguous(), out, d,
                                1 if per_row else 0, BLOCK_D=triton.next_power_of_2(d))
    return out


@triton.jit
def cross_index_kernel(index_ptr, out_ptr, T, K, width, col0, shift, BLOCK_K: tl.constexpr):
    """grid (B·T,): one §5 group member's share of the cross-layer index. index [B, T+1, K] int32 is the member's
    sweep index (row t: the entries token t reads; the last row is not read); out [B, T, width] int32 gets, in
    columns [col0, col0 + K), index + shift where >= 0 and -1 elsewhere (cross_layer_bank with the member's bank
    `shift` rows into the joined bank)."""
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    i = tl.load(index_ptr + (b * (T + 1) + t) * K + offs, mask=mask, other=-1)
    tl.store(out_ptr + r * width + col0 + offs, tl.where(i >= 0, i + shift, -1), mask=mask)


def cross_index_ref(indices, entries: int):
    """cross_layer_bank's index: the members' sweep indices [B, T+1, K] (rows :T read) -> [B, T, len·K]."""
    banks = [i.new_zeros(i.shape[0], entries, 1) for i in indices]          # cross_layer_bank joins them too
    return cross_layer_bank([(b, i[:, :-1]) for b, i in zip(banks, indices)], entries)[1]


def cross_index(indices, entries: int):
    """cross_index_ref with one cross_index_kernel launch per member."""
    B, T1, K = indices[0].shape
    T = T1 - 1
    out = torch.empty(B, T, len(indices) * K, dtype=torch.int32, device=indices[0].device)
    for j, i in enumerate(indices):
        cross_index_kernel[(B * T,)](i.contiguous(), out, T, K, out.shape[-1], j * K, j * entries,
                                     BLOCK_K=triton.next_power_of_2(K))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sampler
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _philox_uniform(row, step, seed_lo, seed_hi):
    """u in [0, 1) with 24 random bits from philox4x32-10(counter=(row, step, 0, 0), key=(seed_lo, seed_hi))."""
    c0 = row.to(tl.uint32)
    c1 = step.to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = seed_lo.to(tl.uint32)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, PHILOX_M0)
        lo0 = tl.mul(c0, PHILOX_M0, sanitize_overflow=False)
        hi1 = tl.umulhi(c2, PHILOX_M1)
        lo1 = tl.mul(c2, PHILOX_M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, PHILOX_W1, sanitize_overflow=False)
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _key(x):
    """fp32 -> uint32 whose unsigned order is the float order (-inf smallest)."""
    i = x.to(tl.int32, bitcast=True)
    flip = (i >> 31) | -2147483648                           # all ones for negatives, the sign bit otherwise
    return (i ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _scaled(base, offs, V, temperature):
    m = offs < V
    x = tl.load(base + offs, mask=m, other=float("-inf")).to(tl.float32) / temperature
    return tl.where(m, x, float("-inf")), m


@triton.jit
def _search(base, V, temperature, mx, floor_key, need_count, need_mass, MASS: tl.constexpr, BLOCK: tl.constexpr):
    """Largest 32-bit key s such that, over the tokens with key >= max(s, floor_key), the count is >= need_count
    (MASS=0) or the mass sum(exp(x - mx)) is > need_mass (MASS=1). 8 rounds of 16 candidates each."""
    j = tl.arange(0, 16).to(tl.uint32)
    prefix = (floor_key * 0).to(tl.uint32)
    for r in tl.static_range(8):
        shift = 28 - 4 * r
        cand = prefix | (j << shift)
        if MASS:
            acc = tl.zeros([16], dtype=tl.float32)
        else:
            acc = tl.zeros([16], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            x, m = _scaled(base, start + tl.arange(0, BLOCK), V, temperature)
            k = _key(x)
            live = m & (k >= floor_key)
            ge = (k[None, :] >= cand[:, None]) & live[None, :]
            if MASS:
                acc += tl.sum(tl.where(ge, tl.exp(x - mx)[None, :], 0.0), axis=1)
            else:
                acc += tl.sum(ge.to(tl.int32), axis=1)
        if MASS:
            ok = acc > need_mass
        else:
            ok = acc >= need_count
        best = tl.max(tl.where(ok, j, 0), axis=0)
        prefix = prefix | (best << shift)
    return prefix


@triton.jit
def sample_kernel(logits_ptr, params_ptr, rng_ptr, token_ptr, V, stride_row, n_rows, BLOCK: tl.constexpr):
    """grid (B,). logits [B, V] (row stride stride_row), fp32 or fp16. params fp32 [temperature, top_k, top_p, _];
    rng uint32 [seed_lo, seed_hi, step, arrivals]. Writes token[b] (int64: what the decode kernels read). The last program to finish
    (arrivals counter) advances rng.step by one and resets arrivals, so one launch = one step of the stream,
    also inside a CUDA graph."""
    row = tl.program_id(0)
    base = logits_ptr + row * stride_row
    temperature = tl.load(params_ptr)
    top_k = tl.load(params_ptr + 1).to(tl.int32)
    top_p = tl.load(params_ptr + 2)
    seed_lo = tl.load(rng_ptr)
    seed_hi = tl.load(rng_ptr + 1)
    step = tl.load(rng_ptr + 2)
    offs0 = tl.arange(0, BLOCK)
    BIG: tl.constexpr = 2147483647
    if temperature <= 0.0:
        best_v = tl.full([BLOCK], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK], BIG, tl.int32)
        for start in range(0, V, BLOCK):
            x, m = _scaled(base, start + offs0, V, 1.0)
            take = (x > best_v) | ((best_i == BIG) & m)      # strict: each lane keeps its earliest maximum
            best_v = tl.where(take, x, best_v)
            best_i = tl.where(take, start + offs0, best_i)
        top = tl.max(best_v, axis=0)
        token = tl.min(tl.where(best_v == top, best_i, BIG), axis=0)
    else:
        mx = float("-inf")
        for start in range(0, V, BLOCK):
            x, m = _scaled(base, start + offs0, V, temperature)
            mx = tl.maximum(mx, tl.max(x, axis=0))
        floor_key = _key(mx) * 0                              # key 0: everything
        if (top_k > 0) & (top_k < V):
            floor_key = _search(base, V, temperature, mx, floor_key, top_k, 0.0, MASS=0, BLOCK=BLOCK)
        if top_p < 1.0:
            z = 0.0
            for start in range(0, V, BLOCK):
                x, m = _scaled(base, start + offs0, V, temperature)
                z += tl.sum(tl.where(m & (_key(x) >= floor_key), tl.exp(x - mx), 0.0), axis=0)
            floor_key = _search(base, V, temperature, mx, floor_key, 0, top_p * z, MASS=1, BLOCK=BLOCK)
        kept_mass = 0.0
        last = row * 0 - 1
        for start in range(0, V, BLOCK):
            x, m = _scaled(base, start + offs0, V, temperature)
            keep = m & (_key(x) >= floor_key)
            kept_mass += tl.sum(tl.where(keep, tl.exp(x - mx), 0.0), axis=0)
            last = tl.maximum(last, tl.max(tl.where(keep, start + offs0, -1), axis=0))
        target = _philox_uniform(row, step, seed_lo, seed_hi) * kept_mass
        running = 0.0
        token = row * 0 + BIG
        for start in range(0, V, BLOCK):
            x, m = _scaled(base, start + offs0, V, temperature)
            keep = m & (_key(x) >= floor_key)
            e = tl.where(keep, tl.exp(x - mx), 0.0)
            cum = tl.cumsum(e, axis=0) + running
            hit = keep & (cum > target)
            token = tl.minimum(token, tl.min(tl.where(hit, start + offs0, BIG), axis=0))
            running += tl.sum(e, axis=0)
        token = tl.where(token == BIG, last, token)          # u*mass rounded past the total: the last kept token
        token = tl.where(mx == float("-inf"), 0, token)      # no finite logit: token 0, as the greedy path
    token = tl.where((token < 0) | (token >= V), 0, token)    # all -inf / NaN rows: token 0, as torch.argmax
    tl.store(token_ptr + row, token.to(token_ptr.dtype.element_ty))
    arrived = tl.atomic_add(rng_ptr + 3, 1)                  # acq_rel: every program has read `step` before this
    if arrived == n_rows - 1:
        tl.store(rng_ptr + 2, step + 1)
        tl.store(rng_ptr + 3, arrived * 0)


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0, rng=None):
    """Launch wrapper (tests). Returns (tokens int64 [B], rng uint32 [4] after the launch)."""
    B, V = logits.shape
    params = torch.tensor([temperature, float(top_k), top_p, 0.0], dtype=torch.float32, device=logits.device)
    if rng is None:
        rng = torch.tensor([seed & 0xFFFFFFFF, seed >> 32, step, 0], dtype=torch.int64).to(torch.uint32)
        rng = rng.to(logits.device)
    tokens = torch.full((B,), -7, dtype=torch.int64, device=logits.device)
    sample_kernel[(B,)](logits, params, rng, tokens, V, logits.stride(0), B, BLOCK=SAMPLE_BLOCK, num_warps=8)
    return tokens, rng


# ---- reference ---------------------------------------------------------------------------------------------------
def philox4x32_10(counter, key) -> tuple[int, int, int, int]:
    """Random123 philox4x32-10 on Python ints (the reference of _philox_uniform and cpp/src/sampling.cpp)."""
    c0, c1, c2, c3 = (int(c) & 0xFFFFFFFF for c in counter)
    k0, k1 = (int(k) & 0xFFFFFFFF for k in key)
    for _ in range(10):
        p0, p1 = PHILOX_M0.value * c0, PHILOX_M1.value * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & 0xFFFFFFFF, p1 & 0xFFFFFFFF, ((p0 >> 32) ^ c3 ^ k1) & 0xFFFFFFFF, \
            p0 & 0xFFFFFFFF
        k0, k1 = (k0 + PHILOX_W0.value) & 0xFFFFFFFF, (k1 + PHILOX_W1.value) & 0xFFFFFFFF
    return c0, c1, c2, c3


def uniform_ref(row: int, step: int, seed: int) -> float:
    return float(np.float32(philox4x32_10((row, step, 0, 0), (seed & 0xFFFFFFFF, seed >> 32))[0] >> 8)
                 * np.float32(1.0 / 16777216.0))


def sample_ref(logits, temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0) -> torch.Tensor:
    """The sampler's definition (module docstring) in float64 arithmetic on the CPU. Returns int64 [B]."""
    x32 = logits.detach().float().cpu()
    out = []
    for row in range(x32.shape[0]):
        r = x32[row]
        if temperature <= 0:
            out.append(int(torch.argmax(r)))
            continue
        x = (r / np.float32(temperature)).double()
        if not torch.isfinite(x.max()):
            out.append(0)
            continue
        keep = torch.ones_like(x, dtype=torch.bool)
        if 0 < top_k < x.numel():
            kth = torch.topk(x, top_k).values[-1]
            keep &= x >= kth
        e = torch.where(keep, torch.exp(x - x.max()), torch.zeros_like(x))
        if top_p < 1:
            z = e.sum()
            vals = torch.unique(x[keep])                            # ascending distinct kept values
            above = torch.stack([e[x > v].sum() for v in vals])      # mass strictly above each value
            v_min = vals[above <= top_p * z].min()
            keep &= x >= v_min
            e = torch.where(keep, e, torch.zeros_like(e))
        target = uniform_ref(row, step, seed) * e.sum()
        cum = torch.cumsum(e, 0)
        hit = torch.nonzero(keep & (cum > target))
        out.append(int(hit[0]) if len(hit) else int(torch.nonzero(keep)[-1]))
    return torch.tensor(out, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------------------
# AOT descriptions (memmamba_deploy/aot.py; cpp/aot_kernels.py adds per-model-shape conv variants)
# ----------------------------------------------------------------------------------------------------------------
def conv_step_signature(act: str) -> dict[str, str]:
    return {"x_ptr": f"*{act}", "w_ptr": f"*{act}", "bias_ptr": f"*{act}", "win_in_ptr": f"*{act}",
            "win_out_ptr": f"*{act}", "out_ptr": f"*{act}", "Di": "i32", "KW": "i32", "stride_x_b": "i32",
            "BLOCK_C": "constexpr", "BLOCK_W": "constexpr"}


def sample_signature(act: str) -> dict[str, str]:
    return {"logits_ptr": f"*{act}", "params_ptr": "*fp32", "rng_ptr": "*u32", "token_ptr": "*i64", "V": "i32",
            "stride_row": "i32", "n_rows": "i32", "BLOCK": "constexpr"}


def gained_add_signature(act: str) -> dict[str, str]:
    return {"res_ptr": f"*{act}", "o_ptr": f"*{act}", "gain_ptr": "*fp32", "out_ptr": f"*{act}", "d": "i32",
            "stride_gain": "i32", "BLOCK_D": "constexpr"}


def cross_index_signature() -> dict[str, str]:
    return {"index_ptr": "*i32", "out_ptr": "*i32", "T": "i32", "K": "i32", "width": "i32", "col0": "i32",
            "shift": "i32", "BLOCK_K": "constexpr"}


CPP_SUPPORT_AOT_KERNELS = {
    "sample": {
        "fn": sample_kernel,
        "signatures": {act: sample_signature(act) for act in ("fp32", "fp16")},
        "constexprs": {"BLOCK": SAMPLE_BLOCK},
        "num_warps": 8,
        "grid": "(B, 1, 1); rng[3] (arrivals) must be 0 before the launch (it is again after it)",
        "doc": "greedy / temperature / top-k / top-p sampling with philox (cpp_support.sample_ref)",
    },
    "gained_add_d768": {           # the 130m preset's width; other shapes: cpp/aot_kernels.py
        "fn": gained_add_kernel,
        "signatures": {act: gained_add_signature(act) for act in ("fp32", "fp16")},
        "constexprs": {"BLOCK_D": 1024},
        "num_warps": 4,
        "grid": "(B·T, 1, 1)",
        "doc": "a read's end in the parallel prefill (gained_add_ref)",
    },
    "cross_index_k50": {
        "fn": cross_index_kernel,
        "signatures": {"any": cross_index_signature()},
        "constexprs": {"BLOCK_K": 64},
        "num_warps": 1,
        "grid": "(B·T, 1, 1), once per §5 group member",
        "doc": "a §5 group member's share of the cross-layer index (cross_index_ref)",
    },
    "conv_step_di1536_k4": {       # the 130m preset's shape; other shapes: cpp/aot_kernels.py
        "fn": conv_step_kernel,
        "signatures": {act: conv_step_signature(act) for act in ("fp32", "fp16")},
        "constexprs": conv_blocks(1536, 4),
        "num_warps": 4,
        "grid": "(cdiv(Di, BLOCK_C), B, 1)",
        "doc": "causal conv step (causal_conv_step_ref)",
    },
}
