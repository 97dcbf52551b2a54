"""The whole decode step in one persistent kernel: every layer's phases, separated by grid-wide barriers.

Same math and rounding points as the four per-layer kernels of decode.py (whose helpers it calls), and the same
reference (MemMambaLM.step). The idea: a kernel boundary costs ~1.3 µs in a CUDA graph on an H100 and a grid
barrier of ~190 programs about the same (1.1 µs at 132), but a program can hold the next phase's weights in
registers *while* it waits at a barrier (PDL can overlap that only where the next kernel's programs find room on
the SMs). Measured (BENCHMARKS.md, 2026-11-25 evening) it ties the layered kernels without the memory path and
loses with it, so TritonBackend keeps the layered kernels as its default and this one as step_kernel="persistent".

A step is, per layer l (whichever program first needs h_l computes it from h_{l-1} and layer l-1's out_proj
sum, or the embedding; program 0 stores it):
  P1 memory     (memory on) one role per program. Programs 0..NT-1 (NT = H·N_OB): BLOCK_O output rows of one
                head's §4 token read over pool l: u = RMSNorm(h), the head's q = W_q u, the trigger, a softmax
                over the slots' keys and values (round(P W_kᵀ), round(P W_vᵀ): computed before the wait, with
                tl.dot) into reads[0]. Programs NT..2NT-1: the same for the §5 cross read over the group's pools
                (cross layers only) into reads[1]. Then rows of [score_in; summary] u into `note`.
  P2 in_proj    programs 0..n_cb-1: a block of channels as decode.py's kernel C, of ũ = round(round(u + r_tok)
                + r_cross) (of u when the memory is off); program n_cb: the §3 insert (score from `note`).
  P3 ssm        programs 0..n_cb-1: a block of channels as kernel D; the out_proj share goes into one of
                ACC_COPIES copies of the layer's sum (fewer atomics per cache line), summed by its readers.
then the final RMSNorm (program 0) into `uf`; the tied LM head is a cuBLAS matmul after the kernel.

Barriers. Every program takes part in every phase, idle or not: it arrives (an atomic add on a counter, release)
when its phase's writes are done, loads the next phase's weights and the state before the token (which no phase
of the step writes), then waits (acquire) until all G programs have arrived. The arrive comes before those loads
because a release waits for the program's earlier loads to finish. Data written in the step is read with
`.cg` (from L2). All G programs must be resident at once: the launch is cooperative
(`launch_cooperative_grid=True`), so a grid that does not fit fails to launch instead of hanging. The counter and
the sums ([L, ACC_COPIES, B, X + d] fp32) are one workspace, zeroed before every step. `reads_ptr` is
[2, B, d]: r_tok and r_cross, as the reference rounds them (keys and values rounded to the model dtype like the
reference's k_proj / v_proj of the bank; decode.py's kernel B never forms them, so fp16 results of the two paths
can differ in the last bit). The grid must fit on the GPU at once: TritonBackend checks it against the SMs.

GRID_SYNC=False runs phases s_lo..s_hi-1 of the sequence without barriers; the backend then launches one phase
per launch ("phased"). That is how Triton's interpreter runs it (its programs run one after another, so a
barrier would never open), and it is a correct, slower path on any GPU. PROFILE=True stamps each program's phases
with the SM clock into prof [G, 256, 6] (scripts/profile_decode.py --phases).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .decode import _acc_sum, _conv_finish, _conv_window, _pool_insert, _rmsnorm, _round, _ssm_step


@triton.jit
def _arrive(bar_ptr, GRID_SYNC: tl.constexpr):
    if GRID_SYNC:
        tl.debug_barrier()                       # every thread's writes of the phase come before the release
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _phase_done(bar_ptr, prof_ptr, pid, s, GRID_SYNC: tl.constexpr, PROFILE: tl.constexpr):
    _stamp(prof_ptr, pid, s, 2, PROFILE)
    _arrive(bar_ptr, GRID_SYNC)


@triton.jit
def _channel_block(pid, d, Di, is_ch, BLOCK_DM: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets over d and the program's block of channels (masked off for programs past the channel blocks)."""
    offs = tl.arange(0, BLOCK_DM)
    ch = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs, offs < d, ch, (ch < Di) & is_ch


@triton.jit
def _wait(bar_ptr, target, GRID_SYNC: tl.constexpr):
    if GRID_SYNC:
        c = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        while c < target:
            c = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def _stamp(prof_ptr, pid, s, k, PROFILE: tl.constexpr):
    """PROFILE: prof[pid, s, k] = this SM's clock (k 0: phase s begins, 1: its wait is over, 2: its work is done,
    3, 4, 5: marks inside the work)."""
    if PROFILE:
        t = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [pid], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(prof_ptr + (pid * 256 + s) * 6 + k, t)


@triton.jit
def _residual(l, b, B, tok_ptr, emb_ptr, stride_emb, h_ptr, acc_ptr, d, X, offs, mask, like_ptr,
              COPIES: tl.constexpr):
    """The residual stream entering layer l (fp32) at the offsets `offs`: the embedding of tok[b] for l == 0, else
    h of layer l-1 (h_ptr [2, B, d], layer l at slot l % 2) + its out_proj sum (acc [L, COPIES, B, X + d], summed
    over the copies) rounded to the model dtype, as the reference adds out_proj's output."""
    if l == 0:
        tok = tl.load(tok_ptr + b)
        h = tl.load(emb_ptr + tok * stride_emb + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.load(h_ptr + (((l - 1) % 2) * B + b) * d + offs, mask=mask, other=0.0, cache_modifier=".cg")
        o = _acc_sum(acc_ptr + ((l - 1) * COPIES * B + b) * (X + d) + X, B * (X + d), offs, mask, COPIES)
        h = h + _round(o, like_ptr)
    return h


@triton.jit
def _load_pool(pool_ptr, prio_ptr, layer, b, B, K, ds, slot, mask, offs_s, mask_s):
    """Rows slot[j] of batch row b's pools of layer[j] (a layer, or one per slot; state [L, B, K, ds] / [L, B, K])
    as a [len(slot), BLOCK_DS] tile and their priorities (-1 where masked: never valid)."""
    base = (layer * B + b) * K + slot
    P = tl.load(pool_ptr + base[:, None] * ds + offs_s[None, :], mask=mask[:, None] & mask_s[None, :], other=0.0)
    return P, tl.load(prio_ptr + base, mask=mask, other=-1.0)


@triton.jit
def _slot_kv(pool_ptr, prio_ptr, layer_j, b, B, K, ds, slot, mask_j, offs_s, mask_s, wk, wv, like_ptr):
    """Slots j of batch row b (row slot[j] of the pool of layer layer_j[j]; state [L, B, K, ds] / [L, B, K]):
    keys [BLOCK_GK, BLOCK_DH] = P W_kᵀ and values [BLOCK_GK, BLOCK_O] = P W_vᵀ for a head's rows
    wk [BLOCK_DH, BLOCK_DS] of W_k and the program's rows wv [BLOCK_O, BLOCK_DS] of W_v, fp32; priorities (-1 where
    masked: never valid). Keys and values in the model dtype, as the reference's projections of the bank."""
    P, prio = _load_pool(pool_ptr, prio_ptr, layer_j, b, B, K, ds, slot, mask_j, offs_s, mask_s)
    keys = tl.dot(P, tl.trans(wk), input_precision="ieee").to(like_ptr.dtype.element_ty)
    vals = tl.dot(P, tl.trans(wv), input_precision="ieee").to(like_ptr.dtype.element_ty)
    return keys, vals, prio


@triton.jit
def _head_read(item, l, ll, lw, B, IS_TOK: tl.constexpr, work, tok_ptr, emb_ptr, stride_emb, h_ptr, u_ptr, reads_ptr,
               acc_ptr, bar_ptr, prof_ptr, pool_in, prio_in, nw, w_q, wk_ptr, wv_ptr, alpha_ptr, w_trig, b_trig,
               d, X, K, ds, dh, dv, gn, eps, tau2, scale, s, G, GRID_SYNC: tl.constexpr, PROFILE: tl.constexpr,
               ACC_COPIES: tl.constexpr, N_OB: tl.constexpr, BLOCK_DM: tl.constexpr, BLOCK_DS: tl.constexpr,
               BLOCK_DH: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_S: tl.constexpr):
    """P1 for one head item (head item // N_OB, BLOCK_O rows of it): the §4 token read of pool l (IS_TOK; weights
    of layer lw = l) or the §5 cross read of the gn pools of layers l-gn+1..l (weights of cross layer lw), as
    r = round(alpha · round(o)) into reads[0 or 1] (reads_ptr [2, B, d]); `work` False: wait only. Everything the
    read needs from before the token (weights, the slots' keys and values) is computed before the wait."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_DM)
    mask_d = offs < d
    offs_s = tl.arange(0, BLOCK_DS)
    mask_s = offs_s < ds
    offs_h = tl.arange(0, BLOCK_DH)
    head = item // N_OB
    rows = head * dv + (item % N_OB) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_rows = rows < (head + 1) * dv
    cq = head * dh + offs_h
    mask_q = (offs_h < dh) & work
    wq = tl.load(w_q + lw * ds * d + cq[:, None] * d + offs[None, :], mask=mask_q[:, None] & mask_d[None, :],
                 other=0.0)
    wk = tl.load(wk_ptr + lw * ds * ds + cq[:, None] * ds + offs_s[None, :], mask=mask_q[:, None] & mask_s[None, :],
                 other=0.0)
    wv = tl.load(wv_ptr + lw * d * ds + rows[:, None] * ds + offs_s[None, :],
                 mask=(mask_rows & work)[:, None] & mask_s[None, :], other=0.0)
    alpha = tl.load(alpha_ptr + lw, mask=work, other=0.0).to(tl.float32)
    if IS_TOK:
        wt = tl.load(w_trig + ll * d + offs, mask=mask_d, other=0.0)
        btrig = tl.load(b_trig + l)
    j = tl.arange(0, BLOCK_S)
    g = j // K
    layer_j = ll - gn + 1 + g
    mask_j = (j < gn * K) & work
    keys, vals, prio = _slot_kv(pool_in, prio_in, layer_j, 0, B, K, ds, j - g * K, mask_j, offs_s, mask_s, wk, wv,
                                reads_ptr)
    _wait(bar_ptr, s * G, GRID_SYNC)
    _stamp(prof_ptr, pid, s, 1, PROFILE)
    if work:
        for b in range(B):
            if b > 0:
                keys, vals, prio = _slot_kv(pool_in, prio_in, layer_j, b, B, K, ds, j - g * K, mask_j, offs_s, mask_s,
                                            wk, wv, reads_ptr)
            h = _residual(l, b, B, tok_ptr, emb_ptr, stride_emb, h_ptr, acc_ptr, d, X, offs, mask_d, reads_ptr,
                          ACC_COPIES)
            u = _rmsnorm(h, nw, d, eps, reads_ptr)
            if IS_TOK:
                if pid == 0:
                    tl.store(h_ptr + ((l % 2) * B + b) * d + offs, h, mask=mask_d)
                    tl.store(u_ptr + b * d + offs, u.to(u_ptr.dtype.element_ty), mask=mask_d)
            q = _round(tl.sum(wq.to(tl.float32) * u[None, :], axis=1), reads_ptr)
            _stamp(prof_ptr, pid, s, 3, PROFILE)
            logit = tl.where(prio >= 0, tl.sum(keys.to(tl.float32) * q[None, :], axis=1) * scale, float("-inf"))
            mx = tl.max(logit, axis=0)
            e = tl.exp(logit - tl.where(mx == float("-inf"), 0.0, mx))     # no valid slot: every weight 0
            den = tl.sum(e, axis=0)
            o = tl.sum(e[:, None] * vals.to(tl.float32), axis=0) / tl.where(den > 0, den, 1.0)
            r = _round(alpha * _round(o, reads_ptr), reads_ptr)
            if IS_TOK:                  # §4's gate: the trigger sigmoid(w_bᵀu + β) > tau2
                trigger = _round(tl.sum(wt.to(tl.float32) * u, axis=0) + btrig, reads_ptr)
                r = tl.where(tl.sigmoid(trigger) > tau2, r, 0.0)
            tl.store(reads_ptr + ((0 if IS_TOK else 1) * B + b) * d + rows, r.to(reads_ptr.dtype.element_ty),
                     mask=mask_rows)


@triton.jit
def _gemv_rows(w, u, like_ptr):
    """round(w [rows, BLOCK_DM] · u [BLOCK_DM]) in fp32 (a Linear without bias: model-dtype output)."""
    return _round(tl.sum(w.to(tl.float32) * u[None, :], axis=1), like_ptr)


@triton.jit
def decode_step_kernel(
    # step buffers
    tok_ptr, emb_ptr, h_ptr, u_ptr, reads_ptr, note_ptr, xc_ptr, z_ptr, acc_ptr, bar_ptr, uf_ptr, prof_ptr,
    # state before the token (read) and after it (written); layer-major [L, B, ...]
    conv_in, ssm_in, pool_in, prio_in, conv_out, ssm_out, pool_out, prio_out,
    # mixer weights, stacked over layers
    norm_w, norm_f, w_in, conv_w, conv_b, w_xT, w_dt, dt_bias, A_ptr, D_ptr, w_outT,
    # memory weights, stacked over layers (cross-layer ones over the cross layers)
    w_q, w_trig, b_trig, w_note, wk_ptr, wv_ptr, alpha_ptr, w_score, w_xq, x_wk, x_wv, x_alpha,
    B, L, d, Di, N, R, KW, K, ds, dh, dv, d4, p, stride_emb, eps, tau1, tau2, scale, G, s_lo, s_hi,
    HAS_MEMORY: tl.constexpr, GRID_SYNC: tl.constexpr, N_OB: tl.constexpr, PROFILE: tl.constexpr,
    ACC_COPIES: tl.constexpr,
    BLOCK_DM: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_X: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_DS: tl.constexpr,
    BLOCK_DH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_GK: tl.constexpr, BLOCK_D4: tl.constexpr,
    BLOCK_NR: tl.constexpr,
):
    """grid (G,), G >= max(n_cb + 1, 2·H·N_OB + cdiv(d4 + ds, BLOCK_NR)), n_cb = cdiv(Di, BLOCK_C). Shapes as the
    module docstring and TritonBackend's buffers; X = R + 2N; `note` [B, d4 + ds]; `uf` [B, d]."""
    pid = tl.program_id(0)
    X = R + 2 * N
    n_cb = tl.cdiv(Di, BLOCK_C)
    n_head_items = (d // dv) * N_OB
    is_ch = pid < n_cb
    is_insert = pid == n_cb
    # tiles' offsets and masks are recomputed inside each phase: hoisted, they would live across the whole loop
    PPL: tl.constexpr = 3 if HAS_MEMORY else 2          # phases per layer
    for l in range(L):
        ll = tl.cast(l, tl.int64)
        if HAS_MEMORY:
            s = l * PPL
            if (s >= s_lo) & (s < s_hi):
                _stamp(prof_ptr, pid, s, 0, PROFILE)
                # ---- P1: the memory reads and the Note Block's projections of u, by program role ----
                cross = (l + 1) % p == 0
                lc = ll // p
                offs = tl.arange(0, BLOCK_DM)
                mask_d = offs < d
                nw = tl.load(norm_w + ll * d + offs, mask=mask_d, other=0.0)
                if pid < n_head_items:         # a head's BLOCK_O output rows of r_tok
                    _head_read(pid, l, ll, ll, B, True, True, tok_ptr, emb_ptr, stride_emb, h_ptr, u_ptr, reads_ptr,
                               acc_ptr, bar_ptr, prof_ptr, pool_in, prio_in, nw, w_q, wk_ptr, wv_ptr, alpha_ptr,
                               w_trig, b_trig, d, X, K, ds, dh, dv, 1, eps, tau2, scale, s, G, GRID_SYNC, PROFILE,
                               ACC_COPIES, N_OB, BLOCK_DM, BLOCK_DS, BLOCK_DH, BLOCK_O, BLOCK_K)
                elif pid < 2 * n_head_items:   # the same for r_cross, over the §5 group's pools (cross layers)
                    _head_read(pid - n_head_items, l, ll, lc, B, False, cross, tok_ptr, emb_ptr, stride_emb, h_ptr,
                               u_ptr, reads_ptr, acc_ptr, bar_ptr, prof_ptr, pool_in, prio_in, nw, w_xq, x_wk, x_wv,
                               x_alpha, w_trig, b_trig, d, X, K, ds, dh, dv, p, eps, tau2, scale, s, G, GRID_SYNC,
                               PROFILE, ACC_COPIES, N_OB, BLOCK_DM, BLOCK_DS, BLOCK_DH, BLOCK_O, BLOCK_GK)
                elif pid < 2 * n_head_items + tl.cdiv(d4 + ds, BLOCK_NR):
                    # rows of [score_in; summary] u, for P2's insert
                    nr = (pid - 2 * n_head_items) * BLOCK_NR + tl.arange(0, BLOCK_NR)
                    mask_nr = nr < d4 + ds
                    wn = tl.load(w_note + ll * (d4 + ds) * d + nr[:, None] * d + offs[None, :],
                                 mask=mask_nr[:, None] & mask_d[None, :], other=0.0)
                    _wait(bar_ptr, s * G, GRID_SYNC)
                    _stamp(prof_ptr, pid, s, 1, PROFILE)
                    for b in range(B):
                        h = _residual(l, b, B, tok_ptr, emb_ptr, stride_emb, h_ptr, acc_ptr, d, X, offs, mask_d,
                                      reads_ptr, ACC_COPIES)
                        u = _rmsnorm(h, nw, d, eps, reads_ptr)
                        yn = tl.sum(wn.to(tl.float32) * u[None, :], axis=1)
                        tl.store(note_ptr + b * (d4 + ds) + nr, yn.to(note_ptr.dtype.element_ty), mask=mask_nr)
                else:
                    _wait(bar_ptr, s * G, GRID_SYNC)
                    _stamp(prof_ptr, pid, s, 1, PROFILE)
                _phase_done(bar_ptr, prof_ptr, pid, s, GRID_SYNC, PROFILE)

        # ---- P2: in_proj rows of a channel block, conv step, x_proj share; one program: the §3 insert ----
        s = l * PPL + PPL - 2
        if (s >= s_lo) & (s < s_hi):
            _stamp(prof_ptr, pid, s, 0, PROFILE)
            offs, mask_d, ch, mask_c = _channel_block(pid, d, Di, is_ch, BLOCK_DM, BLOCK_C)
            mask_cd = mask_c[:, None] & mask_d[None, :]
            offs_x = tl.arange(0, BLOCK_X)
            wx = tl.load(w_in + ll * 2 * Di * d + ch[:, None] * d + offs[None, :], mask=mask_cd, other=0.0)
            wz = tl.load(w_in + ll * 2 * Di * d + (Di + ch[:, None]) * d + offs[None, :], mask=mask_cd, other=0.0)
            cb = tl.load(conv_b + ll * Di + ch, mask=mask_c, other=0.0).to(tl.float32)
            partial, last, shifted = _conv_window(conv_w + ll * Di * KW, conv_in + ll * B * Di * (KW - 1), ch, mask_c,
                                                  KW, xc_ptr, BLOCK_W)
            w_x = tl.load(w_xT + (ll * Di + ch[:, None]) * X + offs_x[None, :],
                          mask=mask_c[:, None] & (offs_x < X)[None, :], other=0.0)
            if HAS_MEMORY:
                offs4 = tl.arange(0, BLOCK_D4)
                wsc = tl.load(w_score + ll * d4 + offs4, mask=(offs4 < d4) & is_insert, other=0.0).to(tl.float32)
            else:
                nw = tl.load(norm_w + ll * d + offs, mask=mask_d, other=0.0).to(tl.float32)
            _wait(bar_ptr, s * G, GRID_SYNC)
            _stamp(prof_ptr, pid, s, 1, PROFILE)
            for b in range(B):
                if HAS_MEMORY:                 # ũ = u + r_tok + r_cross, rounded after each add as the reference
                    uv = tl.load(u_ptr + b * d + offs, mask=mask_d, other=0.0, cache_modifier=".cg").to(tl.float32)
                    rt = tl.load(reads_ptr + b * d + offs, mask=mask_d, other=0.0, cache_modifier=".cg").to(tl.float32)
                    rx = tl.load(reads_ptr + (B + b) * d + offs, mask=mask_d & ((l + 1) % p == 0), other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
                    uv = _round(uv + rt, xc_ptr)
                    if (l + 1) % p == 0:
                        uv = _round(uv + rx, xc_ptr)
                else:
                    h = _residual(l, b, B, tok_ptr, emb_ptr, stride_emb, h_ptr, acc_ptr, d, X, offs, mask_d, xc_ptr,
                                  ACC_COPIES)
                    uv = _rmsnorm(h, nw, d, eps, xc_ptr)
                    if pid == 0:
                        tl.store(h_ptr + ((l % 2) * B + b) * d + offs, h, mask=mask_d)
                if is_ch:
                    if b > 0:
                        partial, last, shifted = _conv_window(conv_w + ll * Di * KW,
                                                              conv_in + (ll * B + b) * Di * (KW - 1), ch, mask_c, KW,
                                                              xc_ptr, BLOCK_W)
                    x = _gemv_rows(wx, uv, xc_ptr)
                    tl.store(z_ptr + b * Di + ch, tl.sum(wz.to(tl.float32) * uv[None, :], axis=1)
                             .to(z_ptr.dtype.element_ty), mask=mask_c)
                    xc = _conv_finish(x, partial, last, cb, shifted, conv_out + (ll * B + b) * Di * (KW - 1), ch,
                                      mask_c, KW, xc_ptr, BLOCK_W)
                    tl.store(xc_ptr + b * Di + ch, xc.to(xc_ptr.dtype.element_ty), mask=mask_c)
                    _stamp(prof_ptr, pid, s, 3, PROFILE)
                    tl.atomic_add(acc_ptr + ((ll * ACC_COPIES + pid % ACC_COPIES) * B + b) * (X + d) + offs_x,
                                  tl.sum(w_x.to(tl.float32) * xc[:, None], axis=0), mask=offs_x < X, sem="relaxed")
                if HAS_MEMORY:
                    if is_insert:
                        offs_k = tl.arange(0, BLOCK_K)
                        offs_s = tl.arange(0, BLOCK_DS)
                        P, prio = _load_pool(pool_in, prio_in, ll, b, B, K, ds, offs_k, offs_k < K, offs_s,
                                             offs_s < ds)
                        pbase = (ll * B + b) * K
                        nb = note_ptr + b * (d4 + ds)
                        _pool_insert(nb, nb + d4, wsc, P, prio, pool_out + pbase * ds, prio_out + pbase, K, ds, d4,
                                     tau1, xc_ptr, BLOCK_K, BLOCK_DS, BLOCK_D4)
            _phase_done(bar_ptr, prof_ptr, pid, s, GRID_SYNC, PROFILE)

        # ---- P3: dt_proj, state update, gate, out_proj share of a channel block ----
        s = l * PPL + PPL - 1
        if (s >= s_lo) & (s < s_hi):
            _stamp(prof_ptr, pid, s, 0, PROFILE)
            offs, mask_d, ch, mask_c = _channel_block(pid, d, Di, is_ch, BLOCK_DM, BLOCK_C)
            offs_r = tl.arange(0, BLOCK_R)
            offs_n = tl.arange(0, BLOCK_N)
            mask_cn = mask_c[:, None] & (offs_n < N)[None, :]
            w_out = tl.load(w_outT + (ll * Di + ch[:, None]) * d + offs[None, :],
                            mask=mask_c[:, None] & mask_d[None, :], other=0.0)
            wdt = tl.load(w_dt + (ll * Di + ch[:, None]) * R + offs_r[None, :],
                          mask=mask_c[:, None] & (offs_r < R)[None, :], other=0.0).to(tl.float32)
            dtb = tl.load(dt_bias + ll * Di + ch, mask=mask_c, other=0.0).to(tl.float32)
            Am = tl.load(A_ptr + (ll * Di + ch[:, None]) * N + offs_n[None, :], mask=mask_cn, other=0.0)
            Dv = tl.load(D_ptr + ll * Di + ch, mask=mask_c, other=0.0).to(tl.float32)
            hs = tl.load(ssm_in + ((ll * B) * Di + ch[:, None]) * N + offs_n[None, :], mask=mask_cn, other=0.0)
            _wait(bar_ptr, s * G, GRID_SYNC)
            _stamp(prof_ptr, pid, s, 1, PROFILE)
            if is_ch:
                for b in range(B):
                    if b > 0:
                        hs = tl.load(ssm_in + ((ll * B + b) * Di + ch[:, None]) * N + offs_n[None, :], mask=mask_cn,
                                     other=0.0)
                    x = tl.load(xc_ptr + b * Di + ch, mask=mask_c, other=0.0, cache_modifier=".cg").to(tl.float32)
                    z = tl.load(z_ptr + b * Di + ch, mask=mask_c, other=0.0, cache_modifier=".cg").to(tl.float32)
                    hn, y = _ssm_step(acc_ptr + (ll * ACC_COPIES * B + b) * (X + d), B * (X + d), x, z, wdt, dtb, Am,
                                      Dv, hs, mask_c, R, N, offs_r, offs_n, xc_ptr, ACC_COPIES)
                    tl.store(ssm_out + ((ll * B + b) * Di + ch[:, None]) * N + offs_n[None, :], hn, mask=mask_cn)
                    _stamp(prof_ptr, pid, s, 3, PROFILE)
                    # w_out · y through two transposes: written as w_out * y[:, None], Triton converts the whole
                    # [BLOCK_C, BLOCK_DM] tile to y's layout (through shared memory) instead of y to the tile's
                    contrib = tl.sum(tl.trans(tl.trans(w_out).to(tl.float32) * y[None, :]), axis=0)
                    _stamp(prof_ptr, pid, s, 4, PROFILE)
                    tl.atomic_add(acc_ptr + ((ll * ACC_COPIES + pid % ACC_COPIES) * B + b) * (X + d) + X + offs,
                                  contrib, mask=mask_d, sem="relaxed")
                    _stamp(prof_ptr, pid, s, 5, PROFILE)
            _phase_done(bar_ptr, prof_ptr, pid, s, GRID_SYNC, PROFILE)

    # ---- final RMSNorm of the last layer's output (the LM head follows as a cuBLAS matmul) ----
    s = L * PPL
    if (s >= s_lo) & (s < s_hi):
        _stamp(prof_ptr, pid, s, 0, PROFILE)
        offs = tl.arange(0, BLOCK_DM)
        mask_d = offs < d
        nf = tl.load(norm_f + offs, mask=mask_d, other=0.0).to(tl.float32)
        _wait(bar_ptr, s * G, GRID_SYNC)
        _stamp(prof_ptr, pid, s, 1, PROFILE)
        if pid == 0:
            for b in range(B):
                h = _residual(L, b, B, tok_ptr, emb_ptr, stride_emb, h_ptr, acc_ptr, d, X, offs, mask_d, uf_ptr,
                              ACC_COPIES)
                uf = _rmsnorm(h, nf, d, eps, uf_ptr)
                tl.store(uf_ptr + b * d + offs, uf.to(uf_ptr.dtype.element_ty), mask=mask_d)


def step_blocks(d: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int, pool_size: int, summary_dim: int,
                heads: int, cross_layer_every: int = 1, memory: bool = True) -> dict:
    """Block sizes and the grid of decode_step_kernel for one model shape (130m: 8-channel blocks, 193
    programs of 4 warps, two per SM on some SMs)."""
    p2 = triton.next_power_of_2
    dv = max(1, d // heads)
    dot = lambda n: max(16, p2(n))                     # noqa: E731  (tl.dot's N and K must be >= 16)
    blocks = dict(BLOCK_DM=p2(d), BLOCK_C=max(1, min(8, 8192 // p2(d))), BLOCK_W=p2(d_conv),
                  BLOCK_X=p2(dt_rank + 2 * d_state), BLOCK_N=p2(d_state), BLOCK_R=p2(dt_rank),
                  BLOCK_O=dot(min(32, dv)), BLOCK_DS=dot(summary_dim), BLOCK_DH=dot(max(1, summary_dim // heads)),
                  BLOCK_K=p2(pool_size), BLOCK_GK=dot(pool_size * cross_layer_every), BLOCK_D4=p2(max(1, d // 4)),
                  BLOCK_NR=16, ACC_COPIES=2, num_warps=4)
    blocks["N_OB"] = -(-dv // blocks["BLOCK_O"])
    n_cb = -(-d_inner // blocks["BLOCK_C"])
    p1 = 2 * heads * blocks["N_OB"] + -(-(d // 4 + summary_dim) // blocks["BLOCK_NR"]) if memory else 0
    blocks["grid"] = max(n_cb + (1 if memory else 0), p1)
    return blocks
