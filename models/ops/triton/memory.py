"""A layer's memory path in half-precision prefill, fused: Layer.memory_read (models/memmamba.py) is the
reference composition it equals (spec §3–§5 in parallel form).

What the fusion changes, and why:
  one GEMM      every projection of u on the memory path (score_in, summary, trigger, each read's query through
                W_kᵀ) is one [B·T, d] x [d, width] GEMM on a stacked weight: at 16k tokens one 576-wide GEMM costs
                about half of the five narrow ones (BENCHMARKS.md). It writes into K + T rows a batch row, whose
                summary columns are then the layer's bank (K pool rows, then the tokens'): no cat;
  note_scores   score_out, both sigmoids, the trigger's bias and threshold are one small kernel over its rows,
                which also writes the pool's summaries into the bank's first K rows;
  reads         pool_mix on the summaries, with the sweep's entry ends; the cross-layer read takes its group's
                pools where they lie (no joined bank or index);
  one output    the reads' mixtures land side by side in m, and ũ = u + m W_outᵀ is one GEMM (with the residual)
                for the token read and the cross-layer read together.
Rounding differs from the composition only in the order of GEMM sums and in the trigger's output (rounded to half
before its bias is added, then again); the scores' rounding is the reference's (score_out's output is rounded to
half, as its Linear layer returns it). Weights are stacked on every call, in one launch (no cache; see
stack_weights), unless the caller passes them derived once (TritonBackend: `derived`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memmamba_deploy.models.ops import needs_grad
from memmamba_deploy.models.ops.pool import fp32

from .launch import _after_predecessor, pdl_meta
from .pool import pool_after, pool_mix, pool_sweep_ends
from .scan import _check_lengths

SCORE_ROWS = 64          # note_scores_kernel: rows per program


class SweepEntries(tuple):
    """A layer's §5 entries (bank, index rows), the pair Layer.memory_read returns, carrying its sweep's
    entry ends [B, K+T] (pool_sweep_ends) for its group's cross-layer read: still a pair to whoever unpacks it."""

    def __new__(cls, bank, index, ends):
        entries = super().__new__(cls, (bank, index))
        entries.ends = ends
        return entries

    def __getnewargs__(self):            # copy and pickle rebuild it from these, not from the pair
        return (*self, self.ends)


@triton.jit
def note_scores_kernel(g_ptr, w2_ptr, trig_bias_ptr, alpha_ptr, a_ptr, gain_ptr, pool0_ptr, lengths_ptr, M, T, K, hd,
                       ds, col_trig, stride_g, stride_pool_b, stride_pool_k, stride_pool_s, tau2, BLOCK_M: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                       USE_PDL: tl.constexpr):
    """grid (cdiv(M, BLOCK_M),) over the M = B·T token rows of the stacked GEMM's output g (half), which has
    K + T rows a batch row (the bank's layout: K pool rows, then the tokens'; row stride stride_g):
    a = sigmoid(w2ᵀ ReLU(g[:, :hd])) (§3) and gain = α·[sigmoid(g[:, col_trig] + β) > τ2] (§4), both fp32.
    score_out's and the trigger's outputs are rounded to g's dtype first, as their half-precision Linear layers
    return them. Program 0 also writes pool0 [B, K, ds] (any strides) into the first K rows' summary columns
    [hd, hd + ds), which makes those columns the layer's bank. HAS_LENGTHS: lengths [B] (int64), a = 0 at the
    tokens past each batch row's length (padding: 0 is never above τ1, so it enters no pool)."""
    _after_predecessor(USE_PDL)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_r = m < M
    rows = ((m // T) * (K + T) + K + m % T).to(tl.int64)          # token m's row of g
    cols = tl.arange(0, BLOCK_H)
    mask_c = cols < hd
    hid = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    w2 = tl.load(w2_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    score = tl.sum(tl.maximum(hid.to(tl.float32), 0.0) * w2[None, :], axis=1)
    score = score.to(g_ptr.dtype.element_ty).to(tl.float32)
    a = tl.sigmoid(score)
    trig = tl.load(g_ptr + rows * stride_g + col_trig, mask=mask_r, other=0.0).to(tl.float32)
    trig = (trig + tl.load(trig_bias_ptr).to(tl.float32)).to(g_ptr.dtype.element_ty).to(tl.float32)
    gain = tl.where(tl.sigmoid(trig) > tau2, tl.load(alpha_ptr).to(tl.float32), 0.0)
    if HAS_LENGTHS:
        a = tl.where(m % T < tl.load(lengths_ptr + m // T, mask=mask_r, other=0), a, 0.0)
    tl.store(a_ptr + m, a, mask=mask_r)
    tl.store(gain_ptr + m, gain, mask=mask_r)
    if tl.program_id(0) == 0:
        slots = tl.arange(0, BLOCK_K)
        offs_s = tl.arange(0, BLOCK_S)
        mask_p = (slots < K)[:, None] & (offs_s < ds)[None, :]
        for b in range(0, M // T):
            p = tl.load(pool0_ptr + b * stride_pool_b + slots[:, None] * stride_pool_k + offs_s[None, :] * stride_pool_s,
                        mask=mask_p)
            tl.store(g_ptr + (b * (K + T) + slots.to(tl.int64))[:, None] * stride_g + hd + offs_s[None, :],
                     p.to(g_ptr.dtype.element_ty), mask=mask_p)


STACK_D = 64             # stack_weights_kernel: columns of d per program
STACK_ROWS = 32          # ... rows copied or zeroed per program


@triton.jit
def stack_weights_kernel(plain, plain_rows, wqs, wks, wvs, w_stack_ptr, w_out_ptr, d, ds, dh, dv, col_qk, qk_w,
                         width, stride_wout, READS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (cdiv(d, BLOCK_D), H + cdiv(width - READS·qk_w, BLOCK_R)), tail = col_qk + READS·qk_w; columns
    [i0, i0 + BLOCK_D) of the stacked weight w_stack [width, d] and the matching rows of w_out [d, READS·H·ds].
    Programs h < H write head h's share of each read r's derived weights: W_qk rows col_qk + r·qk_w + h·ds + s,
    Σ_c w_k[h·dh + c, s] w_q[h·dh + c, i] (an fp32 dot), and w_out[i, r·qk_w + h·ds + s] = w_v[i, s] where row i
    is head h's (i // dv == h), else 0 (the block-diagonal W_v). Programs h >= H write BLOCK_R of the other rows
    each (rows 0..col_qk, then tail..width): the plain weights (a tuple: score_in, summary, trigger, plain_rows rows
    each) stacked from row 0, zeros elsewhere (one block a program: a loop over them was the launch's long pole)."""
    _after_predecessor(USE_PDL)
    offs_i = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    h = tl.program_id(1)
    mask_i = offs_i < d
    H = ds // dh
    if h >= H:
        nth = (h - H) * BLOCK_R + tl.arange(0, BLOCK_R)        # the rows outside the reads' blocks, in order
        tail = col_qk + READS * qk_w
        rows = tl.where(nth < col_qk, nth, nth - col_qk + tail)
        w = tl.zeros([BLOCK_R, BLOCK_D], w_stack_ptr.dtype.element_ty)
        row0 = 0
        for j in tl.static_range(len(plain)):
            mine = (rows >= row0) & (rows < row0 + plain_rows[j])
            w = tl.where(mine[:, None], tl.load(plain[j] + (rows - row0)[:, None] * d + offs_i[None, :],
                                                mask=mine[:, None] & mask_i[None, :], other=0.0), w)
            row0 += plain_rows[j]
        tl.store(w_stack_ptr + rows[:, None] * d + offs_i[None, :], w, mask=(rows < width)[:, None] & mask_i[None, :])
    else:
        offs_s = tl.arange(0, BLOCK_S)
        offs_c = tl.arange(0, BLOCK_H)
        mask_s = offs_s < ds
        mask_c = offs_c < dh
        for r in tl.static_range(READS):
            k = tl.load(wks[r] + (h * dh + offs_c)[None, :] * ds + offs_s[:, None],
                        mask=mask_s[:, None] & mask_c[None, :], other=0.0).to(tl.float32)  # W_k,hᵀ [S, H]
            q = tl.load(wqs[r] + (h * dh + offs_c)[:, None] * d + offs_i[None, :],
                        mask=mask_c[:, None] & mask_i[None, :], other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_D]
            wqk = tl.dot(k, q, input_precision="ieee")
            tl.store(w_stack_ptr + (col_qk + r * qk_w + h * ds + offs_s)[:, None] * d + offs_i[None, :],
                     wqk.to(w_stack_ptr.dtype.element_ty), mask=mask_s[:, None] & mask_i[None, :])
            v = tl.load(wvs[r] + offs_i[:, None] * ds + offs_s[None, :], mask=mask_i[:, None] & mask_s[None, :],
                        other=0.0)
            v = tl.where((offs_i // dv == h)[:, None], v, 0.0)
            tl.store(w_out_ptr + offs_i[:, None] * stride_wout + (r * qk_w + h * ds + offs_s)[None, :],
                     v.to(w_out_ptr.dtype.element_ty), mask=mask_i[:, None] & mask_s[None, :])


def stack_weights(plain, reads, heads: int, col_qk: int, width: int, dtype):
    """The fused path's derived weights in one launch (stack_weights_kernel): w_stack [width, d] = [plain weights
    (rows stacked); 0; each read's W_qk = W_k,hᵀ W_q,h per head; 0] and w_out [d, len(reads)·H·ds] = each read's
    block-diagonal W_v, for q'_h = W_qk u and o = W_v m in one GEMM each. Derived on every call: a cache would have
    to know every way weights change (.data edits and fused optimizers keep the version counter; a CUDA graph
    would keep reading what the cache replaced)."""
    plain = tuple(w.detach().contiguous() for w in plain)
    wqs, wks, wvs = (tuple(getattr(r, name).weight.detach().contiguous() for r in reads)
                     for name in ("q_proj", "k_proj", "v_proj"))
    H, ds, d = heads, wks[0].shape[0], wqs[0].shape[1]
    if H < 1 or ds % H or d % H:                 # the kernel finds H as ds // (ds // H), each head's rows as d // H
        raise ValueError(f"stack_weights: {heads} heads must divide summary_dim {ds} and d_model {d}")
    qk_w = H * ds
    if any(w.dtype != dtype for w in (*plain, *wqs, *wks, *wvs)):
        raise ValueError(f"stack_weights: the weights must all be {dtype}, got "
                         f"{sorted({str(w.dtype) for w in (*plain, *wqs, *wks, *wvs)})}")
    if sum(w.shape[0] for w in plain) > col_qk or col_qk + len(reads) * qk_w > width or \
            any(w.shape[1] != d for w in plain):
        raise ValueError(f"stack_weights: plain weights {[list(w.shape) for w in plain]} do not fit {col_qk} rows "
                         f"of width {d} before {len(reads)} reads' {qk_w} rows in {width}")
    w_stack = torch.empty(width, d, device=wqs[0].device, dtype=dtype)
    w_out = torch.empty(d, len(reads) * qk_w, device=wqs[0].device, dtype=dtype)
    copy_rows = width - len(reads) * qk_w                        # rows that are not the reads' derived ones
    stack_weights_kernel[(triton.cdiv(d, STACK_D), H + triton.cdiv(copy_rows, STACK_ROWS))](
        plain, tuple(w.shape[0] for w in plain), wqs, wks, wvs, w_stack, w_out, d, ds, ds // H, d // H, col_qk, qk_w,
        width, w_out.stride(0), READS=len(reads), BLOCK_D=STACK_D, BLOCK_S=max(16, triton.next_power_of_2(ds)),
        BLOCK_H=max(16, triton.next_power_of_2(ds // H)), BLOCK_R=STACK_ROWS, num_warps=4,
        **pdl_meta(w_stack.device))
    return w_stack, w_out


def _layout(layer):
    """(reads, H, ds, hd, col_trig, col_qk, qk_w, width) of a layer's fused path: the columns of its stacked GEMM."""
    tok, cross = layer.token_attn, layer.cross_attn
    reads = [tok] if cross is None else [tok, cross]
    H, ds = tok.heads, tok.k_proj.weight.shape[0]
    hd = layer.note.score_in.weight.shape[0]
    col_trig = hd + ds
    col_qk = triton.cdiv(col_trig + 1, 64) * 64  # 16-byte aligned query blocks (pool_mix loads them as vectors)
    qk_w = H * ds
    width = triton.cdiv(col_qk + len(reads) * qk_w, 64) * 64   # a multiple of 64: cuBLAS is 5x slower at 513 than 576
    return reads, H, ds, hd, col_trig, col_qk, qk_w, width


def layer_weights(layer, dtype):
    """A layer's derived weights for fused_memory_read, (w_stack, w_out): the stacked weights [score_in;
    summary; trigger; 0; each read's W_qk; 0] and the reads' output weights (stack_weights)."""
    note, tok = layer.note, layer.token_attn
    reads, H, _, _, _, col_qk, _, width = _layout(layer)
    return stack_weights((note.score_in.weight, note.summary.weight, tok.trigger.weight), reads, H, col_qk, width,
                         dtype)


def fused_memory_read(layer, u, pool0, prio0, group, u_is_scratch=False, lengths=None, derived=None):
    """Layer.memory_read for fp16/bf16 inference: (ũ, pool, prio, (bank, index rows)). None for fp32 (an
    fp32 dot has no exact tensor-core form, pool_read's reasoning) and under autograd (the reference has the
    gradients, including the straight-through factors). u_is_scratch: u may be overwritten (with ũ). lengths
    [B] (int64, on u's device): the tokens past each row's length score 0, so that they enter no pool
    (Layer.memory_read's).
    derived: {layer: layer_weights(layer, dtype)} taken once by an owner that snapshots the weights
    (TritonBackend, whose decode kernels pack theirs too); without it they are derived on every call."""
    note, tok, cross = layer.note, layer.token_attn, layer.cross_attn
    if u.dtype not in (torch.float16, torch.bfloat16) or \
            needs_grad(u, pool0, *(p for p in layer.parameters())):
        return None
    Bsz, T, d = u.shape
    dev, dtype = u.device, u.dtype
    reads, H, ds, hd, col_trig, col_qk, qk_w, width = _layout(layer)
    w_stack, w_out = (derived or {}).get(layer) or layer_weights(layer, dtype)
    if w_stack.dtype != dtype:
        raise ValueError(f"fused_memory_read: derived weights are {w_stack.dtype}, u is {dtype}")

    K = layer.pool_size
    if lengths is not None:
        lengths = _check_lengths(lengths, Bsz, dev)
    if pool0.shape != (Bsz, K, ds) or prio0.shape != (Bsz, K):
        raise ValueError(f"fused_memory_read wants pool0 [B, K, ds] = {[Bsz, K, ds]} and prio0 [B, K]; got "
                         f"{list(pool0.shape)} and {list(prio0.shape)}")
    u2 = u.reshape(Bsz * T, d)
    g_rows = torch.empty(Bsz, K + T, width, device=dev, dtype=dtype)   # K pool rows, then the tokens': the layout
    g = g_rows[:, K:]                                                   # of the bank, so no copy of the summaries
    if Bsz == 1:                                                        # a prompt: one plain GEMM into [T, width]
        torch.mm(u2, w_stack.t(), out=g[0])
    else:                                                               # batch rows K + T rows apart
        torch.bmm(u, w_stack.t().expand(Bsz, d, width), out=g)
    bank = g_rows[:, :, hd:col_trig]                                    # [B, K+T, ds]; rows < K: pool0, below
    a = torch.empty(Bsz, T, device=dev, dtype=torch.float32)
    gain = torch.empty(Bsz, T, device=dev, dtype=torch.float32)
    if T:
        note_scores_kernel[(triton.cdiv(Bsz * T, SCORE_ROWS),)](
            g_rows, note.score_out.weight.detach(), tok.trigger.bias.detach(), tok.alpha.detach(), a, gain, pool0,
            a if lengths is None else lengths, Bsz * T, T, K, hd, ds, col_trig, g_rows.stride(1), pool0.stride(0),
            pool0.stride(1), pool0.stride(2), fp32(tok.read_threshold), BLOCK_M=SCORE_ROWS,
            BLOCK_H=max(16, triton.next_power_of_2(hd)), BLOCK_K=triton.next_power_of_2(K),
            BLOCK_S=triton.next_power_of_2(ds), HAS_LENGTHS=lengths is not None, num_warps=4, **pdl_meta(dev))
    else:
        bank.copy_(pool0)
    index, prio, ends = pool_sweep_ends(a, prio0, layer.insert_threshold)
    entries = SweepEntries(bank, index[:, :T], ends)               # what each token reads, and §5's share
    sources = [([entries], gain)]                                   # per read: its pools (read in place), gain
    if cross is not None:
        sources.append((group + [entries], cross.alpha.detach()))
    m = torch.empty(Bsz, T, len(reads) * qk_w, device=dev, dtype=dtype)
    for i, (read_pools, read_gain) in enumerate(sources):
        # ends: the sweep's; None (found by pool_mix) for a layer whose entries came from the composed ops
        pool_mix(g[:, :, col_qk + i * qk_w:col_qk + (i + 1) * qk_w], [bank for bank, _ in read_pools],
                 [rows for _, rows in read_pools], read_gain, H, m[:, :, i * qk_w:(i + 1) * qk_w],
                 [getattr(e, "ends", None) for e in read_pools])
    m2 = m.view(Bsz * T, m.shape[-1])
    # u + r_tok + r_cross; torch.addmm would first copy u into its output (14 µs a layer at 16k tokens)
    ut = u2.addmm_(m2, w_out.t()) if u_is_scratch else torch.addmm(u2, m2, w_out.t())
    return ut.view(Bsz, T, d), pool_after(bank, index[:, T]), prio, entries
