"""Selective scan in Triton: the chunked scan (forward + backward), the one-token state step, and the causal conv.

References (ground truth, same arguments): models.ops.scan.selective_scan_ref, selective_state_step_ref and
causal_conv_ref. Spec §6 (the recurrence), §8 (parallel form), §9 (fp32 recurrence whatever the activation dtype).

Forward, h_t = exp(δ_t A) h_{t-1} + δ_t x_t B_t, y_t = (C_t·h_t + D x_t) SiLU(z_t), δ = softplus(dt + dt_bias).
A program owns (batch row, some channels, one chunk of tokens); across chunks:

  single pass  (enough batch x channel programs to fill the GPU): one chunk per row, starts from h0.
  three passes (few rows, long T):  1. every chunk from zero state -> its final state S_c and Σδ over the chunk
                                    2. h_start[c+1] = exp(A Σδ_c) h_start[c] + S_c: scan_chunk_prefix (an
                                       associative scan over the chunks; the backward and the AOT builds chain
                                       them in order, scan_chunk_combine)
                                    3. every chunk again from h_start[c] -> y (scan_forward: pass 1 keeps δ,
                                       fp32, so pass 3 reads it instead of recomputing the softplus).
Two kernels walk a chunk:
  selective_scan_seq_kernel  (scan_forward: prefill and training forward; seq_chunk_plan) a thread owns a few
      channels and all their states and steps token by token: N exp2 per channel-token, no cross-thread traffic.
  selective_scan_fwd_kernel  (the backward's chunk states; the AOT builds of the TensorRT plugins and the C++
      runtime; scan_chunk_plan) tiles of BLOCK_T tokens, inside a tile an associative scan over time of the pairs
      (exp(δA), δxB).
Neither forms exp(-cumsum), so nothing overflows however long T is.
Backward (autograd): chunks of one tile each; recompute h_start as above, then the same three passes in reverse
time for the state gradient g_t = C_t dy_t + exp(δ_{t+1}A) g_{t+1}, then per-tile gradients. Reductions over
channels (dB, dC) and over tokens (dA, dD, ddt_bias) go through per-program partial buffers summed in torch:
deterministic, no atomics.

All kernels take runtime sizes and strides as scalars and are AOT-compilable (see README.md, AOT_KERNELS).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from memmamba_deploy.models.ops import is_integer, needs_grad
from memmamba_deploy.models.ops.scan import at_row_ends, padded_dt
from memmamba_deploy.models.ops.scan import selective_scan_ref, selective_state_step_ref  # noqa: F401 (references)

from .launch import _after_predecessor, pdl_meta

LOG2E = tl.constexpr(1.4426950408889634)  # exp(δA) = exp2(δ·A·log2 e): A prescaled once per program

# Chunk plan: aim for this many programs per pass before splitting T into chunks; never chunks under MIN_CHUNK.
TARGET_PROGRAMS = 1024
MIN_CHUNK = 256
SEQ_MIN_CHUNK = 16     # scan_forward's shortest chunk (seq_chunk_plan): 16 beats 64 by 10% at 2k tokens, ties at 16k
SEQ_NUM_WARPS = 1      # scan_forward: one warp per program (measured best on the H100, see BENCHMARKS.md)
SEQ_CHANNELS_PER_THREAD = 4
SEQ_UNROLL = 2         # tokens per loop iteration of scan_forward's passes, whose loads Triton issues SEQ_STAGES - 1
SEQ_STAGES = 3         # iterations ahead into shared memory (cp.async): no registers held by loads in flight
SEQ_PROGRAMS_PER_SM = 8  # one warp each at ~250 registers: 8 fill an SM's register file (one wave: 1056 on an H100)
CONV_CHUNK = 8         # causal_conv_kernel: tokens per program, loaded CONV_AHEAD at a time, CONV_BLOCK_D channels
CONV_AHEAD = 8         # (8 per lane of its one warp). H100, Di 1536: 8 tokens a program beat 64 at 2k-64k tokens
                       # (7.7 vs 12.2 us at 2k, 38.6 vs 42.4 at 16k; 16 is 1.7 us better at 4k only; BENCHMARKS.md)
CONV_BLOCK_D = 256
PREFIX_BLOCK_C = 32    # scan_forward's chunk chain as a parallel scan: chunks x state elements per tile, one
PREFIX_BLOCK_E = 32    # warp (a sweep on the H100 at 16k tokens, 86 chunks: 14 us; 128 x 32 with 4 warps, 22 us;
PREFIX_NUM_WARPS = 1   # the sequential chain of before, 26 us on the H200: BENCHMARKS.md)
NUM_WARPS = 4          # forward: a 16x16x16 fp32 tile is 32 values per thread (127 registers on sm_90, no spills)
BWD_NUM_WARPS = 8      # backward keeps ~8 such tiles live: 8 warps fit them in 243 registers without spilling


# ----------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) then (a2, b2) for h -> a h + b; also right for the reverse scan g -> a g + b (Triton folds in order)
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _fast_log2(w):
    # lg2.approx.ftz.f32, one MUFU op (tl.log2 is libdevice's polynomial); the CPU interpreter, which has no
    # libdevice, gets numpy's log2 instead (_interpreter.py)
    return libdevice.fast_log2f(w)


@triton.jit
def _softplus(v):
    # F.softplus (threshold 20) = max(v, 0) + log1p(u), u = e^-|v|, in two MUFU ops (exp2, lg2.approx) and ~9
    # others. Against one exp2 and libdevice's log polynomial (~20 others), the prefill scan's chunk pass loop
    # went 887 -> 792 instructions and the scan 1.5% faster (BENCHMARKS.md, eighteenth session). lg2.approx's
    # absolute error and 1 + u's rounding are ~1e-5 relative at u = 1/64 (6.4e-6 measured); below that, log1p's
    # series u - u²/2 + u³/3 (truncation < u³/4 < 1e-6 relative) keeps a tiny δ precise.
    u = tl.exp2(tl.abs(v) * -LOG2E)
    series = u * (1.0 - u * (0.5 - u * 0.3333333333333333))
    lp = tl.where(u < 0.015625, series, _fast_log2(1.0 + u) * 0.6931471805599453)
    return tl.maximum(v, 0.0) + lp


@triton.jit
def _silu(z):
    # z·sigmoid(z) with sigmoid = r², r = rsqrt(1 + e^-z): no division sequence (rsqrt.approx, ~2^-22 relative)
    r = tl.math.rsqrt(1.0 + tl.exp2(z * -LOG2E))
    return z * (r * r)


@triton.jit
def _delta(dt, bias, mask, dt_softplus):
    v = dt + bias
    if dt_softplus != 0:               # a runtime switch (the contract's attribute), uniform over the program
        v = _softplus(v)
    return tl.where(mask, v, 0.0)      # masked lanes: δ = 0 makes (exp(0), 0) the scan's identity


@triton.jit
def _chunk_start(A_ptr, D_ptr, dt_bias_ptr, h_in_ptr, pid_b, pid_c, stride_hin_b, stride_hin_c, nd_off, mask_nd,
                 offs_d, mask_d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
                 HAS_H_IN: tl.constexpr):
    # what a forward program holds for its channels: A·log2(e), D, the dt bias, the state entering its chunk
    A2 = tl.load(A_ptr + nd_off, mask=mask_nd, other=0.0).to(tl.float32) * LOG2E  # [BLOCK_N, BLOCK_D]
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_H_IN:
        h = tl.load(h_in_ptr + pid_b * stride_hin_b + pid_c * stride_hin_c + nd_off, mask=mask_nd, other=0.0)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    return A2, Dv, bias, h


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def selective_scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h_in_ptr, y_ptr, h_out_ptr, dt_sum_ptr,
    T, Di, N, chunk_len, dt_softplus,
    stride_x_b, stride_x_t, stride_dt_b, stride_dt_t, stride_B_b, stride_B_t, stride_C_b, stride_C_t,
    stride_z_b, stride_z_t, stride_y_b, stride_y_t, stride_hin_b, stride_hin_c, stride_hout_b, stride_hout_c,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_H_IN: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_H: tl.constexpr, WRITE_DT_SUM: tl.constexpr,
):
    """grid (B, cdiv(Di, BLOCK_D), cdiv(T, chunk_len)). Program (b, j, c) scans tokens [c·chunk_len, +chunk_len)
    of channels [j·BLOCK_D, +BLOCK_D) from h_in[b, c] (zero when HAS_H_IN=0), writes y (WRITE_Y) and the state
    after its last token to h_out[b, c] (WRITE_H); WRITE_DT_SUM also writes Σδ over the chunk to dt_sum[b, c, :]
    (fp32, contiguous [B, n_chunks, Di]). Unit stride is assumed along the channel / state axes; A [Di,N]
    contiguous. Tiles are [BLOCK_T, BLOCK_N, BLOCK_D]: channels across lanes (coalesced along Di), time and
    states mostly within a thread, so the scan over time and the sum over N need few shuffles."""
    pid_b = tl.program_id(0).to(tl.int64)              # batch offsets can pass 2^31 elements at long T
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Di
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    nd_off = offs_d[None, :] * N + offs_n[:, None]            # element (n, d) of a [Di, N] row-major tensor
    A2, Dv, bias, h = _chunk_start(A_ptr, D_ptr, dt_bias_ptr, h_in_ptr, pid_b, pid_c, stride_hin_b, stride_hin_c,
                                   nd_off, mask_nd, offs_d, mask_d, BLOCK_N, BLOCK_D, HAS_DT_BIAS, HAS_H_IN)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_T)
    t_begin = pid_c * chunk_len
    t_end = tl.minimum(t_begin + chunk_len, T)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + rows
        mask_t = offs_t < t_end
        m_td = mask_t[:, None] & mask_d[None, :]
        m_tn = mask_t[:, None] & mask_n[None, :]
        x = tl.load(x_ptr + pid_b * stride_x_b + offs_t[:, None] * stride_x_t + offs_d[None, :], mask=m_td,
                    other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * stride_dt_b + offs_t[:, None] * stride_dt_t + offs_d[None, :], mask=m_td,
                     other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + pid_b * stride_B_b + offs_t[:, None] * stride_B_t + offs_n[None, :], mask=m_tn,
                     other=0.0).to(tl.float32)
        delta = _delta(dt, bias[None, :], m_td, dt_softplus)                      # [BLOCK_T, BLOCK_D]
        dBx = (delta * x)[:, None, :] * Bv[:, :, None]                             # [BLOCK_T, BLOCK_N, BLOCK_D]
        if WRITE_Y:
            dA = tl.exp2(delta[:, None, :] * A2[None, :, :])
            a_cum, h_loc = tl.associative_scan((dA, dBx), 0, _combine)
            h_all = a_cum * h[None, :, :] + h_loc
            Cv = tl.load(C_ptr + pid_b * stride_C_b + offs_t[:, None] * stride_C_t + offs_n[None, :], mask=m_tn,
                         other=0.0).to(tl.float32)
            y = tl.sum(h_all * Cv[:, :, None], axis=1) + Dv[None, :] * x
            if HAS_Z:
                z = tl.load(z_ptr + pid_b * stride_z_b + offs_t[:, None] * stride_z_t + offs_d[None, :], mask=m_td,
                            other=0.0).to(tl.float32)
                y = y * _silu(z)
            tl.store(y_ptr + pid_b * stride_y_b + offs_t[:, None] * stride_y_t + offs_d[None, :],
                     y.to(y_ptr.dtype.element_ty), mask=m_td)
            # masked rows are identity steps, so the tile's last row is the state after its last real token
            h = tl.sum(tl.where(rows[:, None, None] == BLOCK_T - 1, h_all, 0.0), axis=0)
        else:
            # only the state after the tile is wanted: no scan, one exp per element,
            # h <- exp(A Σδ) h + Σ_t exp(A Σ_{u>t} δ_u) δ_t x_t B_t   (exponents <= 0: nothing overflows)
            tile_sum = tl.sum(delta, axis=0)
            after = tile_sum[None, :] - tl.cumsum(delta, axis=0)                  # Σ_{u>t} δ_u in the tile
            w = tl.exp2(after[:, None, :] * A2[None, :, :])
            h = tl.exp2(tile_sum[None, :] * A2) * h + tl.sum(w * dBx, axis=0)
        if WRITE_DT_SUM:
            dt_sum += tl.sum(delta, axis=0)
    if WRITE_H:
        tl.store(h_out_ptr + pid_b * stride_hout_b + pid_c * stride_hout_c + nd_off, h, mask=mask_nd)
    if WRITE_DT_SUM:
        tl.store(dt_sum_ptr + (pid_b * tl.num_programs(2) + pid_c) * Di + offs_d, dt_sum, mask=mask_d)


@triton.jit
def _load_states_row(ptr, offs_n, N, EVEN_N: tl.constexpr):
    # one token's B or C row, fp32; unmasked when N == BLOCK_N so that it loads as vectors
    if EVEN_N:
        v = tl.load(ptr + offs_n)
    else:
        v = tl.load(ptr + offs_n, mask=offs_n < N, other=0.0)
    return v.to(tl.float32)


@triton.jit
def _seq_loads(xp, dtp, Bp, Cp, zp, t, stride_x_t, stride_dt_t, stride_B_t, stride_C_t, stride_z_t, offs_n, N,
               mask_d, EVEN_N: tl.constexpr, WRITE_Y: tl.constexpr, HAS_Z: tl.constexpr):
    # token t's x, dt, B, C, z (C and z only where y is written; otherwise stand-ins the compiler drops)
    x = tl.load(xp + t * stride_x_t, mask=mask_d, other=0.0)
    dt = tl.load(dtp + t * stride_dt_t, mask=mask_d, other=0.0)
    Bv = _load_states_row(Bp + t * stride_B_t, offs_n, N, EVEN_N)
    Cv = Bv
    z = x
    if WRITE_Y:
        Cv = _load_states_row(Cp + t * stride_C_t, offs_n, N, EVEN_N)
        if HAS_Z:
            z = tl.load(zp + t * stride_z_t, mask=mask_d, other=0.0)
    return x, dt, Bv, Cv, z


@triton.jit
def _seq_token(t, t_end, t_live, x, dt, Bv, Cv, z, h, A2, Dv, bias, mask_d, dt_softplus, y_row, delta_row, offs_d,
               dt_sum, WRITE_Y: tl.constexpr, HAS_Z: tl.constexpr, WRITE_DT_SUM: tl.constexpr,
               WRITE_DELTA: tl.constexpr, DELTA_IN: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    # one token of the recurrence; past the chunk's end δ = 0 makes it the identity and y is not stored; past the
    # row's own end (t_live: rows of different lengths) δ = 0 too, and y is stored as any other column's
    valid = mask_d & (t < t_end)
    live = valid
    if HAS_LENGTHS:                    # a constexpr: the plain loop keeps its one compare
        live = mask_d & (t < t_live)
    x = x.to(tl.float32)
    if DELTA_IN:                       # dt is δ itself, as the chunk-state pass stored it (a constexpr: the
                                       # runtime dt_softplus switch would keep a bias add and a branch per token)
        delta = tl.where(live, dt.to(tl.float32), 0.0)
    else:
        delta = _delta(dt.to(tl.float32), bias, live, dt_softplus)
    h = tl.exp2(delta[None, :] * A2) * h + Bv[:, None] * (delta * x)[None, :]
    if WRITE_Y:
        y = tl.sum(h * Cv[:, None], axis=0) + Dv * x
        if HAS_Z:
            y = y * _silu(z.to(tl.float32))
        tl.store(y_row + offs_d, y.to(y_row.dtype.element_ty), mask=valid)
    if WRITE_DT_SUM:
        dt_sum += delta
    if WRITE_DELTA:                    # the chunk-state pass keeps δ for the pass that writes y
        tl.store(delta_row + offs_d, delta.to(delta_row.dtype.element_ty), mask=valid)
    return h, dt_sum


@triton.jit
def selective_scan_seq_kernel(
    x_ptr, dt_ptr, AT_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h_in_ptr, y_ptr, h_out_ptr, dt_sum_ptr,
    T, Di, N, chunk_len, dt_softplus,
    stride_x_b, stride_x_t, stride_dt_b, stride_dt_t, stride_B_b, stride_B_t, stride_C_b, stride_C_t,
    stride_z_b, stride_z_t, stride_y_b, stride_y_t, stride_hin_b, stride_hin_c, stride_hout_b, stride_hout_c,
    delta_ptr, lengths_ptr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, HAS_H_IN: tl.constexpr,
    WRITE_Y: tl.constexpr, WRITE_H: tl.constexpr, WRITE_DT_SUM: tl.constexpr, UNROLL: tl.constexpr,
    STAGES: tl.constexpr, WRITE_DELTA: tl.constexpr, DELTA_IN: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The prefill scan (scan_forward): as selective_scan_fwd_kernel, but each thread owns a few channels and all
    their states and walks the chunk one token at a time. A token costs N exp2 and no cross-thread traffic: the
    sum over N is in-thread and every [BLOCK_D] vector is the slice of the state tile's layout.
    UNROLL tokens per iteration; Triton's pipeliner issues an iteration's loads STAGES - 1 iterations ahead,
    asynchronously into shared memory (the loads' latency bounded the plain loop; loads issued ahead into
    registers took registers the state tiles need).
    grid (B, cdiv(Di, BLOCK_D), n_chunks), BLOCK_D = 32 x num_warps x channels per thread. The state tiles
    are [N, Di] (channels contiguous) so that Triton lays threads along channels: AT is A transposed (loaded as
    [Di, N], A spills registers in the loop), and h_in / h_out (per (b, c)) are [N, Di] fp32, strides as
    selective_scan_fwd_kernel's. HAS_LENGTHS: lengths [B] (int64), the tokens past each row's length are padding,
    whose δ is 0 (stored as such with WRITE_DELTA); DELTA_IN reads the δ so stored and needs no lengths."""
    _after_predecessor(USE_PDL)
    pid_b = tl.program_id(0).to(tl.int64)              # batch offsets can pass 2^31 elements at long T
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Di
    mask_nd = (offs_n < N)[:, None] & mask_d[None, :]
    nd_off = offs_n[:, None] * Di + offs_d[None, :]            # element (n, d) of an [N, Di] row-major tensor
    A2, Dv, bias, h = _chunk_start(AT_ptr, D_ptr, dt_bias_ptr, h_in_ptr, pid_b, pid_c, stride_hin_b, stride_hin_c,
                                   nd_off, mask_nd, offs_d, mask_d, BLOCK_N, BLOCK_D, HAS_DT_BIAS, HAS_H_IN)
    dt_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    t_begin = pid_c * chunk_len
    t_end = tl.minimum(t_begin + chunk_len, T)
    last = t_end - 1                                           # loads past the chunk read its last token again
    t_live = t_end
    if HAS_LENGTHS:
        t_live = tl.minimum(t_end, tl.load(lengths_ptr + pid_b).to(tl.int32))
    xp = x_ptr + pid_b * stride_x_b + offs_d
    dtp = dt_ptr + pid_b * stride_dt_b + offs_d
    Bp = B_ptr + pid_b * stride_B_b
    Cp = C_ptr + pid_b * stride_C_b
    zp = z_ptr + pid_b * stride_z_b + offs_d
    yp = y_ptr + pid_b * stride_y_b
    deltap = delta_ptr + pid_b * T * Di                        # δ [B, T, Di] (WRITE_DELTA)
    st = (stride_x_t, stride_dt_t, stride_B_t, stride_C_t, stride_z_t)
    for t in tl.range(t_begin, t_end, UNROLL, num_stages=STAGES):
        for j in tl.static_range(UNROLL):
            loads = _seq_loads(xp, dtp, Bp, Cp, zp, tl.minimum(t + j, last), *st, offs_n, N, mask_d, EVEN_N, WRITE_Y,
                               HAS_Z)
            h, dt_sum = _seq_token(t + j, t_end, t_live, *loads, h, A2, Dv, bias, mask_d, dt_softplus,
                                   yp + (t + j) * stride_y_t, deltap + (t + j) * Di, offs_d, dt_sum, WRITE_Y, HAS_Z,
                                   WRITE_DT_SUM, WRITE_DELTA, DELTA_IN, HAS_LENGTHS)
    if WRITE_H:
        tl.store(h_out_ptr + pid_b * stride_hout_b + pid_c * stride_hout_c + nd_off, h, mask=mask_nd)
    if WRITE_DT_SUM:
        tl.store(dt_sum_ptr + (pid_b * tl.num_programs(2) + pid_c) * Di + offs_d, dt_sum, mask=mask_d)


@triton.jit
def scan_chunk_combine_kernel(
    A_ptr, dt_sum_ptr, h0_ptr, states_ptr, h_out_ptr,
    Di, N, n_chunks, stride_h0_b, stride_hout_b,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
):
    """grid (B, cdiv(Di, BLOCK_D)). Chains chunk summaries sequentially (T/chunk_len steps).
    states [B, n_chunks, Di, N] fp32 holds each chunk's own contribution (forward: final state from zero;
    REVERSE: the state gradient a chunk sends to the token before it, with zero gradient arriving from after it)
    and is overwritten with what enters the chunk (forward: the state before its first token; REVERSE: the
    gradient arriving from after its last token).
    h0 [B, Di, N] (HAS_H0) enters the first chunk (REVERSE: the last); h_out [B, Di, N] gets what leaves the
    sequence: the final state, or REVERSE the gradient of h0.
    dt_sum [B, n_chunks, Di] fp32: Σδ per chunk, so a chunk's total decay is exp(A Σδ)."""
    pid_b = tl.program_id(0).to(tl.int64)              # batch offsets can pass 2^31 elements at long T
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Di
    mask_nd = (offs_n < N)[:, None] & mask_d[None, :]
    st_off = offs_d[None, :] * N + offs_n[:, None]              # [BLOCK_N, BLOCK_D] tiles of [Di, N] tensors
    hn_off = st_off
    A2 = tl.load(A_ptr + hn_off, mask=mask_nd, other=0.0).to(tl.float32) * LOG2E
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * stride_h0_b + hn_off, mask=mask_nd, other=0.0)
    else:
        h = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # a chain of n_chunks dependent steps: each step's loads are issued one step ahead
    c = (n_chunks - 1) if REVERSE else 0
    row = pid_b * n_chunks + c
    own = tl.load(states_ptr + row * Di * N + st_off, mask=mask_nd, other=0.0)
    dsum = tl.load(dt_sum_ptr + row * Di + offs_d, mask=mask_d, other=0.0)
    for i in range(0, n_chunks):
        c_next = (n_chunks - 2 - i) if REVERSE else (i + 1)
        more = i + 1 < n_chunks
        row_next = pid_b * n_chunks + c_next
        own_next = tl.load(states_ptr + row_next * Di * N + st_off, mask=mask_nd & more, other=0.0)
        dsum_next = tl.load(dt_sum_ptr + row_next * Di + offs_d, mask=mask_d & more, other=0.0)
        tl.store(states_ptr + row * Di * N + st_off, h, mask=mask_nd)
        h = tl.exp2(dsum[None, :] * A2) * h + own
        own, dsum, row = own_next, dsum_next, row_next
    tl.store(h_out_ptr + pid_b * stride_hout_b + hn_off, h, mask=mask_nd)


@triton.jit
def scan_chunk_prefix_kernel(AT_ptr, dt_sum_ptr, h0_ptr, states_ptr, starts_ptr, h_out_ptr,
                             Di, N, n_chunks, stride_h0_b, stride_hout_b,
                             BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr, HAS_H0: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B, cdiv(N·Di, BLOCK_E)). scan_forward's pass 2 as a parallel scan over the chunks, for element
    e = n·Di + d of the [N, Di] chunk states. states [B, n_chunks, N, Di]: each chunk's final state from zero;
    dt_sum [B, n_chunks, Di]: Σδ per chunk. Writes starts [B, n_chunks, N, Di] (the state entering each chunk)
    and h_out [B, Di, N] (the final state; h0 is [Di, N] too, AT = A transposed [N, Di]). Row r of a tile is the
    step into chunk r, h_start[r] = exp2(A2 Σδ[r-1]) h_start[r-1] + states[r-1] (r = n_chunks: the final state),
    an associative scan over r, BLOCK_C rows at a time from the carry h0."""
    _after_predecessor(USE_PDL)
    pid_b = tl.program_id(0).to(tl.int64)
    NDi = N * Di
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < NDi
    d = offs_e % Di
    dn = d * N + offs_e // Di                                   # element e of a [Di, N] tensor
    A2 = tl.load(AT_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32) * LOG2E
    if HAS_H0:
        carry = tl.load(h0_ptr + pid_b * stride_h0_b + dn, mask=mask_e, other=0.0)
    else:
        carry = tl.zeros([BLOCK_E], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_C)
    for r0 in range(0, n_chunks + 1, BLOCK_C):
        r = r0 + rows
        m = ((r >= 1) & (r <= n_chunks))[:, None] & mask_e[None, :]
        prev = pid_b * n_chunks + r - 1
        own = tl.load(states_ptr + prev[:, None] * NDi + offs_e[None, :], mask=m, other=0.0)
        dsum = tl.load(dt_sum_ptr + prev[:, None] * Di + d[None, :], mask=m, other=0.0)
        decay = tl.exp2(dsum * A2[None, :])          # masked rows: (1, 0), the identity
        P, S = tl.associative_scan((decay, own), 0, _combine)
        h = P * carry[None, :] + S
        tl.store(starts_ptr + (pid_b * n_chunks + r)[:, None] * NDi + offs_e[None, :], h,
                 mask=(r < n_chunks)[:, None] & mask_e[None, :])
        tl.store(h_out_ptr + pid_b * stride_hout_b + dn[None, :] + 0 * r[:, None], h,
                 mask=(r == n_chunks)[:, None] & mask_e[None, :])
        carry = tl.sum(tl.where((rows == BLOCK_C - 1)[:, None], h, 0.0), axis=0)


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def selective_scan_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, dy_ptr, h_start_ptr, g_ptr,
    dx_ptr, ddt_ptr, dz_ptr, dB_part_ptr, dC_part_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr,
    T, Di, N, chunks_per_program, n_chunks, dt_softplus,
    stride_x_b, stride_x_t, stride_dt_b, stride_dt_t, stride_B_b, stride_B_t, stride_C_b, stride_C_t,
    stride_z_b, stride_z_t, stride_dy_b, stride_dy_t,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr, FULL: tl.constexpr,
):
    """grid (B, cdiv(Di, BLOCK_D), cdiv(n_chunks, chunks_per_program)); a chunk is one tile of BLOCK_T tokens.
    g [B, n_chunks, Di, N] fp32. FULL=0: write into g[b,c] the state gradient chunk c sends to the token before it
    given zero gradient from after it (a_first · g_first). FULL=1: g[b,c] is the gradient arriving from after the
    chunk (scan_chunk_combine REVERSE); write dx, ddt (w.r.t. dt before the bias), dz, and the partial sums
    dB_part/dC_part [nDblk, B, T, N] (over this program's channels), dA_part [B, nCprog, Di, N],
    dD_part/dbias_part [B, nCprog, Di] (over this program's tokens). h_start [B, n_chunks, Di, N]: state before
    each chunk (the forward's chunk combine)."""
    pid_b = tl.program_id(0).to(tl.int64)              # batch offsets can pass 2^31 elements at long T
    pid_d = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Di
    mask_n = offs_n < N
    mask_nd = mask_n[:, None] & mask_d[None, :]
    nd_off = offs_d[None, :] * N + offs_n[:, None]            # tiles [BLOCK_T, BLOCK_N, BLOCK_D] as the forward
    A = tl.load(A_ptr + nd_off, mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_T)
    dA_acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    c_begin = pid_c * chunks_per_program
    c_end = tl.minimum(c_begin + chunks_per_program, n_chunks)
    for c in range(c_begin, c_end):
        offs_t = c * BLOCK_T + rows
        mask_t = offs_t < T
        m_td = mask_t[:, None] & mask_d[None, :]
        m_tn = mask_t[:, None] & mask_n[None, :]
        # a_{t+1} for the reverse scan: within the chunk only; the chunk's last row gets 1 (g arrives separately)
        mask_next = ((rows + 1) < BLOCK_T)[:, None] & ((offs_t + 1) < T)[:, None] & mask_d[None, :]
        x = tl.load(x_ptr + pid_b * stride_x_b + offs_t[:, None] * stride_x_t + offs_d[None, :], mask=m_td,
                    other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + pid_b * stride_dt_b + offs_t[:, None] * stride_dt_t + offs_d[None, :], mask=m_td,
                     other=0.0).to(tl.float32)
        dt_next = tl.load(dt_ptr + pid_b * stride_dt_b + (offs_t[:, None] + 1) * stride_dt_t + offs_d[None, :],
                          mask=mask_next, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + pid_b * stride_C_b + offs_t[:, None] * stride_C_t + offs_n[None, :], mask=m_tn,
                     other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + pid_b * stride_dy_b + offs_t[:, None] * stride_dy_t + offs_d[None, :], mask=m_td,
                     other=0.0).to(tl.float32)
        delta = _delta(dt, bias[None, :], m_td, dt_softplus)
        delta_next = _delta(dt_next, bias[None, :], mask_next, dt_softplus)
        dA = tl.exp2(delta[:, None, :] * A2[None, :, :])
        if FULL:                                                     # the states, recomputed from the chunk start
            Bv = tl.load(B_ptr + pid_b * stride_B_b + offs_t[:, None] * stride_B_t + offs_n[None, :], mask=m_tn,
                         other=0.0).to(tl.float32)
            dBx = (delta * x)[:, None, :] * Bv[:, :, None]
            h0 = tl.load(h_start_ptr + (pid_b * n_chunks + c) * Di * N + nd_off, mask=mask_nd, other=0.0)
            a_cum, h_loc = tl.associative_scan((dA, dBx), 0, _combine)
            h_all = a_cum * h0[None, :, :] + h_loc
        if HAS_Z:
            z = tl.load(z_ptr + pid_b * stride_z_b + offs_t[:, None] * stride_z_t + offs_d[None, :], mask=m_td,
                        other=0.0).to(tl.float32)
            sz = tl.sigmoid(z)
            dy_raw = dy * (z * sz)
        else:
            dy_raw = dy
        # reverse scan: g_t = a_{t+1} g_{t+1} + C_t dy_raw_t
        alpha = tl.exp2(delta_next[:, None, :] * A2[None, :, :])
        a_suf, g_loc = tl.associative_scan((alpha, dy_raw[:, None, :] * Cv[:, :, None]), 0, _combine, reverse=True)
        g_row = (pid_b * n_chunks + c) * Di * N + nd_off
        if FULL:
            g_in = tl.load(g_ptr + g_row, mask=mask_nd, other=0.0)
            g = g_loc + a_suf * g_in[None, :, :]
            sum_gB = tl.sum(g * Bv[:, :, None], axis=1)
            dx = dy_raw * Dv[None, :] + delta * sum_gB
            prev = h_all - dBx                                           # a_t h_{t-1}, no division by a_t
            ddelta = tl.sum(g * (A[None, :, :] * prev), axis=1) + x * sum_gB
            if dt_softplus != 0:
                ddelta = ddelta * tl.sigmoid(dt + bias[None, :])
            ddelta = tl.where(m_td, ddelta, 0.0)
            tl.store(dx_ptr + (pid_b * T + offs_t[:, None]) * Di + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=m_td)
            tl.store(ddt_ptr + (pid_b * T + offs_t[:, None]) * Di + offs_d[None, :],
                     ddelta.to(ddt_ptr.dtype.element_ty), mask=m_td)
            if HAS_Z:
                y_raw = tl.sum(h_all * Cv[:, :, None], axis=1) + Dv[None, :] * x
                dz = dy * y_raw * sz * (1.0 + z * (1.0 - sz))
                tl.store(dz_ptr + (pid_b * T + offs_t[:, None]) * Di + offs_d[None, :],
                         dz.to(dz_ptr.dtype.element_ty), mask=m_td)
            part = ((pid_d * tl.num_programs(0) + pid_b) * T + offs_t[:, None]) * N + offs_n[None, :]
            tl.store(dB_part_ptr + part, tl.sum(g * (delta * x)[:, None, :], axis=2), mask=m_tn)
            tl.store(dC_part_ptr + part, tl.sum(dy_raw[:, None, :] * h_all, axis=2), mask=m_tn)
            dA_acc += tl.sum(g * delta[:, None, :] * prev, axis=0)
            dD_acc += tl.sum(dy_raw * x, axis=0)
            dbias_acc += tl.sum(ddelta, axis=0)
        else:
            g_first = tl.sum(tl.where(rows[:, None, None] == 0, dA * g_loc, 0.0), axis=0)
            tl.store(g_ptr + g_row, g_first, mask=mask_nd)
    if FULL:
        prog = pid_b * tl.num_programs(2) + pid_c
        tl.store(dA_part_ptr + prog * Di * N + nd_off, dA_acc, mask=mask_nd)
        tl.store(dD_part_ptr + prog * Di + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_part_ptr + prog * Di + offs_d, dbias_acc, mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# One token (SelectiveScanStep)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def selective_state_step_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h_in_ptr, y_ptr, h_out_ptr,
    Di, N, dt_softplus, stride_x_b, stride_dt_b, stride_B_b, stride_C_b, stride_z_b, stride_y_b, stride_h_b,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_Z: tl.constexpr, HAS_DT_BIAS: tl.constexpr,
):
    """grid (B, cdiv(Di, BLOCK_D)). One token: h_out = exp(δA) h_in + δ x B, y = (C·h_out + D x) SiLU(z).
    h_in / h_out [B, Di, N] fp32 with batch stride stride_h_b; h_out may alias h_in (each element is read and
    written by the same thread)."""
    pid_b = tl.program_id(0).to(tl.int64)              # batch offsets can pass 2^31 elements at long T
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < Di
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    hn_off = offs_d[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + hn_off, mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        bias = tl.load(dt_bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    x = tl.load(x_ptr + pid_b * stride_x_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + pid_b * stride_dt_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Bv = tl.load(B_ptr + pid_b * stride_B_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * stride_C_b + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    h = tl.load(h_in_ptr + pid_b * stride_h_b + hn_off, mask=mask_dn, other=0.0)
    delta = _delta(dt, bias, mask_d, dt_softplus)
    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bv[None, :]
    y = tl.sum(h * Cv[None, :], axis=1) + Dv * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * stride_z_b + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y = y * _silu(z)
    tl.store(h_out_ptr + pid_b * stride_h_b + hn_off, h, mask=mask_dn)
    tl.store(y_ptr + pid_b * stride_y_b + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# Causal depthwise conv + SiLU over a sequence (inference; training keeps the reference's differentiable conv)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _conv_input(x_ptr, win_ptr, pid_b, offs_d, mask_d, p, T, stride_x_b, stride_x_t, stride_win_b,
                WIDTH: tl.constexpr):
    # input p of the conv as fp32 [BLOCK_D]: x[p] for 0 <= p < T, the window's entry for -(WIDTH-1) <= p < 0
    xv = tl.load(x_ptr + pid_b * stride_x_b + p * stride_x_t + offs_d, mask=mask_d & (p >= 0) & (p < T), other=0.0)
    wv = tl.load(win_ptr + pid_b * stride_win_b + offs_d * (WIDTH - 1) + (p + WIDTH - 1),
                 mask=mask_d & (p < 0) & (p >= 1 - WIDTH), other=0.0)
    return tl.where(p >= 0, xv.to(tl.float32), wv.to(tl.float32))   # a select keeps an input's -0.0 (the window)


@triton.jit
def causal_conv_kernel(
    x_ptr, w_ptr, b_ptr, win_ptr, out_ptr, new_win_ptr, lengths_ptr,
    T, Di, stride_x_b, stride_x_t, stride_win_b, stride_out_b, stride_out_t, stride_new_win_b,
    WIDTH: tl.constexpr, CHUNK: tl.constexpr, AHEAD: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, USE_PDL: tl.constexpr,
):
    """grid (B, cdiv(Di, BLOCK_D), cdiv(T, CHUNK)), one warp, WIDTH 2..4. out[t] = SiLU(b + Σ_k w[:, k]
    x[t - WIDTH + 1 + k]) in fp32, where x before token 0 comes from win [B, Di, WIDTH-1] (oldest first).
    A program walks CHUNK tokens in order, the last WIDTH-1 inputs in registers, so each input is read once
    (a [tokens, channels] tile per tap read it WIDTH times: 85 vs 37 us at 16k on the H200); AHEAD tokens' loads
    at a time. x [B, T, Di] may be a strided view (in_proj's first half); unit stride along channels everywhere,
    w [Di, WIDTH] contiguous. The last chunk's programs also write the window after the last token, new_win
    [B, Di, WIDTH-1] (the last WIDTH-1 inputs, oldest first; the old window's where T < WIDTH-1); HAS_LENGTHS:
    each row's after its own lengths[b] inputs (lengths [B] int64, 0..T)."""
    _after_predecessor(USE_PDL)
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t0 = tl.program_id(2) * CHUNK
    mask_d = offs_d < Di
    # taps by age: w_0 multiplies the newest input x[t], w_1 x[t-1], ...; their inputs x_1, x_2, x_3 in registers
    w_0 = tl.load(w_ptr + offs_d * WIDTH + (WIDTH - 1), mask=mask_d, other=0.0).to(tl.float32)
    w_1 = tl.load(w_ptr + offs_d * WIDTH + (WIDTH - 2), mask=mask_d, other=0.0).to(tl.float32)
    x_1 = _conv_input(x_ptr, win_ptr, pid_b, offs_d, mask_d, t0 - 1, T, stride_x_b, stride_x_t, stride_win_b, WIDTH)
    w_2, x_2, w_3, x_3 = w_1, x_1, w_1, x_1                   # placeholders when WIDTH < 3 / < 4 (never used)
    if WIDTH > 2:
        w_2 = tl.load(w_ptr + offs_d * WIDTH + (WIDTH - 3), mask=mask_d, other=0.0).to(tl.float32)
        x_2 = _conv_input(x_ptr, win_ptr, pid_b, offs_d, mask_d, t0 - 2, T, stride_x_b, stride_x_t, stride_win_b,
                          WIDTH)
    if WIDTH > 3:
        w_3 = tl.load(w_ptr + offs_d * WIDTH + (WIDTH - 4), mask=mask_d, other=0.0).to(tl.float32)
        x_3 = _conv_input(x_ptr, win_ptr, pid_b, offs_d, mask_d, t0 - 3, T, stride_x_b, stride_x_t, stride_win_b,
                          WIDTH)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    rows = tl.arange(0, AHEAD)
    for tb in range(t0, t0 + CHUNK, AHEAD):
        tile = tl.load(x_ptr + pid_b * stride_x_b + (tb + rows)[:, None] * stride_x_t + offs_d[None, :],
                       mask=(tb + rows < T)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        for j in tl.static_range(AHEAD):
            x_0 = tl.sum(tl.where(rows[:, None] == j, tile, 0.0), axis=0)     # row j (in-thread)
            acc = bias                                                        # oldest tap first, as before
            if WIDTH > 3:
                acc += w_3 * x_3
            if WIDTH > 2:
                acc += w_2 * x_2
            acc = acc + w_1 * x_1 + w_0 * x_0
            acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32)          # rounded where the reference's conv rounds
            tl.store(out_ptr + pid_b * stride_out_b + (tb + j) * stride_out_t + offs_d,
                     _silu(acc).to(out_ptr.dtype.element_ty), mask=mask_d & (tb + j < T))
            x_3, x_2, x_1 = x_2, x_1, x_0
    if tl.program_id(2) == tl.num_programs(2) - 1:
        end = T
        if HAS_LENGTHS:
            end = tl.load(lengths_ptr + pid_b).to(tl.int32)
        for j in tl.static_range(WIDTH - 1):
            v = _conv_input(x_ptr, win_ptr, pid_b, offs_d, mask_d, end - (WIDTH - 1) + j, T, stride_x_b, stride_x_t,
                            stride_win_b, WIDTH)
            tl.store(new_win_ptr + pid_b * stride_new_win_b + offs_d * (WIDTH - 1) + j,
                     v.to(new_win_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------------------------------------------
# Launch heuristics (plain Python; the AOT launchers mirror them, see README.md)
# ----------------------------------------------------------------------------------------------------------------
def scan_blocks(N: int, Di: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_N) of the forward scan: a [BLOCK_T, BLOCK_D, BLOCK_N] tile of about 4096 fp32."""
    block_n = triton.next_power_of_2(N)
    block_t = 16
    block_d = max(4, min(triton.next_power_of_2(Di), 4096 // (block_t * block_n)))
    return block_t, block_d, block_n


AOT_SCAN_BLOCK_T, AOT_SCAN_BLOCK_D = 16, 16   # the AOT variants' tile (aot.SCAN_BLOCKS: N padded to 16)


def _chunks_wanted(B: int, T: int, Di: int) -> int:
    """scan_chunk_plan's chunk count before the chunk length is rounded to whole tiles (grows with T)."""
    return min(triton.cdiv(TARGET_PROGRAMS, B * triton.cdiv(Di, AOT_SCAN_BLOCK_D)), triton.cdiv(T, MIN_CHUNK))


def scan_chunk_plan(B: int, T: int, Di: int, N: int) -> tuple[int, int]:
    """(chunk_len, n_chunks) of the AOT builds' tile scan (the TensorRT plugin and the C++ runtime;
    opLaunch.cpp chunkPlan): one chunk when batch x channel blocks already give TARGET_PROGRAMS programs."""
    n_chunks = max(1, _chunks_wanted(B, T, Di))
    if n_chunks == 1:
        return max(T, 1), 1
    chunk_len = triton.cdiv(triton.cdiv(T, n_chunks), AOT_SCAN_BLOCK_T) * AOT_SCAN_BLOCK_T
    return chunk_len, triton.cdiv(T, chunk_len)


def scan_workspace_bytes(B: int, T: int, Di: int, N: int) -> int:
    """fp32 scratch enough for scan_chunk_plan's three passes at any batch <= B and tokens <= T (a bound): chunk
    states [b, n_chunks, Di, N] + Σδ [b, n_chunks, Di]. n_chunks is not monotone in T (rounding chunk_len up to
    whole tiles can leave a shorter T more chunks), so this bounds it by the count before that rounding, which
    grows with T; fewer rows can mean more chunks, so every batch up to B is taken. The TensorRT plugin sizes its
    workspace the same way (opLaunch.cpp scanChunkWorkspace)."""
    worst = 0
    for b in range(1, max(B, 1) + 1):
        n = _chunks_wanted(b, max(T, 1), Di)
        if n > 1:
            worst = max(worst, 4 * b * n * Di * (N + 1))
    return worst


# ----------------------------------------------------------------------------------------------------------------
# Python entry points
# ----------------------------------------------------------------------------------------------------------------
def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _check_scan_args(x, dt, A, B, C, D, z, dt_bias, h0, one_token: bool, last_only: bool = False):
    lead = x.shape[:-1]
    Di, N = A.shape
    want = {"x": (*lead, Di), "dt": (*lead, Di), "B": (*lead, N), "C": (*lead, N), "D": (Di,)}
    if z is not None:               # last_only: the gate may be the last token's alone
        want["z"] = (x.shape[0], 1, Di) if last_only and z.dim() == 3 and z.shape[1] == 1 else (*lead, Di)
    if dt_bias is not None:
        want["dt_bias"] = (Di,)
    if h0 is not None:
        want["h0"] = (x.shape[0], Di, N)
    got = dict(x=x, dt=dt, B=B, C=C, D=D, z=z, dt_bias=dt_bias, h0=h0)
    if x.dim() != (2 if one_token else 3):
        raise ValueError(f"x must be [{'B, Di' if one_token else 'B, T, Di'}], got shape {list(x.shape)}")
    for k, shape in want.items():
        if tuple(got[k].shape) != tuple(shape):
            raise ValueError(f"{k} has shape {list(got[k].shape)}, expected {list(shape)} (x {list(x.shape)}, "
                             f"A {list(A.shape)})")
        if got[k].device != x.device:
            raise ValueError(f"{k} is on {got[k].device}, x on {x.device}")


def _check_lengths(lengths, batch: int, device) -> torch.Tensor:
    """Rows' lengths for a kernel: [batch] integers on `device`, as int64. Their values (0..T) are the caller's
    to check (MemMambaLM.check_lengths): reading them here would sync the GPU, or fail inside a CUDA graph."""
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch or \
            not is_integer(lengths):
        raise ValueError(f"lengths must be a [{batch}] integer tensor (one length a row), got "
                         f"{list(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}"
                         f"{'' if not isinstance(lengths, torch.Tensor) else ' ' + str(lengths.dtype)}")
    if lengths.device != torch.device(device):
        raise ValueError(f"lengths is on {lengths.device}, x on {device}")
    return lengths.to(torch.int64).contiguous()


def _forward_launch(kernel, x, dt, A, B, C, D, z, dt_bias, h_in, y, h_out, dt_sum, chunk_len, n_chunks,
                    dt_softplus, **meta):
    """One launch of a forward scan kernel over the chunks: selective_scan_fwd_kernel (A [Di, N], chunk states
    [B, n_chunks, Di, N]) or selective_scan_seq_kernel (A transposed, states [B, n_chunks, N, Di]); both take the
    same arguments. Absent tensors are None, which sets HAS_* / WRITE_*; meta: block sizes and num_warps (and the
    seq kernel's own arguments, by name: scan_forward's)."""
    Bsz, T, Di = x.shape
    N = A.numel() // Di
    dummy = A                                                    # stands in for absent tensors; never read
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)
    ys = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    hs = (n_chunks * Di * N, Di * N)                             # chunk states, in and out
    kernel[(Bsz, triton.cdiv(Di, meta["BLOCK_D"]), n_chunks)](
        x, dt, A, B, C, D, dummy if z is None else z, dummy if dt_bias is None else dt_bias,
        dummy if h_in is None else h_in, dummy if y is None else y, dummy if h_out is None else h_out,
        dummy if dt_sum is None else dt_sum, T, Di, N, chunk_len, int(bool(dt_softplus)),
        x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        *zs, *ys, *hs, *hs, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, HAS_H_IN=h_in is not None,
        WRITE_Y=y is not None, WRITE_H=h_out is not None, WRITE_DT_SUM=dt_sum is not None, **meta)


def _chunk_states(x, dt, A, B, C, D, dt_bias, h0, dt_softplus, chunk_len, n_chunks):
    """Passes 1 + 2: (states [B,nc,Di,N] = state before each chunk, dt_sum [B,nc,Di], final state [B,Di,N])."""
    Bsz, T, Di = x.shape
    N = A.shape[1]
    block_t, block_d, block_n = scan_blocks(N, Di)
    states = torch.empty(Bsz, n_chunks, Di, N, device=x.device, dtype=torch.float32)
    dt_sum = torch.empty(Bsz, n_chunks, Di, device=x.device, dtype=torch.float32)
    h = torch.empty(Bsz, Di, N, device=x.device, dtype=torch.float32)
    _forward_launch(selective_scan_fwd_kernel, x, dt, A, B, C, D, None, dt_bias, None, None, states, dt_sum,
                    chunk_len, n_chunks, dt_softplus, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n,
                    num_warps=NUM_WARPS)
    scan_chunk_combine_kernel[(Bsz, triton.cdiv(Di, block_d))](
        A, dt_sum, A if h0 is None else h0, states, h, Di, N, n_chunks, Di * N, Di * N,
        BLOCK_D=block_d, BLOCK_N=block_n, HAS_H0=h0 is not None, REVERSE=False, num_warps=4)
    return states, dt_sum, h


def _prepare(x, dt, A, B, C, D, z, dt_bias, h0):
    x, dt, B, C, z = (_last_dim_contiguous(t) for t in (x, dt, B, C, z))
    return (x, dt, A.float().contiguous(), B, C, D.contiguous(), z,
            None if dt_bias is None else dt_bias.contiguous(), None if h0 is None else h0.float().contiguous())


def seq_blocks(N: int, Di: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps) of selective_scan_seq_kernel: SEQ_CHANNELS_PER_THREAD channels per thread
    (they share the loads of B and C), all N states in registers."""
    num_warps, per_thread = SEQ_NUM_WARPS, SEQ_CHANNELS_PER_THREAD
    while num_warps * per_thread > 1 and 32 * num_warps * per_thread > triton.next_power_of_2(Di):
        num_warps, per_thread = (num_warps // 2, per_thread) if num_warps > 1 else (num_warps, per_thread // 2)
    return 32 * num_warps * per_thread, triton.next_power_of_2(N), num_warps


@functools.lru_cache(maxsize=None)
def seq_programs(device: torch.device) -> int:
    """The programs scan_forward aims for on a device: one wave, SEQ_PROGRAMS_PER_SM per SM (on an H100 1056 beat
    1032 by 4 us a pass at 16k tokens; a second wave, even a partial one, costs far more; BENCHMARKS.md)."""
    if device.type != "cuda":
        return TARGET_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count * SEQ_PROGRAMS_PER_SM


def seq_chunk_plan(B: int, T: int, Di: int, N: int, programs: int = TARGET_PROGRAMS) -> tuple[int, int]:
    """(chunk_len, n_chunks) of scan_forward: as many chunks as batch x channel blocks x chunks fit in `programs`
    (seq_programs), never chunks under SEQ_MIN_CHUNK tokens (every chunk costs its state twice, passes 1 and 2)."""
    block_d, _, _ = seq_blocks(N, Di)
    rows = B * triton.cdiv(Di, block_d)
    n_chunks = max(1, min(programs // rows, T // SEQ_MIN_CHUNK))
    if n_chunks == 1:
        return max(T, 1), 1
    chunk_len = triton.cdiv(T, n_chunks)
    return chunk_len, triton.cdiv(T, chunk_len)


def scan_forward(x, dt, A, B, C, D, z=None, dt_bias=None, h0=None, dt_softplus=True, chunk_len=None,
                 last_only=False, lengths=None):
    """The kernel path of selective_scan_ref (no autograd): (y [B,T,Di] in x.dtype, h [B,Di,N] fp32).
    One pass when batch x channel blocks fill the GPU, else three (each chunk from zero -> its final state, and δ
    kept; chain the chunks; each chunk again from its true start -> y). chunk_len=None picks the plan
    (seq_chunk_plan); tests pass one to force the three-pass path. last_only: y [B,1,Di] of the last token, from
    the final state (y_T = C_T·h_T + D x_T, gated), with no pass that writes y (a prompt's last layer).
    lengths [B] (int, 0..T): rows of their own lengths, as selective_scan_ref's: the passes that compute δ make it
    0 past each row's end (the pass that writes y reads the δ they kept), and last_only reads each row's last
    token."""
    # the state tiles are [N, Di]: A transposed (no copy where A is a transposed view, as the model's prefill
    # passes every layer's: a [N, Di] copy a layer is a launch, 56 µs of a 16k prefill)
    _check_scan_args(x, dt, A, B, C, D, z, dt_bias, h0, one_token=False, last_only=last_only)
    x, dt, AT, B, C, D, z, dt_bias, h0 = _prepare(x, dt, A.float().t(), B, C, D, z, dt_bias, h0)
    Bsz, T, Di = x.shape
    N = AT.shape[0]
    if lengths is not None:
        lengths = _check_lengths(lengths, Bsz, x.device)
        if not dt_softplus:
            raise ValueError("scan_forward: lengths needs dt_softplus (padding's δ is softplus(-inf) = 0)")
    if T == 0 or Bsz == 0:
        y = x.new_empty(Bsz, 1 if last_only and T else T, Di)
        return y, (torch.zeros(Bsz, Di, N, device=x.device) if h0 is None else h0.clone())
    if chunk_len is None:
        chunk_len, n_chunks = seq_chunk_plan(Bsz, T, Di, N, seq_programs(x.device))
    else:
        n_chunks = triton.cdiv(T, chunk_len)
    block_d, block_n, num_warps = seq_blocks(N, Di)
    pdl = pdl_meta(x.device)
    meta = dict(BLOCK_D=block_d, BLOCK_N=block_n, EVEN_N=N == block_n, UNROLL=SEQ_UNROLL, STAGES=SEQ_STAGES,
                num_warps=num_warps, delta_ptr=AT, WRITE_DELTA=False, DELTA_IN=False,   # δ: passes 1, 3
                lengths_ptr=AT if lengths is None else lengths, HAS_LENGTHS=lengths is not None, **pdl)
    y = None if last_only else torch.empty_like(x)
    f32 = dict(device=x.device, dtype=torch.float32)
    if n_chunks == 1:                                  # h0 and h transposed too
        h0_nd = None if h0 is None else h0.transpose(1, 2).contiguous()
        h_nd = torch.empty(Bsz, 1, N, Di, **f32)
        _forward_launch(selective_scan_seq_kernel, x, dt, AT, B, C, D, None if last_only else z, dt_bias, h0_nd, y,
                        h_nd, None, T, 1, dt_softplus, **meta)
        h = h_nd[:, 0].transpose(1, 2).contiguous()
        return (_last_y(x, C, D, z, h, lengths) if last_only else y), h
    states = torch.empty(Bsz, n_chunks, N, Di, **f32)
    dt_sum = torch.empty(Bsz, n_chunks, Di, **f32)
    h = torch.empty(Bsz, Di, N, **f32)
    # δ, kept by pass 1: pass 3 skips the softplus (the kernel indexes it as this fresh contiguous [B, T, Di]
    # buffer); last_only has no pass 3, so nothing is kept (AT stands in, unwritten)
    delta = AT if last_only else torch.empty(Bsz, T, Di, **f32)
    _forward_launch(selective_scan_seq_kernel, x, dt, AT, B, C, D, None, dt_bias, None, None, states, dt_sum,
                    chunk_len, n_chunks, dt_softplus, **dict(meta, delta_ptr=delta, WRITE_DELTA=not last_only))
    starts = torch.empty_like(states)
    scan_chunk_prefix_kernel[(Bsz, triton.cdiv(N * Di, PREFIX_BLOCK_E))](
        AT, dt_sum, AT if h0 is None else h0, states, starts, h, Di, N, n_chunks, Di * N, Di * N,
        BLOCK_C=PREFIX_BLOCK_C, BLOCK_E=PREFIX_BLOCK_E, HAS_H0=h0 is not None, num_warps=PREFIX_NUM_WARPS, **pdl)
    if last_only:
        return _last_y(x, C, D, z, h, lengths), h
    _forward_launch(selective_scan_seq_kernel, x, delta, AT, B, C, D, z, None, starts, y, None, None, chunk_len,
                    n_chunks, False, **dict(meta, DELTA_IN=True, lengths_ptr=AT, HAS_LENGTHS=False))
    return y, h


def _last_y(x, C, D, z, h, lengths=None):
    """y [B,1,Di] of the last token from the state after it, h [B,Di,N] fp32: (C_T·h_T + D x_T)·SiLU(z_T).
    lengths: of each row's last token instead (column 0 for a row of length 0); z is then [B,1,Di] at those tokens
    or [B,T,Di] (at_row_ends)."""
    if lengths is None:
        xe, Ce, ze = x[:, -1], C[:, -1], None if z is None else z[:, -1]
    else:
        xe, Ce, ze = (None if t is None else at_row_ends(t, lengths)[:, 0] for t in (x, C, z))
    y = (h * Ce[:, None, :].float()).sum(-1) + D.float() * xe.float()
    if ze is not None:
        y = y * torch.nn.functional.silu(ze.float())
    return y.to(x.dtype)[:, None]


def scan_backward(x, dt, A, B, C, D, z, dt_bias, h0, dt_softplus, dy, dh, chunks_per_program=None):
    """Gradients of (y, h) = scan_forward(...) given dy [B,T,Di] and dh [B,Di,N] (or None).
    Returns dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0 (None where the input was None)."""
    x, dt, A, B, C, D, z, dt_bias, h0 = _prepare(x, dt, A, B, C, D, z, dt_bias, h0)
    Bsz, T, Di = x.shape
    N = A.shape[1]
    block_t, block_d, block_n = scan_blocks(N, Di)
    n_chunks = triton.cdiv(T, block_t)
    n_dblk = triton.cdiv(Di, block_d)
    if chunks_per_program is None:
        chunks_per_program = max(1, triton.cdiv(n_chunks * Bsz * n_dblk, TARGET_PROGRAMS))
    n_cprog = triton.cdiv(n_chunks, chunks_per_program)
    dy = _last_dim_contiguous(dy)
    f32 = dict(device=x.device, dtype=torch.float32)
    h_start, dt_sum, _ = _chunk_states(x, dt, A, B, C, D, dt_bias, h0, dt_softplus, block_t, n_chunks)
    g = torch.empty(Bsz, n_chunks, Di, N, **f32)
    dx = torch.empty(Bsz, T, Di, device=x.device, dtype=x.dtype)
    ddt = torch.empty(Bsz, T, Di, device=x.device, dtype=dt.dtype)
    dz = torch.empty(Bsz, T, Di, device=x.device, dtype=z.dtype) if z is not None else None
    dB_part = torch.empty(n_dblk, Bsz, T, N, **f32)
    dC_part = torch.empty(n_dblk, Bsz, T, N, **f32)
    dA_part = torch.empty(Bsz, n_cprog, Di, N, **f32)
    dD_part = torch.empty(Bsz, n_cprog, Di, **f32)
    dbias_part = torch.empty(Bsz, n_cprog, Di, **f32)
    dummy = A
    zs = (z.stride(0), z.stride(1)) if z is not None else (0, 0)

    def launch(full: bool):
        selective_scan_bwd_kernel[(Bsz, n_dblk, n_cprog)](
            x, dt, A, B, C, D, dummy if z is None else z, dummy if dt_bias is None else dt_bias, dy, h_start, g,
            dx, ddt, dummy if dz is None else dz, dB_part, dC_part, dA_part, dD_part, dbias_part,
            T, Di, N, chunks_per_program, n_chunks, int(bool(dt_softplus)),
            x.stride(0), x.stride(1), dt.stride(0), dt.stride(1), B.stride(0), B.stride(1), C.stride(0),
            C.stride(1), *zs, dy.stride(0), dy.stride(1),
            BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_N=block_n, HAS_Z=z is not None,
            HAS_DT_BIAS=dt_bias is not None, FULL=full, num_warps=BWD_NUM_WARPS)

    launch(False)                                  # each chunk's own gradient to the token before it
    dh0 = torch.empty(Bsz, Di, N, **f32)
    scan_chunk_combine_kernel[(Bsz, n_dblk)](      # chain them backwards: g[b, c] = gradient arriving from after c
        A, dt_sum, dummy if dh is None else dh.float().contiguous(), g, dh0, Di, N, n_chunks, Di * N, Di * N,
        BLOCK_D=block_d, BLOCK_N=block_n, HAS_H0=dh is not None, REVERSE=True, num_warps=4)
    launch(True)
    dA = dA_part.sum((0, 1))
    dD = dD_part.sum((0, 1)).to(D.dtype)
    ddt_bias = dbias_part.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    dB = dB_part.sum(0).to(B.dtype)
    dC = dC_part.sum(0).to(C.dtype)
    return dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0 if h0 is not None else None


class SelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper: forward = scan_forward, backward = scan_backward (Triton both ways)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, h0, dt_softplus):
        y, h = scan_forward(x, dt, A, B, C, D, z, dt_bias, h0, dt_softplus)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0)
        ctx.dt_softplus = dt_softplus
        return y, h

    @staticmethod
    def backward(ctx, dy, dh):
        x, dt, A, B, C, D, z, dt_bias, h0 = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        grads = scan_backward(x, dt, A, B, C, D, z, dt_bias, h0, ctx.dt_softplus, dy, dh)
        dA = grads[2].to(A.dtype)
        return (*grads[:2], dA, *grads[3:], None)


def selective_scan(x, dt, A, B, C, D, z=None, dt_bias=None, h0=None, dt_softplus=True, last_only=False,
                   lengths=None):
    """Same signature and results as selective_scan_ref; differentiable when any input requires grad."""
    _check_scan_args(x, dt, A, B, C, D, z, dt_bias, h0, one_token=False, last_only=last_only)
    tensors = (x, dt, A, B, C, D, z, dt_bias, h0)
    if needs_grad(*tensors):
        if lengths is not None:                     # padding's δ = softplus(-inf) = 0, through the Triton autograd
            lengths = _check_lengths(lengths, x.shape[0], x.device)
            dt = padded_dt(dt, lengths, dt_softplus)
            if not last_only:
                return SelectiveScanFn.apply(x, dt, A, B, C, D, z, dt_bias, h0, dt_softplus)
            y, h = SelectiveScanFn.apply(x, dt, A, B, C, D, None, dt_bias, h0, dt_softplus)
            y = at_row_ends(y, lengths).float()
            return ((y if z is None else y * torch.nn.functional.silu(at_row_ends(z, lengths).float())).to(x.dtype),
                    h)
        if last_only and z is not None:             # gated at the last token only (z may be that token's alone)
            y, h = SelectiveScanFn.apply(x, dt, A, B, C, D, None, dt_bias, h0, dt_softplus)
            return (y[:, -1:].float() * torch.nn.functional.silu(z[:, -1:].float())).to(x.dtype), h
        y, h = SelectiveScanFn.apply(*tensors, dt_softplus)
        return (y[:, -1:] if last_only else y), h
    return scan_forward(*tensors, dt_softplus, last_only=last_only, lengths=lengths)


def selective_state_step(h, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=True):
    """Same signature and results as selective_state_step_ref (inference only: no autograd).
    h [B,Di,N] fp32 is not modified; returns (y [B,Di] in x.dtype, new h)."""
    _check_scan_args(x, dt, A, B, C, D, z, dt_bias, h, one_token=True)
    x, dt, A, B, C, D, z, dt_bias, h = _prepare(x, dt, A, B, C, D, z, dt_bias, h)
    Bsz, Di = x.shape
    N = A.shape[1]
    block_d, block_n = step_blocks(N, Di)
    y = torch.empty_like(x)
    h_out = torch.empty(Bsz, Di, N, device=x.device, dtype=torch.float32)
    dummy = A
    selective_state_step_kernel[(Bsz, triton.cdiv(Di, block_d))](
        x, dt, A, B, C, D, dummy if z is None else z, dummy if dt_bias is None else dt_bias, h, y, h_out,
        Di, N, int(bool(dt_softplus)), x.stride(0), dt.stride(0), B.stride(0), C.stride(0),
        0 if z is None else z.stride(0), y.stride(0), Di * N,
        BLOCK_D=block_d, BLOCK_N=block_n, HAS_Z=z is not None, HAS_DT_BIAS=dt_bias is not None, num_warps=4)
    return y, h_out


def conv_block_d(Di: int) -> int:
    """causal_conv_kernel's channels per program (its launchers: causal_conv, the C++ runtime's prefill)."""
    return min(CONV_BLOCK_D, max(32, triton.next_power_of_2(Di)))


def causal_conv(x, weight, bias, window, lengths=None):
    """Same signature and results as causal_conv_ref (inference: no autograd). x [B,T,Di], weight [Di,k],
    bias [Di] or None, window [B,Di,k-1], lengths [B] (int, 0..T) or None. Returns (out [B,T,Di] contiguous,
    new window [B,Di,k-1])."""
    Bsz, T, Di = x.shape
    k = weight.shape[1]
    if tuple(weight.shape) != (Di, k) or tuple(window.shape) != (Bsz, Di, k - 1) or \
            (bias is not None and tuple(bias.shape) != (Di,)):
        raise ValueError(f"causal_conv wants x [B,T,Di], weight [Di,k], bias [Di], window [B,Di,k-1]; got "
                         f"{list(x.shape)}, {list(weight.shape)}, {None if bias is None else list(bias.shape)}, "
                         f"{list(window.shape)}")
    if lengths is not None:
        lengths = _check_lengths(lengths, Bsz, x.device)
    if not 2 <= k <= 4:                     # the kernel keeps 1 to 3 past inputs (mamba_ssm's conv: widths 2-4)
        from ..scan import causal_conv_ref
        return causal_conv_ref(x, weight, bias, window, lengths)
    x = _last_dim_contiguous(x)
    win = window.to(x.dtype).contiguous()
    out = torch.empty(Bsz, T, Di, device=x.device, dtype=x.dtype)
    if T == 0:
        return out, win.clone()
    new_win = torch.empty_like(win)
    block_d = conv_block_d(Di)
    causal_conv_kernel[(Bsz, triton.cdiv(Di, block_d), triton.cdiv(T, CONV_CHUNK))](
        x, weight.contiguous(), win if bias is None else bias.contiguous(), win, out, new_win,
        win if lengths is None else lengths, T, Di, x.stride(0), x.stride(1), win.stride(0), out.stride(0),
        out.stride(1), new_win.stride(0), WIDTH=k, CHUNK=CONV_CHUNK, AHEAD=CONV_AHEAD, BLOCK_D=block_d,
        HAS_BIAS=bias is not None, HAS_LENGTHS=lengths is not None, num_warps=1, **pdl_meta(x.device))
    return out, new_win


def step_blocks(N: int, Di: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N) of the one-token step: [BLOCK_D, BLOCK_N] about 1024 states per program."""
    block_n = triton.next_power_of_2(N)
    return max(4, min(triton.next_power_of_2(Di), 1024 // block_n)), block_n
