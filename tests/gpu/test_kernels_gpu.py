"""The Triton kernels on the GPU (issue 3), compiled, against the PyTorch references on fresh random inputs.

Every kernel in fp32 (rel. error <= 1e-4), fp16 and bf16 (<= 1e-2) with outputs poisoned first; the scan backward
against autograd through the reference; the whole model kernels="triton" vs "torch" over 2k-token sequences; and
the fast decode path (TritonBackend, CUDA graph) vs the reference step over 1k greedy steps.

Threshold decisions (spec §9) can flip between two correct backends when a score lies within rounding of a
threshold; in fp16/bf16 a few flips per thousand decisions are expected. Whole-model half-precision checks
therefore bound the share of positions off by more than 1e-2 (and count them) instead of the maximum; fp32 and
every kernel are held to the maximum.

Run by scripts/gpu_stages/10-kernel-tests.sh; JSON lines of the errors go to $MEMMAMBA_RESULTS when set.
"""
from __future__ import annotations

import copy
import json
import os
import types

import pytest
import torch

from conftest import make_model
from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models import MemMambaConfig, MemMambaLM
from memmamba_deploy.models.ops import no_fused_memory_read
from memmamba_deploy.models.ops import triton as kt
from memmamba_deploy.models.ops.norm import residual_norm_ref
from memmamba_deploy.models.ops.pool import pool_attention_ref, pool_read_ref, pool_sweep_ref
from memmamba_deploy.models.ops.scan import causal_conv_ref, selective_scan_ref, selective_state_step_ref
from test_kernels import (assert_stack_weights_equal_their_composition, entry_ends_ref, layer_inputs, poison_backend,
                          poisoned, pool_mix_ref, reads_only_layer, scan_inputs, softplus_rel_err, sweep_like_index)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA GPU (run by scripts/gpu_stages/10-kernel-tests.sh)")]

DEV = "cuda"
torch.backends.cudnn.allow_tf32 = False          # fp32 means fp32: the references' F.conv1d would run in TF32
torch.backends.cuda.matmul.allow_tf32 = False
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ids_dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def record(**row):
    path = os.environ.get("MEMMAMBA_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": "kernel-tests", **row}) + "\n")


def to_dev(a: dict, dtype) -> dict:
    """Activations in `dtype`, A/D/dt_bias/h0 fp32 (the contract's dtypes)."""
    acts = ("x", "dt", "B", "C", "z")
    return {k: (None if v is None else v.to(DEV, dtype if k in acts else torch.float32)) for k, v in a.items()}


@pytest.fixture
def g():
    # fresh inputs every run; MEMMAMBA_SEED replays a recorded draw (the fused-path and 1k-decode records carry it)
    seed = os.environ.get("MEMMAMBA_SEED") or int.from_bytes(os.urandom(4), "little")
    return torch.Generator().manual_seed(int(seed))


# ---- kernels -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype.get)
@pytest.mark.parametrize("chunk_len", [4096, 256], ids=["one-pass", "three-pass"])
def test_scan_forward(dtype, chunk_len, g):
    a = to_dev(scan_inputs(g, 2, 1000, 256, 16), dtype)
    y_ref, h_ref = selective_scan_ref(**a)
    with poisoned():
        y, h = kt.scan.scan_forward(**a, chunk_len=chunk_len)
    torch.cuda.synchronize()
    ey, eh = rel_err(y, y_ref), rel_err(h, h_ref)
    record(kernel="selective_scan", dtype=ids_dtype[dtype], chunk_len=chunk_len, err_y=ey, err_h=eh)
    assert ey <= TOL[dtype] and eh <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype.get)
@pytest.mark.parametrize("chunk_len", [4096, 256, None], ids=["one-pass", "three-pass", "planned"])
def test_scan_forward_and_conv_of_rows_of_different_lengths(dtype, chunk_len, g):
    # lengths (a batch of prompts): padding's δ is 0 in the passes that compute it, the conv window is each row's
    # after its own inputs, last_only reads each row's last token; against the references given the same lengths
    a = to_dev(scan_inputs(g, 4, 1000, 256, 16), dtype)
    lengths = torch.tensor([1000, 517, 0, 1], device=DEV)
    y_ref, h_ref = selective_scan_ref(**a, lengths=lengths)
    with poisoned():
        y, h = kt.scan.scan_forward(**a, chunk_len=chunk_len, lengths=lengths)
    ends = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, 256)
    with poisoned():
        y_last, h_last = kt.scan.scan_forward(**dict(a, z=a["z"].gather(1, ends)), chunk_len=chunk_len,
                                              last_only=True, lengths=lengths)
    x, w = a["x"], torch.randn(256, 4, generator=g).to(DEV, dtype)
    window = torch.randn(4, 256, 3, generator=g).to(DEV, dtype)
    out_ref, win_ref = causal_conv_ref(x, w, None, window, lengths)
    with poisoned():
        out, win = kt.TRITON_OPS.causal_conv(x, w, None, window, lengths=lengths)
    torch.cuda.synchronize()
    errs = dict(err_y=rel_err(y, y_ref), err_h=rel_err(h, h_ref), err_y_last=rel_err(y_last, y_ref.gather(1, ends)),
                err_h_last=rel_err(h_last, h_ref), err_conv=rel_err(out, out_ref))
    record(kernel="selective_scan+conv lengths", dtype=ids_dtype[dtype], chunk_len=chunk_len, **errs)
    assert all(e <= TOL[dtype] for e in errs.values()), errs
    assert torch.equal(win, win_ref) and torch.equal(h[2], a["h0"][2])


def test_softplus_with_lg2_approx():
    # lg2.approx's absolute error (~1.7e-7 in log1p) is at most ~1e-5 relative where the series does not take over
    assert softplus_rel_err("cuda") <= 2e-5


def test_scan_forward_long_and_planned(g):
    a = to_dev(scan_inputs(g, 1, 20000, 64, 16, dt_scale=3.0), torch.float32)   # the planner's own chunking
    y_ref, h_ref = selective_scan_ref(**a)
    with poisoned():
        y, h = kt.TRITON_OPS.selective_scan(**a)
    assert torch.isfinite(y).all() and rel_err(y, y_ref) <= 1e-4 and rel_err(h, h_ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=ids_dtype.get)
def test_scan_backward(dtype, g):
    a = to_dev(scan_inputs(g, 2, 300, 64, 16), dtype)
    leaves = {k: v.clone().requires_grad_() for k, v in a.items()}
    y_ref, h_ref = selective_scan_ref(**leaves)
    dy, dh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    torch.autograd.backward([y_ref, h_ref], [dy, dh])
    mine = {k: v.clone().requires_grad_() for k, v in a.items()}
    with poisoned():
        y, h = kt.TRITON_OPS.selective_scan(**mine)
        torch.autograd.backward([y, h], [dy, dh])
    errs = {k: rel_err(v.grad, leaves[k].grad) for k, v in mine.items()}
    record(kernel="selective_scan_backward", dtype=ids_dtype[dtype], **{f"err_{k}": v for k, v in errs.items()})
    assert max(errs.values()) <= TOL[dtype], errs


@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype.get)
def test_state_step(dtype, g):
    a = to_dev(scan_inputs(g, 4, 1, 1536, 16), dtype)
    one = {k: (v[:, 0] if k in ("x", "dt", "B", "C", "z") else v) for k, v in a.items()}
    h = one.pop("h0")
    y_ref, h_ref = selective_state_step_ref(h, **one)
    with poisoned():
        y, h_new = kt.TRITON_OPS.selective_state_step(h, **one)
    ey, eh = rel_err(y, y_ref), rel_err(h_new, h_ref)
    record(kernel="selective_state_step", dtype=ids_dtype[dtype], err_y=ey, err_h=eh)
    assert ey <= TOL[dtype] and eh <= TOL[dtype]


@pytest.mark.parametrize("K", [50, 8, 200])
def test_pool_sweep(K, g):
    levels = torch.tensor([0.3, 0.5, 0.55, 0.6, 0.6, 0.7, 0.9])
    a = torch.cat([levels[torch.randint(0, len(levels), (2, 3000), generator=g)],
                   torch.rand(2, 3000, generator=g)]).to(DEV)
    prio0 = torch.where(torch.rand(4, K, generator=g) < 0.3, -1.0, torch.rand(4, K, generator=g)).to(DEV)
    index_ref, prio_ref = pool_sweep_ref(a, prio0, 0.5)
    with poisoned():
        index, prio, ends = kt.pool.pool_sweep_ends(a, prio0, 0.5)
    mismatches = int((index != index_ref).sum())
    ends_ref = entry_ends_ref(index_ref[:, :-1].cpu(), K + a.shape[1])
    record(kernel="pool_sweep", K=K, index_mismatches=mismatches, ends_mismatches=int((ends.cpu() != ends_ref).sum()))
    assert mismatches == 0 and torch.equal(prio, prio_ref) and torch.equal(ends.cpu(), ends_ref)


def group_sweep_index(g, B, T, K, groups):
    """[B, T, groups·K] int32 on the GPU: real sweep indices of `groups` layers' banks, offset as §5 joins them."""
    parts = []
    for i in range(groups):
        idx = pool_sweep_ref(torch.rand(B, T, generator=g), torch.full((B, K), -1.0), 0.5)[0][:, :T]
        parts.append(torch.where(idx >= 0, idx + i * (K + T), -1))
    return torch.cat(parts, 2).int().to(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype.get)
@pytest.mark.parametrize("groups", [1, 4], ids=["token-read", "cross-read"])
def test_pool_attention(dtype, groups, g):
    B, T, K, ds, d, H = 2, 2000, 50, 64, 768, 4
    index = group_sweep_index(g, B, T, K, groups)
    M = groups * (K + T)
    q = torch.randn(B, T, ds, generator=g).to(DEV, dtype)
    keys = torch.randn(B, M, ds, generator=g).to(DEV, dtype)
    values = torch.randn(B, M, d, generator=g).to(DEV, dtype)
    ref = pool_attention_ref(q, keys, values, index, H)
    with poisoned():
        o = kt.TRITON_OPS.pool_attention(q, keys, values, index, H)
    err = rel_err(o, ref)
    record(kernel="pool_attention", dtype=ids_dtype[dtype], S=groups * K, err=err)
    assert err <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype.get)
@pytest.mark.parametrize("groups", [1, 4], ids=["token-read", "cross-read"])
def test_pool_read(dtype, groups, g):
    # against the reference in fp32 on the same (rounded) inputs: the kernel rounds in other places than the
    # half-precision reference does (q' and the mixture instead of q, keys and values)
    B, T, K, ds, d, H = 2, 2000, 50, 64, 768, 4
    index = group_sweep_index(g, B, T, K, groups)
    u = torch.randn(B, T, d, generator=g).to(DEV, dtype)
    bank = torch.randn(B, groups * (K + T), ds, generator=g).to(DEV, dtype)
    w = [(torch.randn(*shape, generator=g) * shape[1] ** -0.5).to(DEV, dtype) for shape in ((ds, d), (ds, ds), (d, ds))]
    gain = (0.1 * (torch.rand(B, T, generator=g) > 0.3).float()).to(DEV)
    ref = pool_read_ref(u.float(), bank.float(), index, *(x.float() for x in w), H, gain)
    with poisoned(), torch.no_grad():
        o = kt.TRITON_OPS.pool_read(u, bank, index, *w, H, gain)
    err = rel_err(o, ref)
    record(kernel="pool_read", dtype=ids_dtype[dtype], S=groups * K, err=err,
           half_reference_err=rel_err(pool_read_ref(u, bank, index, *w, H, gain), ref))   # for comparison
    assert err <= TOL[dtype]
    residual = torch.randn(B, T, d, generator=g).to(DEV, dtype)
    with poisoned(), torch.no_grad():
        o = kt.TRITON_OPS.pool_read(u, bank, index, *w, H, gain, residual)         # the add in the output GEMM
    err = rel_err(o, residual.float() + ref)
    record(kernel="pool_read+residual", dtype=ids_dtype[dtype], S=groups * K, err=err)
    assert err <= TOL[dtype]


def test_stack_weights():
    assert_stack_weights_equal_their_composition(DEV)


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=ids_dtype.get)
@pytest.mark.parametrize("groups", [1, 4], ids=["token-read", "cross-read"])
@torch.no_grad()
def test_pool_mix_on_sweep_indices(dtype, groups, g):
    # the prefill's read (pool_mix_kernel: the blocks' first rows and own tokens) on real sweeps
    B, T, K, ds, H = 2, 2000, 50, 64, 4
    index = group_sweep_index(g, B, T, K, groups)
    bank = torch.randn(B, groups * (K + T), ds, generator=g).to(DEV, dtype)
    qk = torch.randn(B, T, H * ds, generator=g).to(DEV, dtype)
    gain = (0.1 * (torch.rand(B, T, generator=g) > 0.3).float()).to(DEV)
    m = torch.full((B, T, H * ds), float("nan"), device=DEV, dtype=dtype)
    # the pools where they lie: the joined bank's layer blocks, each index block shifted back to its own rows
    banks = list(bank.split(K + T, dim=1))
    indices = [torch.where(i >= 0, i - j * (K + T), -1).int() for j, i in enumerate(index.split(K, dim=2))]
    err = rel_err(kt.pool.pool_mix(qk, banks, indices, gain, H, m), pool_mix_ref(qk, bank, index, gain, H))
    record(kernel="pool_mix", dtype=ids_dtype[dtype], S=groups * K, err=err)
    assert err <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=ids_dtype.get)
@pytest.mark.parametrize("layer_index", [0, 1], ids=["token-read", "token-and-cross-layer-reads"])
@torch.no_grad()
def test_fused_memory_path(dtype, layer_index, g):
    # the fused half-precision path (memory.py) against the same ops composed; the two compute the scores with
    # differently ordered GEMM sums (and round the trigger twice), so a score within rounding of a decision may
    # flip: the pool decisions must agree for all but a few rows, and the reads wherever no decision is that close.
    # The reads are held to the composition run in fp32 (same weights and inputs): the half-precision composition
    # rounds ũ more often than the fused path, so the two half results differ by up to ~2 ulps (1.02e-2 in bf16
    # on one draw), more than either differs from the fp32 result
    model = gpu_model(dtype, **SMALL)
    layer = reads_only_layer(model, layer_index)
    u, pool0, prio0, group = layer_inputs(model, layer_index, g, 2000, dtype, DEV)
    composed = types.SimpleNamespace(**{**vars(kt.TRITON_OPS), "fused_memory_read": no_fused_memory_read})
    with poisoned():
        ut, pool, prio, (bank, index) = layer.memory_read(u, pool0, prio0, group, kt.TRITON_OPS)
    ut_ref, pool_ref, prio_ref, (bank_ref, index_ref) = layer.memory_read(u, pool0, prio0, group, composed)
    # fp32 on the half composition's pool decisions (fp32 scores would take other ones, and one differing entry
    # changes every later index row); its last index row, unused here, is a stand-in
    decisions = types.SimpleNamespace(**{**vars(composed), "pool_sweep": lambda *_: (
        torch.cat([index_ref, index_ref[:, -1:]], dim=1), prio_ref)})
    ut32 = copy.deepcopy(layer).float().memory_read(
        u.float(), pool0.float(), prio0, [(bk.float(), ix) for bk, ix in group], decisions)[0]
    same = (index == index_ref).all(-1)                                              # [B, T] rows that agree
    b = torch.sigmoid(layer.token_attn.trigger(u).float()[..., 0])
    near = (b - layer.token_attn.read_threshold).abs() < 1e-2                        # a trigger decision that close
    keep = same & ~near
    reads32 = (ut32 - u.float())[keep]
    err = rel_err((ut.float() - u.float())[keep], reads32)                                       # the reads
    err_composed = rel_err((ut_ref.float() - u.float())[keep], reads32)
    record(test="fused_memory_path", dtype=ids_dtype[dtype], layer=layer_index, err=err, seed=g.initial_seed(),
           info_composed_vs_fp32=err_composed, rows_differing=int((~same).sum()),
           rows_near_trigger=int(near.sum()), bank_err=rel_err(bank, bank_ref))
    assert (~same).float().mean() <= 0.005 and near.float().mean() <= 0.05 and err <= TOL[dtype]
    assert rel_err(bank, bank_ref) <= TOL[dtype]
    assert (index >= model.config.pool_size).any()                                   # tokens entered the pool


@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype.get)
def test_residual_norm_and_causal_conv(dtype, g):
    h = torch.randn(2, 3000, 768, generator=g).to(DEV)
    y = torch.randn(2, 3000, 768, generator=g).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(768, generator=g)).to(DEV, dtype)
    h_ref, u_ref = residual_norm_ref(h, y, w, 1e-5)
    with poisoned():
        h_new, u = kt.TRITON_OPS.residual_norm(h, y, w, 1e-5)
    xz = torch.randn(2, 3000, 3072, generator=g).to(DEV, dtype)
    cw, cb = torch.randn(1536, 4, generator=g).to(DEV, dtype), torch.randn(1536, generator=g).to(DEV, dtype)
    win = torch.randn(2, 1536, 3, generator=g).to(DEV, dtype)
    out_ref, win_ref = causal_conv_ref(xz[..., :1536], cw, cb, win)
    with poisoned(), torch.no_grad():
        out, win_new = kt.TRITON_OPS.causal_conv(xz[..., :1536], cw, cb, win)
    errs = dict(err_h=rel_err(h_new, h_ref), err_u=rel_err(u, u_ref), err_conv=rel_err(out, out_ref))
    record(kernel="residual_norm+causal_conv", dtype=ids_dtype[dtype], **errs)
    assert max(errs.values()) <= TOL[dtype] and torch.equal(win_new, win_ref), errs


def test_pool_attention_backward(g):
    B, T, M, S, ds, d, H = 2, 300, 120, 50, 64, 256, 4
    q, keys, values = (torch.randn(B, T, ds, generator=g).to(DEV), torch.randn(B, M, ds, generator=g).to(DEV),
                       torch.randn(B, M, d, generator=g).to(DEV))
    index = sweep_like_index(g, B, T, M, S).to(DEV)
    leaves = [t.clone().requires_grad_() for t in (q, keys, values)]
    ref = pool_attention_ref(*leaves, index, H)
    do = torch.randn_like(ref)
    ref.backward(do)
    mine = [t.clone().requires_grad_() for t in (q, keys, values)]
    kt.TRITON_OPS.pool_attention(*mine, index, H).backward(do)
    for a, b in zip(mine, leaves):
        assert rel_err(a.grad, b.grad) <= 1e-4


# ---- the whole model -----------------------------------------------------------------------------------------------
SMALL = dict(d_model=256, n_layers=4, d_state=16, pool_size=16, summary_dim=32, memory_heads=4, cross_layer_every=2)


def gpu_model(dtype, seed=0, **overrides):
    return make_model(seed, **overrides).to(DEV, dtype).eval()


def triton_twin(model):
    return copy.copy(model).set_kernels("triton")


def share_off(a, b, tol):
    """Share of positions [B, T] whose logits differ by more than tol (relative to the row's max)."""
    diff = (a.float() - b.float()).abs().amax(-1) / b.float().abs().amax(-1).clamp_min(1e-30)
    return float((diff > tol).float().mean())


@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype.get)
@pytest.mark.parametrize("variant", [dict(), SMALL, dict(memory=False)], ids=["tiny", "small", "no-memory"])
@torch.no_grad()
def test_model_forward_2k_tokens(dtype, variant, g):
    model = gpu_model(dtype, **variant)
    ids = torch.randint(0, 256, (2, 2048), generator=g).to(DEV)
    ref, ref_state = model.prefill(ids)
    fast, state = triton_twin(model).prefill(ids)
    err = rel_err(fast, ref)
    off = share_off(fast, ref, TOL[dtype])
    state_err = max(rel_err(v, ref_state.tensors()[k]) for k, v in state.tensors().items() if k != "prio")
    record(test="model_forward_2k", dtype=ids_dtype[dtype], variant=str(variant), err=err, share_off=off,
           state_err=state_err)
    if dtype == torch.float32:
        assert err <= 1e-4 and state_err <= 1e-4
    else:
        ref32 = copy.deepcopy(model).float().prefill(ids)[0]        # the same (rounded) weights in fp32
        off32 = dict(triton=share_off(fast, ref32, TOL[dtype]), torch=share_off(ref, ref32, TOL[dtype]))
        record(test="model_forward_2k_vs_fp32", dtype=ids_dtype[dtype], variant=str(variant), **off32)
        # either it matches the half-precision reference, or it is as close to the fp32 model as that reference
        # is: the two round in different places (conv, pool read), and over 2k recurrent tokens in bf16 the
        # reference itself is off the fp32 model at several percent of positions
        assert off <= 0.02 or off32["triton"] <= 1.25 * off32["torch"] + 0.01, \
            f"{off:.1%} of positions off by > {TOL[dtype]} (max {err:.2e}); against fp32: {off32}"


@pytest.mark.parametrize("variant", [dict(), SMALL], ids=["tiny", "small"])
def test_model_backward_matches_torch(variant, g):
    model = gpu_model(torch.float32, **variant).train()
    ids = torch.randint(0, 256, (2, 512), generator=g).to(DEV)
    w = torch.randn(2, 512, 256, generator=g).to(DEV)
    (model(ids) * w).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (triton_twin(model)(ids) * w).sum().backward()
    errs = {n: rel_err(p.grad, ref[n]) for n, p in model.named_parameters() if p.grad is not None}
    record(test="model_backward", variant=str(variant), err=max(errs.values()))
    assert max(errs.values()) <= 1e-4, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


# ---- the fast decode path ------------------------------------------------------------------------------------------
class Decisions:
    """The reference's threshold decisions during model.step (spec §9), through forward hooks: the smallest margin
    of the step, min over layers and rows of |a - tau1|, |a - min prio| (tokens above tau1) and |b - tau2|."""

    def __init__(self, model):
        self.model, self.c = model, model.config
        self.scores, self.triggers, self.hooks = [], [], []
        for layer in model.layers if model.config.memory else []:
            self.hooks.append(layer.note.register_forward_hook(lambda m, i, o: self.scores.append(o[0].float())))
            self.hooks.append(layer.token_attn.trigger.register_forward_hook(
                lambda m, i, o: self.triggers.append(torch.sigmoid(o.float()[..., 0]))))

    def step(self, token, state):
        self.scores, self.triggers = [], []
        logits, new = self.model.step(token, state)
        margin = float("inf")
        for l, (a, b) in enumerate(zip(self.scores, self.triggers)):
            pmin = state.prio[l].min(-1).values
            above = a > self.c.insert_threshold
            margin = min(margin, float((a - self.c.insert_threshold).abs().min()),
                         float((b - self.c.read_threshold).abs().min()))
            if above.any():
                margin = min(margin, float((a - pmin).abs()[above].min()))
        return logits, new, margin

    def close(self):
        for h in self.hooks:
            h.remove()


STEP_KERNELS = ["layered", "persistent"]


def prefill_decision_margin(model, prompt, start):
    """The smallest nonzero distance of any §3/§4 decision of model.prefill(prompt, start) from its threshold:
    |a - tau1|, |a - min priority| for scores above tau1 (the minimum as the reference sweep has it before each token),
    the gap between the two lowest priorities where a token enters (which slot it evicts), |b - tau2| for the
    triggers. Another rounding of the same math may decide otherwise below ~1e-5."""
    c, scores, triggers = model.config, [], []
    hooks = [h for layer in model.layers for h in (
        layer.note.register_forward_hook(lambda m, i, o: scores.append(o[0].float())),
        layer.token_attn.trigger.register_forward_hook(
            lambda m, i, o: triggers.append(torch.sigmoid(o.float()[..., 0]))))]
    try:
        model.prefill(prompt, start)
    finally:
        for h in hooks:
            h.remove()

    def nearest(gap):                      # exact ties are structural (a repeated token in layer 0, a ReLU that
        gap = gap[gap > 0]                 # zeroes the whole score: a = 0.5) and decided alike by every backend
        return float(gap.min()) if gap.numel() else float("inf")

    margin = min(nearest((b - c.read_threshold).abs()) for b in triggers)
    for l, a in enumerate(scores):
        prio0 = start.prio[l].float()
        index = pool_sweep_ref(a, prio0, c.insert_threshold)[0][:, :-1].long()       # [B, T, K] before each token
        token = a.gather(1, (index - c.pool_size).clamp(min=0).flatten(1)).view_as(index)
        initial = prio0.gather(1, index.clamp(min=0, max=c.pool_size - 1).flatten(1)).view_as(index)
        held = torch.where(index >= 0, torch.where(index >= c.pool_size, token, initial), -1.0).sort(-1).values
        pmin = held[..., 0]
        above = a > c.insert_threshold
        enters = above & (a > pmin)
        margin = min(margin, nearest((a - c.insert_threshold).abs()), nearest((a - pmin).abs()[above]))
        if c.pool_size > 1:                # which slot an entrant evicts: the gap between the two lowest
            margin = min(margin, nearest((held[..., 1] - pmin)[enters]))
    return margin


@pytest.mark.parametrize("variant", [dict(), SMALL], ids=["tiny", "small"])
@torch.no_grad()
def test_graphed_prefill_in_pieces_matches_the_reference(variant, g):
    # 3000 tokens in pieces of at most 1024: 1024 + 1024 + 512 + 256 + 128 + 32 + 16 + 8, a chain of 8 replays
    from memmamba_deploy.backends.triton_backend import TritonBackend

    model = gpu_model(torch.float32, **variant)
    backend = TritonBackend(model, cuda_graph=True)
    backend.PREFILL_TOKENS = 2048                                       # pieces of 1024 at batch 2
    backend.PIECE_COST_TOKENS = 0                                       # exactly these pieces, none padded
    prompt = torch.randint(0, 256, (2, 3000), generator=g).to(DEV)
    start = model.prefill(prompt[:, :100])[1]                          # resuming from a non-trivial state
    ref_logits, ref_state = model.prefill(prompt, start)
    fast, eager_state, pos = triton_twin(model), start, 0               # the same pieces, eagerly
    for n in (1024, 1024, 512, 256, 128, 32, 16, 8):
        eager_logits, eager_state = fast.prefill(prompt[:, pos:pos + n], eager_state, last_only=True)
        pos += n
    # whole prompt (torch) vs pieces (Triton) is the same math rounded otherwise: it holds them to 1e-4 unless
    # a pool or trigger decision sits within 1e-5 of its threshold, where the two paths' fp32 scores (about
    # 1e-6 apart after a few layers) may decide otherwise (seen twice on an H200, not reproducible alone)
    margin = prefill_decision_margin(model, prompt, start)
    for _ in range(2):                                                   # the captured graphs, replayed twice
        logits, state = backend.prefill(prompt, start)
        state = backend.state_to_reference(state).tensors()
        errs = {k: rel_err(v, eager_state.tensors()[k]) for k, v in state.items()}
        err = rel_err(logits, eager_logits[:, -1])
        ref_errs = {k: rel_err(v, ref_state.tensors()[k]) for k, v in state.items()}
        ref_err = rel_err(logits, ref_logits[:, -1])
        record(test="graphed_prefill", variant=str(variant), err=err, **{f"err_{k}": v for k, v in errs.items()},
               ref_err=ref_err, **{f"ref_err_{k}": v for k, v in ref_errs.items()}, decision_margin=margin)
        assert err <= 1e-4 and max(errs.values()) <= 1e-4, (err, errs)
        same = ref_err <= 1e-4 and max(ref_errs.values()) <= 1e-4
        assert same or margin < 1e-5, (ref_err, ref_errs, margin)
    assert len(backend._prefill_graphs) == 7                          # 1024, 512, ..., 8: one graph each
    backend.release_prefill_graphs()
    assert not backend._prefill_graphs and backend._prefill_pool is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@torch.no_grad()
def test_graphed_prefill_padded_to_fewer_pieces_equals_the_eager_pieces(dtype, g):
    # prefill_plan pads 1500 tokens (exactly: 7 pieces) to 1024 + 512, the last piece a ragged graph whose rows end
    # 36 columns early: the result is those pieces run eagerly, and the reference's within rounding
    from memmamba_deploy.backends.triton_backend import TritonBackend

    model = gpu_model(dtype, **SMALL)
    backend = TritonBackend(model, cuda_graph=True)
    backend.PREFILL_TOKENS = 2048                                       # pieces of 1024 at batch 2
    assert backend.prefill_plan(2, 1500) == [1024, 512]
    prompt = torch.randint(0, 256, (2, 1500), generator=g).to(DEV)
    start = model.prefill(prompt[:, :100])[1]
    fast = triton_twin(model)
    _, eager_state = fast.prefill(prompt[:, :1024], start, last_only=True)
    padded = torch.cat([prompt[:, 1024:], prompt.new_zeros(2, 36)], 1)
    eager_logits, eager_state = fast.prefill(padded, eager_state, last_only=True, lengths=[476, 476])
    ref_logits, ref_state = model.prefill(prompt, start, last_only=True)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for _ in range(2):
        logits, state = backend.prefill(prompt, start)
        state = backend.state_to_reference(state).tensors()
        assert rel_err(logits, eager_logits[:, -1]) <= tol
        assert all(rel_err(v, eager_state.tensors()[k]) <= tol for k, v in state.items())
        record(test="graphed_prefill_padded", dtype=str(dtype), ref_err=rel_err(logits, ref_logits[:, -1]),
               **{f"ref_err_{k}": rel_err(v.float(), ref_state.tensors()[k].float()) for k, v in state.items()})
        assert rel_err(logits, ref_logits[:, -1]) <= 10 * tol
    assert set(backend._prefill_graphs) == {(2, 1024, False), (2, 512, True)}

    def eager_pieces(ids, lengths):
        # the graphed pieces run eagerly: a piece every row fills plain, else with each row's columns left in it;
        # a row's logits from the piece where it ends (0 for a row of length 0)
        T = max(1, int(lengths.max()))
        plan = backend.prefill_plan(2, T)
        ids = torch.cat([ids[:, :T], ids.new_zeros(2, sum(plan) - T)], 1)
        out, st, pos = torch.zeros(2, 256, device=DEV), start, 0
        for n in plan:
            left = lengths - pos
            ragged = pos + n > int(lengths.min())
            lg, st = fast.prefill(ids[:, pos:pos + n], st, last_only=True,
                                  lengths=left.clamp(0, n) if ragged else None)
            out = torch.where(((left >= 1) & (left <= n))[:, None], lg[:, -1], out)
            pos += n
        return out, st

    # rows of their own lengths: one ending where the plain piece ends (its logits kept through the ragged piece),
    # one of length 0 (its state kept, logits 0), and ids running past every row (those columns not run at all)
    longer = torch.cat([prompt, prompt[:, :100]], 1)
    for lengths in ([1024, 1500], [0, 1500], [700, 900]):
        lengths = torch.tensor(lengths, device=DEV)
        logits, state = backend.prefill(longer, start, lengths=lengths)
        want_logits, want_state = eager_pieces(longer, lengths)
        assert rel_err(logits, want_logits) <= tol, lengths
        for k, v in backend.state_to_reference(state).tensors().items():
            assert rel_err(v.float(), want_state.tensors()[k].float()) <= tol, (lengths, k)
        if lengths[0] == 0:
            assert not logits[0].any()
            for k, v in backend.state_to_reference(state).tensors().items():
                assert torch.equal(v[:, 0], start.tensors()[k][:, 0]), k
    assert (2, 1024, True) in backend._prefill_graphs                    # [700, 900]: one padded ragged piece


@torch.no_grad()
def test_graphed_prefill_half_precision_replays_the_eager_pieces(g):
    # fp16 through pool_mix_kernel: the graphs must run what the same pieces run eagerly (same kernels, same order)
    from memmamba_deploy.backends.triton_backend import TritonBackend

    model = gpu_model(torch.float16, **SMALL)
    backend = TritonBackend(model, cuda_graph=True)
    backend.PREFILL_TOKENS = 2048                                       # pieces of 1024 at batch 2
    backend.PIECE_COST_TOKENS = 0                                       # exactly these pieces, none padded
    prompt = torch.randint(0, 256, (2, 1500), generator=g).to(DEV)     # 1024 + 256 + 128 + 64 + 16 + 8 + 4
    logits, state = backend.prefill(prompt, backend.new_state(2))
    fast, eager_state, pos = triton_twin(model), model.new_state(2), 0
    for n in (1024, 256, 128, 64, 16, 8, 4):
        eager_logits, eager_state = fast.prefill(prompt[:, pos:pos + n], eager_state, last_only=True)
        pos += n
    errs = {k: rel_err(v, eager_state.tensors()[k]) for k, v in backend.state_to_reference(state).tensors().items()}
    err = rel_err(logits, eager_logits[:, -1])
    record(test="graphed_prefill_fp16", err=err, **{f"err_{k}": v for k, v in errs.items()})
    assert err <= 1e-2 and max(errs.values()) <= 1e-2, (err, errs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@torch.no_grad()
def test_graphed_prefill_in_two_streams_equals_the_halves_in_turn(dtype, g):
    # a piece of SPLIT_TOKENS or more runs as two halves on two streams inside its graph (prefill_in_halves): the
    # streams change when kernels run, never what they compute, so it equals the same halves run eagerly on one
    # stream, bit for bit (that those are the halves prefilled in turn: tests/test_model.py, on the CPU)
    from memmamba_deploy.backends.triton_backend import TritonBackend, prefill_in_halves

    model = gpu_model(dtype, **SMALL)
    backend = TritonBackend(model, cuda_graph=True)
    backend.SPLIT_TOKENS = 2048                                         # 2 x 1024 tokens: halves of 512
    backend.PIECE_COST_TOKENS = 0                                       # exactly these pieces, none padded
    prompt = torch.randint(0, 256, (2, 1100), generator=g).to(DEV)     # 1024 (split) + 64 + 8 + 4
    start = model.prefill(prompt[:, :100])[1]
    fast = triton_twin(model)
    eager_logits, eager_state = prefill_in_halves(fast, prompt[:, :1024], start)
    for pos, n in ((1024, 64), (1088, 8), (1096, 4)):
        eager_logits, eager_state = fast.prefill(prompt[:, pos:pos + n], eager_state, last_only=True)
    for _ in range(2):                                                   # the captured graphs, replayed twice
        logits, state = backend.prefill(prompt, start)
        assert torch.equal(logits, eager_logits[:, -1])
        for k, v in backend.state_to_reference(state).tensors().items():
            assert torch.equal(v, eager_state.tensors()[k]), k
    assert backend._prefill_streams is not None
    # against one prefill of the 1024 tokens: a split rounds otherwise (the scan's chunks, the GEMMs' shapes)
    whole_logits, _ = fast.prefill(prompt[:, :1024], start, last_only=True)
    split_logits, _ = prefill_in_halves(fast, prompt[:, :1024], start)
    err = rel_err(split_logits, whole_logits)
    record(test="prefill_in_halves", dtype=str(dtype), err_vs_whole=err)
    assert err <= (1e-4 if dtype == torch.float32 else 1e-2), err


@torch.no_grad()
def test_prefill_with_pdl_equals_without(g, monkeypatch):
    # the prefill kernels' programmatic dependent launch (launch.py) changes when programs start, never what they
    # compute: fp16 (the fused memory path) and fp32, eagerly and in CUDA graphs, bit for bit
    from memmamba_deploy.backends.triton_backend import TritonBackend
    from memmamba_deploy.models.ops.triton import launch

    assert launch.pdl_meta(torch.device(DEV))["USE_PDL"] == (torch.cuda.get_device_capability()[0] >= 9)
    ids = torch.randint(0, 256, (2, 1500), generator=g).to(DEV)
    for dtype in (torch.float16, torch.float32):
        model = gpu_model(dtype, **SMALL)
        runs = {}
        for pdl in (False, True):
            monkeypatch.setattr(launch, "PDL", pdl)
            backend = TritonBackend(model, cuda_graph=True)
            logits, state = backend.prefill(ids, backend.new_state(2))
            runs[pdl] = (triton_twin(model).prefill(ids), (logits, backend.state_to_reference(state)))
        for (off_logits, off_state), (on_logits, on_state) in zip(runs[False], runs[True]):
            assert torch.equal(on_logits, off_logits)
            for k, v in on_state.tensors().items():
                assert torch.equal(v, off_state.tensors()[k]), (dtype, k)


@pytest.mark.parametrize("step_kernel", STEP_KERNELS)
@pytest.mark.parametrize("variant", [dict(), SMALL, dict(memory=False)], ids=["tiny", "small", "no-memory"])
@torch.no_grad()
def test_decode_1k_greedy_steps_cuda_graph_fp32(variant, step_kernel, g):
    from memmamba_deploy.backends.triton_backend import TritonBackend

    model = gpu_model(torch.float32, **variant)
    backend = TritonBackend(model, cuda_graph=True, step_kernel=step_kernel)
    decisions = Decisions(model)
    prompt = torch.randint(0, 256, (2, 64), generator=g).to(DEV)
    ref_logits, ref_state = model.prefill(prompt)
    logits, state = backend.prefill(prompt, backend.new_state(2))
    assert rel_err(logits, ref_logits[:, -1]) <= 1e-4
    token = ref_logits[:, -1].argmax(-1)

    def state_errs():
        return {k: rel_err(v, ref_state.tensors()[k]) for k, v in backend.state_to_reference(state).tensors().items()}

    worst, flips, ties, disagree, last_margin = 0.0, 0, 0, 0, float("inf")
    for _ in range(1000):
        ref_l, ref_state, margin = decisions.step(token, ref_state)
        logits, state = backend.step(token, state)
        err = rel_err(logits, ref_l)
        if err > 1e-4 and min(margin, last_margin) < 1e-5:          # a decision within rounding of its threshold
            flips += 1
            state = backend.copy_state(ref_state)                    # both sides right: resume from the reference
        else:
            worst = max(worst, err)
            disagree += int((logits.argmax(-1) != ref_l.argmax(-1)).sum())
        if err <= 1e-4 and margin < 1e-5:
            # A pool decision within rounding (in a loop of repeated tokens a score ties the lowest priority, the
            # tokens' summaries nearly equal): either choice is right, and the logits need not show which was
            # taken. Where it went the other way only the pool differs; resume from the reference. Near
            # decisions that went alike (most of them) leave the state to the end-of-run check.
            errs = state_errs()
            if max(errs.values()) > 1e-4:
                assert errs["conv"] <= 1e-4 and errs["ssm"] <= 1e-4, errs
                ties += 1
                state = backend.copy_state(ref_state)
        last_margin = margin
        token = ref_l.argmax(-1)                                     # the reference drives the tokens
    decisions.close()
    errs = state_errs()
    state_err = max(errs.values())
    record(test="decode_1k_fp32_graph", variant=str(variant), step_kernel=step_kernel, err=worst,
           greedy_disagreements=disagree, decision_flips=flips, pool_ties_taken_otherwise=ties, state_err=state_err,
           seed=g.initial_seed(), **{f"info_state_{k}": v for k, v in errs.items()})
    assert worst <= 1e-4 and disagree == 0 and flips <= 3 and ties <= 10 and (flips or state_err <= 1e-4)


@pytest.mark.parametrize("step_kernel", STEP_KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids_dtype.get)
@torch.no_grad()
def test_decode_130m_preset_teacher_forced(dtype, step_kernel, g):
    """The 130m shape (the benchmark's block sizes), random weights, each step from the reference's state."""
    from memmamba_deploy.backends.triton_backend import TritonBackend

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
    model = MemMambaLM(MemMambaConfig.preset("130m")).to(DEV, dtype).eval()
    backend = TritonBackend(model, cuda_graph=True, step_kernel=step_kernel)
    decisions = Decisions(model)
    _, ref_state = model.prefill(torch.randint(0, 50280, (1, 200), generator=g).to(DEV))
    errs, flips = [], 0
    for _ in range(48):
        token = torch.randint(0, 50280, (1,), generator=g).to(DEV)
        poison_backend(backend, 1, keep=None)
        logits, _ = backend.step(token, backend.copy_state(ref_state))
        ref_l, ref_state, margin = decisions.step(token, ref_state)
        err = rel_err(logits, ref_l)
        if err > TOL[dtype] and margin < 10 * TOL[dtype]:             # a read trigger within rounding of tau2
            flips += 1
        else:
            errs.append(err)
    decisions.close()
    record(test="decode_130m_teacher_forced", dtype=ids_dtype[dtype], step_kernel=step_kernel, err=max(errs),
           decision_flips=flips)
    assert max(errs) <= TOL[dtype] and flips <= 2


@pytest.mark.parametrize("step_kernel", STEP_KERNELS)
@torch.no_grad()
def test_cuda_graph_replay_equals_eager_launches(step_kernel, g):
    from memmamba_deploy.backends.triton_backend import TritonBackend

    # fp32: the x_proj / out_proj sums are fp32 atomics, so two runs agree to rounding, not bit for bit; in fp16
    # a last-bit difference could round either way and grow over 50 steps. The eager side of the persistent
    # kernel is its phased form (one launch per phase): the barriers' version against the plain one.
    model = gpu_model(torch.float32, **SMALL)
    graphed = TritonBackend(model, cuda_graph=True, step_kernel=step_kernel)
    eager = TritonBackend(model, cuda_graph=False, step_kernel="phased" if step_kernel == "persistent" else step_kernel)
    sg, se = graphed.new_state(3), eager.new_state(3)
    for _ in range(50):
        token = torch.randint(0, 256, (3,), generator=g).to(DEV)
        lg, sg = graphed.step(token, sg)
        le, se = eager.step(token, se)
        assert rel_err(lg, le) <= 1e-5
    for k, v in graphed.state_to_reference(sg).tensors().items():
        assert rel_err(v, eager.state_to_reference(se).tensors()[k]) <= 1e-5, k
