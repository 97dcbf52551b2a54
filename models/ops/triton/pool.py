"""Note-pool kernels: the §3 sweep and the §4/§5 sparse pool attention, in Triton.

References (ground truth, same arguments): models.ops.pool.pool_sweep_ref and pool_attention_ref (spec §3-§5, §8).

pool_sweep: who enters is decided in parallel (a count against the earlier candidates, see SWEEP_SEG), then one
warp per batch row replays only the entering tokens' slot choices, one argmin each, and the index rows are filled
in parallel. Exactly the reference's results (fp32 comparisons, strict >, argmin lowest index on ties).
pool_sweep_kernel, the ahead-of-time builds' sweep, replays all T tokens in one program: it reads scores a tile
of BLOCK_T tokens at a time and keeps the current minimum priority; a tile with no score above max(tau1, min
priority) changes nothing, so its index rows are the current slot vector stored in one go; otherwise it jumps
from one entering token to the next inside the tile, patching the tile's rows after each.

pool_attention: a program owns (batch row, BLOCK_Q consecutive queries, one head), value columns BLOCK_V at a time.
Consecutive rows of a sweep index differ in at most one slot per inserted token, so the block's queries mostly
read the entries of its first row: those keys/values are gathered once and used in two small fp32 dots (logits,
then weights x values); only slots that changed inside the block are gathered per query. Softmax in fp32, scale
1/sqrt(ds/H), a query with no entry gets 0. Correct for any index in [-1, M) (-1: no entry). An entry past
the bank is not checked (the sweep never writes one, and a check would read the index on the host); fast
when rows repeat.
Backward (autograd): recomputes with the reference math (pool_attention_ref) in chunks of queries.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from memmamba_deploy.models.ops import needs_grad
from memmamba_deploy.models.ops.pool import (fp32, gained_read, pool_attention_ref, pool_read_ref,  # noqa: F401
                                              pool_sweep_ref)

from .launch import _after_predecessor, pdl_meta

ATTN_BWD_BYTES = 1 << 28       # the reference backward materialises [B, chunk, S, d] fp32: keep a chunk under this


# ----------------------------------------------------------------------------------------------------------------
# §3 sweep (NotePoolSweep)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def pool_sweep_kernel(
    scores_ptr, prio0_ptr, index_ptr, prio_ptr,
    T, K, tau1, stride_scores_b,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (B,). scores [B,T] fp32 (token stride 1), prio0/prio [B,K] fp32 contiguous, index [B,T+1,K] int32
    contiguous: row t names what each slot holds before token t (row T: after the last), j < K an initial slot,
    K + i token i, -1 empty."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    rows = tl.arange(0, BLOCK_T)
    mask_k = cols < K
    prio = tl.load(prio0_ptr + b * K + cols, mask=mask_k, other=float("inf"))   # padding slots never chosen
    slot = tl.where(prio >= 0, cols, -1)
    pmin, jmin = tl.min(prio, axis=0, return_indices=True, return_indices_tie_break_left=True)
    a_next = tl.load(scores_ptr + b * stride_scores_b + rows, mask=rows < T, other=float("-inf"))
    for blk in range(0, tl.cdiv(T, BLOCK_T)):
        t0 = blk * BLOCK_T
        offs_t = t0 + rows
        a = a_next                                   # loaded one tile ahead: the latency hides behind this tile
        a_next = tl.load(scores_ptr + b * stride_scores_b + offs_t + BLOCK_T, mask=offs_t + BLOCK_T < T,
                         other=float("-inf"))
        tile = tl.broadcast_to(slot[None, :], [BLOCK_T, BLOCK_K])
        # a token enters iff a > tau1 and a > the current minimum priority (then it takes the argmin slot)
        i = tl.min(tl.where(a > tl.maximum(pmin, tau1), rows, BLOCK_T), axis=0)
        while i < BLOCK_T:
            a_i = tl.sum(tl.where(rows == i, a, 0.0), axis=0)
            hit = cols == jmin
            prio = tl.where(hit, a_i, prio)
            slot = tl.where(hit, K + t0 + i, slot)
            tile = tl.where((rows[:, None] > i) & hit[None, :], K + t0 + i, tile)
            pmin, jmin = tl.min(prio, axis=0, return_indices=True, return_indices_tie_break_left=True)
            i = tl.min(tl.where((a > tl.maximum(pmin, tau1)) & (rows > i), rows, BLOCK_T), axis=0)
        tl.store(index_ptr + (b * (T + 1) + offs_t[:, None]) * K + cols[None, :], tile,
                 mask=(offs_t[:, None] < T) & mask_k[None, :])
    tl.store(index_ptr + (b * (T + 1) + T) * K + cols, slot, mask=mask_k)
    tl.store(prio_ptr + b * K + cols, prio, mask=mask_k)


# The parallel sweep (pool_sweep): which tokens enter is decided in parallel, only the slot choice is sequential.
# The pool's priorities before token t, as a multiset, are the K largest of prio0 and every earlier score above
# tau1 (an entering token replaces the minimum; a refused one is at most that minimum). So token t enters iff
# a_t > tau1 and fewer than K of them are >= a_t: a count, not a replay. Counting against each earlier segment's
# K largest candidates is exact too (a segment with K of them >= a_t already refuses it). The slots (argmin,
# lowest index on ties) are then a replay of the entering tokens alone, a few hundred at 16k tokens.
SWEEP_SEG = 512          # tokens per segment (one sort each); earlier segments cost BLOCK_K compares per token
                         # (the H100, K = 50: 512 beats 1024 by 4 us a layer at 16k tokens, 8 us at 2k)
SWEEP_COUNT_T = 16       # tokens per program of the count
SWEEP_COUNT_S = 128      # earlier tokens of the segment compared at a time
SWEEP_COUNT_GROUP = 4    # earlier segments' top lists compared at a time (one load: they lie side by side). The
                         # H100, the 130m's 24 sweeps at 16k: 1314 us with 1 and 64, 1173 with 4 and 64, 1134 with
                         # 4 and 128 (2k: 751 -> 713 us; BENCHMARKS.md)
SWEEP_COUNT_WARPS = 1
SWEEP_FILL_T = 64        # index rows per program of the fill
SWEEP_RANGE_R = 128      # entries a step of the replay's pass for the range of the priorities


@triton.jit
def sweep_segment_top_kernel(scores_ptr, top_ptr, seg_count_ptr, T, tau1, stride_scores_b,
                             SEG: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B, n_seg). top[b, s] = the BLOCK_K largest scores above tau1 of segment s, descending, -inf padded;
    seg_count[b, s] = 0 for sweep_enter_kernel to count into."""
    _after_predecessor(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    tl.store(seg_count_ptr + b * tl.num_programs(1) + seg, 0)
    offs = seg * SEG + tl.arange(0, SEG)
    a = tl.load(scores_ptr + b * stride_scores_b + offs, mask=offs < T, other=float("-inf"))
    a = tl.sort(tl.where(a > tau1, a, float("-inf")), descending=True)
    lane = tl.arange(0, SEG)
    tl.store(top_ptr + (b * tl.num_programs(1) + seg) * BLOCK_K + lane, a, mask=lane < BLOCK_K)


@triton.jit
def _any_open(a, count, tau1, K):
    # whether some token of the block could still enter: a candidate with fewer than K counted >= it
    return tl.max(((a > tau1) & (count < K)).to(tl.int32), axis=0) > 0


@triton.jit
def sweep_enter_kernel(scores_ptr, prio0_ptr, top_ptr, enter_ptr, seg_count_ptr, T, K, n_seg, tau1, stride_scores_b,
                       SEG: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B, cdiv(T, BLOCK_T)). enter[b, t] = a_t if token t enters, else -inf. It enters iff a_t > tau1 and
    fewer than K of prio0, the earlier segments' top lists and this segment's earlier candidates are >= a_t.
    seg_count[b, s] (zeroed by sweep_segment_top_kernel) gets how many of segment s enter."""
    _after_predecessor(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    t0 = tl.program_id(1) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_K)
    row = scores_ptr + b * stride_scores_b
    a = tl.load(row + offs_t, mask=offs_t < T, other=float("-inf"))
    p0 = tl.load(prio0_ptr + b * K + cols, mask=cols < K, other=float("-inf"))
    count = tl.sum((p0[None, :] >= a[:, None]).to(tl.int32), axis=1)
    seg = t0 // SEG
    # stop once every candidate of the block is refused (K already >= it): after one earlier segment for most
    # blocks, since a segment's top list holds its K best. GROUP segments a step: the steps are a chain of
    # dependent loads, and a block with a high score stays open through every earlier segment
    lists = tl.arange(0, GROUP * BLOCK_K)
    alive = _any_open(a, count, tau1, K)
    s = 0
    while alive & (s < seg):
        top = tl.load(top_ptr + (b * n_seg + s) * BLOCK_K + lists, mask=lists < (seg - s) * BLOCK_K,
                      other=float("-inf"))
        count += tl.sum((top[None, :] >= a[:, None]).to(tl.int32), axis=1)
        alive = _any_open(a, count, tau1, K)
        s += GROUP
    s0 = seg * SEG
    while alive & (s0 < t0 + BLOCK_T):                             # this segment, up to the block's last token
        offs_s = s0 + tl.arange(0, BLOCK_S)
        c = tl.load(row + offs_s, mask=offs_s < T, other=float("-inf"))
        c = tl.where(c > tau1, c, float("-inf"))
        earlier = (c[None, :] >= a[:, None]) & (offs_s[None, :] < offs_t[:, None])
        count += tl.sum(earlier.to(tl.int32), axis=1)
        alive = _any_open(a, count, tau1, K)
        s0 += BLOCK_S
    enter = (a > tau1) & (count < K)
    tl.store(enter_ptr + b * T + offs_t, tl.where(enter, a, float("-inf")), mask=offs_t < T)
    tl.atomic_add(seg_count_ptr + b * n_seg + seg, tl.sum(enter.to(tl.int32), axis=0))


@triton.jit
def sweep_compact_kernel(enter_ptr, seg_count_ptr, ev_tok_ptr, ev_a_ptr, ecount_ptr, ends_ptr, T, K, n_seg,
                         SEG: tl.constexpr, BLOCK_SEG: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B, n_seg). Lists segment s's entering tokens in order after the earlier segments' (ev_tok, ev_a),
    writes ecount[b, t] = how many tokens enter before t, and ends[b, K + t] = -1 (sweep_fill_kernel sets the
    ends of the tokens held), for t in the segment."""
    _after_predecessor(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    segs = tl.arange(0, BLOCK_SEG)
    counts = tl.load(seg_count_ptr + b * n_seg + segs, mask=segs < n_seg, other=0)
    before = tl.sum(tl.where(segs < seg, counts, 0), axis=0)
    t = seg * SEG + tl.arange(0, SEG)
    a = tl.load(enter_ptr + b * T + t, mask=t < T, other=float("-inf"))
    hit = a > float("-inf")
    f = hit.to(tl.int32)
    pos = before + tl.cumsum(f, axis=0) - f
    tl.store(ecount_ptr + b * (T + 1) + t, pos, mask=t < T)
    tl.store(ends_ptr + b * (K + T) + K + t, -1, mask=t < T)
    tl.store(ev_tok_ptr + b * T + pos, t, mask=hit)
    tl.store(ev_a_ptr + b * T + pos, a, mask=hit)


@triton.jit
def _ordered_key(p):
    # an int32 with the order of the fp32 p (-0.0 taken as +0.0, as fp32 comparisons do): negative floats' bits
    # read as integers run backwards, so flip them
    bits = (p + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _argmin_slot(key, cols, BLOCK_K: tl.constexpr):
    # the lowest slot of the least key: two integer minimums, which Triton lowers to redux.sync on sm_80+ (one
    # instruction each, where a float min with its index takes five rounds of two shuffles)
    m = tl.min(key, axis=0)
    return tl.min(tl.where(key == m, cols, BLOCK_K), axis=0)


@triton.jit
def _replay_entry(e, n, t, a, prio, key, slot, jmin, cols, mask_k, row_ptr, K, BLOCK_K: tl.constexpr):
    # entry e (token t, score a) takes slot jmin, if e < n; hist row e + 1 is the slot vector after it
    hit = (cols == jmin) & (e < n)
    prio = tl.where(hit, a, prio)
    key = tl.where(hit, _ordered_key(a), key)
    slot = tl.where(hit, K + t, slot)
    tl.store(row_ptr + tl.cast(e + 1, tl.int64) * K + cols, slot, mask=mask_k & (e < n))
    return prio, key, slot, _argmin_slot(key, cols, BLOCK_K)


@triton.jit
def _entries(ev_t, ev_a, first, last, some):
    # entries first .. first+3 (tokens, scores), clamped to the last: past it their values are unused
    toks = ()
    scores = ()
    for j in tl.static_range(4):
        toks = toks + (tl.load(ev_t + tl.minimum(first + j, last), mask=some, other=0),)
        scores = scores + (tl.load(ev_a + tl.minimum(first + j, last), mask=some, other=0.0),)
    return toks, scores


INT32_MAX = tl.constexpr(2 ** 31 - 1)
INT32_MIN = tl.constexpr(-2 ** 31)
MINUS_ONE_KEY = tl.constexpr(-1065353217)   # _ordered_key(-1.0): the bits 0xBF800000 flipped as a negative float's


@triton.jit
def _code(p, lo):
    # a priority as a small int32 in its order: an empty slot's -1 is 0, any other p its ordered key above lo's
    return tl.where(p == -1.0, 0, _ordered_key(p) - lo + 1)


@triton.jit
def _packed_entry(e, n, t, a, lo, prio, packed, slot, m, cols, mask_k, row_ptr, K, SLOT_BITS: tl.constexpr):
    # _replay_entry on (code << SLOT_BITS) | slot: the argmin slot is the one whose packed value is the minimum
    hit = (packed == m) & (e < n)
    packed = tl.where(hit, (_code(a, lo) << SLOT_BITS) | cols, packed)
    prio = tl.where(hit, a, prio)
    slot = tl.where(hit, K + t, slot)
    tl.store(row_ptr + tl.cast(e + 1, tl.int64) * K + cols, slot, mask=mask_k & (e < n))
    return prio, packed, slot, tl.min(packed, axis=0)


@triton.jit
def _replay(order, prio, slot, lo, n, last, some, ev_t, ev_a, cols, mask_k, row_ptr, K, BLOCK_K: tl.constexpr,
            SLOT_BITS: tl.constexpr, PACKED: tl.constexpr):
    # the entries in order, four at a time, loaded while the four before them are replayed; order: the packed
    # priorities (PACKED) or the ordered keys. Returns the priorities after the last
    if PACKED:
        m = tl.min(order, axis=0)
    else:
        m = _argmin_slot(order, cols, BLOCK_K)
    toks, scores = _entries(ev_t, ev_a, 0, last, some)
    for e in range(0, n, 4):
        next_toks, next_scores = _entries(ev_t, ev_a, e + 4, last, some)
        for j in tl.static_range(4):
            if PACKED:
                prio, order, slot, m = _packed_entry(e + j, n, toks[j], scores[j], lo, prio, order, slot, m, cols,
                                                     mask_k, row_ptr, K, SLOT_BITS)
            else:
                prio, order, slot, m = _replay_entry(e + j, n, toks[j], scores[j], prio, order, slot, m, cols,
                                                     mask_k, row_ptr, K, BLOCK_K)
        toks, scores = next_toks, next_scores
    return prio


@triton.jit
def _priority_range(prio, key, mask_k, ev_a, n, BLOCK_R: tl.constexpr):
    # (lo, hi) of the ordered keys of every priority but -1 (prio0's and the entries'), and whether any is NaN
    held = mask_k & (prio != -1.0)
    lo = tl.min(tl.where(held, key, INT32_MAX), axis=0)
    hi = tl.max(tl.where(held, key, INT32_MIN), axis=0)
    nan = tl.max((mask_k & (prio != prio)).to(tl.int32), axis=0)
    offs = tl.arange(0, BLOCK_R)
    for r0 in range(0, n, BLOCK_R):
        live = r0 + offs < n
        a = tl.load(ev_a + r0 + offs, mask=live, other=-1.0)
        k = _ordered_key(a)
        scored = live & (a != -1.0)
        lo = tl.minimum(lo, tl.min(tl.where(scored, k, INT32_MAX), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(scored, k, INT32_MIN), axis=0))
        nan = tl.maximum(nan, tl.max((live & (a != a)).to(tl.int32), axis=0))
    return lo, hi, nan


@triton.jit
def sweep_replay_kernel(seg_count_ptr, prio0_ptr, ev_tok_ptr, ev_a_ptr, ecount_ptr, hist_ptr, prio_ptr, ends_ptr, T,
                        K, n_seg, BLOCK_SEG: tl.constexpr, BLOCK_K: tl.constexpr, SLOT_BITS: tl.constexpr,
                        BLOCK_R: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B,), one warp. Replays the entering tokens (ev_tok, ev_a, in order; seg_count says how many): each
    takes the argmin slot (lowest index on ties). hist[b, e] is the slot vector after e entries (j < K an initial
    slot, K + i token i, -1 empty); prio the priorities after the last; ends[b, :K] = -1 (sweep_compact_kernel
    sets the token rows' -1, sweep_fill_kernel the ends of the rows held). Each entry waits on the previous one's
    argmin, and the entries come four at a time, loaded while the four before them are replayed (a load consumed
    in its own iteration cost the loop its latency every entry). The argmin is one integer minimum where each
    priority fits in an int32 with its slot, (_code << SLOT_BITS) | slot, _code the ordered key less the least
    one plus 1 (0 for an empty slot's -1): so wherever prio0's and the entries' priorities lie within 2^(31 -
    SLOT_BITS) - 2 floats of each other, e.g. scores in [1/8, 1] at K <= 64 (a first pass over the entries finds
    their range). Otherwise (priorities spread wider, below -1, or NaN) it is two minimums of the ordered keys
    themselves (_ordered_key, _argmin_slot): the same slots either way. (Replaying several entries per step by
    ranking the slots measured slower on the H100: BENCHMARKS.md.)"""
    _after_predecessor(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    mask_k = cols < K
    segs = tl.arange(0, BLOCK_SEG)
    n = tl.sum(tl.load(seg_count_ptr + b * n_seg + segs, mask=(segs < n_seg) & (T > 0), other=0), axis=0)
    tl.store(ecount_ptr + b * (T + 1) + T, n)                  # row T of the index: after every entry
    prio = tl.load(prio0_ptr + b * K + cols, mask=mask_k, other=float("inf"))   # padding slots never chosen
    key = _ordered_key(prio)
    slot = tl.where(prio >= 0, cols, -1)
    row_ptr = hist_ptr + b * (T + 1) * K
    tl.store(row_ptr + cols, slot, mask=mask_k)
    tl.store(ends_ptr + b * (K + T) + cols, -1, mask=mask_k)   # for sweep_fill_kernel to set (token rows: compact)
    last = tl.maximum(n - 1, 0)                               # loads past the last entry read it again (unused)
    some = n > 0
    ev_t, ev_a = ev_tok_ptr + b * T, ev_a_ptr + b * T
    lo, hi, nan = _priority_range(prio, key, mask_k, ev_a, n, BLOCK_R)
    packs = (nan == 0) & (lo > MINUS_ONE_KEY) & (hi.to(tl.int64) - lo.to(tl.int64) < (1 << (31 - SLOT_BITS)) - 2)
    if packs:
        prio = _replay(tl.where(mask_k, (_code(prio, lo) << SLOT_BITS) | cols, INT32_MAX), prio, slot, lo, n, last,
                       some, ev_t, ev_a, cols, mask_k, row_ptr, K, BLOCK_K, SLOT_BITS, True)
    else:
        prio = _replay(key, prio, slot, lo, n, last, some, ev_t, ev_a, cols, mask_k, row_ptr, K, BLOCK_K, SLOT_BITS,
                       False)
    tl.store(prio_ptr + b * K + cols, prio, mask=mask_k)


@triton.jit
def _store_ends(ends_row, rows, rows_next, held, offs_t):
    # ends[r] = t where index row t holds bank row r and row t + 1 does not (rows_next: -2 past the last row):
    # an entry keeps its slot until evicted and never comes back, so each held bank row has one such t
    last = held & (rows >= 0) & (rows != rows_next)
    tl.store(ends_row + rows, tl.broadcast_to(offs_t[:, None], rows.shape), mask=last)


@triton.jit
def sweep_fill_kernel(ecount_ptr, hist_ptr, index_ptr, ends_ptr, T, K, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_PDL: tl.constexpr):
    """grid (B, cdiv(T + 1, BLOCK_T)). index[b, t] = hist[b, ecount[b, t]], t <= T; and ends[b, r] = t for the
    last row t < T that holds bank row r (entry_ends of index[:, :T]): where row t holds r and row t + 1 does
    not (an entry keeps its slot until evicted and never comes back), or t = T - 1."""
    _after_predecessor(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_K)
    mask = (offs_t <= T)[:, None] & (cols < K)[None, :]
    e = tl.load(ecount_ptr + b * (T + 1) + offs_t, mask=offs_t <= T, other=0)
    rows = tl.load(hist_ptr + (b * (T + 1) + e[:, None]) * K + cols[None, :], mask=mask)
    tl.store(index_ptr + (b * (T + 1) + offs_t[:, None]) * K + cols[None, :], rows, mask=mask)
    held = (offs_t < T)[:, None] & (cols < K)[None, :]
    e_next = tl.load(ecount_ptr + b * (T + 1) + offs_t + 1, mask=offs_t + 1 < T, other=0)
    rows_next = tl.load(hist_ptr + (b * (T + 1) + e_next[:, None]) * K + cols[None, :],
                        mask=held & (offs_t + 1 < T)[:, None], other=-2)
    _store_ends(ends_ptr + b * (K + T), rows, rows_next, held, offs_t)


def pool_sweep(scores, prio0, tau1):
    """Same signature and results as pool_sweep_ref: (index [B,T+1,K] int32, prio [B,K] fp32). Five launches: the
    segments' top lists, who enters, their list, the slot replay of the entering tokens, the index rows; all but
    the replay in parallel. pool_sweep_kernel (one launch, sequential) is what the ahead-of-time builds use."""
    return pool_sweep_ends(scores, prio0, tau1)[:2]


def pool_sweep_ends(scores, prio0, tau1):
    """pool_sweep, and ends [B, K+T] int32: entry_ends(index[:, :T], K + T), found by the index fill beside the
    rows it writes, so pool_mix needs no pass of its own over the index. (Found by the replay instead, as it
    evicts each entry, it measured slower: two more stores in its serial loop cost it 5.7 µs a layer at 16k.)"""
    if scores.dim() != 2 or prio0.dim() != 2 or scores.shape[0] != prio0.shape[0]:
        raise ValueError(f"pool_sweep wants scores [B,T] and prio0 [B,K], got {list(scores.shape)} and "
                         f"{list(prio0.shape)}")
    Bsz, T = scores.shape
    K = prio0.shape[1]
    scores = scores.detach().float().contiguous()
    prio0 = prio0.detach().float().contiguous()
    dev, tau = scores.device, fp32(tau1)
    block_k = triton.next_power_of_2(K)
    index = torch.empty(Bsz, T + 1, K, device=dev, dtype=torch.int32)
    prio = torch.empty(Bsz, K, device=dev, dtype=torch.float32)
    seg_len = max(SWEEP_SEG, block_k)           # a segment's top list is its first BLOCK_K sorted scores
    assert seg_len % SWEEP_COUNT_T == 0, "sweep_enter_kernel's blocks must not straddle segments"
    n_seg = max(1, triton.cdiv(T, seg_len))
    block_seg = triton.next_power_of_2(n_seg)
    top = torch.empty(Bsz, n_seg, block_k, device=dev, dtype=torch.float32)
    seg_count = torch.empty(Bsz, n_seg, device=dev, dtype=torch.int32)
    enter = torch.empty(Bsz, T, device=dev, dtype=torch.float32)
    ev_tok = torch.empty(Bsz, T, device=dev, dtype=torch.int32)
    ev_a = torch.empty(Bsz, T, device=dev, dtype=torch.float32)
    ecount = torch.empty(Bsz, T + 1, device=dev, dtype=torch.int32)
    hist = torch.empty(Bsz, T + 1, K, device=dev, dtype=torch.int32)
    ends = torch.empty(Bsz, K + T, device=dev, dtype=torch.int32)
    pdl = pdl_meta(dev)
    if T > 0:
        sweep_segment_top_kernel[(Bsz, n_seg)](scores, top, seg_count, T, tau, scores.stride(0), SEG=seg_len,
                                               BLOCK_K=block_k, num_warps=4, **pdl)
        sweep_enter_kernel[(Bsz, triton.cdiv(T, SWEEP_COUNT_T))](
            scores, prio0, top, enter, seg_count, T, K, n_seg, tau, scores.stride(0), SEG=seg_len,
            BLOCK_T=SWEEP_COUNT_T, BLOCK_S=SWEEP_COUNT_S, BLOCK_K=block_k, GROUP=SWEEP_COUNT_GROUP,
            num_warps=SWEEP_COUNT_WARPS, **pdl)
        sweep_compact_kernel[(Bsz, n_seg)](enter, seg_count, ev_tok, ev_a, ecount, ends, T, K, n_seg, SEG=seg_len,
                                           BLOCK_SEG=block_seg, num_warps=4, **pdl)
    sweep_replay_kernel[(Bsz,)](seg_count, prio0, ev_tok, ev_a, ecount, hist, prio, ends, T, K, n_seg,
                                BLOCK_SEG=block_seg, BLOCK_K=block_k, SLOT_BITS=block_k.bit_length() - 1,
                                BLOCK_R=SWEEP_RANGE_R, num_warps=1, **pdl)
    sweep_fill_kernel[(Bsz, triton.cdiv(T + 1, SWEEP_FILL_T))](ecount, hist, index, ends, T, K, BLOCK_T=SWEEP_FILL_T,
                                                                BLOCK_K=block_k, num_warps=4, **pdl)
    return index, prio, ends


def sweep_block_t(block_k: int) -> int:
    """Tokens per tile of the sweep: a [BLOCK_T, BLOCK_K] int32 index tile of about 2048 values (32 tokens at
    K <= 64: 12% faster than 64 on the H100, see BENCHMARKS.md)."""
    return max(16, 2048 // block_k)


# ----------------------------------------------------------------------------------------------------------------
# §4/§5 sparse pool attention (SparsePoolAttention)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _extract(tile, cols, s):
    """Column s of a [rows, cols] register tile (a masked row sum: Triton cannot index registers)."""
    return tl.sum(tl.where(cols[None, :] == s, tile, 0), axis=1)


@triton.jit
def _block_index(index_ptr, b, qb, offs_q, offs_s, mask_q, mask_s, stride_i_b, stride_i_t, BLOCK_Q: tl.constexpr):
    """The block's index rows [BLOCK_Q, BLOCK_S] (-1 outside), its first row, which entries are valid and which
    differ from the first row."""
    idx = tl.load(index_ptr + b * stride_i_b + offs_q[:, None] * stride_i_t + offs_s[None, :],
                  mask=mask_q[:, None] & mask_s[None, :], other=-1)
    first = tl.load(index_ptr + b * stride_i_b + (qb * BLOCK_Q) * stride_i_t + offs_s, mask=mask_s, other=-1)
    valid = idx >= 0
    changed = valid & (idx != first[None, :])
    return idx, first, valid, changed


@triton.jit
def _changed_logits(logits, q, idx, first, offs_s, col_changed, base, stride_m, cols, mask_cols,
                    BLOCK_S: tl.constexpr):
    """logits [BLOCK_Q, BLOCK_S] of the first index row, fixed at the slots whose entry changed inside the block:
    there each query dots its own entry (rows of base at stride_m, columns cols) with q."""
    s = tl.min(tl.where(col_changed > 0, offs_s, BLOCK_S), axis=0)
    while s < BLOCK_S:
        idx_s = _extract(idx, offs_s, s)
        ch_s = (idx_s >= 0) & (idx_s != tl.sum(tl.where(offs_s == s, first, 0), axis=0))
        k_s = tl.load(base + idx_s[:, None] * stride_m + cols[None, :], mask=ch_s[:, None] & mask_cols[None, :],
                      other=0.0).to(tl.float32)
        logits = tl.where((offs_s[None, :] == s) & ch_s[:, None], tl.sum(k_s * q, axis=1)[:, None], logits)
        s = tl.min(tl.where((col_changed > 0) & (offs_s > s), offs_s, BLOCK_S), axis=0)
    return logits


@triton.jit
def _changed_mix(acc, w, idx, first, offs_s, col_changed, base, stride_m, cols, mask_cols, BLOCK_S: tl.constexpr):
    """acc [BLOCK_Q, cols] plus, at the slots whose entry changed inside the block, each query's weight times its
    own entry (the first row's entries went through a dot with those slots' weights zeroed)."""
    s = tl.min(tl.where(col_changed > 0, offs_s, BLOCK_S), axis=0)
    while s < BLOCK_S:
        idx_s = _extract(idx, offs_s, s)
        ch_s = (idx_s >= 0) & (idx_s != tl.sum(tl.where(offs_s == s, first, 0), axis=0))
        v_s = tl.load(base + idx_s[:, None] * stride_m + cols[None, :], mask=ch_s[:, None] & mask_cols[None, :],
                      other=0.0).to(tl.float32)
        acc += tl.where(ch_s, _extract(w, offs_s, s), 0.0)[:, None] * v_s
        s = tl.min(tl.where((col_changed > 0) & (offs_s > s), offs_s, BLOCK_S), axis=0)
    return acc


@triton.jit
def _masked_softmax(logits, valid, scale):
    """Row softmax of scale·logits over the valid entries, fp32; a row with none gets all zeros."""
    logits = tl.where(valid, logits * scale, float("-inf"))
    m = tl.max(logits, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)                   # no valid entry: every weight is exp(-inf) = 0
    e = tl.exp(logits - m[:, None])
    den = tl.sum(e, axis=1)
    return e / tl.where(den > 0, den, 1.0)[:, None]


@triton.jit
def pool_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, index_ptr, o_ptr,
    T, S, dh, dv, n_vblocks, scale,
    stride_q_b, stride_q_t, stride_k_b, stride_k_m, stride_v_b, stride_v_m, stride_i_b, stride_i_t,
    stride_o_b, stride_o_t,
    BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """grid (B, cdiv(T, BLOCK_Q), H), dh = ds/H, dv = d/H, n_vblocks = cdiv(dv, BLOCK_V).
    q [B,T,ds], keys [B,M,ds], values [B,M,d], index [B,T,S] int32 (negative: no entry), o [B,T,d]; unit stride
    on the last axis of each. A program: BLOCK_Q queries x one head, its value columns BLOCK_V at a time.
    Entries equal to the block's first index row at the same slot use that row's keys/values, gathered once (two
    small dots); slots that changed inside the block (a sweep index changes one slot per inserted token) are
    gathered per query, one changed slot at a time."""
    b = tl.program_id(0).to(tl.int64)                          # batch offsets can pass 2^31 elements at long T
    qb = tl.program_id(1)
    head = tl.program_id(2)
    offs_q = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_DH)
    mask_q = offs_q < T
    mask_s = offs_s < S
    mask_c = offs_c < dh
    k_cols = head * dh + offs_c
    k_base = k_ptr + b * stride_k_b
    v_base = v_ptr + b * stride_v_b
    idx, first, valid, changed = _block_index(index_ptr, b, qb, offs_q, offs_s, mask_q, mask_s, stride_i_b,
                                              stride_i_t, BLOCK_Q)
    has_first = first >= 0
    k_first = tl.load(k_base + first[:, None] * stride_k_m + k_cols[None, :], mask=has_first[:, None] & mask_c[None, :],
                      other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b * stride_q_b + offs_q[:, None] * stride_q_t + k_cols[None, :],
                mask=mask_q[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    logits = tl.dot(q, tl.trans(k_first), input_precision="ieee")             # [BLOCK_Q, BLOCK_S], fp32
    col_changed = tl.max(changed.to(tl.int32), axis=0)
    logits = _changed_logits(logits, q, idx, first, offs_s, col_changed, k_base, stride_k_m, k_cols, mask_c, BLOCK_S)
    w = _masked_softmax(logits, valid, scale)
    w_first = tl.where(changed, 0.0, w)
    for vb in range(0, n_vblocks):
        offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < dv
        v_cols = head * dv + offs_v
        v_first = tl.load(v_base + first[:, None] * stride_v_m + v_cols[None, :],
                          mask=has_first[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        o = tl.dot(w_first, v_first, input_precision="ieee")                   # [BLOCK_Q, BLOCK_V]
        o = _changed_mix(o, w, idx, first, offs_s, col_changed, v_base, stride_v_m, v_cols, mask_v, BLOCK_S)
        tl.store(o_ptr + b * stride_o_b + offs_q[:, None] * stride_o_t + v_cols[None, :],
                 o.to(o_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_v[None, :])


@triton.jit
def _mix_dot(w, s):
    # w [rows, slots] fp32 times s [slots, ds] half on tensor cores, w in two half parts: to ~2^-22 in fp16,
    # ~2^-16 in bf16
    w_hi = w.to(s.dtype)
    w_lo = (w - w_hi.to(tl.float32)).to(s.dtype)
    return tl.dot(w_hi, s) + tl.dot(w_lo, s)


ENDS_T = 64           # entry_ends_kernel: index rows per program


@triton.jit
def entry_ends_kernel(index_ptr, ends_ptr, T, S, stride_i_b, stride_i_t, stride_e_b,
                      BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """grid (B, cdiv(T, BLOCK_T)). ends[b, r] = the last row t < T of index [B,T,S] that holds bank row r in
    some slot, for a sweep's index (an entry keeps its slot until it is evicted, and never comes back): the row
    after which the slot holds another entry, or the last row. ends is -1 beforehand (rows never held)."""
    b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_s = tl.arange(0, BLOCK_S)
    mask = (offs_t < T)[:, None] & (offs_s < S)[None, :]
    row = index_ptr + b * stride_i_b + offs_t[:, None].to(tl.int64) * stride_i_t + offs_s[None, :]
    r = tl.load(row, mask=mask, other=-1)
    r_next = tl.load(row + stride_i_t, mask=mask & (offs_t + 1 < T)[:, None], other=-2)
    _store_ends(ends_ptr + b * stride_e_b, r, r_next, mask, offs_t)


def entry_ends(index, rows: int):
    """ends [B, rows] int32 (entry_ends_kernel): the last row of a sweep's index [B,T,S] holding each bank row,
    -1 where none does."""
    Bsz, T, S = index.shape
    if index.dtype != torch.int32 or index.stride(-1) != 1:
        raise ValueError(f"entry_ends wants an int32 index with unit slot stride, got {index.dtype} with strides "
                         f"{tuple(index.stride())}")
    ends = torch.full((Bsz, rows), -1, device=index.device, dtype=torch.int32)
    if T and S:
        entry_ends_kernel[(Bsz, triton.cdiv(T, ENDS_T))](index, ends, T, S, index.stride(0), index.stride(1),
                                                         ends.stride(0), BLOCK_T=ENDS_T,
                                                         BLOCK_S=triton.next_power_of_2(S), num_warps=4)
    return ends


@triton.jit
def _online_softmax_step(logits, s, top, den, acc):
    # one more part of a row softmax's entries (logits [rows, n], -inf where absent; summaries s [n, ds]) into
    # the running maximum, denominator and weighted sum. A row that does not read summary j has weight 0 for
    # it, and 0 x inf is NaN: non-finite summaries are mixed as 0 (a row that reads one has a non-finite logit
    # and ends NaN anyway, as in the reference)
    new_top = tl.maximum(top, tl.max(logits, axis=1))
    shift = tl.where(new_top == float("-inf"), 0.0, new_top)       # nothing yet: every weight is exp(-inf) = 0
    rescale = tl.exp(top - shift)
    e = tl.exp(logits - shift[:, None])
    s = tl.where(tl.abs(s.to(tl.float32)) < float("inf"), s, 0.0).to(s.dtype)          # NaN fails < too
    return new_top, den * rescale + tl.sum(e, axis=1), acc * rescale[:, None] + _mix_dot(e, s)


@triton.jit
def pool_mix_kernel(
    q_ptr, banks, indices, ends, gain_ptr, m_ptr,
    T, K, ds, H, scale,
    stride_q_b, stride_q_t, strides_s_b, strides_s_m, strides_i_b, strides_i_t, strides_e_b, stride_g_b, stride_g_t,
    stride_m_b, stride_m_t, LAYERS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B, cdiv(T, BLOCK_Q), cdiv(H, BLOCK_H)); BLOCK_Q queries a program, BLOCK_H heads of each (all of
    them up to MIX_ROWS // 16): its rows are (query, head) pairs, so one set of index and summary loads serves
    those heads (they share the summaries) and each dot is one [rows, ds] x [ds, slots]. fp16/bf16 tensors
    (tensor-core dots). The
    attention of pool_attention_fwd_kernel done on the summaries themselves:
    q [B,T,H*ds] holds each head's query already through that head's W_k (q'_h = W_k,hᵀ q_h, so that
    q'_h·s_j = q_h·k_j); per pool j < LAYERS (tuples of pointers and strides), banks[j] [B,K+T,ds] its
    summaries (its K slots, then token t's at row K + t), indices[j] [B,T,K] int32 its sweep's index rows over
    that bank (negative: no entry) and ends[j] [B,K+T] int32 the last row holding each bank row (-1: never).
    m [B,T,H*ds] gets m_h = gain · Σ_j softmax_j(scale q'_h·s_j) s_j over every pool's entries (gain [B,T] per
    query); the caller applies W_v (o_h = W_v,h m_h), so no [M, d] values are ever formed or gathered.

    In a sweep's index a bank row is read by the queries from the one after it entered (or 0) through its end.
    So per pool a query block reads its first index row's entries while they last, and its own tokens that
    entered while they last: one index row loaded per block, and the tokens' summaries only where one of them
    entered. Every pool's index row and its tokens' ends are loaded before the first pool's summaries."""
    _after_predecessor(USE_PDL)
    b = tl.program_id(0).to(tl.int64)                          # batch offsets can pass 2^31 elements at long T
    t0 = tl.program_id(1) * BLOCK_Q
    r = tl.arange(0, BLOCK_Q * BLOCK_H)                        # row r: query t0 + r // BLOCK_H, head r % BLOCK_H
    t_r = t0 + r // BLOCK_H                                    # of the program's group of heads
    h_r = tl.program_id(2) * BLOCK_H + r % BLOCK_H
    mask_r = (t_r < T) & (h_r < H)
    offs_q = t0 + tl.arange(0, BLOCK_Q)                        # the block's queries (its own tokens' rows)
    rows_q = offs_q.to(tl.int64)                               # token x row stride passes 2^31 at a few M tokens
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    mask_q = offs_q < T
    mask_k = offs_k < K
    mask_c = offs_c < ds
    cell = t_r.to(tl.int64)[:, None] * stride_q_t + (h_r * ds)[:, None] + offs_c[None, :]
    q = tl.load(q_ptr + b * stride_q_b + cell, mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    gain = tl.load(gain_ptr + b * stride_g_b + t_r.to(tl.int64) * stride_g_t, mask=mask_r, other=0.0).to(tl.float32)
    firsts = ()
    owns = ()
    for j in tl.static_range(LAYERS):                          # round one: every pool's index row and own ends
        firsts = firsts + (tl.load(indices[j] + b * strides_i_b[j] + t0.to(tl.int64) * strides_i_t[j] + offs_k,
                                   mask=mask_k, other=-1),)
        owns = owns + (tl.load(ends[j] + b * strides_e_b[j] + K + rows_q, mask=mask_q, other=-1),)
    # a softmax over every pool's two parts, online (the pools one after the other, flash-attention's way)
    top = tl.full([BLOCK_Q * BLOCK_H], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_Q * BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, BLOCK_C], tl.float32)
    for j in tl.static_range(LAYERS):
        s_base = banks[j] + b * strides_s_b[j]
        first = firsts[j]
        has = first >= 0
        s_first = tl.load(s_base + first[:, None] * strides_s_m[j] + offs_c[None, :],
                          mask=has[:, None] & mask_c[None, :], other=0.0)               # [BLOCK_K, BLOCK_C]
        last = tl.load(ends[j] + b * strides_e_b[j] + first, mask=has, other=-1)
        logits = tl.where(t_r[:, None] <= last[None, :], tl.dot(q, tl.trans(s_first)) * scale, float("-inf"))
        top, den, acc = _online_softmax_step(logits, s_first, top, den, acc)
        own_last = owns[j]
        if tl.max(own_last, axis=0) > t0:                        # a token of the block entered, read inside it
            s_own = tl.load(s_base + (K + rows_q)[:, None] * strides_s_m[j] + offs_c[None, :],
                            mask=(own_last > offs_q)[:, None] & mask_c[None, :], other=0.0)
            sees = (t_r[:, None] > offs_q[None, :]) & (t_r[:, None] <= own_last[None, :])   # [row, token]
            l_own = tl.where(sees, tl.dot(q, tl.trans(s_own)) * scale, float("-inf"))
            top, den, acc = _online_softmax_step(l_own, s_own, top, den, acc)
    m = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(m_ptr + b * stride_m_b + t_r.to(tl.int64)[:, None] * stride_m_t + (h_r * ds)[:, None] + offs_c[None, :],
             (m * gain[:, None]).to(m_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_c[None, :])


MIX_ROWS = 64         # pool_mix_kernel: (query, head) rows per program (16 queries of the 130m's 4 heads), and
MIX_WARPS = 4         # warps. H100, the 130m's 16k reads: token 15.5 -> 11.3 us, cross-layer 69.5 -> 42.6 against one
                      # head a program (64 queries); 128 rows 15.7 / 60.5, 2 warps 19.3 / 149 (BENCHMARKS.md)


def mix_blocks(K: int, ds: int, heads: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_Q, BLOCK_H, BLOCK_K, BLOCK_C, num_warps) of pool_mix_kernel for pools of K slots: MIX_ROWS
    (query, head) rows a program, at least 16 queries (a dot's least M), so more heads than MIX_ROWS // 16 are
    spread over programs (the grid's third axis)."""
    block_h = min(triton.next_power_of_2(heads), MIX_ROWS // 16)
    return (max(16, MIX_ROWS // block_h), block_h, max(16, triton.next_power_of_2(max(K, 1))),
            max(16, triton.next_power_of_2(ds)), MIX_WARPS)


def pool_mix(qk, banks, indices, gain, heads: int, m, ends=None):
    """m [B,T,H·ds] = gain · Σ_j softmax_j(q'_h·s_j / sqrt(ds/H)) s_j per head (pool_mix_kernel), for qk [B,T,H·ds]
    (each head's query through W_k,hᵀ; rows may be strided, as a column block of a wider GEMM output), and one or
    more pools read together (§4: a layer's own; §5: its group's), each a bank of summaries [B,K+T,ds] (its K
    slots, then the T tokens') and its sweep's index rows [B,T,K] over that bank, read where they lie (no joined
    copy). gain is broadcast to [B,T] (a scalar's expand is not copied); m may be a column block of a wider
    tensor too. Any index other than a sweep's gives wrong results (pool_attention takes any). ends: per pool
    entry_ends(index, K + T) [B,K+T] int32 where the caller has it (pool_sweep_ends), or None to find it here."""
    Bsz, T, _ = qk.shape
    if not 0 < len(banks) == len(indices) or (ends is not None and len(ends) != len(banks)):
        raise ValueError(f"pool_mix wants as many banks as indices (and ends), at least one; got {len(banks)}, "
                         f"{len(indices)} and {'no ends' if ends is None else len(ends)}")
    K, ds = indices[0].shape[-1], banks[0].shape[-1]
    if m.stride(-1) != 1:
        raise ValueError(f"pool_mix writes m with unit column stride; got strides {tuple(m.stride())}")
    for j, (bank, index) in enumerate(zip(banks, indices)):
        if bank.shape != (Bsz, K + T, ds) or index.shape != (Bsz, T, K):
            raise ValueError(f"pool_mix wants banks of K + T rows and indices of K slots for T={T}, K={K}; pool {j} "
                             f"has a bank {list(bank.shape)} and an index {list(index.shape)}")
    ends = [None] * len(banks) if ends is None else list(ends)
    for j, e in enumerate(ends):
        if e is not None and (e.shape != (Bsz, K + T) or e.dtype != torch.int32 or e.stride(-1) != 1):
            raise ValueError(f"pool_mix wants ends [B, K+T] = {[Bsz, K + T]} int32 with unit stride; pool {j} has "
                             f"{e.dtype} {list(e.shape)} strides {tuple(e.stride())}")
    banks = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in banks)
    indices = tuple(t if t.dtype == torch.int32 and t.stride(-1) == 1 else t.to(torch.int32).contiguous()
                    for t in indices)
    qk = qk if qk.stride(-1) == 1 else qk.contiguous()
    gain = gain.expand(Bsz, T)
    if T:
        ends = tuple(entry_ends(i, K + T) if e is None else e for i, e in zip(indices, ends))
        block_q, block_h, block_k, block_c, num_warps = mix_blocks(K, ds, heads)
        pool_mix_kernel[(Bsz, triton.cdiv(T, block_q), triton.cdiv(heads, block_h))](
            qk, banks, indices, ends, gain, m, T, K, ds, heads, (ds // heads) ** -0.5, qk.stride(0), qk.stride(1),
            tuple(t.stride(0) for t in banks), tuple(t.stride(1) for t in banks),
            tuple(t.stride(0) for t in indices), tuple(t.stride(1) for t in indices), tuple(t.stride(0) for t in ends),
            gain.stride(0), gain.stride(1), m.stride(0), m.stride(1),
            LAYERS=len(banks), BLOCK_Q=block_q, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_C=block_c,
            num_warps=num_warps,
            **pdl_meta(m.device))
    return m


@triton.jit
def pool_after_kernel(bank_ptr, last_ptr, out_ptr, K, ds, stride_bank_b, stride_bank_m, stride_last_b, stride_last_k,
                      stride_out_b, stride_out_k, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, USE_PDL: tl.constexpr):
    """grid (B,): pool_after_ref, out[b, j] = bank[b, last[b, j]], or bank[b, j] where last[b, j] < 0 (empty)."""
    _after_predecessor(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    mask_k = offs_k < K
    mask = mask_k[:, None] & (offs_c < ds)[None, :]
    last = tl.load(last_ptr + b * stride_last_b + offs_k * stride_last_k, mask=mask_k, other=0)
    rows = tl.where(last >= 0, last, offs_k).to(tl.int64)
    s = tl.load(bank_ptr + b * stride_bank_b + rows[:, None] * stride_bank_m + offs_c[None, :], mask=mask)
    tl.store(out_ptr + b * stride_out_b + offs_k[:, None] * stride_out_k + offs_c[None, :], s, mask=mask)


def pool_after(bank, index_last):
    """pool_after_ref in one launch: the pool's summaries [B,K,ds] after a prefill."""
    Bsz, K = index_last.shape
    ds = bank.shape[-1]
    bank = bank if bank.stride(-1) == 1 else bank.contiguous()
    out = torch.empty(Bsz, K, ds, device=bank.device, dtype=bank.dtype)
    if Bsz and K:
        pool_after_kernel[(Bsz,)](bank, index_last, out, K, ds, bank.stride(0), bank.stride(1), index_last.stride(0),
                                  index_last.stride(1), out.stride(0), out.stride(1), BLOCK_K=triton.next_power_of_2(K),
                                  BLOCK_C=triton.next_power_of_2(ds), num_warps=4, **pdl_meta(out.device))
    return out


def pool_read(u, bank, index, w_q, w_k, w_v, heads: int, gain, residual=None):
    """Same signature and results as pool_read_ref, for any index: pool_attention on the projected keys and
    values (differentiable). The half-precision prefill reads through pool_mix_kernel instead, inside
    fused_memory_read, where the index is known to be a sweep's."""
    F = torch.nn.functional
    o = pool_attention(F.linear(u, w_q), F.linear(bank, w_k), F.linear(bank, w_v), index, heads)
    return gained_read(o, gain, residual)


def attention_blocks(S: int, dh: int, dv: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_Q, BLOCK_S, BLOCK_DH, BLOCK_V, num_warps): [BLOCK_Q, BLOCK_S] tiles of about 2048 values, fp32 dot
    operands under 32 KiB of shared memory (no opt-in above 48 KiB), every dot dimension >= 16. ptxas keeps
    these in registers on sm_90 (231 / 226 registers for S <= 64 / 256; larger value blocks spill)."""
    block_s = max(16, triton.next_power_of_2(max(S, 1)))
    block_v = max(16, min(32, triton.next_power_of_2(dv), 4096 // block_s))
    return max(16, 2048 // block_s), block_s, max(16, triton.next_power_of_2(dh)), block_v, 4


def _attention_forward(q, keys, values, index, heads):
    Bsz, T, ds = q.shape
    d, S = values.shape[-1], index.shape[-1]
    dh, dv = ds // heads, d // heads
    block_q, block_s, block_dh, block_v, num_warps = attention_blocks(S, dh, dv)
    n_vblocks = triton.cdiv(dv, block_v)
    q, keys, values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, keys, values))
    index = index.to(torch.int32).contiguous()
    o = torch.empty(Bsz, T, d, device=q.device, dtype=q.dtype)
    if T == 0:
        return o
    pool_attention_fwd_kernel[(Bsz, triton.cdiv(T, block_q), heads)](
        q, keys, values, index, o, T, S, dh, dv, n_vblocks, dh ** -0.5,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        index.stride(0), index.stride(1), o.stride(0), o.stride(1),
        BLOCK_Q=block_q, BLOCK_S=block_s, BLOCK_DH=block_dh, BLOCK_V=block_v, num_warps=num_warps)
    return o


class PoolAttentionFn(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: the reference math (pool_attention_ref) under autograd, recomputed
    chunk by chunk of queries so its [B, chunk, S, d] gathers stay under ATTN_BWD_BYTES."""

    @staticmethod
    def forward(ctx, q, keys, values, index, heads):
        ctx.save_for_backward(q, keys, values, index)
        ctx.heads = heads
        return _attention_forward(q, keys, values, index, heads)

    @staticmethod
    def backward(ctx, do):
        q, keys, values, index = ctx.saved_tensors
        Bsz, T, _ = q.shape
        S, d = index.shape[-1], values.shape[-1]
        chunk = max(1, ATTN_BWD_BYTES // max(1, Bsz * S * d * 4))
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(keys, dtype=torch.float32)
        dvals = torch.zeros_like(values, dtype=torch.float32)
        k_leaf, v_leaf = keys.detach().requires_grad_(), values.detach().requires_grad_()
        with torch.enable_grad():
            for t0 in range(0, T, chunk):
                q_leaf = q[:, t0:t0 + chunk].detach().requires_grad_()
                o = pool_attention_ref(q_leaf, k_leaf, v_leaf, index[:, t0:t0 + chunk], ctx.heads)
                gq, gk, gv = torch.autograd.grad(o, (q_leaf, k_leaf, v_leaf), do[:, t0:t0 + chunk])
                dq[:, t0:t0 + chunk] = gq
                dk += gk
                dvals += gv
        return dq, dk.to(keys.dtype), dvals.to(values.dtype), None, None


def pool_attention(q, keys, values, index, heads: int):
    """Same signature and results as pool_attention_ref; differentiable in q, keys and values."""
    if q.dim() != 3 or keys.dim() != 3 or values.dim() != 3 or index.dim() != 3:
        raise ValueError(f"pool_attention wants q [B,T,ds], keys [B,M,ds], values [B,M,d], index [B,T,S]; got "
                         f"{list(q.shape)}, {list(keys.shape)}, {list(values.shape)}, {list(index.shape)}")
    Bsz, T, ds = q.shape
    if keys.shape[0] != Bsz or values.shape[:2] != keys.shape[:2] or keys.shape[2] != ds or \
            index.shape[:2] != (Bsz, T):
        raise ValueError(f"pool_attention shapes disagree: q {list(q.shape)}, keys {list(keys.shape)}, values "
                         f"{list(values.shape)}, index {list(index.shape)}")
    if ds % heads or values.shape[2] % heads:
        raise ValueError(f"heads={heads} must divide ds={ds} and d={values.shape[2]}")
    if needs_grad(q, keys, values):
        return PoolAttentionFn.apply(q, keys, values, index, heads)
    return _attention_forward(q, keys, values, index, heads)

