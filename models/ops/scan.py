"""Selective-scan and causal-conv references (spec §6). Ground truth for every fast path.

Layouts are batch-time-channel: x, dt, z [B, T, Di]; B, C [B, T, N]; A [Di, N]; SSM state h [B, Di, N] (fp32);
conv window [B, Di, k-1] holding the last k-1 conv *inputs*, oldest first. Per spec §9 the recurrence runs in fp32
(exp(dt·A), softplus and the accumulation) whatever the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def padding(lengths, T: int):
    """[B, T] bool, True at the tokens past each row's length (rows of different lengths in one batch)."""
    return torch.arange(T, device=lengths.device)[None, :] >= lengths[:, None]


def padded_dt(dt, lengths, dt_softplus: bool):
    """dt [B,T,Di] with -inf past each row's length: δ = softplus(-inf) = 0 there, the recurrence's identity."""
    if not dt_softplus:
        raise ValueError("selective_scan: lengths needs dt_softplus (padding's δ is softplus(-inf) = 0)")
    return dt.masked_fill(padding(lengths.to(dt.device), dt.shape[1])[..., None], float("-inf"))


def at_row_ends(t, lengths):
    """t [B,T,...] at each row's last token, lengths[b] - 1 (column 0 for a row of length 0): [B,1,...]. A t of
    one column ([B,1,...]) is taken as already there."""
    if t.shape[1] == 1:
        return t
    end = (lengths.to(t.device) - 1).clamp(min=0).view(-1, 1, *([1] * (t.dim() - 2)))
    return t.gather(1, end.expand(-1, 1, *t.shape[2:]))


def causal_conv_ref(x, weight, bias, window, lengths=None):
    """Depthwise causal conv over time, then SiLU. x [B,T,Di], weight [Di,k], bias [Di] or None,
    window [B,Di,k-1] (the inputs before x). Returns (out [B,T,Di], new window [B,Di,k-1]).
    lengths [B] (int, 0..T): row b's inputs are x[b, :lengths[b]], the rest padding: its new window is the one
    after its own last input (out at padding is computed as any other column, and no real column reads it)."""
    k = weight.shape[1]
    xt = torch.cat([window.to(x.dtype), x.transpose(1, 2)], dim=2)  # [B, Di, k-1+T]
    out = F.conv1d(xt, weight.unsqueeze(1), bias, groups=weight.shape[0])
    if lengths is None:
        return F.silu(out).transpose(1, 2), xt[:, :, xt.shape[2] - (k - 1):]
    at = lengths.to(x.device)[:, None] + torch.arange(k - 1, device=x.device)   # xt's columns after each row's end
    return F.silu(out).transpose(1, 2), xt.gather(2, at[:, None, :].expand(-1, xt.shape[1], -1))


def causal_conv_step_ref(x, weight, bias, window):
    """One token of causal_conv_ref. x [B,Di]. Returns (out [B,Di], new window)."""
    xt = torch.cat([window.to(x.dtype), x.unsqueeze(2)], dim=2)  # [B, Di, k]
    out = (xt * weight).sum(-1)
    if bias is not None:
        out = out + bias
    return F.silu(out), xt[:, :, 1:]


def selective_state_step_ref(h, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=True):
    """One token of the selective SSM. h [B,Di,N] fp32; x, dt, z [B,Di]; B, C [B,N]; A [Di,N]; D [Di].
    Returns (y [B,Di] in x.dtype, new h)."""
    xf, dtf = x.float(), dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    dA = torch.exp(dtf.unsqueeze(-1) * A.float())                         # [B, Di, N]
    dBx = (dtf * xf).unsqueeze(-1) * B.float().unsqueeze(1)               # [B, Di, N]
    h = dA * h + dBx
    y = (h * C.float().unsqueeze(1)).sum(-1) + D.float() * xf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), h


def selective_scan_ref(x, dt, A, B, C, D, z=None, dt_bias=None, h0=None, dt_softplus=True, last_only=False,
                       lengths=None):
    """The selective scan over T tokens, run as the step recurrence (§8: the parallel form must equal it).
    Returns (y [B,T,Di], final state [B,Di,N] fp32); last_only: y of the last token only, [B,1,Di] (what a
    prompt's last layer gives when only the last logits are wanted: a kernel set may skip every other y), and z
    may then be the last token's alone, [B,1,Di] (the gate is read there only).
    lengths [B] (int, 0..T): row b's tokens are [0, lengths[b]), the rest padding, whose δ is 0 (softplus(-inf):
    the recurrence's identity), so h is each row's state after its own last token; last_only then reads y (and z
    [B,1,Di], or [B,T,Di] read there) at each row's last token (column 0 for a row of length 0)."""
    Bsz, T, Di = x.shape
    if lengths is not None:
        dt = padded_dt(dt, lengths, dt_softplus)
    ends = lengths is not None and last_only                # y read at each row's own last token
    if ends and z is not None:
        z = at_row_ends(z, lengths)
    h = torch.zeros(Bsz, Di, A.shape[1], device=x.device, dtype=torch.float32) if h0 is None else h0.float()
    ys = []
    for t in range(T):
        if z is None or (last_only and not ends and t < T - 1):
            zt = None
        else:                                  # last_only with lengths: every column gated as the row's last
            zt = z[:, -1] if last_only else z[:, t]
        y, h = selective_state_step_ref(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, zt, dt_bias, dt_softplus)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(Bsz, 0, Di)
    if ends and T:
        return at_row_ends(y, lengths), h
    return (y[:, -1:] if last_only else y), h
