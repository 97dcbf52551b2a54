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
