"""Fused decode kernels: one MemMamba layer for one token in four launches (the fast path, TritonBackend).

References: the recurrent step of models.memmamba (MemMambaLM.step -> Layer, Mixer.step, NoteBlock, PoolAttention)
built on models.ops.scan.causal_conv_step_ref / selective_state_step_ref and models.ops.pool.pool_insert_ref /
pool_attention_ref. The kernels round to the model dtype wherever the reference's torch ops produce a model-dtype
tensor, so fp16/bf16 decode follows the reference's rounding points (and its threshold decisions, spec §9).

Fusion boundaries. Every projection is a matrix-vector product whose input must be complete before any row can
be computed, so a layer splits where a full vector is needed:

  A  norm_proj    h += out_proj sum of the previous layer (or h = embedding[token]); u = RMSNorm(h); one GEMV
                  of u through the concatenated memory projections [q_tok; score_in; summary; trigger; q_cross]
                  (the GEMVs that share u). Program 0 writes h and u and zeroes this layer's two accumulators.
  B  note_pool    token read over this layer's pool and, every p layers, the cross read over the pools of the
                  §5 group (a program owns rows of one head: one softmax each over all the group's slots);
                  ũ = u + r_tok + r_cross; program 0 scores the token and writes the pool after the insert.
                  logits_hj = P_j · (W_k^(h)ᵀ q_h) and o_h = (Σ_j w_hj P_j) W_v^(h)ᵀ: the pool is never
                  projected, only the softmax-weighted summary is.
  C  in_proj_conv in_proj rows of a channel block (x and z), conv-window shift + depthwise conv + SiLU, and the
                  block's share of x_proj, added into the layer's x_proj accumulator (fp32 atomics).
  D  ssm_out      (dt_r, B, C) from the accumulator; dt_proj rows of the block; softplus; state update;
                  y = C·h + D x; SiLU(z) gate; the block's share of out_proj, added into the layer's out_proj
                  accumulator (read by the next A).

Why it is shaped so (decode is latency-bound: a 130m layer moves ~7 MB in ~3 µs at HBM speed): many small
programs (130m: C 192, so every SM streams weights; D 48, a quarter of the out_proj atomics); each kernel loads
everything that no earlier kernel of the step writes (weights, and the state before the token) *before* it waits
for its predecessor, so
with programmatic dependent launch (USE_PDL, sm_90+: `launch_pdl=True`, griddepcontrol) those loads overlap the
previous kernel; and partial sums meet in fp32 atomics rather than per-program buffers that every consumer
program would re-read. The price: the sums are not bit-for-bit reproducible between runs (fp32 adds of ~200
shares in any order); in fp16/bf16 a last-bit difference can round either way at the model-dtype rounding points
and grow over many steps, as between any two correct backends (§9; the tests' tolerances hold either way).
Layouts matter as much as bytes: written as `w * y[:, None]`, a product of a weight tile with a vector that
comes out of another tile's reduction can make Triton convert the whole weight tile (through shared memory) to
the vector's layout; D's out_proj share goes through two transposes instead, which converts only the vector
(that one conversion was a third of the step). Check a change with the TTGIR's `convert_layout` ops.

PDL rules every kernel keeps: nothing before gdc_wait reads what an earlier kernel of the step writes, and nothing
before it writes; every program calls gdc_wait (so a kernel's completion implies its predecessor's, transitively).
The state is double-buffered by the caller: reads come from the state before the token and every write goes to a
second buffer, so the §5 cross read of a group never sees the inserts of the group's earlier layers (§2), and a
captured CUDA graph never updates a buffer it also reads (deployment-notes).
"""
from __future__ import annotations

import triton
import triton.language as tl

from memmamba_deploy.models.ops.pool import pool_insert_ref  # noqa: F401 (reference)
from memmamba_deploy.models.ops.scan import causal_conv_step_ref, selective_state_step_ref  # noqa: F401

from .launch import _after_predecessor
from .scan import _silu, _softplus


@triton.jit
def _round(x, like_ptr):
    """x rounded to the element type of like_ptr, returned in fp32 (where the reference holds a model-dtype
    tensor)."""
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _rmsnorm(h, weight, d, eps, like_ptr):
    """RMSNorm of the fp32 row h [BLOCK] (d valid): weight * (h · rstd).to(dtype), in the model dtype (the
    reference's RMSNorm), returned in fp32."""
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / d + eps)
    return _round(weight.to(tl.float32) * _round(h * rstd, like_ptr), like_ptr)


@triton.jit
def _acc_sum(ptr, copy_stride, offs, mask, COPIES: tl.constexpr):
    """Σ over the COPIES copies (copy_stride apart) of an fp32 sum that atomics add into, read from L2."""
    o = tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg")
    for c in tl.static_range(1, COPIES):
        o += tl.load(ptr + c * copy_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
    return o


# ----------------------------------------------------------------------------------------------------------------
# A: residual + RMSNorm + memory projections
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def decode_norm_proj_kernel(
    tok_ptr, emb_ptr, h_prev_ptr, part_ptr, h_ptr, u_ptr, norm_w_ptr, w_ptr, bias_ptr, out_ptr, zx_ptr, zo_ptr,
    d, R, P, X, eps, stride_emb,
    BLOCK_DM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr, FROM_EMBEDDING: tl.constexpr,
    HAS_PROJ: tl.constexpr, USE_PDL: tl.constexpr,
):
    """grid (cdiv(R, BLOCK_R) if HAS_PROJ else 1, B).
    h = embedding[tok[b]] (FROM_EMBEDDING; tok int64 [B]) or h_prev [B,d] fp32 + round(part[b,:]) (part [B,d]
    fp32: the previous layer's out_proj sum; P is 1 to add it, 0 not to, no other value); u = RMSNorm(h)
    (weight norm_w [d]); program 0 writes h [B,d] fp32 and u [B,d] and zeroes zx [B,X] and zo [B,d] (the sums
    kernels C and D of this layer add into).
    HAS_PROJ: out[b, rows] = round(w[rows, :] · u + bias[rows]) for w [R,d], bias [R] fp32, out [B,R]."""
    pid_r = tl.program_id(0)
    b = tl.program_id(1)
    offs = tl.arange(0, BLOCK_DM)
    mask = offs < d
    norm_w = tl.load(norm_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_PROJ:
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rows < R
        w = tl.load(w_ptr + rows[:, None] * d + offs[None, :], mask=mask_r[:, None] & mask[None, :], other=0.0)
        bias = tl.load(bias_ptr + rows, mask=mask_r, other=0.0)
    _after_predecessor(USE_PDL)
    if FROM_EMBEDDING:
        tok = tl.load(tok_ptr + b)
        h = tl.load(emb_ptr + tok * stride_emb + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.load(h_prev_ptr + b * d + offs, mask=mask, other=0.0)
        part = tl.load(part_ptr + b * d + offs, mask=offs < d * P, other=0.0)          # P is 0 or 1
        h = h + _round(part, u_ptr)                # the reference adds out_proj's model-dtype output to h (fp32)
    u = _rmsnorm(h, norm_w, d, eps, u_ptr)
    if pid_r == 0:
        tl.store(h_ptr + b * d + offs, h, mask=mask)
        tl.store(u_ptr + b * d + offs, u.to(u_ptr.dtype.element_ty), mask=mask)
        offs_x = tl.arange(0, BLOCK_X)
        tl.store(zx_ptr + b * X + offs_x, tl.zeros([BLOCK_X], dtype=tl.float32), mask=offs_x < X)
        tl.store(zo_ptr + b * d + offs, tl.zeros([BLOCK_DM], dtype=tl.float32), mask=mask)
    if HAS_PROJ:
        y = tl.sum(w.to(tl.float32) * u[None, :], axis=1) + bias
        tl.store(out_ptr + b * R + rows, y.to(out_ptr.dtype.element_ty), mask=mask_r)


# ----------------------------------------------------------------------------------------------------------------
# B: note pool (reads, score, insert)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_slots(pool_ptr, prio_ptr, stride_pool_l, stride_prio_l, K, ds, G: tl.constexpr, BLOCK_GK: tl.constexpr,
                BLOCK_DS: tl.constexpr):
    """The G·K slots of G pools as one [BLOCK_GK, BLOCK_DS] tile (slot j = pool j // K, row j % K; pool g at
    pool_ptr + g·stride_pool_l, [K, ds]) and their priorities (-1 where j >= G·K: never valid)."""
    j = tl.arange(0, BLOCK_GK)
    offs_c = tl.arange(0, BLOCK_DS)
    mask_j = j < G * K
    g = j // K
    P = tl.load(pool_ptr + (g * stride_pool_l + (j - g * K) * ds)[:, None] + offs_c[None, :],
                mask=mask_j[:, None] & (offs_c < ds)[None, :], other=0.0)
    prio = tl.load(prio_ptr + g * stride_prio_l + (j - g * K), mask=mask_j, other=-1.0)
    return P, prio


@triton.jit
def _pool_read(qh, wk, P, prio, wv, scale):
    """Rows of o = MultiHead(q, P W_kᵀ, P W_vᵀ) for one head over the valid slots (prio >= 0) of the tile P (one
    softmax over all of them), fp32, 0 where no slot is valid. qh [BLOCK_DH] is the head's query, wk [BLOCK_DH,
    BLOCK_DS] the head's rows of W_k, wv [BLOCK_O, BLOCK_DS] the program's rows of W_v."""
    qk = tl.sum(wk.to(tl.float32) * qh[:, None], axis=0) * scale     # W_k^(h)ᵀ q_h, so logit_j = P_j · qk
    Pf = P.to(tl.float32)
    logit = tl.where(prio >= 0, tl.sum(Pf * qk[None, :], axis=1), float("-inf"))
    m = tl.max(logit, axis=0)
    p = tl.exp(logit - tl.where(m == float("-inf"), 0.0, m))        # all empty: every weight 0
    l_sum = tl.sum(p, axis=0)
    pooled = tl.sum(p[:, None] * Pf, axis=0) / tl.where(l_sum > 0, l_sum, 1.0)   # Σ_j w_hj P_j
    return tl.sum(wv.to(tl.float32) * pooled[None, :], axis=1)


@triton.jit
def _pool_insert(hidden_ptr, summary_ptr, w_score, P, prio, pool_out_ptr, prio_out_ptr, K, ds, d4, tau1, like_ptr,
                 BLOCK_K: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_D4: tl.constexpr):
    """§3 for one batch row: score a = sigmoid(round(w_score · ReLU(hidden))) (hidden [d4], the score_in output),
    then the priority replacement of summary [ds] into the pool P [BLOCK_K, BLOCK_DS] / prio [BLOCK_K] (the state
    before the token), written whole to pool_out [K, ds] / prio_out [K]."""
    offs4 = tl.arange(0, BLOCK_D4)
    offs_c = tl.arange(0, BLOCK_DS)
    mask_c = offs_c < ds
    hidden = tl.load(hidden_ptr + offs4, mask=offs4 < d4, other=0.0, cache_modifier=".cg").to(tl.float32)
    score = tl.sigmoid(_round(tl.sum(w_score * tl.maximum(hidden, 0.0), axis=0), like_ptr))
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    prio_k = tl.where(mask_k, prio, float("inf"))
    pmin, jmin = tl.min(prio_k, axis=0, return_indices=True, return_indices_tie_break_left=True)
    score_k = tl.zeros([BLOCK_K], dtype=tl.float32) + score          # as a block: Triton 3.6's interpreter
    hit = (offs_k == jmin) & (score_k > tau1) & (score_k > pmin)      # cannot `&` a broadcast scalar comparison
    tl.store(prio_out_ptr + offs_k, tl.where(hit, score_k, prio), mask=mask_k)
    summary = tl.load(summary_ptr + offs_c, mask=mask_c, other=0.0, cache_modifier=".cg")
    pool = tl.where(hit[:, None], summary[None, :].to(P.dtype), P)
    tl.store(pool_out_ptr + offs_k[:, None] * ds + offs_c[None, :], pool, mask=mask_k[:, None] & mask_c[None, :])


@triton.jit
def _conv_window(conv_w_ptr, win_ptr, ch, mask_c, KW, like_ptr, BLOCK_W: tl.constexpr):
    """The part of a causal conv step that needs only the state before the token, for channels ch: the sum over
    the KW-1 window taps of round(window_t * w_t) (fp32 sum of the reference's model-dtype products), the last
    tap's weight, and the window shifted one to the left (its last slot is for the new input). window [Di, KW-1]
    and conv_w [Di, KW] start at win_ptr / conv_w_ptr. Kept apart from the new input: a [C, BLOCK_W] tile
    combined with x (a row reduction of the in_proj tile) costs the compiler ~100 registers."""
    tap = tl.arange(0, BLOCK_W)
    m = mask_c[:, None] & (tap < KW - 1)[None, :]
    window = tl.load(win_ptr + ch[:, None] * (KW - 1) + tap[None, :], mask=m, other=0.0)
    w = tl.load(conv_w_ptr + ch[:, None] * KW + tap[None, :], mask=m, other=0.0).to(tl.float32)
    partial = tl.sum(_round(window.to(tl.float32) * w, like_ptr), axis=1)
    shifted = tl.load(win_ptr + ch[:, None] * (KW - 1) + tap[None, :] + 1,
                      mask=mask_c[:, None] & (tap < KW - 2)[None, :], other=0.0)
    last = tl.load(conv_w_ptr + ch * KW + KW - 1, mask=mask_c, other=0.0).to(tl.float32)
    return partial, last, shifted


@triton.jit
def _conv_finish(x, partial, last, conv_b, shifted, win_out_ptr, ch, mask_c, KW, like_ptr, BLOCK_W: tl.constexpr):
    """The rest of the conv step once the new input x [C] (fp32, rounded) is known: sum, + bias, SiLU in the model
    dtype like causal_conv_step_ref (returns xc [C] fp32, rounded); writes the new window (shifted, then x)."""
    s = _round(partial + _round(x * last, like_ptr), like_ptr)
    s = _round(s + conv_b, like_ptr)
    tap = tl.arange(0, BLOCK_W)
    tl.store(win_out_ptr + ch[:, None] * (KW - 1) + tap[None, :], shifted,
             mask=mask_c[:, None] & (tap < KW - 2)[None, :])
    tl.store(win_out_ptr + ch * (KW - 1) + KW - 2, x.to(shifted.dtype), mask=mask_c)
    return _round(_silu(s), like_ptr)


@triton.jit
def _ssm_step(xacc_ptr, copy_stride, x, z, w_dt, dt_bias, A, Dv, h, mask_c, R, N, offs_r, offs_n, like_ptr,
              COPIES: tl.constexpr):
    """dt_r, B, C = round(xacc) split at R, R+N (xacc: the sum of COPIES fp32 copies copy_stride apart);
    δ = softplus(round(w_dt · dt_r) + dt_bias); h' = exp(δA) h + δ x B; y = round((C·h' + D x) SiLU(z)).
    Returns (h' [C, BLOCK_N] fp32, y [C] fp32)."""
    dt_r = _round(_acc_sum(xacc_ptr, copy_stride, offs_r, offs_r < R, COPIES), like_ptr)
    Bv = _round(_acc_sum(xacc_ptr + R, copy_stride, offs_n, offs_n < N, COPIES), like_ptr)
    Cv = _round(_acc_sum(xacc_ptr + R + N, copy_stride, offs_n, offs_n < N, COPIES), like_ptr)
    dt = _round(tl.sum(w_dt * dt_r[None, :], axis=1), like_ptr)
    delta = tl.where(mask_c, _softplus(dt + dt_bias), 0.0)
    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bv[None, :]
    y = tl.sum(h * Cv[None, :], axis=1) + Dv * x
    return h, _round(y * _silu(z), like_ptr)


@triton.jit
def decode_note_pool_kernel(
    u_ptr, mem_ptr, pool_ptr, prio_ptr, group_pool_ptr, group_prio_ptr, pool_out_ptr, prio_out_ptr, ut_ptr,
    wk_ptr, wv_ptr, alpha_ptr, x_wk_ptr, x_wv_ptr, x_alpha_ptr, w_score_ptr,
    d, K, ds, dh, dv, d4, R_mem, n_oblocks, stride_pool_l, stride_prio_l, tau1, tau2, scale,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DH: tl.constexpr,
    BLOCK_D4: tl.constexpr, BLOCK_GK: tl.constexpr, HAS_CROSS: tl.constexpr, GROUP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """grid (H * n_oblocks, B), n_oblocks = cdiv(dv, BLOCK_O), dh = ds/H, dv = d/H: a program owns BLOCK_O rows of
    one head's output columns. mem [B, R_mem] (kernel A's output) holds, per row: q_tok [ds], score hidden [d4],
    summary [ds], trigger logit [1], then q_cross [ds] (HAS_CROSS). pool/prio point at this layer's [B,K,ds]/[B,K]
    of the state before the token; group_pool/group_prio at the first layer of the §5 group (G layers, strides
    stride_pool_l/stride_prio_l; G = GROUP = p, a constexpr; BLOCK_GK >= G·K). Writes ut [B,d] = u + r_tok +
    r_cross, and (program 0) this layer's pool_out/prio_out after the §3 insert. alpha/x_alpha: 1-element
    tensors (model dtype)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    head = pid // n_oblocks
    cols = (pid % n_oblocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    rows = head * dv + cols
    mask_rows = cols < dv
    offs_c = tl.arange(0, BLOCK_DS)
    mask_c = offs_c < ds
    offs_h = tl.arange(0, BLOCK_DH)
    mq = offs_h < dh
    cq = head * dh + offs_h
    # before the wait: weights and the state before the token (no kernel of this step writes either)
    wk = tl.load(wk_ptr + cq[:, None] * ds + offs_c[None, :], mask=mq[:, None] & mask_c[None, :], other=0.0)
    wv = tl.load(wv_ptr + rows[:, None] * ds + offs_c[None, :], mask=mask_rows[:, None] & mask_c[None, :],
                 other=0.0)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    P, prio = _load_slots(pool_ptr + b * K * ds, prio_ptr + b * K, 0, 0, K, ds, 1, BLOCK_K, BLOCK_DS)
    if HAS_CROSS:
        x_wk = tl.load(x_wk_ptr + cq[:, None] * ds + offs_c[None, :], mask=mq[:, None] & mask_c[None, :],
                       other=0.0)
        x_wv = tl.load(x_wv_ptr + rows[:, None] * ds + offs_c[None, :], mask=mask_rows[:, None] & mask_c[None, :],
                       other=0.0)
        x_alpha = tl.load(x_alpha_ptr).to(tl.float32)
        GP, gprio = _load_slots(group_pool_ptr + b * K * ds, group_prio_ptr + b * K, stride_pool_l, stride_prio_l,
                                K, ds, GROUP, BLOCK_GK, BLOCK_DS)
    offs4 = tl.arange(0, BLOCK_D4)
    w_score = tl.load(w_score_ptr + offs4, mask=offs4 < d4, other=0.0).to(tl.float32)
    _after_predecessor(USE_PDL)
    mem = mem_ptr + b * R_mem
    u = tl.load(u_ptr + b * d + rows, mask=mask_rows, other=0.0).to(tl.float32)
    # §4 token read, gated by the learned trigger b = sigmoid(w_bᵀu + β) > tau2
    trigger = tl.load(mem + ds + d4 + ds).to(tl.float32)
    qh = tl.load(mem + cq, mask=mq, other=0.0).to(tl.float32)
    o = _pool_read(qh, wk, P, prio, wv, scale)
    r = _round(alpha * _round(o, ut_ptr), ut_ptr)
    r = tl.where(tl.sigmoid(trigger) > tau2, r, 0.0)
    ut = _round(u + r, ut_ptr)
    if HAS_CROSS:                                   # §5 cross read over the group's pools, no trigger
        xq = tl.load(mem + ds + d4 + ds + 1 + cq, mask=mq, other=0.0).to(tl.float32)
        o = _pool_read(xq, x_wk, GP, gprio, x_wv, scale)
        ut = _round(ut + _round(x_alpha * _round(o, ut_ptr), ut_ptr), ut_ptr)
    tl.store(ut_ptr + b * d + rows, ut.to(ut_ptr.dtype.element_ty), mask=mask_rows)
    if pid == 0:                                    # §3: score, then priority replacement into the out buffer
        _pool_insert(mem + ds, mem + ds + d4, w_score, P, prio, pool_out_ptr + b * K * ds, prio_out_ptr + b * K,
                     K, ds, d4, tau1, ut_ptr, BLOCK_K, BLOCK_DS, BLOCK_D4)


# ----------------------------------------------------------------------------------------------------------------
# C: in_proj + conv step + x_proj share
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def decode_in_proj_conv_kernel(
    ut_ptr, w_in_ptr, conv_w_ptr, conv_b_ptr, win_in_ptr, win_out_ptr, w_xT_ptr, xc_ptr, z_ptr, xacc_ptr,
    d, Di, KW, X,
    BLOCK_C: tl.constexpr, BLOCK_KD: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_X: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """grid (cdiv(Di, BLOCK_C), B), BLOCK_KD >= d. For channels c of the block: x_c, z_c = in_proj rows c and
    Di + c of ut (w_in [2Di, d]); conv over [window_in[b,c,:], x_c] with taps conv_w [Di, KW] + conv_b, SiLU ->
    xc [B,Di]; window_out [B,Di,KW-1] = the window shifted by one with x_c last; z [B,Di];
    xacc[b, :] += Σ_{c in block} w_xT[c, :] xc_c for w_xT [Di, X] (x_proj weight transposed), fp32 atomics
    (xacc zeroed by this layer's kernel A)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < Di
    offs = tl.arange(0, BLOCK_KD)
    m2 = mask_c[:, None] & (offs < d)[None, :]
    offs_x = tl.arange(0, BLOCK_X)
    # before the wait: weights and the conv window before the token
    wx = tl.load(w_in_ptr + ch[:, None] * d + offs[None, :], mask=m2, other=0.0)
    wz = tl.load(w_in_ptr + (Di + ch[:, None]) * d + offs[None, :], mask=m2, other=0.0)
    conv_b = tl.load(conv_b_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    partial, last, shifted = _conv_window(conv_w_ptr, win_in_ptr + b * Di * (KW - 1), ch, mask_c, KW, xc_ptr, BLOCK_W)
    w_x = tl.load(w_xT_ptr + ch[:, None] * X + offs_x[None, :], mask=mask_c[:, None] & (offs_x < X)[None, :],
                  other=0.0).to(tl.float32)
    _after_predecessor(USE_PDL)
    uv = tl.load(ut_ptr + b * d + offs, mask=offs < d, other=0.0).to(tl.float32)
    x = _round(tl.sum(wx.to(tl.float32) * uv[None, :], axis=1), xc_ptr)
    acc_z = tl.sum(wz.to(tl.float32) * uv[None, :], axis=1)
    tl.store(z_ptr + b * Di + ch, acc_z.to(z_ptr.dtype.element_ty), mask=mask_c)
    xc = _conv_finish(x, partial, last, conv_b, shifted, win_out_ptr + b * Di * (KW - 1), ch, mask_c, KW, xc_ptr,
                      BLOCK_W)
    tl.store(xc_ptr + b * Di + ch, xc.to(xc_ptr.dtype.element_ty), mask=mask_c)
    # this block's share of x_proj
    tl.atomic_add(xacc_ptr + b * X + offs_x, tl.sum(w_x * xc[:, None], axis=0), mask=offs_x < X, sem="relaxed")


# ----------------------------------------------------------------------------------------------------------------
# D: dt_proj + state update + gate + out_proj share
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def decode_ssm_out_kernel(
    xc_ptr, z_ptr, xacc_ptr, w_dt_ptr, dt_bias_ptr, A_ptr, D_ptr, h_in_ptr, h_out_ptr, w_outT_ptr, oacc_ptr,
    d, Di, N, R, X,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """grid (cdiv(Di, BLOCK_C), B), BLOCK_O >= d. (dt_r, B, C) = round(xacc[b, :]) split at R, R+N (xacc [B,X]
    fp32, X = R + 2N); dt = round(w_dt[c, :] · dt_r) (w_dt [Di,R]); δ = softplus(dt + dt_bias); h_out =
    exp(δA) h_in + δ x B (h [B,Di,N] fp32, A [Di,N] fp32); y = round((C·h + D x) SiLU(z));
    oacc[b, :] += Σ_{c in block} w_outT[c, :] y_c for w_outT [Di, d] (out_proj weight transposed), fp32 atomics
    (oacc zeroed by this layer's kernel A)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < Di
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_r = offs_r < R
    mask_n = offs_n < N
    mask_cn = mask_c[:, None] & mask_n[None, :]
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < d
    # before the wait: weights and the SSM state before the token
    w_out = tl.load(w_outT_ptr + ch[:, None] * d + offs_o[None, :], mask=mask_c[:, None] & mask_o[None, :],
                    other=0.0)
    w_dt = tl.load(w_dt_ptr + ch[:, None] * R + offs_r[None, :], mask=mask_c[:, None] & mask_r[None, :],
                   other=0.0).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0)
    Dv = tl.load(D_ptr + ch, mask=mask_c, other=0.0).to(tl.float32)
    h = tl.load(h_in_ptr + (b * Di + ch[:, None]) * N + offs_n[None, :], mask=mask_cn, other=0.0)
    _after_predecessor(USE_PDL)
    x = tl.load(xc_ptr + b * Di + ch, mask=mask_c, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * Di + ch, mask=mask_c, other=0.0).to(tl.float32)
    h, y = _ssm_step(xacc_ptr + b * X, 0, x, z, w_dt, dt_bias, A, Dv, h, mask_c, R, N, offs_r, offs_n, xc_ptr, 1)
    tl.store(h_out_ptr + (b * Di + ch[:, None]) * N + offs_n[None, :], h, mask=mask_cn)
    # w_out · y through two transposes: written as w_out * y[:, None], Triton converts the whole [BLOCK_C, BLOCK_O]
    # tile to y's layout (through shared memory) instead of y to the tile's
    tl.atomic_add(oacc_ptr + b * d + offs_o, tl.sum(tl.trans(tl.trans(w_out).to(tl.float32) * y[None, :]), axis=0),
                  mask=mask_o, sem="relaxed")


# ----------------------------------------------------------------------------------------------------------------
# Block heuristics (plain Python, shared with the AOT table; see README.md)
# ----------------------------------------------------------------------------------------------------------------
def decode_blocks(d: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int, pool_size: int, summary_dim: int,
                  heads: int, cross_layer_every: int = 1, aot: bool = False) -> dict:
    """Block sizes of the four kernels for one model shape: C and D take whole rows of d (one tile, loaded before
    the wait); C in blocks of 8 channels (130m: 192 programs), D of 32 (48 programs: a quarter of the out_proj
    atomics). From sweeps on an H100 (BENCHMARKS.md, 2026-11-25 evening: D at 32 channels 0.329 ms/token, at 8
    0.379). aot: D keeps 8 channels, as a 32-channel tile spills in an ahead-of-time build (no divisibility
    specialisation there, so its loads are not vectorised)."""
    p2 = triton.next_power_of_2
    block_dm = p2(d)
    c_block = max(1, min(8, 8192 // block_dm))           # 130m: 8 channels x 2 (x, z) rows -> 192 programs
    d_block = max(1, min(8 if aot else 32, 32768 // block_dm))      # 130m: 32 channels -> 48 programs
    return dict(
        norm_proj=dict(BLOCK_DM=block_dm, BLOCK_R=max(1, min(16, 8192 // block_dm)),
                       BLOCK_X=p2(dt_rank + 2 * d_state), num_warps=4),
        note_pool=dict(BLOCK_O=min(32, p2(max(1, d // heads))), BLOCK_K=p2(pool_size), BLOCK_DS=p2(summary_dim),
                       BLOCK_DH=p2(max(1, summary_dim // heads)), BLOCK_D4=p2(max(1, d // 4)),
                       BLOCK_GK=p2(pool_size * cross_layer_every),
                       num_warps=8 if p2(pool_size * cross_layer_every) * p2(summary_dim) >= 4096 else 4),
        in_proj_conv=dict(BLOCK_C=c_block, BLOCK_KD=block_dm, BLOCK_W=p2(d_conv), BLOCK_X=p2(dt_rank + 2 * d_state),
                          num_warps=4),
        ssm_out=dict(BLOCK_C=d_block, BLOCK_N=p2(d_state), BLOCK_R=p2(dt_rank), BLOCK_O=block_dm, num_warps=4),
    )
