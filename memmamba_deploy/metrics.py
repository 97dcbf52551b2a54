"""Error measures shared by self-checks, parity and tests."""
from __future__ import annotations

import torch


def rel_err(actual, expected) -> float:
    """max|actual - expected| / max|expected| (0 when both are all zeros)."""
    a, e = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {list(a.shape)} vs {list(e.shape)}")
    if a.numel() == 0:
        return 0.0
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff



def _take_slots(state, index: torch.Tensor):
    """`state` (a models.State) with pool slot k of each (layer, row) taken from slot index[..., k]."""
    pool = torch.take_along_dim(state.pool, index.to(state.pool.device)[..., None], dim=-2)
    prio = torch.take_along_dim(state.prio, index.to(state.prio.device), dim=-1)
    return type(state)(conv=state.conv, ssm=state.ssm, pool=pool, prio=prio)


def align_pool_slots(reference, got):
    """`got` with its pool entries moved into the slots where `reference` keeps the nearest entries (summary and
    priority), values untouched: always a permutation of got's slots. Two pools holding the same entries in other
    slots then compare equal slot by slot. Slot order does not matter to the reads (§4/§5 attend over a set), nor
    to an eviction while priorities differ (the least priority leaves, whatever its slot); on an exact tie the rule
    evicts the lowest slot, so entries with equal priorities and different summaries keep the reference's order
    only if got had it. A parallel prefill or half-precision rounding can put near-equal priorities in another order.
    Greedy matching, nearest pair first; pools that differ stay different."""
    if got.prio is None:
        return got
    rp, gp = reference.prio.float().to(got.prio.device), got.prio.float()
    scale = reference.pool.float().abs().amax().clamp_min(1e-12).to(got.pool.device)
    d = ((reference.pool.float().to(got.pool.device)[..., :, None, :] - got.pool.float()[..., None, :, :]).abs()
         .amax(-1) / scale)
    d = torch.maximum(d, (rp[..., :, None] - gp[..., None, :]).abs())            # [..., K ref, K got]
    d = torch.nan_to_num(d, nan=1e30, posinf=1e30).clamp_max(1e30)             # non-finite entries: far, not free
    K = d.shape[-1]
    index = torch.zeros(d.shape[:-1], dtype=torch.long, device=d.device)
    free = torch.ones(d.shape, dtype=torch.bool, device=d.device)              # pairs whose row and column are unused
    for _ in range(K):
        flat = torch.where(free, d, torch.inf).flatten(-2).argmin(-1)           # the nearest free pair
        i, j = flat // K, flat % K
        index.scatter_(-1, i[..., None], j[..., None])
        free.scatter_(-2, i[..., None, None].expand(*i.shape, 1, K), False)
        free.scatter_(-1, j[..., None, None].expand(*j.shape, K, 1), False)
    return _take_slots(got, index)
