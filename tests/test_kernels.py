"""The Triton kernels (issue 3) against their PyTorch references, on the CPU in Triton's interpreter.

Fresh random inputs in every test, fp32 tolerance 1e-4 (metrics.rel_err), every kernel output poisoned (NaN, or -7
for indices) before the kernel runs so an unwritten element fails.

Triton is either interpreted or compiled in a process, chosen at its first import (TRITON_INTERPRET), and other
test files compile kernels ahead of time, so this file never switches the process: in a compiled process (the
usual `pytest`) the kernel tests are skipped here and test_kernels_in_an_interpreted_process runs this file again
in a child process with TRITON_INTERPRET=1, failing with the child's report if any test fails there. Run it
interpreted directly with `TRITON_INTERPRET=1 python -m pytest tests/test_kernels.py`. About 1 minute on 2 cores.
"""
import contextlib
import copy
import os
import pickle
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from conftest import interpreted, make_model, run_interpreted
from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models import State
from memmamba_deploy.models.ops import TORCH_OPS, no_fused_memory_read
from memmamba_deploy.models.ops import triton as kt
from memmamba_deploy.models.ops.norm import residual_norm_ref
from memmamba_deploy.models.ops.pool import (cross_layer_bank, pool_after_ref, pool_attention_ref, pool_read_ref,
                                              pool_sweep_ref)
from memmamba_deploy.models.ops.scan import causal_conv_ref, padding, selective_scan_ref, selective_state_step_ref
from memmamba_deploy.models.ops.triton.scan import _softplus

TOL = 1e-4


@contextlib.contextmanager
def poisoned(value=float("nan")):
    """Every tensor the kernels' wrappers allocate with torch.empty/empty_like starts as NaN, or `value` (-7 for
    integers). NaN fails any comparison, so kernels whose unwritten scratch feeds comparisons are also run with a
    large value."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(value)
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    torch.empty = lambda *a, **k: fill(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: fill(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def scan_inputs(g, Bsz, T, Di, N, z=True, bias=True, h0=True, dt_scale=0.5):
    return dict(x=torch.randn(Bsz, T, Di, generator=g), dt=torch.randn(Bsz, T, Di, generator=g) * dt_scale - 1.0,
                A=-torch.rand(Di, N, generator=g) * 3 - 0.05, B=torch.randn(Bsz, T, N, generator=g),
                C=torch.randn(Bsz, T, N, generator=g), D=torch.randn(Di, generator=g),
                z=torch.randn(Bsz, T, Di, generator=g) if z else None,
                dt_bias=torch.randn(Di, generator=g) * 0.3 if bias else None,
                h0=torch.randn(Bsz, Di, N, generator=g) if h0 else None)


# ---- selective scan ------------------------------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("chunk_len", [4096, 16, None], ids=["one-pass", "three-pass", "planned"])
@pytest.mark.parametrize("variant", [dict(), dict(z=False, bias=False, h0=False), dict(softplus=False)],
                         ids=["full", "bare", "no-softplus"])
def test_selective_scan_forward(chunk_len, variant, rng):
    variant = dict(variant)
    softplus = variant.pop("softplus", True)
    a = scan_inputs(rng, 2, 37, 24, 6, **variant)                  # T, Di, N off the block sizes; last chunk short
    if not softplus:
        a["dt"] = a["dt"].abs() * 0.1
    y_ref, h_ref = selective_scan_ref(**a, dt_softplus=softplus)
    with poisoned():
        y, h = kt.scan.scan_forward(**a, dt_softplus=softplus, chunk_len=chunk_len)
    assert rel_err(y, y_ref) <= TOL and rel_err(h, h_ref) <= TOL
    # the last token's y only (a prompt's last layer): from the final state, without the pass that writes y
    with poisoned():
        y_last, h_last = kt.scan.scan_forward(**a, dt_softplus=softplus, chunk_len=chunk_len, last_only=True)
    assert y_last.shape == (2, 1, 24) and rel_err(y_last, y_ref[:, -1:]) <= TOL and rel_err(h_last, h_ref) <= TOL
    if a["z"] is not None:                       # ... whose gate may be the last token's alone, in every kernel set
        one = dict(a, z=a["z"][:, -1:])
        assert torch.equal(selective_scan_ref(**one, dt_softplus=softplus, last_only=True)[0],
                           selective_scan_ref(**a, dt_softplus=softplus, last_only=True)[0])
        with poisoned():
            y_one, _ = kt.TRITON_OPS.selective_scan(**one, dt_softplus=softplus, last_only=True)
        assert rel_err(y_one, y_ref[:, -1:]) <= TOL
        x = one["x"].clone().requires_grad_()                   # and under autograd
        y_grad, _ = kt.TRITON_OPS.selective_scan(**dict(one, x=x), dt_softplus=softplus, last_only=True)
        y_grad.sum().backward()
        assert rel_err(y_grad.detach(), y_ref[:, -1:]) <= TOL and x.grad.abs().sum() > 0
        with pytest.raises(ValueError, match="z has shape"):    # a one-row gate is for last_only alone
            kt.TRITON_OPS.selective_scan(**one, dt_softplus=softplus)


@triton.jit
def _softplus_probe_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _softplus(tl.load(v_ptr + offs, mask=offs < n)), mask=offs < n)


def softplus_rel_err(device) -> float:
    """Largest relative error of the kernels' softplus against F.softplus in fp64 over v in [-40, 40], densely
    around the switch to log1p's series (u = 1/64, v = -ln 64) and around 0."""
    v = torch.cat([torch.linspace(-40, 40, 200_001), -4.1588830833596715 + torch.linspace(-1e-3, 1e-3, 2001),
                   torch.linspace(-1e-3, 1e-3, 2001)]).to(device)
    out = torch.full_like(v, float("nan"))
    _softplus_probe_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), BLOCK=1024)
    ref = torch.nn.functional.softplus(v.double())
    return ((out.double() - ref).abs() / ref).max().item()


@interpreted
def test_softplus():
    # the interpreter runs lg2.approx as numpy's log2 (the GPU test bounds the approximation): this checks the
    # formula and the series branch; what is left is 1 + u's rounding just above the switch (4e-6)
    assert softplus_rel_err("cpu") <= 5e-6


@interpreted
@pytest.mark.parametrize("with_y", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_residual_norm(with_y, dtype, rng):
    h = torch.randn(2, 7, 48, generator=rng)
    y = torch.randn(2, 7, 48, generator=rng).to(dtype) if with_y else None
    w = (1 + 0.1 * torch.randn(48, generator=rng)).to(dtype)
    h_ref, u_ref = residual_norm_ref(h, y, w, 1e-5)
    with poisoned():
        h_new, u = kt.TRITON_OPS.residual_norm(h, y, w, 1e-5)
    assert u.dtype == dtype and rel_err(h_new, h_ref) <= TOL
    assert rel_err(u, u_ref) <= (TOL if dtype == torch.float32 else 1e-3)


@interpreted
@pytest.mark.parametrize("chunk_len", [4096, 16, None], ids=["one-pass", "three-pass", "planned"])
def test_selective_scan_of_rows_of_different_lengths(chunk_len, rng):
    # lengths: each row's y and state are those of its own tokens alone (padding's δ = 0, in the chunk-state pass,
    # whose δ the y pass reads); last_only reads each row's last token, gated by that token's z
    a = scan_inputs(rng, 5, 37, 24, 6)
    lengths = torch.tensor([37, 20, 0, 1, 16])      # whole, mid-chunk (chunks of 16), none, one token, a chunk's end
    y_ref, h_ref = selective_scan_ref(**a, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):                # the reference's lengths: each row alone
        row = {k: a[k][b:b + 1, :n] for k in ("x", "dt", "B", "C", "z")}
        alone_y, alone_h = selective_scan_ref(**row, A=a["A"], D=a["D"], dt_bias=a["dt_bias"], h0=a["h0"][b:b + 1])
        assert rel_err(y_ref[b:b + 1, :n], alone_y) <= 1e-6 and rel_err(h_ref[b:b + 1], alone_h) <= 1e-6, b
    assert torch.equal(h_ref[2], a["h0"][2])
    with poisoned():
        y, h = kt.scan.scan_forward(**a, chunk_len=chunk_len, lengths=lengths)
    assert rel_err(y, y_ref) <= TOL and rel_err(h, h_ref) <= TOL
    assert rel_err(h[1], selective_scan_ref(**a)[1][1]) > 1e-2    # the padding would have moved the state
    ends = (lengths - 1).clamp(min=0)
    z_ends = a["z"].gather(1, ends[:, None, None].expand(-1, 1, 24))
    y_last_ref, _ = selective_scan_ref(**dict(a, z=z_ends), last_only=True, lengths=lengths)
    assert rel_err(y_last_ref, y_ref.gather(1, ends[:, None, None].expand(-1, 1, 24))) <= 1e-6
    with poisoned():
        y_last, h_last = kt.TRITON_OPS.selective_scan(**dict(a, z=z_ends), last_only=True, lengths=lengths)
    assert y_last.shape == (5, 1, 24) and rel_err(y_last, y_last_ref) <= TOL and rel_err(h_last, h_ref) <= TOL
    # a whole-length gate is read at the row ends too; int32 and strided lengths are taken as they are
    for z, n in ((a["z"], lengths), (z_ends, torch.stack([lengths.int(), lengths.int()], 1)[:, 0])):
        with poisoned():
            y_z, _ = kt.TRITON_OPS.selective_scan(**dict(a, z=z), last_only=True, lengths=n)
        assert rel_err(y_z, y_last_ref) <= TOL
        assert rel_err(selective_scan_ref(**dict(a, z=z), last_only=True, lengths=n)[0], y_last_ref) <= 1e-6
    # under autograd: the Triton scan (padding's dt -inf), the reference's values and finite gradients
    x = a["x"].clone().requires_grad_()
    y_g, h_g = kt.TRITON_OPS.selective_scan(**dict(a, x=x), lengths=lengths)
    assert rel_err(y_g.detach(), y_ref) <= TOL and rel_err(h_g.detach(), h_ref) <= TOL
    y_gl, _ = kt.TRITON_OPS.selective_scan(**dict(a, x=x, z=z_ends), last_only=True, lengths=lengths)
    assert rel_err(y_gl.detach(), y_last_ref) <= TOL
    (h_g.sum() + y_gl.sum()).backward()                  # the state and each row's last y: padding has no say
    pad = padding(lengths, 37) & (lengths > 0)[:, None]         # (a row of length 0 reads its y at column 0)
    assert torch.isfinite(x.grad).all() and not x.grad.masked_select(pad[..., None]).any()
    assert x.grad[0].abs().sum() > 0
    for bad in (lengths[:3], lengths.float(), [37, 20, 0, 1, 16]):
        with pytest.raises(ValueError, match="lengths must be a \\[5\\] integer tensor"):
            kt.scan.scan_forward(**a, lengths=bad)


@interpreted
@pytest.mark.parametrize("T", [150, 37, 2], ids=["chunks", "long", "shorter-than-window"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [4, 3, 2, 5, 1], ids=["width4", "width3", "width2", "width5-reference",
                                                   "width1-reference"])
def test_causal_conv(T, bias, k, rng):
    Bsz, Di = 2, 40                                                   # 150 tokens: chunks of CONV_CHUNK, many programs
    xz = torch.randn(Bsz, T, 2 * Di, generator=rng)                   # x a strided view, as in_proj's first half
    x = xz[..., :Di]
    w, b = torch.randn(Di, k, generator=rng), torch.randn(Di, generator=rng) if bias else None
    window = torch.randn(Bsz, Di, k - 1, generator=rng)
    xz[:, -1, :5] = -0.0                                              # the window keeps signed zeros
    window[:, 5:9] = -0.0
    out_ref, win_ref = causal_conv_ref(x, w, b, window)
    with poisoned():
        out, win = kt.TRITON_OPS.causal_conv(x, w, b, window)
    assert rel_err(out, out_ref) <= TOL and torch.equal(win, win_ref)
    assert torch.equal(torch.signbit(win), torch.signbit(win_ref))


@interpreted
@pytest.mark.parametrize("k", [4, 2, 5], ids=["width4", "width2", "width5-reference"])
def test_causal_conv_of_rows_of_different_lengths(k, rng):
    # lengths: each row's window is the one after its own inputs (from the old window where it has fewer than k-1)
    Bsz, T, Di = 5, 37, 40
    x, w, b = torch.randn(Bsz, T, Di, generator=rng), torch.randn(Di, k, generator=rng), torch.randn(Di, generator=rng)
    window = torch.randn(Bsz, Di, k - 1, generator=rng)
    lengths = torch.tensor([37, 20, 0, 1, 2])
    out_ref, win_ref = causal_conv_ref(x, w, b, window, lengths)
    assert torch.equal(out_ref, causal_conv_ref(x, w, b, window)[0])
    for r, n in enumerate(lengths.tolist()):
        if n >= k:                                          # conv1d needs an input as long as its kernel
            assert torch.equal(win_ref[r:r + 1], causal_conv_ref(x[r:r + 1, :n], w, b, window[r:r + 1])[1]), r
        else:
            want = torch.cat([window[r], x[r, :n].t()], 1)[:, n:]
            assert torch.equal(win_ref[r], want), r
    with poisoned():
        out, win = kt.TRITON_OPS.causal_conv(x, w, b, window, lengths=lengths)
    assert rel_err(out, out_ref) <= TOL and torch.equal(win, win_ref)
    assert not torch.equal(win, causal_conv_ref(x, w, b, window)[1])


@interpreted
def test_causal_conv_of_no_tokens(rng):
    # (the reference's conv1d refuses an input shorter than its kernel) no output, the window unchanged, a copy
    x, w, window = torch.randn(2, 0, 40), torch.randn(40, 4, generator=rng), torch.randn(2, 40, 3, generator=rng)
    out, win = kt.TRITON_OPS.causal_conv(x, w, None, window)
    assert out.shape == (2, 0, 40) and torch.equal(win, window) and win.data_ptr() != window.data_ptr()


@interpreted
def test_selective_scan_chunk_chain_carries_across_tiles(rng):
    # 150 chunks: the chain's associative scan takes PREFIX_BLOCK_C (32) of them at a time and carries the state
    a = scan_inputs(rng, 2, 300, 8, 4)
    assert triton.cdiv(300, 2) + 1 > kt.scan.PREFIX_BLOCK_C
    y_ref, h_ref = selective_scan_ref(**a)
    with poisoned():
        y, h = kt.scan.scan_forward(**a, chunk_len=2)
    assert rel_err(y, y_ref) <= TOL and rel_err(h, h_ref) <= TOL


@interpreted
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "no-softplus"])
def test_selective_scan_three_pass_delta_across_channel_blocks(softplus, rng):
    # pass 1 keeps δ for pass 3: Di 130 is two channel blocks of 128, the second with 2 live channels; batch 3 (δ's
    # batch offset); chunk_len 7 is odd (the unrolled loop steps past a chunk's end), the last chunk 3 tokens
    a = scan_inputs(rng, 3, 24, 130, 5)
    if not softplus:
        a["dt"], a["dt_bias"] = a["dt"].abs() * 0.1, a["dt_bias"].abs()
    assert kt.scan.seq_blocks(5, 130)[0] == 128
    y_ref, h_ref = selective_scan_ref(**a, dt_softplus=softplus)
    for poison in (float("nan"), 1e30):
        with poisoned(poison):
            y, h = kt.scan.scan_forward(**a, dt_softplus=softplus, chunk_len=7)
        assert rel_err(y, y_ref) <= TOL and rel_err(h, h_ref) <= TOL, poison


@interpreted
def test_selective_scan_long_sequence_does_not_overflow(rng):
    # δ·A from about -1e-4 to -60 per token and many chunks: decays underflow to 0, nothing overflows
    a = scan_inputs(rng, 1, 600, 8, 4, dt_scale=4.0)
    y_ref, h_ref = selective_scan_ref(**a)
    with poisoned():
        y, h = kt.scan.scan_forward(**a, chunk_len=128)
    assert torch.isfinite(y).all() and rel_err(y, y_ref) <= TOL and rel_err(h, h_ref) <= TOL


@interpreted
@pytest.mark.parametrize("variant", [dict(), dict(z=False, bias=False, h0=False)], ids=["full", "bare"])
def test_selective_scan_backward_matches_autograd_through_the_reference(variant, rng):
    a = scan_inputs(rng, 2, 37, 24, 6, **variant)
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in a.items()}
    y_ref, h_ref = selective_scan_ref(**leaves)
    dy, dh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    torch.autograd.backward([y_ref, h_ref], [dy, dh])
    mine = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in a.items()}
    with poisoned():
        y, h = kt.TRITON_OPS.selective_scan(**mine)                 # the autograd Function
        torch.autograd.backward([y, h], [dy, dh])
    for k, v in mine.items():
        if v is not None:
            assert rel_err(v.grad, leaves[k].grad) <= TOL, k


@interpreted
@pytest.mark.parametrize("with_z", [True, False])
def test_selective_state_step(with_z, rng):
    a = scan_inputs(rng, 3, 1, 40, 5, z=with_z)
    one = {k: (v[:, 0] if k in ("x", "dt", "B", "C", "z") and v is not None else v) for k, v in a.items()}
    h = one.pop("h0")
    before = h.clone()
    y_ref, h_ref = selective_state_step_ref(h, **one)
    with poisoned():
        y, h_new = kt.TRITON_OPS.selective_state_step(h, **one)
    assert rel_err(y, y_ref) <= TOL and rel_err(h_new, h_ref) <= TOL
    assert torch.equal(h, before)


# ---- note pool -----------------------------------------------------------------------------------------------------
def entry_ends_ref(index, rows):
    """[B, rows]: the last row t of index [B,T,S] holding each bank row, -1 where none does (torch)."""
    B, T, _ = index.shape
    t = torch.arange(T).view(1, T, 1).expand_as(index)
    return torch.full((B, rows + 1), -1).scatter_reduce(1, torch.where(index >= 0, index, rows).flatten(1).long(),
                                                        t.flatten(1), "amax")[:, :-1].int()


def assert_sweep_replays_the_reference(a, prio0):
    """The kernel sweep's index and priorities equal pool_sweep_ref's, with its scratch poisoned with NaN and with
    1e30 (NaN fails every comparison, so unwritten scratch read by one would go unseen), and the entry ends it
    finds on the way are those of its index. Returns the index."""
    index_ref, prio_ref = pool_sweep_ref(a, prio0, 0.5)
    for poison in (float("nan"), 1e30):
        with poisoned(poison):
            index, prio, ends = kt.pool.pool_sweep_ends(a, prio0, 0.5)
        assert torch.equal(index, index_ref) and torch.equal(prio, prio_ref), poison
        assert torch.equal(ends, entry_ends_ref(index_ref[:, :-1], a.shape[1] + prio0.shape[1])), poison
        with poisoned(poison):
            assert all(torch.equal(x, y) for x, y in zip(kt.TRITON_OPS.pool_sweep(a, prio0, 0.5), (index, prio)))
    return index_ref


@interpreted
@pytest.mark.parametrize("scores", ["ties", "uniform", "rising"])
def test_pool_sweep_replays_the_reference_exactly(scores, rng, monkeypatch):
    # segments of 128 tokens counted 32 at a time: 700 tokens span six segments and their top lists
    monkeypatch.setattr(kt.pool, "SWEEP_SEG", 128)
    monkeypatch.setattr(kt.pool, "SWEEP_COUNT_S", 32)
    B, T, K = 3, 700, 5                                             # K not a power of two
    if scores == "ties":                                            # ties with each other, tau1 and the initial slots
        levels = torch.tensor([0.2, 0.5, 0.55, 0.6, 0.6, 0.65, 0.7, 0.9])
        a = levels[torch.randint(0, len(levels), (B, T), generator=rng)]
    elif scores == "rising":                                        # every token above tau1 enters
        a = torch.linspace(0.3, 1.0, T).repeat(B, 1)
    else:
        a = torch.rand(B, T, generator=rng)
    prio0 = torch.tensor([[-1.0, 0.65, -1.0, 0.55, 0.8], [-1.0] * 5, [0.95, 0.9, 0.99, 0.97, 0.91]])
    index_ref = assert_sweep_replays_the_reference(a, prio0)
    assert (index_ref[:2, -1] >= K).any()                             # tokens did enter (and, row 2, none could)
    if scores == "uniform":
        assert (index_ref[:2, -1] >= K + 128).any()                    # tokens of later segments entered


@interpreted
def test_pool_sweep_with_more_slots_than_a_segment(rng, monkeypatch):
    # K = 40 slots (a top list of 64) with 32-token segments: a segment must grow to hold its top list
    monkeypatch.setattr(kt.pool, "SWEEP_SEG", 32)
    a, prio0 = torch.rand(2, 300, generator=rng), torch.full((2, 40), -1.0)
    prio0[1, ::3] = 0.9
    assert_sweep_replays_the_reference(a, prio0)


@interpreted
def test_pool_sweep_with_priorities_too_wide_to_pack(rng, monkeypatch):
    # the replay's argmin packs each priority with its slot in an int32 where the priorities span under 2^25
    # floats; rows 0 and 1 do not (a held slot at 1e-30, one at -2 below the empty slots' -1) and take the
    # two-minimum argmin, row 2 packs: the same results either way, ties included (scores on a coarse grid)
    monkeypatch.setattr(kt.pool, "SWEEP_SEG", 128)
    a = torch.randint(0, 40, (3, 400), generator=rng) / 40.0
    prio0 = torch.tensor([[1e-30, 0.7, -1.0, 0.6, 0.7], [-2.0, -1.0, 0.9, 0.55, -1.0], [-1.0, 0.8, -1.0, 0.525, 0.8]])
    index_ref = assert_sweep_replays_the_reference(a, prio0)
    assert (index_ref[:, -1] >= prio0.shape[1]).all()                   # tokens entered every row


@interpreted
@pytest.mark.parametrize("case", ["none", "one", "three", "entrant-ties-a-slot"])
def test_pool_sweep_of_a_few_tokens(case):
    # fewer events than a replay step; and an entrant (0.6 in slot 0) tying a held slot (0.6 in slot 1): the
    # next entrant must evict slot 0, the lower index, not the older entry
    a, prio0 = torch.tensor([[0.9, 0.4, 0.7], [0.6, 0.8, 0.95]]), torch.tensor([[-1.0, 0.8], [0.7, 0.85]])
    a = {"none": a[:, :0], "one": a[:, :1], "three": a, "entrant-ties-a-slot": torch.tensor([[0.6, 0.7]])}[case]
    if case == "entrant-ties-a-slot":
        prio0 = torch.tensor([[0.55, 0.6, 0.9]])
    index_ref, prio_ref = pool_sweep_ref(a, prio0, 0.5)
    with poisoned():
        index, prio, ends = kt.pool.pool_sweep_ends(a, prio0, 0.5)
    assert torch.equal(index, index_ref) and torch.equal(prio, prio_ref)
    assert torch.equal(ends, entry_ends_ref(index_ref[:, :-1], a.shape[1] + prio0.shape[1]))


def sweep_like_index(g, B, T, M, S):
    """Rows that change one slot at a time, as a sweep's do, with empty slots."""
    index = torch.randint(-1, M, (B, 1, S), generator=g, dtype=torch.int32).repeat(1, T, 1)
    for t in range(1, T):
        if torch.rand(1, generator=g) < 0.3:
            index[:, t:, int(torch.randint(0, S, (1,), generator=g))] = int(torch.randint(-1, M, (1,), generator=g))
    return index


@interpreted
@pytest.mark.parametrize("pattern", ["sweep-like", "random"])
def test_pool_attention_forward_and_backward(pattern, rng):
    B, T, M, S, ds, d, H = 2, 150, 30, 12, 12, 18, 3                 # 150 queries: two blocks of 128, one short
    q, keys, values = (torch.randn(B, T, ds, generator=rng), torch.randn(B, M, ds, generator=rng),
                       torch.randn(B, M, d, generator=rng))
    index = sweep_like_index(rng, B, T, M, S) if pattern == "sweep-like" else \
        torch.randint(-1, M, (B, T, S), generator=rng, dtype=torch.int32)
    index[0, 3] = -1                                                # queries that read nothing get 0
    index[1, 5] = -1
    leaves = [t.clone().requires_grad_() for t in (q, keys, values)]
    ref = pool_attention_ref(*leaves, index, H)
    do = torch.randn_like(ref)
    ref.backward(do)
    mine = [t.clone().requires_grad_() for t in (q, keys, values)]
    with poisoned():
        o = kt.TRITON_OPS.pool_attention(*mine, index, H)
        o.backward(do)
    assert rel_err(o, ref) <= TOL
    assert torch.equal(o[0, 3], torch.zeros(d)) and torch.equal(o[1, 5], torch.zeros(d))
    for a, b in zip(mine, leaves):
        assert rel_err(a.grad, b.grad) <= TOL


@interpreted
@pytest.mark.parametrize("pattern", ["sweep-like", "random"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_pool_read_matches_the_reference(pattern, dtype, rng):
    # bf16 runs on the GPU only: Triton 3.6's interpreter computes bf16 tl.dot wrongly
    B, T, M, S, ds, d, H = 2, 150, 30, 12, 12, 18, 3                 # 150 queries: two blocks of 128, one short
    u, bank = torch.randn(B, T, d, generator=rng).to(dtype), torch.randn(B, M, ds, generator=rng).to(dtype)
    w = [(torch.randn(*shape, generator=rng) * shape[1] ** -0.5).to(dtype) for shape in ((ds, d), (ds, ds), (d, ds))]
    index = sweep_like_index(rng, B, T, M, S) if pattern == "sweep-like" else \
        torch.randint(-1, M, (B, T, S), generator=rng, dtype=torch.int32)
    index[0, 3] = -1                                                # queries that read nothing get 0
    gain = 0.1 * (torch.rand(B, T, generator=rng) > 0.3).float()     # α where the trigger fires, else 0
    gain[0, 3] = 0.1
    ref = pool_read_ref(u.float(), bank.float(), index, *(x.float() for x in w), H, gain)   # same rounded inputs
    with poisoned(), torch.no_grad():
        o = kt.TRITON_OPS.pool_read(u, bank, index, *w, H, gain)
    assert o.dtype == dtype and rel_err(o, ref) <= (TOL if dtype == torch.float32 else 1e-2)
    assert torch.equal(o[0, 3], torch.zeros(d, dtype=dtype))                        # reads nothing
    assert not o[gain == 0].any()                                                   # the trigger did not fire
    residual = torch.randn(B, T, d, generator=rng).to(dtype)
    with poisoned(), torch.no_grad():
        o = kt.TRITON_OPS.pool_read(u, bank, index, *w, H, gain, residual)         # ũ = u + r in one op
    assert o.dtype == dtype and rel_err(o, residual.float() + ref) <= (TOL if dtype == torch.float32 else 1e-2)


@interpreted
def test_pool_after(rng):
    B, K, T, ds = 3, 6, 20, 5
    bank = torch.randn(B, K + T, ds, generator=rng).half()
    last = torch.randint(-1, K + T, (B, K), generator=rng, dtype=torch.int32)
    last[0] = -1                                                    # an empty pool keeps its initial slots
    with poisoned():
        pool = kt.pool.pool_after(bank, last)
    assert torch.equal(pool, pool_after_ref(bank, last))


def pool_mix_ref(qk, bank, index, gain, H):
    # pool_mix's m through pool_attention_ref: every head's keys and values are the summaries themselves, and
    # the scale is that of the heads' own width ds / H
    wide = bank.float().repeat(1, 1, H)
    return pool_attention_ref(qk.float() * H ** 0.5, wide, wide, index, H) * gain[..., None]


@interpreted
@pytest.mark.parametrize("layers, K, T, scores, H, ds", [(1, 6, 150, "random", 2, 16), (3, 6, 150, "random", 3, 24),
                                                         (4, 50, 150, "random", 4, 16), (1, 1, 130, "rising", 1, 16),
                                                         (2, 6, 70, "random", 12, 48)],
                         ids=["token-read", "three-layer-read", "wide", "every-token-one-slot", "head-groups"])
def test_pool_mix_on_sweep_indices(layers, K, T, scores, H, ds, rng):
    # pool_mix reads the block's first index row and its own tokens, never the other rows: on real sweeps it
    # must equal the reference, which gathers every row's entries. Random rising scores: tokens enter all
    # along, a slot changes twice inside a block, ties on 0.01 steps, held slots in row 0; "wide" is the 130m
    # preset's §5 read (S = 200). One slot and strictly rising scores: every token enters and is evicted by the
    # next, and the last block (tokens 128, 129) reads its first token only in the sequence's last row. A
    # program's rows are (query, head) pairs: three heads leave a fourth of its rows (and of its columns) masked;
    # twelve take three programs of four heads a block.
    B = 2
    group = []
    for j in range(layers):
        a = (0.45 + 0.55 * torch.rand(B, T, generator=rng) * torch.linspace(0.4, 1.0, T)).mul(100).round().div(100)
        if scores == "rising":
            a = torch.linspace(0.51, 0.99, T).repeat(B, 1)
        prio0 = torch.full((B, K), -1.0)
        prio0[0, 1::3] = 0.52 + 0.3 * torch.rand(len(range(1, K, 3)), generator=rng)   # held slots in row 0
        index, _ = pool_sweep_ref(a, prio0, 0.5)
        group.append((torch.randn(B, K + T, ds, generator=rng).half(), index[:, :T].int()))
    banks, indices = [bank for bank, _ in group], [index for _, index in group]     # pool_mix reads them in place
    bank, index = cross_layer_bank(group, K + T) if layers > 1 else group[0]       # the reference's one joined pool
    block_q = kt.pool.mix_blocks(K, ds, H)[0]
    first_rows = index[:, torch.arange(T) // block_q * block_q]
    twice = [(index[b, t0:t0 + block_q, s].unique().numel() > 2) for b in range(B) for t0 in range(0, T, block_q)
             for s in range(index.shape[-1])]
    assert (index >= K).any() and not torch.equal(index, first_rows) and any(twice)   # rows change inside blocks
    with poisoned():
        assert torch.equal(kt.pool.entry_ends(index, bank.shape[1]), entry_ends_ref(index, bank.shape[1]))
    qk = torch.randn(B, T, H * ds, generator=rng).half()
    gain = 0.1 * (torch.rand(B, T, generator=rng) > 0.2).float()
    gain[1, 0] = 0.1                                                             # row 0 of batch 1 reads nothing
    m = torch.full((B, T, H * ds), float("nan"), dtype=torch.float16)
    kt.pool.pool_mix(qk, banks, indices, gain, H, m)
    assert rel_err(m, pool_mix_ref(qk, bank, index, gain, H)) <= 1e-2
    assert (index[1, 0] < 0).all() and torch.equal(m[1, 0], torch.zeros(H * ds, dtype=torch.float16))
    given = torch.full_like(m, float("nan"))                                     # ends from the caller (the sweep's)
    ends = [entry_ends_ref(i, K + T) for i in indices]
    kt.pool.pool_mix(qk, banks, indices, gain, H, given, ends)
    assert torch.equal(given, m)
    with pytest.raises(ValueError, match="ends"):
        kt.pool.pool_mix(qk, banks, indices, gain, H, given, [e[:, 1:] for e in ends])
    # a NaN summary (an overflowed model) spoils only the queries that read it, as in the reference
    entered = (indices[0][0, 1:] == K + torch.arange(T - 1)[:, None]).any(-1).nonzero()[:, 0]
    banks[0][0, K + int(entered[len(entered) // 2]), 3] = float("nan")
    bank, index = cross_layer_bank(group, K + T) if layers > 1 else group[0]
    ref = pool_mix_ref(qk, bank, index, gain, H)
    kt.pool.pool_mix(qk, banks, indices, gain, H, m)
    spoilt = ref.isnan().any(-1)
    assert spoilt.any() and not spoilt.all() and torch.equal(m.isnan().any(-1), spoilt)
    assert rel_err(m[~spoilt], ref[~spoilt]) <= 1e-2
    with pytest.raises(ValueError, match="banks of K"):
        kt.pool.pool_mix(qk, [b[:, 1:] for b in banks], indices, gain, H, m)


# ---- the whole model with kernels="triton" ---------------------------------------------------------------------------
def triton_twin(model):
    return copy.copy(model).set_kernels("triton")


@interpreted
@pytest.mark.parametrize("variant", [dict(), dict(memory=False)], ids=["tiny", "no-memory"])
@torch.no_grad()
def test_model_forward_prefill_and_step_match_torch(variant, rng):
    model = make_model(3, **variant)
    fast = triton_twin(model)
    ids = torch.randint(0, 256, (2, 32), generator=rng)             # 4x the pool: pools fill, then replace
    with poisoned():
        logits, state = fast.prefill(ids[:, :24])
        resumed, state2 = fast.prefill(ids[:, 24:], state)
        step_logits, _ = fast.step(ids[:, 0], state2)
    ref_logits, ref_state = model.prefill(ids[:, :24])
    ref_resumed, ref_state2 = model.prefill(ids[:, 24:], ref_state)
    ref_step, _ = model.step(ids[:, 0], ref_state2)
    assert rel_err(logits, ref_logits) <= TOL and rel_err(resumed, ref_resumed) <= TOL
    assert rel_err(step_logits, ref_step) <= TOL
    for k, v in state2.tensors().items():
        assert rel_err(v, ref_state2.tensors()[k]) <= TOL, k
    if model.config.memory:
        assert (ref_state2.prio >= 0).all()                          # every pool full: replacement was exercised


@interpreted
def test_training_through_step_has_the_references_gradients(rng):
    """The step kernel has no backward: with gradients, kernels="triton" runs the reference for it (it used to
    run the kernel and drop every gradient behind the SSM state, silently)."""
    model = make_model(4)
    fast = triton_twin(model)
    ids = torch.randint(0, 256, (2, 3), generator=rng)
    grads = []
    for m in (model, fast):
        m.zero_grad()
        state, loss = m.new_state(2), 0
        for t in range(3):
            logits, state = m.step(ids[:, t], state)
            loss = loss + logits.logsumexp(-1).mean()
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert all(g is not None for g in grads[1].values())
    for n, g in grads[0].items():
        assert rel_err(grads[1][n], g) <= 1e-5, n


@interpreted
def test_bad_calls_are_named_not_read_past(rng):
    from memmamba_deploy.models.ops.triton.scan import scan_forward
    x, A = torch.randn(2, 8, 32), -torch.rand(32, 8) - 0.5
    with pytest.raises(ValueError, match="B has shape"):                 # state size 4 where A says 8
        scan_forward(x, x, A, torch.randn(2, 8, 4), torch.randn(2, 8, 4), torch.randn(32))
    y, h = scan_forward(x[:0], x[:0], A, torch.randn(0, 8, 8), torch.randn(0, 8, 8), torch.randn(32))
    assert y.shape == (0, 8, 32) and h.shape == (0, 32, 8)                # an empty batch
    with torch.no_grad():
        assert triton_twin(make_model(5))(torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4, 256)
    bf16 = triton_twin(make_model(5)).to(torch.bfloat16)
    with torch.no_grad(), pytest.raises(ValueError, match="bf16 with kernels='triton' needs a GPU"):
        bf16(torch.zeros(1, 4, dtype=torch.long))


def layer_inputs(model, layer_index, rng, T, dtype, device="cpu"):
    """u, pool0 (half full: -1 priorities), and the §5 group of the layers before layer_index (their banks and
    indices, by the reference composition), for Layer.memory_read."""
    c = model.config
    B = 2
    u = torch.randn(B, T, c.d_model, generator=rng).to(device, dtype)
    pool0 = torch.randn(B, c.pool_size, c.summary_dim, generator=rng).to(device, dtype)
    prio0 = torch.where(torch.arange(c.pool_size) < c.pool_size // 2, 0.5 + 0.5 * torch.rand(B, c.pool_size,
                        generator=rng), torch.tensor(-1.0)).to(device)
    group = []
    first = layer_index - layer_index % c.cross_layer_every
    for l in range(first, layer_index):
        group.append(model.layers[l].memory_read(u, pool0, prio0, group, TORCH_OPS)[3])
    return u, pool0, prio0, group


@torch.no_grad()
def reads_only_layer(model, layer_index):
    """A copy of the layer with large, distinct read gains: the reads dominate its memory_read's ũ = u + r_tok +
    r_cross, and a mixed-up gain shows."""
    layer = copy.deepcopy(model.layers[layer_index])
    layer.token_attn.alpha.fill_(20.0)
    if layer.cross_attn is not None:
        layer.cross_attn.alpha.fill_(-7.0)
    return layer


def test_sweep_entries_copy_and_pickle_as_themselves():
    # the fused path's entries are a (bank, index) pair carrying the sweep's ends: copies keep all three
    from memmamba_deploy.models.ops.triton.memory import SweepEntries
    entries = SweepEntries(torch.randn(2, 5, 3), torch.arange(6).view(2, 3, 1), torch.arange(10).view(2, 5))
    for twin in (copy.copy(entries), copy.deepcopy(entries), pickle.loads(pickle.dumps(entries))):
        bank, index = twin
        assert isinstance(twin, SweepEntries) and torch.equal(bank, entries[0]) and torch.equal(index, entries[1])
        assert torch.equal(twin.ends, entries.ends)


@interpreted
def test_stack_weights_equals_its_composition():
    assert_stack_weights_equal_their_composition("cpu")


@torch.no_grad()
def assert_stack_weights_equal_their_composition(device):
    """The fused path's derived weights in one launch: the plain rows copied, the padding zeroed (poisoned
    beforehand), each read's W_kᵀW_q per head and its block-diagonal W_v; for a layer with both reads and padding
    after them, and for one read with none (the width fused_memory_read gives when the sum is 64-aligned)."""
    model = make_model(6).to(device, torch.float16)
    layer, c = model.layers[1], model.config
    H, ds, d = c.memory_heads, c.summary_dim, c.d_model
    plain = (layer.note.score_in.weight, layer.note.summary.weight, layer.token_attn.trigger.weight)
    rows = sum(w.shape[0] for w in plain)
    col_qk = triton.cdiv(rows, 64) * 64
    for reads, pad_after in (([layer.token_attn, layer.cross_attn], 64), ([layer.token_attn], 0)):
        width = col_qk + len(reads) * H * ds + pad_after
        with poisoned():
            w_stack, w_out = kt.memory.stack_weights(plain, reads, H, col_qk, width, torch.float16)
        assert torch.equal(w_stack[:rows], torch.cat(plain)) and not w_stack[rows:col_qk].any()
        assert not w_stack[col_qk + len(reads) * H * ds:].any()
        check_read_weights(w_stack, w_out, reads, col_qk, H, ds, d)
    reads = [layer.token_attn, layer.cross_attn]
    width = col_qk + 2 * H * ds
    with pytest.raises(ValueError, match="must all be torch.float16"):
        kt.memory.stack_weights(tuple(w.float() for w in plain), reads, H, col_qk, width, torch.float16)
    with pytest.raises(ValueError, match="do not fit"):
        kt.memory.stack_weights(plain, reads, H, col_qk, col_qk + H * ds, torch.float16)
    with pytest.raises(ValueError, match="heads must divide"):
        kt.memory.stack_weights(plain, reads, H + 1, col_qk, width, torch.float16)


def check_read_weights(w_stack, w_out, reads, col_qk, H, ds, d):
    dh, dv = ds // H, d // H
    for r, read in enumerate(reads):
        wq, wk, wv = (w.float() for w in (read.q_proj.weight, read.k_proj.weight, read.v_proj.weight))
        wqk = torch.cat([wk[h * dh:(h + 1) * dh].t() @ wq[h * dh:(h + 1) * dh] for h in range(H)])
        block = w_stack[col_qk + r * H * ds:col_qk + (r + 1) * H * ds]
        assert rel_err(block, wqk) <= 1e-3                                      # rounded to half once
        diag = torch.block_diag(*[wv[h * dv:(h + 1) * dv] for h in range(H)])
        assert torch.equal(w_out[:, r * H * ds:(r + 1) * H * ds], diag.half())


@interpreted
@pytest.mark.parametrize("layer_index", [0, 1], ids=["token-read", "token-and-cross-layer-reads"])
@torch.no_grad()
def test_fused_memory_path_equals_its_composition(layer_index, rng):
    # half precision only (fp32 and autograd compose the ops); the tiny preset's layer 1 closes a §5 group of 2
    model = make_model(5).half()
    layer = reads_only_layer(model, layer_index)
    assert (layer.cross_attn is not None) == (layer_index == 1)
    u, pool0, prio0, group = layer_inputs(model, layer_index, rng, 150, torch.float16)
    composed = types.SimpleNamespace(**{**vars(kt.TRITON_OPS), "fused_memory_read": no_fused_memory_read})
    with poisoned():
        ut, pool, prio, (bank, index) = layer.memory_read(u, pool0, prio0, group, kt.TRITON_OPS)
    ut_ref, pool_ref, prio_ref, (bank_ref, index_ref) = layer.memory_read(u, pool0, prio0, group, composed)
    assert ut.shape == ut_ref.shape and ut.dtype == torch.float16
    # u_is_scratch (the model's prefill): the same result, written over u instead of a copy; u kept otherwise
    u_before, scratch = u.clone(), u.clone()
    ut_scratch = layer.memory_read(scratch, pool0, prio0, group, kt.TRITON_OPS, u_is_scratch=True)[0]
    assert torch.equal(ut_scratch, ut) and torch.equal(u, u_before) and not torch.equal(scratch, u)
    assert rel_err(ut.float() - u.float(), ut_ref.float() - u.float()) <= 5e-3                 # the reads
    assert rel_err(bank, bank_ref) <= 1e-2 and rel_err(pool, pool_ref) <= 1e-2
    assert torch.equal(index, index_ref) and rel_err(prio, prio_ref) <= 1e-6    # the same pool decisions
    assert (index >= model.config.pool_size).any()                              # tokens entered the pool
    assert not torch.equal(pool, pool0)
    read = layer.token_attn(u, bank_ref, index_ref, TORCH_OPS).abs().amax(-1)
    assert (read > 0).any() and (read == 0).any()                               # the trigger fired both ways
    # rows of different lengths: the padding's scores are 0 in the kernel, as the composed ops mask them
    lengths = torch.tensor([150, 60])
    with poisoned():
        ut_l, pool_l, prio_l, (_, index_l) = layer.memory_read(u, pool0, prio0, group, kt.TRITON_OPS, lengths=lengths)
    ut_lr, pool_lr, prio_lr, (_, index_lr) = layer.memory_read(u, pool0, prio0, group, composed, lengths=lengths)
    assert torch.equal(index_l, index_lr) and rel_err(prio_l, prio_lr) <= 1e-6 and rel_err(pool_l, pool_lr) <= 1e-2
    assert rel_err(ut_l.float() - u.float(), ut_lr.float() - u.float()) <= 5e-3
    assert torch.equal(prio_l[0], prio[0]) and not torch.equal(prio_l[1], prio[1])   # row 1's padding would enter
    odd = torch.stack([torch.tensor([0, 150], dtype=torch.int32)] * 2, 1)[:, 0]          # int32, strided, a row of 0
    _, pool_0, prio_0, _ = layer.memory_read(u, pool0, prio0, group, kt.TRITON_OPS, lengths=odd)
    assert torch.equal(prio_0[0], prio0[0]) and torch.equal(pool_0[0], pool0[0]) and torch.equal(prio_0[1], prio[1])
    # one batch row (a prompt's prefill): the stacked GEMM writes into the bank's rows without a batch stride
    rows1 = (u[:1], pool0[:1], prio0[:1], [(b[:1], i[:1]) for b, i in group])
    with poisoned():
        ut1, pool1, _, (bank1, index1) = layer.memory_read(*rows1, kt.TRITON_OPS)
    ut1_ref, pool1_ref, _, (bank1_ref, index1_ref) = layer.memory_read(*rows1, composed)
    assert rel_err(ut1.float() - u[:1].float(), ut1_ref.float() - u[:1].float()) <= 5e-3
    assert rel_err(bank1, bank1_ref) <= 1e-2 and rel_err(pool1, pool1_ref) <= 1e-2 and torch.equal(index1, index1_ref)
    # pool0 in another layout (a caller's State keeps whatever strides it was given): the same bank and result;
    # a pool0 of the wrong shape is refused by name
    strided = pool0.transpose(1, 2).contiguous().transpose(1, 2)
    assert strided.stride(-1) != 1
    ut_s, pool_s, _, (bank_s, _) = layer.memory_read(u, strided, prio0, group, kt.TRITON_OPS)
    assert torch.equal(ut_s, ut) and torch.equal(bank_s, bank) and torch.equal(pool_s, pool)
    for wrong in (pool0[:1], pool0[..., :-4]):
        with pytest.raises(ValueError, match="pool0"):
            kt.memory.fused_memory_read(layer, u, wrong, prio0, group)
    layer.token_attn.v_proj.weight.mul_(-2.0)          # a weight changed in place: no stale derived weights
    ut2 = layer.memory_read(u, pool0, prio0, group, kt.TRITON_OPS)[0]
    ut2_ref = layer.memory_read(u, pool0, prio0, group, composed)[0]
    assert not torch.equal(ut2, ut) and rel_err(ut2.float() - u.float(), ut2_ref.float() - u.float()) <= 5e-3
    # no tokens: the same (empty) shapes and the unchanged pool
    empty = layer.memory_read(u[:, :0], pool0, prio0, [(b[:, :8], i[:, :0]) for b, i in group], kt.TRITON_OPS)
    empty_ref = layer.memory_read(u[:, :0], pool0, prio0, [(b[:, :8], i[:, :0]) for b, i in group], composed)
    assert empty[0].shape == empty_ref[0].shape == (2, 0, model.config.d_model)
    assert torch.equal(empty[1], pool0) and torch.equal(empty[2], prio0)
    # the whole model: the fused path against the reference's fp16 prefill
    ids = torch.randint(0, 256, (2, 64), generator=rng)
    logits, state = triton_twin(model).prefill(ids)
    ref, ref_state = model.prefill(ids)
    assert rel_err(logits, ref) <= 1e-2
    for k, v in state.tensors().items():
        assert rel_err(v, ref_state.tensors()[k]) <= 1e-2, k


@interpreted
def test_model_trains_with_triton_kernels(rng):
    model = make_model(4).train()
    fast = triton_twin(model)
    ids = torch.randint(0, 256, (1, 20), generator=rng)
    weights = torch.randn(1, 20, 256, generator=rng)
    (model(ids) * weights).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with poisoned():
        (fast(ids) * weights).sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ref.keys() == got.keys() and any("note" in n for n in got)
    for n in ref:
        assert rel_err(got[n], ref[n]) <= TOL, n


# ---- the fast decode path (TritonBackend, no CUDA graph on the CPU) --------------------------------------------------
def poison_backend(backend, batch, keep):
    """NaN into every buffer of the step except the state it will read."""
    bufs = backend._get_buffers(batch)
    for t in (bufs.h, bufs.u, bufs.mem, bufs.ut, bufs.xc, bufs.z, bufs.xacc, bufs.oacc, bufs.uf, bufs.logits,
              bufs.note, bufs.reads):
        t.fill_(float("nan"))
    for s in bufs.states:
        if s is not keep:
            for t in s.tensors().values():
                t.fill_(float("nan"))


@interpreted
@pytest.mark.parametrize("step_kernel", ["phased", "layered"])
@pytest.mark.parametrize("variant, batch", [
    (dict(), 2), (dict(n_layers=3, summary_dim=8, memory_heads=4, d_state=4), 1), (dict(memory=False), 1),
    (dict(n_layers=3, cross_layer_every=3, pool_size=5), 2)],
    ids=["tiny-B2", "L3-trailing-H4", "no-memory", "p3-K5-B2"])
@torch.no_grad()
def test_triton_backend_decode_matches_reference_step(variant, batch, step_kernel, rng):
    from memmamba_deploy.backends.triton_backend import TritonBackend

    model = make_model(5, **variant)
    backend = TritonBackend(model, cuda_graph=False, step_kernel=step_kernel)
    ids = torch.randint(0, 256, (batch, 44), generator=rng)
    _, ref_state = model.prefill(ids[:, :40])                       # pools full: inserts replace from here on
    state = backend.copy_state(ref_state)
    for t in range(40, 44):
        poison_backend(backend, batch, keep=state.state)           # after step 1, state lives in a buffer
        logits, state = backend.step(ids[:, t], state)
        ref_logits, ref_state = model.step(ids[:, t], ref_state)
        assert rel_err(logits, ref_logits) <= TOL
        for k, v in backend.state_to_reference(state).tensors().items():
            assert rel_err(v, ref_state.tensors()[k]) <= TOL, (t, k)


@interpreted
@torch.no_grad()
def test_triton_backend_keeps_every_returned_state_valid(rng):
    from memmamba_deploy.backends.triton_backend import TritonBackend

    model = make_model(6, memory=False, n_layers=2)
    backend = TritonBackend(model, cuda_graph=False)
    s0 = backend.new_state(1)
    s0_copy = backend.state_to_reference(s0)
    _, s1 = backend.step(torch.tensor([3]), s0)
    _, s2 = backend.step(torch.tensor([4]), s1)                     # ping-pong: s1 and s2 in the two buffers
    s2_copy = backend.state_to_reference(s2)
    l3b, s3b = backend.step(torch.tensor([9]), s1)                  # a branch from s1 overwrites s2's buffer ...
    l3, _ = backend.step(torch.tensor([5]), s2)                     # ... yet s2 still holds what it held
    ref, ref_s1 = model.step(torch.tensor([3]), backend.state_to_reference(s0))
    ref_s2 = model.step(torch.tensor([4]), ref_s1)[1]
    for k, v in backend.state_to_reference(s2).tensors().items():
        assert torch.equal(v, s2_copy.tensors()[k]) and rel_err(v, ref_s2.tensors()[k]) <= TOL, k
    for k, v in backend.state_to_reference(s0).tensors().items():
        assert torch.equal(v, s0_copy.tensors()[k]), k
    assert rel_err(l3b, model.step(torch.tensor([9]), ref_s1)[0]) <= TOL
    assert rel_err(l3, model.step(torch.tensor([5]), ref_s2)[0]) <= TOL


@interpreted
@torch.no_grad()
def test_triton_backend_derives_the_memory_weights_once(rng, monkeypatch):
    # half precision: the backend derives each layer's memory weights when it is built (no stack_weights launch in
    # its prefills), and its prefill equals the model's own Triton prefill, which derives them every call, bit for bit
    from memmamba_deploy.backends.triton_backend import TritonBackend

    model = make_model(7).half()
    backend = TritonBackend(model, cuda_graph=False)
    assert set(backend.model.ops.fused_memory_read.keywords["derived"]) == set(backend.model.layers)
    ids = torch.randint(0, 256, (2, 40), generator=rng)
    calls, real = [], kt.memory.stack_weights
    monkeypatch.setattr(kt.memory, "stack_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits, state = backend.prefill(ids, backend.new_state(2))
    ref_logits, ref_state = triton_twin(model).prefill(ids, last_only=True)
    assert len(calls) == model.config.n_layers                         # the model's own prefill only
    assert torch.equal(logits, ref_logits[:, -1])
    for k, v in backend.state_to_reference(state).tensors().items():
        assert torch.equal(v, ref_state.tensors()[k]), k


@interpreted
@torch.no_grad()
def test_triton_prefill_of_the_last_logits_equals_the_full_prefill(rng):
    # last_only: the last layer's scan gives the last token's y from its final state (no pass writing every y) and
    # its out_proj reads that token only; the logits and the state are the full prefill's
    fast = triton_twin(make_model(7))
    ids = torch.randint(0, 256, (2, 40), generator=rng)
    full, state = fast.prefill(ids)
    last, state_last = fast.prefill(ids, last_only=True)
    assert last.shape == (2, 1, 256) and rel_err(last, full[:, -1:]) <= 1e-5
    for k, v in state.tensors().items():
        assert torch.equal(v, state_last.tensors()[k]), k


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16-fused-memory-path"])
@torch.no_grad()
def test_triton_prefill_of_rows_of_different_lengths_is_each_row_alone(dtype, rng):
    # the Triton kernels (scan: δ = softplus(-inf) = 0 at padding; fp16: the fused memory path masking the padding's
    # scores) and TritonBackend.prefill(lengths=): each row is the torch reference's for its tokens alone
    from memmamba_deploy.backends.triton_backend import TritonBackend

    model = make_model(3).to(dtype)
    ids = torch.randint(0, 256, (3, 24), generator=rng)
    _, start = model.prefill(torch.randint(0, 256, (3, 9), generator=rng))
    lengths = torch.tensor([24, 11, 0])
    backend = TritonBackend(model, cuda_graph=False)
    logits, state = backend.prefill(ids, start, lengths=lengths)
    state = backend.state_to_reference(state)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for b, n in enumerate(lengths.tolist()):
        alone = State(**{k: v[:, b:b + 1] for k, v in start.tensors().items()})
        if n:
            want, alone = model.prefill(ids[b:b + 1, :n], alone, last_only=True)
            assert rel_err(logits[b:b + 1], want[:, -1]) <= tol, b
        else:
            assert not logits[b].any()
        for k, v in state.tensors().items():
            assert rel_err(v[:, b:b + 1].float(), alone.tensors()[k].float()) <= tol, (b, k)
    assert torch.equal(state.ssm[:, 2], start.ssm[:, 2]) and torch.equal(state.pool[:, 2], start.pool[:, 2])
    with pytest.raises(ValueError, match=r"token id 256, outside the vocabulary"):      # checked on the host: a
        backend.prefill(torch.tensor([[1, 256], [1, 2], [3, 4]]), start, lengths=[1, 2, 2])  # graph would not


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16-fused-memory-path"])
@torch.no_grad()
def test_triton_prefill_in_halves_of_rows_of_different_lengths(dtype, rng):
    # the Triton backend's long pieces (prefill_in_halves) through the Triton kernels with lengths: rows ending in
    # the first half, exactly at the half, one past it, in the second half and not at all; against the torch
    # kernels' halves and the whole prefill
    from memmamba_deploy.backends.triton_backend import prefill_in_halves

    model = make_model(3).to(dtype)
    ids = torch.randint(0, 256, (6, 22), generator=rng)
    lengths = torch.tensor([22, 5, 11, 12, 17, 0])
    _, start = model.prefill(torch.randint(0, 256, (6, 7), generator=rng))
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    want, want_state = prefill_in_halves(model, ids, start, lengths=lengths)
    whole, whole_state = model.prefill(ids, start, last_only=True, lengths=lengths)
    assert rel_err(want, whole) <= tol
    got, got_state = prefill_in_halves(triton_twin(model), ids, start, lengths=lengths)
    assert rel_err(got, want) <= tol and not got[5].any()
    for k, v in got_state.tensors().items():
        assert rel_err(v.float(), want_state.tensors()[k].float()) <= tol, k
        assert rel_err(v.float(), whole_state.tensors()[k].float()) <= tol, k
        assert torch.equal(v[:, 5], start.tensors()[k][:, 5]), k


@pytest.mark.parametrize("batch, T, cost, want", [
    (1, 1500, 2048, [2048]), (1, 1024, 2048, [1024]), (1, 3, 2048, [4]), (1, 17000, 2048, [16384, 1024]),
    (1, 70000, 2048, [65536, 4096, 512]), (64, 2017, 2048, [1024, 1024]), (1, 1500, 0, [1024, 256, 128, 64, 16, 8, 4]),
    (4, 4100, 2048, [4096, 4])])
def test_graphed_prefill_plan_pads_where_a_piece_costs_more(batch, T, cost, want):
    from memmamba_deploy.backends.triton_backend import TritonBackend

    backend = types.SimpleNamespace(PREFILL_TOKENS=65536, PIECE_COST_TOKENS=cost)
    plan = TritonBackend.prefill_plan(backend, batch, T)
    assert plan == want and sum(plan) >= T and all(batch * n <= 65536 for n in plan)


@interpreted
def test_triton_backend_generates_like_the_torch_backend(rng):
    from memmamba_deploy.backends import TorchBackend
    from memmamba_deploy.backends.triton_backend import TritonBackend
    from memmamba_deploy.sampling import generate

    model = make_model(7, n_layers=2)
    prompt = torch.randint(0, 256, (1, 12), generator=rng)
    fast = list(generate(TritonBackend(model, cuda_graph=False), prompt, 4))
    ref = list(generate(TorchBackend(model), prompt, 4))
    assert torch.equal(torch.stack(fast), torch.stack(ref))


# ---- clear errors ----------------------------------------------------------------------------------------------------
@interpreted
def test_bad_inputs_get_clear_errors(rng):
    from memmamba_deploy.backends.triton_backend import TritonBackend

    a = scan_inputs(rng, 2, 5, 8, 4)
    with pytest.raises(ValueError, match=r"B has shape \[2, 5, 3\], expected \[2, 5, 4\]"):
        kt.TRITON_OPS.selective_scan(**{**a, "B": a["B"][..., :3]})
    with pytest.raises(ValueError, match="heads=3 must divide"):
        kt.TRITON_OPS.pool_attention(torch.zeros(1, 2, 8), torch.zeros(1, 3, 8), torch.zeros(1, 3, 8),
                                     torch.zeros(1, 2, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="scores \\[B,T\\] and prio0 \\[B,K\\]"):
        kt.TRITON_OPS.pool_sweep(torch.zeros(2, 3), torch.zeros(3, 4), 0.5)
    model = make_model(0, memory=False, n_layers=2)
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        TritonBackend(model, cuda_graph=True)
    with pytest.raises(ValueError, match="step_kernel must be one of layered, persistent, phased, not 'fast'"):
        TritonBackend(model, cuda_graph=False, step_kernel="fast")
    with pytest.raises(ValueError, match="step_kernel='persistent' needs a CUDA device"):
        TritonBackend(model, cuda_graph=False, step_kernel="persistent")
    backend = TritonBackend(model, cuda_graph=False)
    with pytest.raises(ValueError, match="token ids must lie in"):
        backend.step(torch.tensor([256]), backend.new_state(1))
    with pytest.raises(ValueError, match=r"state.conv has shape"):
        backend.step(torch.tensor([1, 2]), backend.new_state(1))
    with pytest.raises(ValueError, match="expected a TritonState or a models.State"):
        backend.step(torch.tensor([1]), {"conv": None})
    with pytest.raises(RuntimeError, match="AOT_KERNELS needs the compiled kernels"):
        kt.AOT_KERNELS


# ---- ahead-of-time compilation (a compiled process) ---------------------------------------------------------------
AOT_CHECK = textwrap.dedent("""
    import os, subprocess, tempfile, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from memmamba_deploy.models import MemMambaConfig
    from memmamba_deploy.models.ops.triton import AOT_KERNELS, INTERPRETED
    from memmamba_deploy.models.ops.triton.aot import decode_aot_kernels
    assert not INTERPRETED
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    table = dict(AOT_KERNELS)
    for preset in ("tiny", "130m"):
        table.update({f"{k}[{preset}]": v for k, v in decode_aot_kernels(MemMambaConfig.preset(preset)).items()})
    n = 0
    for name, e in table.items():
        for suffix, sig in e["signatures"].items():
            assert list(sig) == list(e["fn"].arg_names), name
            k = triton.compile(ASTSource(e["fn"], sig, e["constexprs"]), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": e["num_warps"], "num_stages": e["num_stages"]})
            assert not getattr(k.metadata, "global_scratch_size", 0), name
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(k.asm["cubin"]); f.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                       text=True).stdout
            assert "STACK:0 " in usage and "LOCAL:0 " in usage, f"{name}_{suffix} spills: {usage}"
            n += 1
    print("compiled", n)
""")


@pytest.mark.skipif(kt.INTERPRETED, reason="the compiled parent process runs this one")
def test_aot_kernels_compile_for_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", AOT_CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert int(out.stdout.split()[-1]) >= 20


# ---- when this process cannot interpret ---------------------------------------------------------------------------
def test_kernels_in_an_interpreted_process():
    run_interpreted(__file__)


def test_triton_ops_offer_the_reference_signatures():
    import inspect

    from memmamba_deploy.models.ops import TORCH_OPS
    names = {k for k in vars(TORCH_OPS) if k != "name"}
    assert names == {k for k in vars(kt.TRITON_OPS) if k != "name"} and kt.TRITON_OPS.name == "triton"
    for k in names:
        assert inspect.signature(getattr(kt.TRITON_OPS, k)) == inspect.signature(getattr(TORCH_OPS, k)), k


def test_states_are_the_reference_layout():
    # the fast path's state is the reference State itself: parity tools and fork work on it directly
    from memmamba_deploy.backends.triton_backend import TritonState
    s = TritonState(State.zeros(make_model(0).config, 2))
    assert isinstance(s.to_reference(), State) and s.batch_size == 2
