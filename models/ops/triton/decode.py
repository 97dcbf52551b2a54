"""Fused decode kernels: one MemMamba layer for one token in four launches (the fast path, TritonBackend).

References: the recurrent step of models.memmamba (MemMambaLM.step -> Layer, Mixer.step, NoteBlock, PoolAttention)
built on models.ops.scan.causal_conv_step_ref / selective_state_step_ref and models.ops.pool.pool_insert_ref /
pool_attention_ref. The kernels round to the model dtype wherever the reference's torch ops produce a model-dtype
tensor, so fp16/bf16 decode follows the reference's rounding points (and its threshold decisions, spec §9).

Fusion boundaries. Every projection is a matrix-vector product whose input must be complete before any row can
be computed, so a layer splits where a full vector is needed:

  A  norm_proj    h += out_proj partials of the previous layer (or h = embedding[token]); u = RMSNorm(h);
                  one GEMV of u through the concatenated memory projections [q_tok; score_in; summary; trigger;
                  q_cross] (the GEMVs that share u). Program 0 writes h and u.
  B  note_pool    token read over this layer's pool and, every p layers, the cross read over the pools of the
                  §5 group (a program owns rows of one head: one softmax each); ũ = u + r_tok + r_cross;
                  program 0 scores the token and writes the pool after the insert.
                  logits_hj = P_j · (W_k^(h)ᵀ q_h) and o_h = (Σ_j w_hj P_j) W_v^(h)ᵀ: the pool is never
                  projected, only the softmax-weighted summary is.
  C  in_proj_conv in_proj rows of a channel block (x and z), conv-window shift + depthwise conv + SiLU, and the
                  block's share of x_proj (partial sums over its channels).
  D  ssm_out      x_proj partials summed -> (dt_r, B, C); dt_proj rows of the block; softplus; state update;
                  y = C·h + D x; SiLU(z) gate; the block's share of out_proj (partial sums, added by the next A).

Partial sums are written per program and summed by the consumer in a fixed order (deterministic, no atomics).
The state is double-buffered by the caller: reads come from the state before the token and every write goes to
a second buffer, so the §5 cross read of a group never sees the inserts of the group's earlier layers (§2), and
a captured CUDA graph never updates a buffer it also reads (deployment-notes).
"""
from __future__ import annotations

import triton
import triton.language as tl

from memmamba_deploy.models.ops.pool import pool_insert_ref  # noqa: F401 (reference)
from memmamba_deploy.models.ops.scan import causal_conv_step_ref, selective_state_step_ref  # noqa: F401


@triton.jit
def _softplus(v):
    # F.softplus (threshold 20) with log1p accuracy, as models/ops/triton/scan.py
    e = tl.exp(v)
    w = 1.0 + e
    return tl.where(v > 20.0, v, tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0))))


@triton.jit
def _round(x, like_ptr):
    """x rounded to the element type of like_ptr, returned in fp32 (where the reference holds a model-dtype
    tensor)."""
    return x.to(like_ptr.dtype.element_ty).to(tl.float32)


# ----------------------------------------------------------------------------------------------------------------
# A: residual + RMSNorm + memory projections
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def decode_norm_proj_kernel(
    tok_ptr, emb_ptr, h_prev_ptr, part_ptr, h_ptr, u_ptr, norm_w_ptr, w_ptr, bias_ptr, out_ptr,
    d, R, P, eps, stride_emb,
    BLOCK_DM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, P_ITERS: tl.constexpr,
    FROM_EMBEDDING: tl.constexpr, HAS_PROJ: tl.constexpr,
):
    """grid (cdiv(R, BLOCK_R) if HAS_PROJ else 1, B).
    h = embedding[tok[b]] (FROM_EMBEDDING; tok int64 [B]) or h_prev [B,d] fp32 + round(Σ_p part[p,b,:]) with
    part [P,B,d] fp32 (P_ITERS = cdiv(P, BLOCK_P): unrolled, so every load is in flight at once);
    u = RMSNorm(h) (weight norm_w [d]); program 0 writes h [B,d] fp32 and u [B,d].
    HAS_PROJ: out[b, rows] = round(w[rows, :] · u + bias[rows]) for w [R,d], bias [R] fp32, out [B,R]."""
    pid_r = tl.program_id(0)
    b = tl.program_id(1)
    n_batch = tl.num_programs(1)
    offs = tl.arange(0, BLOCK_DM)
    mask = offs < d
    if HAS_PROJ:
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rows < R
        w = tl.load(w_ptr + rows[:, None] * d + offs[None, :], mask=mask_r[:, None] & mask[None, :], other=0.0)
        bias = tl.load(bias_ptr + rows, mask=mask_r, other=0.0)
    if FROM_EMBEDDING:
        tok = tl.load(tok_ptr + b)
        h = tl.load(emb_ptr + tok * stride_emb + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.load(h_prev_ptr + b * d + offs, mask=mask, other=0.0)
        acc = tl.zeros([BLOCK_DM], dtype=tl.float32)
        prow = tl.arange(0, BLOCK_P)
        for i in tl.static_range(P_ITERS):
            p0 = i * BLOCK_P
            parts = tl.load(part_ptr + ((p0 + prow[:, None]) * n_batch + b) * d + offs[None, :],
                            mask=((p0 + prow) < P)[:, None] & mask[None, :], other=0.0)
            acc += tl.sum(parts, axis=0)
        h = h + _round(acc, u_ptr)               # the reference adds out_proj's model-dtype output to h (fp32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / d + eps)
    norm_w = tl.load(norm_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = _round(norm_w * _round(h * rstd, u_ptr), u_ptr)     # RMSNorm: weight * x.to(dtype), in the model dtype
    if pid_r == 0:
        tl.store(h_ptr + b * d + offs, h, mask=mask)
        tl.store(u_ptr + b * d + offs, u.to(u_ptr.dtype.element_ty), mask=mask)
    if HAS_PROJ:
        y = tl.sum(w.to(tl.float32) * u[None, :], axis=1) + bias
        tl.store(out_ptr + b * R + rows, y.to(out_ptr.dtype.element_ty), mask=mask_r)


# ----------------------------------------------------------------------------------------------------------------
# B: note pool (reads, score, insert)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _pool_read(q_ptr, pool_ptr, prio_ptr, stride_pool_l, stride_prio_l, wk_ptr, wv_ptr, head, rows, mask_rows,
               K, ds, dh, scale,
               G: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DH: tl.constexpr):
    """Rows `rows` (all in head `head`) of o = MultiHead(q, P W_kᵀ, P W_vᵀ) over the valid slots of G pools (one
    softmax over all of them), fp32, 0 where no slot is valid. q [ds] at q_ptr; pool g at pool_ptr +
    g·stride_pool_l ([K, ds]); W_k [ds, ds] and W_v [d, ds] are nn.Linear weights."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_DS)
    offs_h = tl.arange(0, BLOCK_DH)
    mask_k = offs_k < K
    mask_c = offs_c < ds
    cq = head * dh + offs_h
    mq = offs_h < dh
    qh = tl.load(q_ptr + cq, mask=mq, other=0.0).to(tl.float32)
    wk = tl.load(wk_ptr + cq[:, None] * ds + offs_c[None, :], mask=mq[:, None] & mask_c[None, :],
                 other=0.0).to(tl.float32)
    qk = tl.sum(wk * qh[:, None], axis=0) * scale                    # W_k^(h)ᵀ q_h, so logit_j = P_j · qk
    m_run = float("-inf")
    l_run = 0.0
    acc = tl.zeros([BLOCK_DS], dtype=tl.float32)
    for g in tl.static_range(G):                                     # online softmax over the G pools
        P = tl.load(pool_ptr + g * stride_pool_l + offs_k[:, None] * ds + offs_c[None, :],
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        prio = tl.load(prio_ptr + g * stride_prio_l + offs_k, mask=mask_k, other=-1.0)
        logit = tl.where(prio >= 0, tl.sum(P * qk[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m_run, tl.max(logit, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)         # all empty so far: weights stay 0
        corr = tl.exp(m_run - m_safe)
        p = tl.exp(logit - m_safe)
        l_run = l_run * corr + tl.sum(p, axis=0)
        acc = acc * corr + tl.sum(p[:, None] * P, axis=0)
        m_run = m_new
    pooled = acc / tl.where(l_run > 0, l_run, 1.0)                   # Σ_j w_hj P_j
    wv = tl.load(wv_ptr + rows[:, None] * ds + offs_c[None, :], mask=mask_rows[:, None] & mask_c[None, :],
                 other=0.0).to(tl.float32)
    return tl.sum(wv * pooled[None, :], axis=1)


@triton.jit
def decode_note_pool_kernel(
    u_ptr, mem_ptr, pool_ptr, prio_ptr, group_pool_ptr, group_prio_ptr, pool_out_ptr, prio_out_ptr, ut_ptr,
    wk_ptr, wv_ptr, alpha_ptr, x_wk_ptr, x_wv_ptr, x_alpha_ptr, w_score_ptr,
    d, K, ds, dh, dv, d4, R_mem, n_oblocks, stride_pool_l, stride_prio_l, tau1, tau2, scale,
    BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DH: tl.constexpr,
    BLOCK_D4: tl.constexpr, HAS_CROSS: tl.constexpr, GROUP: tl.constexpr,
):
    """grid (H * n_oblocks, B), n_oblocks = cdiv(dv, BLOCK_O), dh = ds/H, dv = d/H: a program owns BLOCK_O rows of
    one head's output columns. mem [B, R_mem] (kernel A's output) holds, per row: q_tok [ds], score hidden [d4],
    summary [ds], trigger logit [1], then q_cross [ds] (HAS_CROSS). pool/prio point at this layer's [B,K,ds]/[B,K]
    of the state before the token; group_pool/group_prio at the first layer of the §5 group (G layers, strides
    stride_pool_l/stride_prio_l; G = GROUP = p, a constexpr). Writes ut [B,d] = u + r_tok + r_cross, and
    (program 0) this layer's pool_out/prio_out after the §3 insert. alpha/x_alpha: 1-element tensors (model dtype)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    head = pid // n_oblocks
    cols = (pid % n_oblocks) * BLOCK_O + tl.arange(0, BLOCK_O)
    rows = head * dv + cols
    mask_rows = cols < dv
    mem = mem_ptr + b * R_mem
    u = tl.load(u_ptr + b * d + rows, mask=mask_rows, other=0.0).to(tl.float32)
    # §4 token read, gated by the learned trigger b = sigmoid(w_bᵀu + β) > tau2
    trigger = tl.load(mem + ds + d4 + ds).to(tl.float32)
    o = _pool_read(mem, pool_ptr + b * K * ds, prio_ptr + b * K, 0, 0, wk_ptr, wv_ptr, head, rows, mask_rows,
                   K, ds, dh, scale, 1, BLOCK_K, BLOCK_DS, BLOCK_DH)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    r = _round(alpha * _round(o, ut_ptr), ut_ptr)
    r = tl.where(tl.sigmoid(trigger) > tau2, r, 0.0)
    ut = _round(u + r, ut_ptr)
    if HAS_CROSS:                                   # §5 cross read over the group's pools, no trigger
        o = _pool_read(mem + ds + d4 + ds + 1, group_pool_ptr + b * K * ds, group_prio_ptr + b * K,
                       stride_pool_l, stride_prio_l, x_wk_ptr, x_wv_ptr, head, rows, mask_rows, K, ds, dh, scale,
                       GROUP, BLOCK_K, BLOCK_DS, BLOCK_DH)
        x_alpha = tl.load(x_alpha_ptr).to(tl.float32)
        ut = _round(ut + _round(x_alpha * _round(o, ut_ptr), ut_ptr), ut_ptr)
    tl.store(ut_ptr + b * d + rows, ut.to(ut_ptr.dtype.element_ty), mask=mask_rows)
    if pid == 0:                                    # §3: score, then priority replacement into the out buffer
        offs4 = tl.arange(0, BLOCK_D4)
        hidden = tl.load(mem + ds + offs4, mask=offs4 < d4, other=0.0).to(tl.float32)
        w_score = tl.load(w_score_ptr + offs4, mask=offs4 < d4, other=0.0).to(tl.float32)
        score = tl.sigmoid(_round(tl.sum(w_score * tl.maximum(hidden, 0.0), axis=0), ut_ptr))
        offs_k = tl.arange(0, BLOCK_K)
        offs_c = tl.arange(0, BLOCK_DS)
        mask_k = offs_k < K
        mask_kc = mask_k[:, None] & (offs_c < ds)[None, :]
        prio = tl.load(prio_ptr + b * K + offs_k, mask=mask_k, other=float("inf"))
        pmin, jmin = tl.min(prio, axis=0, return_indices=True, return_indices_tie_break_left=True)
        score_k = tl.zeros([BLOCK_K], dtype=tl.float32) + score      # as a block: Triton 3.6's interpreter
        hit = (offs_k == jmin) & (score_k > tau1) & (score_k > pmin)  # cannot `&` a broadcast scalar comparison
        tl.store(prio_out_ptr + b * K + offs_k, tl.where(hit, score_k, prio), mask=mask_k)
        summary = tl.load(mem + ds + d4 + offs_c, mask=offs_c < ds, other=0.0)
        pool = tl.load(pool_ptr + b * K * ds + offs_k[:, None] * ds + offs_c[None, :], mask=mask_kc, other=0.0)
        pool = tl.where(hit[:, None], summary[None, :].to(pool.dtype), pool)
        tl.store(pool_out_ptr + b * K * ds + offs_k[:, None] * ds + offs_c[None, :], pool, mask=mask_kc)


# ----------------------------------------------------------------------------------------------------------------
# C: in_proj + conv step + x_proj partials
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def decode_in_proj_conv_kernel(
    ut_ptr, w_in_ptr, conv_w_ptr, conv_b_ptr, win_in_ptr, win_out_ptr, w_xT_ptr, xc_ptr, z_ptr, xpart_ptr,
    d, Di, KW, X,
    BLOCK_C: tl.constexpr, BLOCK_KD: tl.constexpr, KD_ITERS: tl.constexpr, BLOCK_W: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    """grid (cdiv(Di, BLOCK_C), B). For channels c of the block: x_c, z_c = in_proj rows c and Di + c of ut
    (w_in [2Di, d]); conv over [window_in[b,c,:], x_c] with taps conv_w [Di, KW] + conv_b, SiLU -> xc [B,Di];
    window_out [B,Di,KW-1] = the window shifted by one with x_c last; z [B,Di];
    xpart[pid, b, :] = Σ_{c in block} w_xT[c, :] xc_c for w_xT [Di, X] (x_proj weight transposed), fp32.
    KD_ITERS = cdiv(d, BLOCK_KD): the GEMV over d is unrolled so all its loads are in flight at once."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    n_batch = tl.num_programs(1)
    ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < Di
    acc_x = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_C], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_KD)
    for i in tl.static_range(KD_ITERS):
        k0 = i * BLOCK_KD
        mk = (k0 + offs) < d
        uv = tl.load(ut_ptr + b * d + k0 + offs, mask=mk, other=0.0).to(tl.float32)
        m2 = mask_c[:, None] & mk[None, :]
        wx = tl.load(w_in_ptr + ch[:, None] * d + k0 + offs[None, :], mask=m2, other=0.0)
        wz = tl.load(w_in_ptr + (Di + ch[:, None]) * d + k0 + offs[None, :], mask=m2, other=0.0)
        acc_x += tl.sum(wx.to(tl.float32) * uv[None, :], axis=1)
        acc_z += tl.sum(wz.to(tl.float32) * uv[None, :], axis=1)
    x = _round(acc_x, xc_ptr)
    tl.store(z_ptr + b * Di + ch, acc_z.to(z_ptr.dtype.element_ty), mask=mask_c)
    # causal conv step, in the model dtype like causal_conv_step_ref: products, sum, + bias, SiLU
    tap = tl.arange(0, BLOCK_W)
    win_base = win_in_ptr + (b * Di + ch[:, None]) * (KW - 1)
    mask_w = mask_c[:, None] & (tap < KW - 1)[None, :]
    xt = tl.load(win_base + tap[None, :], mask=mask_w, other=0.0).to(tl.float32)
    xt = tl.where(tap[None, :] == KW - 1, x[:, None], xt)
    taps = tl.load(conv_w_ptr + ch[:, None] * KW + tap[None, :], mask=mask_c[:, None] & (tap < KW)[None, :],
                   other=0.0).to(tl.float32)
    s = _round(tl.sum(_round(xt * taps, xc_ptr), axis=1), xc_ptr)
    s = _round(s + tl.load(conv_b_ptr + ch, mask=mask_c, other=0.0).to(tl.float32), xc_ptr)
    xc = _round(s * tl.sigmoid(s), xc_ptr)
    tl.store(xc_ptr + b * Di + ch, xc.to(xc_ptr.dtype.element_ty), mask=mask_c)
    shifted = tl.load(win_base + tap[None, :] + 1, mask=mask_c[:, None] & (tap < KW - 2)[None, :], other=0.0)
    shifted = tl.where(tap[None, :] == KW - 2, x[:, None].to(shifted.dtype), shifted)
    tl.store(win_out_ptr + (b * Di + ch[:, None]) * (KW - 1) + tap[None, :], shifted, mask=mask_w)
    # this block's share of x_proj
    offs_x = tl.arange(0, BLOCK_X)
    w_x = tl.load(w_xT_ptr + ch[:, None] * X + offs_x[None, :], mask=mask_c[:, None] & (offs_x < X)[None, :],
                  other=0.0).to(tl.float32)
    tl.store(xpart_ptr + (pid * n_batch + b) * X + offs_x, tl.sum(w_x * xc[:, None], axis=0), mask=offs_x < X)


# ----------------------------------------------------------------------------------------------------------------
# D: dt_proj + state update + gate + out_proj partials
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def decode_ssm_out_kernel(
    xc_ptr, z_ptr, xpart_ptr, w_dt_ptr, dt_bias_ptr, A_ptr, D_ptr, h_in_ptr, h_out_ptr, w_outT_ptr, opart_ptr,
    d, Di, N, R, X, P,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    P_ITERS: tl.constexpr, BLOCK_O: tl.constexpr, O_ITERS: tl.constexpr,
):
    """grid (cdiv(Di, BLOCK_C), B). (dt_r, B, C) = round(Σ_p xpart[p,b,:]) split at R, R+N (xpart [P,B,X] fp32,
    X = R + 2N); dt = round(w_dt[c, :] · dt_r) (w_dt [Di,R]); δ = softplus(dt + dt_bias); h_out = exp(δA) h_in
    + δ x B (h [B,Di,N] fp32, A [Di,N] fp32); y = round((C·h + D x) SiLU(z)); opart[pid, b, :] = Σ_{c in block}
    w_outT[c, :] y_c for w_outT [Di, d] (out_proj weight transposed), fp32. P_ITERS = cdiv(P, BLOCK_P) and
    O_ITERS = cdiv(d, BLOCK_O): both loops unrolled."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    n_batch = tl.num_programs(1)
    ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = ch < Di
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    mask_r = offs_r < R
    mask_n = offs_n < N
    prow = tl.arange(0, BLOCK_P)
    dt_r = tl.zeros([BLOCK_R], dtype=tl.float32)
    Bv = tl.zeros([BLOCK_N], dtype=tl.float32)
    Cv = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in tl.static_range(P_ITERS):
        p0 = i * BLOCK_P
        base = xpart_ptr + ((p0 + prow[:, None]) * n_batch + b) * X
        mp = ((p0 + prow) < P)[:, None]
        dt_r += tl.sum(tl.load(base + offs_r[None, :], mask=mp & mask_r[None, :], other=0.0), axis=0)
        Bv += tl.sum(tl.load(base + R + offs_n[None, :], mask=mp & mask_n[None, :], other=0.0), axis=0)
        Cv += tl.sum(tl.load(base + R + N + offs_n[None, :], mask=mp & mask_n[None, :], other=0.0), axis=0)
    dt_r = _round(dt_r, xc_ptr)
    Bv = _round(Bv, xc_ptr)
    Cv = _round(Cv, xc_ptr)
    w_dt = tl.load(w_dt_ptr + ch[:, None] * R + offs_r[None, :], mask=mask_c[:, None] & mask_r[None, :],
                   other=0.0).to(tl.float32)
    dt = _round(tl.sum(w_dt * dt_r[None, :], axis=1), xc_ptr)
    delta = _softplus(dt + tl.load(dt_bias_ptr + ch, mask=mask_c, other=0.0).to(tl.float32))
    delta = tl.where(mask_c, delta, 0.0)
    mask_cn = mask_c[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_cn, other=0.0)
    h = tl.load(h_in_ptr + (b * Di + ch[:, None]) * N + offs_n[None, :], mask=mask_cn, other=0.0)
    x = tl.load(xc_ptr + b * Di + ch, mask=mask_c, other=0.0).to(tl.float32)
    h = tl.exp(delta[:, None] * A) * h + (delta * x)[:, None] * Bv[None, :]
    tl.store(h_out_ptr + (b * Di + ch[:, None]) * N + offs_n[None, :], h, mask=mask_cn)
    y = tl.sum(h * Cv[None, :], axis=1) + tl.load(D_ptr + ch, mask=mask_c, other=0.0).to(tl.float32) * x
    z = tl.load(z_ptr + b * Di + ch, mask=mask_c, other=0.0).to(tl.float32)
    y = _round(y * (z * tl.sigmoid(z)), xc_ptr)
    offs_o = tl.arange(0, BLOCK_O)
    for i in tl.static_range(O_ITERS):
        o0 = i * BLOCK_O
        mo = (o0 + offs_o) < d
        w_out = tl.load(w_outT_ptr + ch[:, None] * d + o0 + offs_o[None, :], mask=mask_c[:, None] & mo[None, :],
                        other=0.0).to(tl.float32)
        tl.store(opart_ptr + (pid * n_batch + b) * d + o0 + offs_o, tl.sum(w_out * y[:, None], axis=0), mask=mo)


# ----------------------------------------------------------------------------------------------------------------
# Block heuristics (plain Python, shared with the AOT table; see README.md)
# ----------------------------------------------------------------------------------------------------------------
def decode_blocks(d: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int, pool_size: int, summary_dim: int,
                  heads: int) -> dict:
    """Block sizes of the four kernels for one model shape: tiles of about 4-8K values per program."""
    p2 = triton.next_power_of_2
    cdiv = triton.cdiv
    x_width = dt_rank + 2 * d_state
    block_dm = p2(d)
    c_block = 32 if d_inner >= 1024 else 16
    d_block = 64 if d_inner >= 1024 else 16
    n_c = cdiv(d_inner, c_block)
    n_d = cdiv(d_inner, d_block)
    a_block_p = max(1, min(p2(n_d), 8192 // block_dm))
    d_block_p = max(1, min(p2(n_c), 8192 // p2(x_width)))
    kd, bo = min(128, block_dm), min(128, block_dm)
    return dict(
        # P_ITERS of kernel A is for the out_proj partials of kernel D (layer 0 reads none: P_ITERS 0 there)
        norm_proj=dict(BLOCK_DM=block_dm, BLOCK_R=max(1, min(16, 8192 // block_dm)), BLOCK_P=a_block_p,
                       P_ITERS=cdiv(n_d, a_block_p), num_warps=8),
        note_pool=dict(BLOCK_O=min(64, p2(max(1, d // heads))), BLOCK_K=p2(pool_size), BLOCK_DS=p2(summary_dim),
                       BLOCK_DH=p2(max(1, summary_dim // heads)), BLOCK_D4=p2(max(1, d // 4)),
                       num_warps=8 if p2(pool_size) * p2(summary_dim) >= 2048 else 4),
        in_proj_conv=dict(BLOCK_C=c_block, BLOCK_KD=kd, KD_ITERS=cdiv(d, kd), BLOCK_W=p2(d_conv),
                          BLOCK_X=p2(x_width), num_warps=8 if c_block >= 32 else 4),
        ssm_out=dict(BLOCK_C=d_block, BLOCK_N=p2(d_state), BLOCK_R=p2(dt_rank), BLOCK_P=d_block_p,
                     P_ITERS=cdiv(n_c, d_block_p), BLOCK_O=bo, O_ITERS=cdiv(d, bo),
                     num_warps=8 if d_block >= 64 else 4),
        programs=dict(in_proj_conv=n_c, ssm_out=n_d),
    )
