"""The TensorRT plugins on the GPU, through the plugin harness (TensorRT's part played without TensorRT): every
plugin built from the parser's fields, serialized, recreated for the runtime phase and enqueued on fresh random
inputs, against the PyTorch reference (fp32 <= 1e-4 rel, fp16 <= 1e-2); outputs are poisoned first so an
unwritten element fails. Then a plugins-flavour prefill and decode run of a tiny MemMamba, every custom op through
the plugins, against the reference model.

Run by scripts/gpu_stages/30-plugins.sh (it sets MEMMAMBA_PLUGIN_BUILD to its CMake build). Case errors go to
$MEMMAMBA_RESULTS (JSON lines) when set.
"""
from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import pytest
import torch

from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models import MemMambaConfig, MemMambaLM
from memmamba_deploy.models.ops import TORCH_OPS
from memmamba_deploy.models.ops.pool import pool_attention_ref, pool_sweep_ref
from memmamba_deploy.models.ops.scan import selective_scan_ref, selective_state_step_ref
from memmamba_deploy.plugin_harness import TRT_HEADERS, Harness, build_plugins, contract_fields

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by 30-plugins.sh)")]

TOL = {torch.float32: 1e-4, torch.float16: 1e-2}
DEV = "cuda"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    build = os.environ.get("MEMMAMBA_PLUGIN_BUILD")
    if build:
        lib, h = Path(build) / "libmemmamba_plugins.so", Path(build) / "libmemmamba_plugin_harness.so"
    else:
        built = build_plugins(tmp_path_factory.mktemp("plugins-build"), trt_include=TRT_HEADERS)
        lib, h = built.plugins, built.harness
    harness = Harness(h, lib)
    yield harness
    harness.close()


def record(**row):
    path = os.environ.get("MEMMAMBA_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": "plugins", **row}) + "\n")


def run_plugin(harness, op, attrs, inputs, outputs, workspace_check=True):
    """Build `op` from `attrs` for these input tensors, check the reported outputs, poison and run. -> outputs."""
    spec = [(_dt(t), tuple(t.shape)) for t in inputs]
    p = harness.build(op, spec, contract_fields(op, attrs), len(outputs))
    try:
        assert p.outputs == [(_dt(t), tuple(t.shape)) for t in outputs], p.outputs
        for t in outputs:                       # poison: an element the plugin does not write fails the comparison
            t.fill_(float("nan") if t.is_floating_point() else -12345)
        ws = torch.empty(max(p.workspace, 1), dtype=torch.uint8, device=DEV)
        harness.enqueue(p, [t.contiguous() for t in inputs], outputs, workspace=ws)
        torch.cuda.synchronize()
        return outputs
    finally:
        harness.release(p)


def _dt(t):
    return {torch.float32: "float32", torch.float16: "float16", torch.int32: "int32"}[t.dtype]


# ---- selective scan -----------------------------------------------------------------------------------------------------
def scan_inputs(b, t, di, n, dtype, g, softplus, step=False):
    r = lambda *s: torch.randn(*s, generator=g)                                  # noqa: E731
    shape = (b, di) if step else (b, t, di)
    bc = (b, n) if step else (b, t, n)
    # without softplus dt + dt_bias is the step itself: keep it positive, or the state grows without bound
    dt = r(*shape) * 0.5 - 1.0 if softplus else torch.rand(*shape, generator=g) * 0.1
    act = dict(x=r(*shape), dt=dt, B=r(*bc), C=r(*bc), z=r(*shape))
    fixed = dict(A=-torch.exp(r(di, n) * 0.5), D=r(di), dt_bias=torch.rand(di, generator=g) * 0.1,
                 h0=r(b, di, n))
    act = {k: v.to(DEV, dtype) for k, v in act.items()}
    fixed = {k: v.to(DEV) for k, v in fixed.items()}
    return act, fixed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,t,di,n,softplus", [(1, 1, 64, 8, 1), (3, 37, 128, 16, 1), (2, 64, 64, 8, 1),
                                                (2, 65, 96, 16, 0), (2, 300, 128, 16, 1)])
def test_scan_chunk_matches_reference(harness, dtype, b, t, di, n, softplus):
    g = torch.Generator().manual_seed(hash((b, t, di, n, softplus)) % 2**31)
    a, f = scan_inputs(b, t, di, n, dtype, g, softplus)
    ins = [a["x"], a["dt"], f["A"], a["B"], a["C"], f["D"], a["z"], f["dt_bias"], f["h0"]]
    y = torch.empty(b, t, di, dtype=dtype, device=DEV)
    h = torch.empty(b, di, n, dtype=torch.float32, device=DEV)
    run_plugin(harness, "SelectiveScanChunk", {"dt_softplus": softplus}, ins, [y, h])
    y_ref, h_ref = selective_scan_ref(a["x"].float(), a["dt"].float(), f["A"], a["B"].float(), a["C"].float(), f["D"],
                                      a["z"].float(), f["dt_bias"], f["h0"], dt_softplus=bool(softplus))
    ey, eh = rel_err(y.float(), y_ref), rel_err(h, h_ref)
    record(op="SelectiveScanChunk", dtype=str(dtype), shape=[b, t, di, n], err_y=ey, err_h=eh)
    assert ey <= TOL[dtype] and eh <= TOL[dtype], (ey, eh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,di,n,softplus", [(1, 64, 8, 1), (4, 128, 16, 1), (3, 1536, 16, 0)])
def test_scan_step_matches_reference(harness, dtype, b, di, n, softplus):
    g = torch.Generator().manual_seed(hash((b, di, n, softplus)) % 2**31)
    a, f = scan_inputs(b, 1, di, n, dtype, g, softplus, step=True)
    ins = [a["x"], a["dt"], f["A"], a["B"], a["C"], f["D"], a["z"], f["dt_bias"], f["h0"]]
    y = torch.empty(b, di, dtype=dtype, device=DEV)
    h = torch.empty(b, di, n, dtype=torch.float32, device=DEV)
    run_plugin(harness, "SelectiveScanStep", {"dt_softplus": softplus}, ins, [y, h])
    y_ref, h_ref = selective_state_step_ref(f["h0"], a["x"].float(), a["dt"].float(), f["A"], a["B"].float(),
                                            a["C"].float(), f["D"], a["z"].float(), f["dt_bias"], bool(softplus))
    ey, eh = rel_err(y.float(), y_ref), rel_err(h, h_ref)
    record(op="SelectiveScanStep", dtype=str(dtype), shape=[b, di, n], err_y=ey, err_h=eh)
    assert ey <= TOL[dtype] and eh <= TOL[dtype], (ey, eh)


# ---- note pool sweep -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,t,k", [(1, 1, 8), (3, 50, 8), (2, 200, 50), (4, 33, 1)])
def test_pool_sweep_matches_reference_exactly(harness, b, t, k):
    g = torch.Generator().manual_seed(b * 1000 + t + k)
    scores = (torch.randint(0, 9, (b, t), generator=g).float() / 8)        # coarse: many exact ties, some == tau
    prio0 = torch.where(torch.rand(b, k, generator=g) < 0.5, -1.0, (torch.randint(0, 9, (b, k), generator=g) / 8))
    scores, prio0 = scores.to(DEV), prio0.float().to(DEV)
    index = torch.empty(b, t + 1, k, dtype=torch.int32, device=DEV)
    prio = torch.empty(b, k, dtype=torch.float32, device=DEV)
    run_plugin(harness, "NotePoolSweep", {"insert_threshold": 0.5}, [scores, prio0], [index, prio])
    index_ref, prio_ref = pool_sweep_ref(scores, prio0, 0.5)
    mismatches = int((index != index_ref).sum())
    record(op="NotePoolSweep", shape=[b, t, k], index_mismatches=mismatches)
    assert mismatches == 0 and torch.equal(prio, prio_ref)


# ---- sparse pool attention -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("b,t,m,s,ds,d,heads", [(1, 1, 8, 8, 16, 64, 2), (3, 9, 40, 13, 64, 768, 4),
                                                 (2, 130, 146, 16, 16, 64, 2)])
def test_pool_attention_matches_reference(harness, dtype, b, t, m, s, ds, d, heads):
    g = torch.Generator().manual_seed(b * 7 + t * 11 + s)
    q = torch.randn(b, t, ds, generator=g).to(DEV, dtype)
    keys = torch.randn(b, m, ds, generator=g).to(DEV, dtype)
    values = torch.randn(b, m, d, generator=g).to(DEV, dtype)
    index = torch.randint(-1, m, (b, t, s), generator=g, dtype=torch.int32)
    index[:, 0] = -1                                                         # a query with no entry reads 0
    index = index.to(DEV)
    o = torch.empty(b, t, d, dtype=dtype, device=DEV)
    run_plugin(harness, "SparsePoolAttention", {"num_heads": heads}, [q, keys, values, index], [o])
    ref = pool_attention_ref(q.float(), keys.float(), values.float(), index, heads)
    e = rel_err(o.float(), ref)
    record(op="SparsePoolAttention", dtype=str(dtype), shape=[b, t, m, s, ds, d, heads], err=e)
    assert e <= TOL[dtype] and torch.all(o[:, 0] == 0)


# ---- a plugins-flavour model: every custom op through the plugins ---------------------------------------------------------
def plugin_ops(harness):
    """TORCH_OPS with the four contract ops replaced by plugin runs (what a plugins-flavour engine executes)."""

    def selective_scan(x, dt, A, B, C, D, z=None, dt_bias=None, h0=None, dt_softplus=True, last_only=False):
        if last_only and z is not None and z.shape[1] == 1:           # the last token's gate alone: it gates the
            z = z.expand(x.shape).contiguous()                        # kept y, the other rows are dropped
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)     # empty_like would keep a view's strides
        h = torch.empty(x.shape[0], x.shape[2], A.shape[1], dtype=torch.float32, device=x.device)
        run_plugin(harness, "SelectiveScanChunk", {"dt_softplus": int(dt_softplus)},
                   [x, dt, A.float(), B, C, D.float(), z, dt_bias.float(), h0.float()], [y, h])
        return (y[:, -1:] if last_only else y), h

    def selective_state_step(h, x, dt, A, B, C, D, z=None, dt_bias=None, dt_softplus=True):
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        h_new = torch.empty(h.shape, dtype=torch.float32, device=h.device)
        return tuple(run_plugin(harness, "SelectiveScanStep", {"dt_softplus": int(dt_softplus)},
                                [x, dt, A.float(), B, C, D.float(), z, dt_bias.float(), h.float()], [y, h_new]))

    def pool_sweep(scores, prio0, tau1):
        b, t = scores.shape
        index = torch.empty(b, t + 1, prio0.shape[1], dtype=torch.int32, device=scores.device)
        prio = torch.empty(prio0.shape, dtype=torch.float32, device=prio0.device)
        return tuple(run_plugin(harness, "NotePoolSweep", {"insert_threshold": float(tau1)},
                                [scores.float(), prio0.float()], [index, prio]))

    def pool_attention(q, keys, values, index, heads):
        o = torch.empty(q.shape[0], q.shape[1], values.shape[2], dtype=q.dtype, device=q.device)
        return run_plugin(harness, "SparsePoolAttention", {"num_heads": int(heads)},
                          [q, keys, values, index.to(torch.int32)], [o])[0]

    return types.SimpleNamespace(**{**vars(TORCH_OPS), "name": "plugins", "selective_scan": selective_scan,
                                    "selective_state_step": selective_state_step, "pool_sweep": pool_sweep,
                                    "pool_attention": pool_attention})


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = MemMambaLM(MemMambaConfig.preset("tiny")).eval()
    with torch.no_grad():                     # as tests/conftest.py: let a good share of tokens clear tau1
        for layer in model.layers:
            layer.note.score_out.weight.normal_(0.0, 1.0)
    return model.to(DEV)


@torch.no_grad()
def test_plugins_flavour_prefill_and_decode_match_reference(harness):
    ref = tiny_model()
    plug = tiny_model()
    plug.ops = plugin_ops(harness)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (2, 48), generator=g).to(DEV)
    logits_ref, state_ref = ref.prefill(ids[:, :40])
    logits, state = plug.prefill(ids[:, :40])
    e_prefill = rel_err(logits, logits_ref)
    worst = 0.0
    for t in range(40, 48):
        step_ref, state_ref = ref.step(ids[:, t], state_ref)
        step, state = plug.step(ids[:, t], state)
        worst = max(worst, rel_err(step, step_ref))
    e_state = max(rel_err(getattr(state, k), getattr(state_ref, k)) for k in ("conv", "ssm", "pool", "prio"))
    record(op="model", what="tiny, batch 2, prefill 40 + 8 decode steps", err_prefill=e_prefill,
           err_step=worst, err_state=e_state)
    assert e_prefill <= 1e-4 and worst <= 1e-4 and e_state <= 1e-4, (e_prefill, worst, e_state)
    assert not math.isnan(worst)
