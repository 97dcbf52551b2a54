"""Note-pool references (spec §3–§5, §8): insertion, the parallel sweep, and attention over pool slots.

Pool of one layer: summaries P [B, K, d_s] and priorities prio [B, K] (fp32; -1 marks an empty slot).
Thresholds are compared in fp32 everywhere (here, in ONNX graphs, in kernels) so every backend decides alike.
"""
from __future__ import annotations

import numpy as np
import torch


def fp32(v: float) -> float:
    """A threshold as the fp32 value every backend compares against."""
    return float(np.float32(v))


def cross_layer_bank(group, entries: int):
    """§5: the banks [B,M,ds] of a group's layers in one [B,len·M,ds], and their indices [B,T,K] in one
    [B,T,len·K] pointing into it (layer j's entries shifted by j·M, -1 kept). group: (bank, index) per layer,
    each bank `entries` long."""
    banks = torch.cat([b for b, _ in group], 1)
    indices = torch.cat([torch.where(i >= 0, i + j * entries, i) for j, (_, i) in enumerate(group)], 2)
    return banks, indices


def pool_after_ref(bank, index_last):
    """The pool's summaries [B,K,ds] after a prefill: slot j holds bank row index_last[:, j] (the sweep's last
    index row), an empty slot (-1) keeps its initial content, bank row j."""
    k = torch.arange(index_last.shape[1], device=index_last.device)
    rows = torch.where(index_last >= 0, index_last.long(), k)
    return bank.gather(1, rows[..., None].expand(-1, -1, bank.shape[-1]))


def pool_insert_ref(pool, prio, score, summary, tau1):
    """§3 priority replacement for one token. pool [B,K,ds], prio [B,K], score [B] fp32, summary [B,ds].
    If score > tau1: j = argmin prio (lowest index on ties); if score > prio[j], slot j takes the token.
    Returns new (pool, prio); the inputs are not modified."""
    j = torch.argmin(prio, dim=1)                                    # first minimum on ties
    pj = prio.gather(1, j[:, None])[:, 0]
    take = (score > fp32(tau1)) & (score > pj)                       # [B]
    hit = take[:, None] & (torch.arange(prio.shape[1], device=prio.device)[None] == j[:, None])  # [B, K]
    new_prio = torch.where(hit, score[:, None].to(prio.dtype), prio)
    new_pool = torch.where(hit[:, :, None], summary[:, None, :].to(pool.dtype), pool)
    return new_pool, new_prio


def pool_sweep_ref(scores, prio0, tau1):
    """§8: replay §3 over T tokens without the summaries, to learn which token sits in which slot.

    scores [B,T] fp32; prio0 [B,K] (the pool's priorities before token 0).
    Returns (index [B,T+1,K] int32, prio [B,K] fp32). Row t < T describes the pool *before* token t, row T the
    pool after the last token: index < K names an initial slot, K + i names token i, -1 an empty slot.
    `prio` is the priorities after the last token. Runs on the CPU in numpy: exact comparisons, O(T·K) per row.

    Why a slot replay and not "top-K by score, earlier wins ties" (the consequence §3 states): the two differ when
    scores tie exactly, e.g. slots {0: token 1 @0.6, 1: token 2 @0.6} and token 3 @0.7 evicts slot 0 (lowest index),
    keeping token 2, where top-K would keep token 1. Replaying the rule is what `step` does, so every backend
    follows the replay.
    """
    a = scores.detach().to("cpu", torch.float32).numpy()
    p = prio0.detach().to("cpu", torch.float32).numpy().copy()
    Bsz, T = a.shape
    K = p.shape[1]
    tau = np.float32(tau1)
    rows = np.arange(Bsz)
    slot = np.where(p >= 0, np.arange(K)[None], -1).astype(np.int32)
    index = np.empty((Bsz, T + 1, K), dtype=np.int32)
    for t in range(T):
        index[:, t] = slot
        j = np.argmin(p, axis=1)                                     # first minimum on ties, as torch.argmin
        at = a[:, t]
        take = (at > tau) & (at > p[rows, j])
        p[rows[take], j[take]] = at[take]
        slot[rows[take], j[take]] = K + t
    index[:, T] = slot
    dev = scores.device
    return torch.from_numpy(index).to(dev), torch.from_numpy(p).to(dev)


def pool_attention_ref(q, keys, values, index, heads: int):
    """§4/§5 sparse attention: each query reads the S entries of a bank that `index` names.

    q [B,T,ds]; keys [B,M,ds] and values [B,M,d] (the bank through W_k, W_v); index [B,T,S] int, -1 = no entry.
    Head h uses q/k columns h·ds/H.. and v columns h·d/H..; scale 1/sqrt(ds/H); softmax in fp32 over the named
    entries; a query with none gets 0. Returns o [B,T,d] in q.dtype.
    """
    Bsz, T, ds = q.shape
    d, S = values.shape[-1], index.shape[-1]
    valid = index >= 0
    rows = torch.arange(Bsz, device=q.device)[:, None, None]
    idx = index.long().clamp(min=0)
    k = keys[rows, idx].float().reshape(Bsz, T, S, heads, ds // heads)
    v = values[rows, idx].float().reshape(Bsz, T, S, heads, d // heads)
    qh = q.float().reshape(Bsz, T, heads, ds // heads)
    logits = torch.einsum("bthc,btshc->bths", qh, k) * (ds // heads) ** -0.5
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))      # no valid entry: every e is exp(-inf) = 0
    e = torch.exp(logits - m)
    den = e.sum(-1, keepdim=True)
    w = e / torch.where(den > 0, den, torch.ones_like(den))
    o = torch.einsum("bths,btshc->bthc", w, v)
    return o.reshape(Bsz, T, d).to(q.dtype)


def pool_read_ref(u, bank, index, w_q, w_k, w_v, heads: int, gain, residual=None):
    """§4/§5 read of a layer: r = gain · pool_attention_ref(W_q u, W_k bank, W_v bank) (no biases), the gain per
    token in u's dtype (α, times the §4 trigger's 0/1). u [B,T,d]; bank [B,M,ds] summaries; index [B,T,S];
    w_q [ds,d], w_k [ds,ds], w_v [d,ds]; gain [B,T] fp32. Returns r [B,T,d] in u's dtype, or residual + r
    when residual [B,T,d] is given (the layer's ũ = u + r_tok + r_cross; a kernel set may fuse the add)."""
    F = torch.nn.functional
    o = pool_attention_ref(F.linear(u, w_q), F.linear(bank, w_k), F.linear(bank, w_v), index, heads)
    return gained_read(o, gain, residual)


def gained_read(o, gain, residual=None):
    """The end of a read: r = gain · o in o's dtype (gain [B,T] fp32), or residual + r, rounded as the reference
    rounds (kernel sets that attend another way finish through this too)."""
    r = o * gain.to(o.dtype).unsqueeze(-1)
    return r if residual is None else residual + r
