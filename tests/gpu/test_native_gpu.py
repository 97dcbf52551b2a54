"""The C++ native runtime (cpp/, libmemmamba) on the GPU against the PyTorch reference (MemMambaLM, kernels="torch").

Prefill + 1000 decode steps, fp32 (<= 1e-4 rel) and fp16 (<= 1e-2), memory path on and off, batch 1 and 4 (the
default "cublas" plan; the "fused" plan at batch 4): the
native logits of every step, its state (conv, ssm, pool, prio: models.State layout) after prefill and at the end,
and its greedy tokens (a token may differ only where the reference's top two logits lie within the measured error:
a near tie, counted and reported). Then generate() vs the step loop, the GPU sampler vs cpp_support.sample_ref, fork
/ reset / stop-token semantics, eager launches vs the CUDA graph, clear errors, and the memmamba_chat example.

Run by scripts/gpu_stages/60-native.sh, which builds cpp/ and sets MEMMAMBA_NATIVE_BUILD; alone, the fixture builds
it (a few minutes: the Triton kernels are compiled ahead of time). Figures go to $MEMMAMBA_RESULTS (JSON lines).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memmamba_deploy.metrics import align_pool_slots, rel_err
from memmamba_deploy.models import MemMambaLM, State
from tests.conftest import make_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "cpp"))
from native_shim import NativeError, NativeSession, build_runtime  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by 60-native.sh)")]

TOL = {"fp32": 1e-4, "fp16": 1e-2}
torch.backends.cuda.matmul.allow_tf32 = False     # the fp32 reference in true fp32 (prefill's conv1d runs in cuDNN)
torch.backends.cudnn.allow_tf32 = False
TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16}
DECODE_STEPS = 1000


def record(**row):
    path = os.environ.get("MEMMAMBA_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": "native", **row}) + "\n")


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    path = os.environ.get("MEMMAMBA_NATIVE_BUILD")
    if path:
        return Path(path)
    return build_runtime(tmp_path_factory.mktemp("native-build"), archs="90", configs=())


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny-preset checkpoints (the kernel library is built for the tiny and 130m shapes), memory on and off."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for memory in (True, False):
        model = make_model(seed=21 + memory, memory=memory)
        model.save_pretrained(root / f"mem{int(memory)}")
        out[memory] = (root / f"mem{int(memory)}", model)
    return out


def reference(ckpt, dtype):
    """The reference as the native runtime sees it: the checkpoint's weights in `dtype` (kernels="torch")."""
    return MemMambaLM.from_pretrained(ckpt, device="cuda", dtype=TORCH_DTYPE[dtype])


def compare_state(native, state, dtype, what, tie_flips=None):
    """The native state against the reference's, pools aligned slot by slot first (metrics.align_pool_slots: the
    parallel prefill may keep the same entries in other slots where priorities tie).

    tie_flips (fp16): a function giving the Python Triton backend's state after the same calls. A slot may then
    hold another token's summary with the reference's very priority (two tokens whose scores half precision rounds
    alike, 2^-11 apart near 1, one entering where the other did: a decision flip, spec §9) only where the Python
    backend's prefill holds that same summary too, at most one slot a (layer, batch row) and two in all; the pool's
    error is taken over the other slots, every other tensor and the priorities as usual."""
    ref = state.to("cpu")
    got = align_pool_slots(ref, State(**{name: native.state(name, t.shape) for name, t in ref.tensors().items()}))
    errs = {}
    keep = None
    if tie_flips is not None and dtype == "fp16" and ref.pool is not None:
        scale = ref.pool.float().abs().amax()
        flipped = ((got.pool.float() - ref.pool.float()).abs().amax(-1) / scale > TOL[dtype]) & \
            ((got.prio.float() - ref.prio.float()).abs() <= 1e-6)
        errs["tie_flips"] = int(flipped.sum())
        if flipped.any():
            assert flipped.sum(-1).max() <= 1 and flipped.sum() <= 2, f"{what}: {int(flipped.sum())} slots flipped"
            py = align_pool_slots(ref, tie_flips().to("cpu"))
            alike = (py.pool.float() - got.pool.float()).abs().amax(-1) / scale <= TOL[dtype]
            assert alike[flipped].all(), f"{what}: a pool slot differs where the Python backend's prefill does not"
            keep = ~flipped
    for name, t in ref.tensors().items():
        a, b = getattr(got, name).float(), t.float()
        if name == "pool" and keep is not None:
            a, b = a[keep], b[keep]
        errs[name] = rel_err(a, b)
        assert errs[name] <= TOL[dtype], f"{what}: state.{name} rel err {errs[name]:.2e}"
    return errs


def python_prefill(ckpt, dtype, calls):
    """The Python Triton backend's state (reference layout) after prefilling each of `calls` ([B, T] ids) in turn."""
    from memmamba_deploy.backends.triton_backend import TritonBackend

    backend = TritonBackend.open(ckpt, device="cuda", dtype=TORCH_DTYPE[dtype])
    state = backend.new_state(calls[0].shape[0])
    for ids in calls:
        _, state = backend.prefill(ids.cuda(), state)
    return backend.state_to_reference(state)


PARITY = [(dt, mem, b, "cublas") for dt in ("fp32", "fp16") for mem in (True, False) for b in (1, 4)]
PARITY += [(dt, mem, 4, "fused") for dt in ("fp32", "fp16") for mem in (True, False)]


@pytest.mark.parametrize("dtype,memory,batch,plan", PARITY)
@torch.no_grad()
def test_prefill_and_1k_decode_match_reference(build, checkpoints, dtype, memory, batch, plan):
    ckpt, model = checkpoints[memory]
    ref = reference(ckpt, dtype)
    V = ref.config.vocab_size
    native = NativeSession(build, ckpt, dtype=dtype, batch=batch, plan=plan)
    g = torch.Generator().manual_seed(100 + batch)
    prompt = torch.randint(0, V, (batch, 32), generator=g)
    native.prefill(prompt)
    ref_logits, state = ref.prefill(prompt.cuda())
    ref_logits = ref_logits[:, -1].float().cpu()
    logits = native.logits(V)
    assert torch.isfinite(logits).all()
    prefill_err = rel_err(logits, ref_logits)
    assert prefill_err <= TOL[dtype], f"prefill logits rel err {prefill_err:.2e}"
    compare_state(native, state, dtype, "after prefill")

    worst, mismatches, near_ties, min_margin, flips = 0.0, 0, 0, float("inf"), 0
    for i in range(DECODE_STEPS):
        token = logits.argmax(-1)                                      # the native runtime's greedy token
        ref_token = ref_logits.argmax(-1)
        top2 = ref_logits.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1])
        slack = 2 * (logits - ref_logits).abs().max().item()
        mismatches += int((token != ref_token).sum())
        near_ties += int(((token != ref_token) & (margin <= slack)).sum())
        min_margin = min(min_margin, margin.min().item())
        native.step(token.int())
        ref_out, state = ref.step(token.cuda(), state)
        logits, ref_logits = native.logits(V), ref_out.float().cpu()
        err = rel_err(logits, ref_logits)
        worst = max(worst, err)
        assert err <= TOL[dtype], f"decode step {i}: logits rel err {err:.2e}"
        if memory:
            # spec §9: a Note-Block score within rounding of a threshold may be decided differently; such a
            # decision flip is counted, and the reference state is copied into the native session so the
            # comparison goes on from the same pools (numeric error and decision flips are reported apart)
            prio, ref_prio = native.state("prio", state.prio.shape), state.prio.cpu()
            if ((prio >= 0) != (ref_prio >= 0)).any() or (prio - ref_prio).abs().max() > 1e-3:
                flips += 1
                for name, t in state.tensors().items():
                    native.set_state(name, t.cpu())
    end_errs = compare_state(native, state, dtype, f"after {DECODE_STEPS} steps")
    record(test="parity", plan=plan, dtype=dtype, memory=memory, batch=batch, prefill_err=prefill_err,
           decode_worst_err=worst,
           greedy_mismatches=mismatches, near_ties=near_ties, min_top2_margin=min_margin, final_state_err=end_errs,
           decision_flips=flips)
    assert mismatches == near_ties, f"{mismatches - near_ties} greedy token(s) differ with a clear top-2 margin"
    if dtype == "fp32":
        assert flips == 0, f"{flips} pool decision flip(s) in fp32"
    assert flips <= DECODE_STEPS // 100, f"{flips} pool decision flips in {DECODE_STEPS} steps"
    native.close()


@pytest.mark.parametrize("dtype,batch", [(dt, b) for dt in ("fp32", "fp16") for b in (1, 3)])
@torch.no_grad()
def test_long_prompts_prefill_in_parallel_chunks(build, checkpoints, dtype, batch):
    """A prompt longer than the runtime's prefill chunk (8192 rows: 8192 // batch tokens), fed in two calls: the
    parallel prefill (the chunked scan, the pool sweep, the sparse reads; spec §8), chunk after chunk and call after
    call, against MemMambaLM.prefill of the whole prompt; then decoding goes on from that state as the reference
    does."""
    ckpt, _ = checkpoints[True]
    ref = reference(ckpt, dtype)
    V = ref.config.vocab_size
    native = NativeSession(build, ckpt, dtype=dtype, batch=batch)
    assert "prefill parallel" in native.describe(), native.describe()
    g = torch.Generator().manual_seed(7 + batch)
    first = 8192 // batch + 250             # a full chunk and 250 tokens: two chunks in flight
    prompt = torch.randint(0, V, (batch, first + 300), generator=g)
    native.prefill(prompt[:, :first])
    native.prefill(prompt[:, first:])       # resumes from that state
    ref_logits, state = ref.prefill(prompt.cuda(), last_only=True)
    logits, ref_logits = native.logits(V), ref_logits[:, -1].float().cpu()
    assert torch.isfinite(logits).all()
    err = rel_err(logits, ref_logits)
    assert err <= TOL[dtype], f"logits after a {prompt.shape[1]}-token prefill: rel err {err:.2e}"
    errs = compare_state(native, state, dtype, f"after a {prompt.shape[1]}-token prefill",
                         tie_flips=lambda: python_prefill(ckpt, dtype, [prompt[:, :first], prompt[:, first:]]))
    for i in range(16):                     # decoding from the parallel prefill's state
        token = ref_logits.argmax(-1)
        native.step(token.int())
        ref_out, state = ref.step(token.cuda(), state)
        logits, ref_logits = native.logits(V), ref_out.float().cpu()
        assert rel_err(logits, ref_logits) <= TOL[dtype], f"decode step {i} after the long prefill"
    flips = errs.pop("tie_flips", 0)
    record(test="long-prefill", dtype=dtype, batch=batch, tokens=prompt.shape[1], logits_err=err, state_err=errs,
           tie_flips=flips)
    native.close()


CHUNKINGS = [(mem, plan, batch, rows) for mem in (True, False) for plan, batch, rows in
             (("cublas", 1, 7), ("cublas", 2, 7), ("fused", 2, 64), ("cublas", 2, 1), ("cublas", 1, 0))]


@pytest.mark.parametrize("memory,plan,batch,rows", CHUNKINGS)
@torch.no_grad()
def test_prefill_matches_reference_at_every_chunking(build, checkpoints, memory, plan, batch, rows):
    """Prompts of 2 to 36 tokens with chunks of a few tokens (SessionOptions::prefillRows 7, 64, or 1 at batch 2:
    a token a row; chunk boundaries everywhere, a prompt that fills its chunks exactly, prompts shorter than the
    conv window) and with the parallel prefill off (rows 0: token by token), fp32; the first from a fresh state,
    each other from the state the one before left."""
    ckpt, _ = checkpoints[memory]
    ref = reference(ckpt, "fp32")
    V = ref.config.vocab_size
    native = NativeSession(build, ckpt, dtype="fp32", batch=batch, plan=plan, prefill_rows=rows)
    mode = "prefill token by token (SessionOptions::prefillRows is 0)" if rows == 0 else "prefill parallel"
    assert mode in native.describe(), native.describe()
    g = torch.Generator().manual_seed(40 + batch + rows)
    state = None
    for T in (2, 3, 4, 5, 15, 36):                  # batch 1, rows 7: Tp = 14 fills two chunks exactly
        prompt = torch.randint(0, V, (batch, T), generator=g)
        native.prefill(prompt)
        ref_logits, state = ref.prefill(prompt.cuda(), state, last_only=True)
        err = rel_err(native.logits(V), ref_logits[:, -1].float().cpu())
        assert err <= TOL["fp32"], f"{T} tokens: logits rel err {err:.2e}"
        compare_state(native, state, "fp32", f"after {T} more tokens")
    native.close()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("rows", [8192, 4 * 64], ids=["one-chunk", "chunks-of-64"])
@torch.no_grad()
def test_prefill_of_rows_of_different_lengths(build, checkpoints, dtype, rows):
    """Session::prefill(tokens, T, lengths): one call prefills rows of their own lengths, as the reference's
    MemMambaLM.prefill(..., lengths) does (each row its own tokens alone: tests/test_model.py), in one chunk and in
    chunks of 64 tokens a row on both sides (rows ending in the first chunk, mid-chunk, at a chunk's end and in the
    last chunk); logits and state after it, after greedy steps together, and after a second such prefill that
    first feeds generate()'s pending tokens. Lengths outside 1..T are refused, and so is a session that prefills
    token by token."""
    ckpt, _ = checkpoints[True]
    ref = reference(ckpt, dtype)
    V = ref.config.vocab_size
    native = NativeSession(build, ckpt, dtype=dtype, batch=4, prefill_rows=rows)
    g = torch.Generator().manual_seed(29 + rows)
    first = torch.randint(0, V, (4, 9), generator=g)
    native.prefill(first)
    _, state = ref.prefill(first.cuda(), last_only=True)

    def python_rows(calls):                            # the Python Triton backend's prefill of the same rows (fp16
        from memmamba_deploy.backends.triton_backend import TritonBackend      # decision flips: compare_state)
        backend = TritonBackend.open(ckpt, device="cuda", dtype=TORCH_DTYPE[dtype])
        st = backend.new_state(4)
        for ids, lengths in calls:
            _, st = backend.prefill(ids.cuda(), st, lengths=lengths)
        return backend.state_to_reference(st)

    ids, lengths = torch.randint(0, V, (4, 200), generator=g), torch.tensor([200, 128, 97, 1])
    native.prefill(ids, lengths)
    ref_logits, state = ref.prefill(ids.cuda(), state, last_only=True, lengths=lengths.cuda())
    err = rel_err(native.logits(V), ref_logits[:, -1].float().cpu())
    assert err <= TOL[dtype], f"logits rel err {err:.2e}"
    calls = [(first, None), (ids, lengths)]
    errs = compare_state(native, state, dtype, "after rows of different lengths", lambda: python_rows(calls))
    tokens = native.generate(4)                        # together; the last token pending
    for t in tokens[:, :-1].t():
        ref_logits, state = ref.step(t.cuda(), state)
    more, more_len = torch.randint(0, V, (4, 50), generator=g), torch.tensor([3, 50, 1, 17])
    native.prefill(more, more_len)                     # each row: its pending token, then its own tokens
    ref_logits, state = ref.prefill(torch.cat([tokens[:, -1:], more], 1).cuda(), state, last_only=True,
                                    lengths=(more_len + 1).cuda())
    err2 = rel_err(native.logits(V), ref_logits[:, -1].float().cpu())
    assert err2 <= TOL[dtype], f"after the second prefill: logits rel err {err2:.2e}"
    compare_state(native, state, dtype, "after a second prefill of rows",
                  lambda: python_rows(calls + [(tokens[:, :-1], None),
                                               (torch.cat([tokens[:, -1:], more], 1), more_len + 1)]))
    # columns past every row's end (the session feeds the first 31 only; lengths equal there: a plain prefill)
    tail = torch.randint(0, V, (4, 60), generator=g)
    for tail_len in (torch.tensor([31, 12, 31, 5]), torch.tensor([31, 31, 31, 31])):
        native.prefill(tail, tail_len)
        ref_logits, state = ref.prefill(tail.cuda(), state, last_only=True, lengths=tail_len.cuda())
        err3 = rel_err(native.logits(V), ref_logits[:, -1].float().cpu())
        assert err3 <= TOL[dtype], f"rows shorter than T ({tail_len.tolist()}): logits rel err {err3:.2e}"
    record(test="rows-of-different-lengths", dtype=dtype, rows=rows, logits_err=err, second_logits_err=err2,
           state_err=errs)
    for bad in ([200, 0, 1, 1], [201, 1, 1, 1]):
        with pytest.raises(NativeError, match="outside 1..200"):
            native.prefill(ids, bad)
    native.close()
    by_step = NativeSession(build, ckpt, dtype=dtype, batch=4, prefill_rows=0)
    with pytest.raises(NativeError, match="rows of different lengths need the parallel prefill"):
        by_step.prefill(ids, lengths)
    by_step.close()


@pytest.mark.parametrize("plan", ["cublas", "fused"])
@torch.no_grad()
def test_fp16_prefill_in_many_chunks(build, checkpoints, plan):
    """fp16 (the reads through pool_mix) with five chunks a call: both sides' buffers are reused by later pairs
    (chunk c+2 on chunk c's side), and every chunk but the last runs its last layer for the state alone."""
    ckpt, _ = checkpoints[True]
    ref = reference(ckpt, "fp16")
    V = ref.config.vocab_size
    native = NativeSession(build, ckpt, dtype="fp16", batch=2, plan=plan, prefill_rows=128)   # 64 tokens a row
    g = torch.Generator().manual_seed(11)
    calls = [torch.randint(0, V, (2, T), generator=g) for T in (300, 129)]    # 5 chunks, then 3 (the last of 1)
    state = None
    for i, prompt in enumerate(calls):
        native.prefill(prompt)
        ref_logits, state = ref.prefill(prompt.cuda(), state, last_only=True)
        err = rel_err(native.logits(V), ref_logits[:, -1].float().cpu())
        assert err <= TOL["fp16"], f"call {i}: logits rel err {err:.2e}"
        compare_state(native, state, "fp16", f"after call {i}",
                      tie_flips=lambda i=i: python_prefill(ckpt, "fp16", calls[:i + 1]))
    native.close()


_PDL_OFF_RUN = """
import sys, torch
sys.path.insert(0, {cpp!r})
from native_shim import NativeSession
s = NativeSession({build!r}, {ckpt!r}, dtype="fp16", batch=2, plan="fused", prefill_rows=128)
assert "PDL off" in s.describe(), s.describe()
s.prefill(torch.load({prompt!r}))
out = {{"logits": s.logits({V})}}
for name, shape in {shapes!r}:
    out[name] = s.state(name, shape)
torch.save(out, {out!r})
"""


@torch.no_grad()
def test_pdl_launches_change_no_result(build, checkpoints, tmp_path):
    """The prefill's kernels launched as programmatic dependents give what plain launches give: five chunks in
    this process and in one with MEMMAMBA_AOT_NO_PDL=1 agree bit for bit (a kernel that read its predecessor's
    output before waiting for it would not). The fused plan's decode graphs (PDL too; their fp32 atomics are not
    bit-reproducible) are checked against the reference over 1k steps above."""
    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    native = NativeSession(build, ckpt, dtype="fp16", batch=2, plan="fused", prefill_rows=128)
    if "PDL: prefill, decode graph" not in native.describe():
        pytest.skip(f"no PDL on this GPU or driver: {native.describe()}")
    prompt = torch.randint(0, V, (2, 300), generator=torch.Generator().manual_seed(12))
    torch.save(prompt, tmp_path / "prompt.pt")
    native.prefill(prompt)
    got = {"logits": native.logits(V)}
    shapes = [(name, list(t.shape)) for name, t in State.zeros(model.config, 2).tensors().items()]
    for name, shape in shapes:
        got[name] = native.state(name, shape)
    native.close()
    code = _PDL_OFF_RUN.format(cpp=str(Path(__file__).resolve().parents[2] / "cpp"), build=str(build), ckpt=str(ckpt),
                               prompt=str(tmp_path / "prompt.pt"), V=V, shapes=shapes, out=str(tmp_path / "plain.pt"))
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MEMMAMBA_AOT_NO_PDL": "1"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")
    for name, t in got.items():
        assert torch.equal(t, plain[name]), f"{name} differs between PDL and plain launches"


@torch.no_grad()
def test_a_shorter_prompt_after_a_longer_one(build, checkpoints):
    """The prefill keeps its buffers between prompts; the scan's chunk count is not monotonic in the prompt's
    length (289 tokens: 17 chunks of 17; 288: 18 of 16), so a shorter prompt must still fit what a longer one
    allocated (it once wrote past them: wrong states, or an illegal address)."""
    ckpt, _ = checkpoints[True]
    ref = reference(ckpt, "fp32")
    V = ref.config.vocab_size
    native = NativeSession(build, ckpt, dtype="fp32")
    g = torch.Generator().manual_seed(17)
    for T in (290, 289, 8178, 8177):
        prompt = torch.randint(0, V, (1, T), generator=g)
        native.reset()
        native.prefill(prompt)
        ref_logits, state = ref.prefill(prompt.cuda(), last_only=True)
        assert rel_err(native.logits(V), ref_logits[:, -1].float().cpu()) <= TOL["fp32"], T
        compare_state(native, state, "fp32", f"a {T}-token prompt after a longer one")
    native.close()


def fed(build, ckpt, prompt, tokens, dtype="fp32"):
    """A session that prefilled `prompt` [B, T] and then stepped `tokens` [B, n] one at a time."""
    s = NativeSession(build, ckpt, dtype=dtype, batch=prompt.shape[0])
    s.prefill(prompt)
    for i in range(tokens.shape[1]):
        s.step(tokens[:, i])
    return s


@torch.no_grad()
def test_generate_equals_the_step_loop_and_stop_semantics(build, checkpoints):
    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    a = NativeSession(build, ckpt, dtype="fp32", batch=2)
    prompt = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(3))
    a.prefill(prompt)
    b = a.fork()
    gen = a.generate(64)                                               # greedy, the token loop on the GPU
    assert gen.shape == (2, 64)
    loop = []
    for _ in range(64):
        t = b.logits(V).argmax(-1).int()
        loop.append(t)
        b.step(t)
    assert torch.equal(gen, torch.stack(loop, 1))
    # generate leaves the state after every token but the last (as memmamba_deploy.sampling.generate); the
    # sessions compared bit for bit feed the same tokens the same way (prefill runs the parallel form, step the
    # decode graph: the two agree within rounding, not bit for bit)
    c = fed(build, ckpt, prompt, gen[:, :-1])
    assert torch.equal(a.state("ssm", (4, 2, 128, 8)), c.state("ssm", (4, 2, 128, 8)))
    assert torch.equal(a.logits(V), c.logits(V))
    # a stop token ends generation once every row has produced one; the stopped step is undone
    d = NativeSession(build, ckpt, dtype="fp32", batch=2)
    d.prefill(prompt)
    stop = [int(gen[0, 5]), int(gen[1, 7])]                           # row 0 meets one by token 5, row 1 by 7
    out = d.generate(64, stop=stop)
    first = [min(i for i, t in enumerate(out[r].tolist()) if t in stop) for r in range(2)]
    assert out.shape[1] == max(first) + 1 <= 8
    e = fed(build, ckpt, prompt, out[:, :-1])
    assert torch.equal(d.state("conv", (4, 2, 128, 3)), e.state("conv", (4, 2, 128, 3)))
    assert torch.equal(d.logits(V), e.logits(V))


@torch.no_grad()
def test_the_session_feeds_generates_last_token_when_the_stream_goes_on(build, checkpoints):
    # as the Python Session: generate's last tokens are pending; prefill, step, sample and generate feed them
    # first, fork copies them, reset drops them
    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    rng = torch.Generator().manual_seed(6)
    prompt, more = torch.randint(0, V, (2, 20), generator=rng), torch.randint(0, V, (2, 5), generator=rng)

    def fresh(ids):
        s = NativeSession(build, ckpt, dtype="fp32", batch=2)
        s.prefill(ids)
        return s

    a = fresh(prompt)
    gen = a.generate(8)
    b = a.fork()
    a.prefill(more)                                                    # the next turn: pending token, then more
    want = fed(build, ckpt, prompt, gen[:, :-1])
    want.prefill(torch.cat([gen[:, -1:], more], 1))
    assert torch.equal(a.logits(V), want.logits(V))
    assert torch.equal(a.state("ssm", (4, 2, 128, 8)), want.state("ssm", (4, 2, 128, 8)))
    b.prefill(more)                                                    # the fork had the pending token too
    assert torch.equal(b.logits(V), want.logits(V))
    c = fresh(prompt)                                                  # generate twice = once (greedy)
    assert torch.equal(torch.cat([c.generate(4), c.generate(4)], 1), gen)
    d = fresh(prompt)
    d.generate(3)
    assert torch.equal(d.sample(), gen[:, 3])                          # sample continues the text
    e = fresh(prompt)
    e.generate(3)
    e.step(gen[:, 3])
    assert torch.equal(e.logits(V), fed(build, ckpt, prompt, gen[:, :4]).logits(V))
    f = fresh(prompt)
    f.generate(3)
    f.reset()
    f.prefill(prompt)
    assert torch.equal(f.logits(V), fresh(prompt).logits(V))         # reset forgot the pending token


@pytest.mark.parametrize("plan,dtype", [("cublas", "fp32"), ("fused", "fp32"), ("cublas", "fp16")])
@torch.no_grad()
def test_copy_row_decodes_prompts_of_different_lengths_together(build, checkpoints, plan, dtype, tmp_path):
    """Session::copyRow (continuous batching): batch-1 sessions prefill prompts of different lengths, their rows
    go into a fresh batch-3 session, which decodes them together: each row's greedy tokens and logits are its
    own session's (within the dtype's tolerance; tokens may differ only past a near tie, so the logits are compared
    along the row's own tokens). Then a row leaves and a new prompt joins mid-stream, from a pending token."""
    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(17)
    prompts = [torch.randint(0, V, (1, n), generator=gen) for n in (37, 5, 300, 12)]
    first = NativeSession(build, ckpt, dtype=dtype, plan=plan)
    alone = [first] + [first.sibling(1) for _ in prompts[1:]]         # one set of weights
    for s, p in zip(alone, prompts):
        s.prefill(p)
    batch = NativeSession(build, ckpt, dtype=dtype, plan=plan, batch=3)  # opened apart: the same weights by sha256
    with pytest.raises(NativeError, match="no logits yet"):
        batch.logits(V)
    for row in range(3):
        batch.copy_row(alone[row], 0, row)
        if row < 2:                                                    # logits only once every row holds some
            with pytest.raises(NativeError, match="no logits yet"):
                batch.logits(V)
    copied = batch.logits(V)
    for row in range(3):                                               # copied, not recomputed
        assert torch.equal(copied[row], alone[row].logits(V)[0]), row
    tokens = batch.generate(24)
    for row in range(3):                                               # each row alone, fed the batch's tokens
        own = alone[row].fork()
        for t in tokens[row, :-1].tolist():
            own.step(torch.tensor([t]))
        assert rel_err(batch.logits(V)[row], own.logits(V)[0]) <= TOL[dtype], row
        if dtype == "fp32":                                            # greedy: the same text (fp16: near ties)
            assert torch.equal(tokens[row], alone[row].fork().generate(24)[0]), row
    # row 1 finishes; prompt 3 joins there (the batch's pending tokens are fed first)
    batch.copy_row(alone[3], 0, 1)
    more = batch.generate(8)
    assert int(more[1, 0]) == int(alone[3].logits(V)[0].argmax())
    if dtype == "fp32":
        assert torch.equal(more[1], alone[3].fork().generate(8)[0])
        for row in (0, 2):                                             # the others went on undisturbed
            assert torch.equal(torch.cat([tokens[row], more[row]]), alone[row].fork().generate(32)[0]), row
    # errors
    with pytest.raises(NativeError, match="row 3 is outside this session's rows 0..2"):
        batch.copy_row(alone[0], 0, 3)
    with pytest.raises(NativeError, match="source row 1 is outside"):
        batch.copy_row(alone[0], 1, 0)
    with pytest.raises(NativeError, match="holds no logits"):
        batch.copy_row(NativeSession(build, ckpt, dtype=dtype, plan=plan), 0, 0)
    with pytest.raises(NativeError, match="another model"):
        batch.copy_row(NativeSession(build, checkpoints[False][0], dtype=dtype, plan=plan), 0, 0)
    other = NativeSession(build, ckpt, dtype="fp16" if dtype == "fp32" else "fp32", plan=plan)
    other.prefill(prompts[1])
    with pytest.raises(NativeError, match="copyRow: the source session runs native on GPU 0 in fp(16|32), this one"):
        batch.copy_row(other, 0, 0)
    import safetensors
    twin = tmp_path / "twin"                                           # the same config, other weights
    make_model(seed=99, memory=True).save_pretrained(twin)
    stranger = NativeSession(build, twin, dtype=dtype, plan=plan)
    stranger.prefill(prompts[1])
    batch.save_state(tmp_path / "s.safetensors")
    with safetensors.safe_open(str(tmp_path / "s.safetensors"), "pt") as fh:
        hashed = "weights_sha256" in (fh.metadata() or {})             # builds without OpenSSL cannot tell
    if hashed:
        with pytest.raises(NativeError, match="runs other weights"):
            batch.copy_row(stranger, 0, 0)
    batch.copy_row(batch, 2, 0)                                        # a row of its own: a duplicate
    dup = batch.logits(V)
    assert torch.equal(dup[0], dup[2])
    batch.copy_row(batch, 1, 1)                                        # onto itself: nothing to do
    assert torch.equal(batch.logits(V), dup)
    # a row of a batch-2 source (the row stride), into a partly filled session that is forked on the way
    pair = first.sibling(2)
    pair.prefill(torch.randint(0, V, (2, 40), generator=gen))
    fresh = first.sibling(2)
    fresh.copy_row(pair, 1, 0)
    half = fresh.fork()                                                # carries which rows are filled
    half.copy_row(pair, 0, 1)
    assert torch.equal(half.logits(V), pair.logits(V).flip(0))
    shape = (4, 2, 128, 8)
    assert torch.equal(half.state("ssm", shape), pair.state("ssm", shape).flip(1))
    with pytest.raises(NativeError, match="no logits yet"):
        fresh.logits(V)


@torch.no_grad()
def test_the_sampling_stream_steps_once_per_token_handed_out(build, checkpoints):
    # same seed, prompt and calls, same tokens: whatever the session ran besides draws (the prompt in one or two
    # prefills, steps, the step generate undoes at a stop) does not move the stream
    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(8))

    def fresh(pieces=1):
        s = NativeSession(build, ckpt, dtype="fp32", batch=2)
        s.reseed(77)                                                   # before the prompt: its draws do not count
        for piece in prompt.chunk(pieces, 1):
            s.prefill(piece)
        return s

    whole = fresh().generate(12, temperature=1.0)
    split = fresh()
    assert torch.equal(torch.cat([split.generate(5, temperature=1.0), split.generate(7, temperature=1.0)], 1), whole)
    assert torch.equal(fresh(2).generate(12, temperature=1.0), whole)
    greedy_first = fresh()
    greedy_first.sample(0.0)                                           # a greedy token takes no step of the stream
    assert torch.equal(greedy_first.generate(12, temperature=1.0), whole)
    stopped = fresh()
    first = stopped.generate(12, temperature=1.0, stop=whole[:, 3].tolist())      # both rows stop by token 3
    assert first.shape[1] <= 4 and torch.equal(first, whole[:, :first.shape[1]])
    assert torch.equal(torch.cat([first, stopped.generate(12 - first.shape[1], temperature=1.0)], 1), whole)
    drawn = fresh()                                                    # sample and step, by hand: the same draws
    first = drawn.sample(1.0)
    drawn.step(first)
    assert torch.equal(first, whole[:, 0]) and torch.equal(drawn.sample(1.0), whole[:, 1])
    seen = set(whole.flatten().tolist())
    assert len(seen) > 4                                               # really sampled, not greedy


@torch.no_grad()
def test_write_state_drops_the_old_states_logits(build, checkpoints):
    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    rng = torch.Generator().manual_seed(9)
    p, q = torch.randint(0, V, (2, 16), generator=rng), torch.randint(0, V, (2, 11), generator=rng)
    shapes = {"conv": (4, 2, 128, 3), "ssm": (4, 2, 128, 8), "pool": (4, 2, 8, 16), "prio": (4, 2, 8)}
    s = NativeSession(build, ckpt, dtype="fp32", batch=2)
    s.prefill(p)
    snapshot = {name: s.state(name, shape) for name, shape in shapes.items()}
    s.prefill(q)
    for name, value in snapshot.items():
        s.set_state(name, value)
    with pytest.raises(NativeError, match="no logits yet"):
        s.logits(V)
    with pytest.raises(NativeError, match="generate needs a prompt"):
        s.generate(1)
    s.step(q[:, 0])                                                    # the restored state goes on from P
    assert torch.equal(s.logits(V), fed(build, ckpt, p, q[:, :1]).logits(V))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gpu_sampler_matches_reference(build, checkpoints, dtype):
    os.environ.setdefault("TRITON_INTERPRET", "0")
    from memmamba_deploy.models.ops.triton.cpp_support import sample_ref

    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    s = NativeSession(build, ckpt, dtype=dtype, batch=4)
    s.prefill(torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(4)))
    logits = s.logits(V)
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 10, 1.0), (1.0, 0, 0.6), (1.3, 40, 0.9), (0.9, 1, 1.0)]
    seen = set()
    for i, (t, k, p) in enumerate(settings):
        for step in range(3):
            if step == 0:
                s.reseed(1000 + i)
            got = s.sample(t, k, p)
            want = sample_ref(logits, temperature=t, top_k=k, top_p=p, seed=1000 + i, step=step)
            assert got.tolist() == want.tolist(), (t, k, p, step)
            seen.update(got.tolist())
    assert len(seen) > 4
    record(test="sampler", dtype=dtype, settings=len(settings), draws=3 * len(settings) * 4, mismatches=0)


def test_fork_reset_eager_and_graph(build, checkpoints):
    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(5))
    graph = NativeSession(build, ckpt, dtype="fp16", batch=1)
    eager = NativeSession(build, ckpt, dtype="fp16", batch=1, cuda_graph=False)
    for s in (graph, eager):
        s.prefill(prompt)
    assert torch.equal(graph.logits(V), eager.logits(V))               # the graph replays exactly the same launches
    fork = graph.fork()
    first = graph.generate(30)
    assert torch.equal(fork.generate(30), first)                       # same state, same sampler stream
    graph.reset()
    with pytest.raises(NativeError, match="no logits yet"):
        graph.logits(V)
    assert (graph.state("prio", (4, 1, 8)) == -1).all() and (graph.state("ssm", (4, 1, 128, 8)) == 0).all()
    graph.prefill(prompt)
    assert torch.equal(graph.logits(V), eager.logits(V))               # reset really is the empty state


def test_errors_are_clear(build, checkpoints, tmp_path):
    ckpt, model = checkpoints[True]
    s = NativeSession(build, ckpt, dtype="fp32", batch=2)
    with pytest.raises(NativeError, match="outside the vocabulary"):
        s.step(torch.tensor([0, 256]))
    with pytest.raises(NativeError, match="no logits to sample from"):
        s.sample()
    with pytest.raises(NativeError, match="top_p"):
        s.prefill(torch.zeros(2, 3))
        s.sample(1.0, 0, 0.0)
    with pytest.raises(NativeError, match="no state tensor"):
        NativeSession(build, checkpoints[False][0], dtype="fp32").state("pool", (4, 1, 8, 16))
    odd = make_model(seed=1, d_model=96)                               # a shape the kernel library was not built for
    odd.save_pretrained(tmp_path / "odd")
    with pytest.raises(NativeError, match="no decode_norm_proj_embed_noproj kernel for fp16 and model shape d96_"):
        NativeSession(build, tmp_path / "odd")
    with pytest.raises(NativeError, match="unknown plan 'magic'"):
        NativeSession(build, ckpt, plan="magic")
    for rows in (-1, 65536):
        with pytest.raises(NativeError, match=f"prefillRows must be 0 \\(token by token\\) to 65535, got {rows}"):
            NativeSession(build, ckpt, prefill_rows=rows)
    broken = tmp_path / "broken"
    model.save_pretrained(broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(NativeError, match="model.safetensors is corrupt or not a safetensors file"):
        NativeSession(build, broken)
    with pytest.raises(NativeError, match="built without the TensorRT backend|not an export directory"):
        NativeSession(build, tmp_path, backend="tensorrt")


@pytest.mark.parametrize("dtype,backend", [("fp32", "torch"), ("fp16", "triton")])
@torch.no_grad()
def test_session_state_files_go_between_python_and_cpp(build, checkpoints, tmp_path, dtype, backend):
    """A stream prefilled and generated by the Python Session (its prompt in one parallel prefill) goes on in the C++
    Session through a state file, and back: the same greedy tokens either way; the C++ file keeps its sampling
    stream; a file that does not fit is refused and leaves the session as it was; state buffers are size-checked."""
    from memmamba_deploy.session import Session

    ckpt, model = checkpoints[True]
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (2, 300), generator=torch.Generator().manual_seed(12))

    def tokens(stream):
        return torch.stack([torch.as_tensor(t).cpu() for t in stream]).T.to(torch.int32)

    py = Session.open(ckpt, backend=backend, device="cuda", dtype=TORCH_DTYPE[dtype])
    tokens(py.generate(prompt, 6))                                     # its last tokens pending
    py.save_state(tmp_path / "py.safetensors")
    fork = py.fork()
    want = tokens(py.generate(None, 24))
    cpp = NativeSession(build, ckpt, dtype=dtype, batch=2)
    cpp.load_state(tmp_path / "py.safetensors")
    assert rel_err(cpp.logits(V), fork.logits.float().cpu()) <= TOL[dtype]
    got = cpp.generate(24)
    assert torch.equal(got, want), (got, want)
    assert torch.equal(cpp.pending(), got[:, -1])

    back = NativeSession(build, ckpt, dtype=dtype, batch=2)            # and from C++ to Python
    back.load_state(tmp_path / "py.safetensors")
    back.reseed(5)
    back.generate(3, temperature=1.0)
    back.save_state(tmp_path / "cpp.safetensors")
    drawn = back.generate(12, temperature=1.0)
    sampled = NativeSession(build, ckpt, dtype=dtype, batch=2)         # the C++ sampling stream came along
    sampled.load_state(tmp_path / "cpp.safetensors")
    assert torch.equal(sampled.generate(12, temperature=1.0), drawn)
    greedy = NativeSession(build, ckpt, dtype=dtype, batch=2)
    greedy.load_state(tmp_path / "cpp.safetensors")
    again = Session.open(ckpt, backend=backend, device="cuda", dtype=TORCH_DTYPE[dtype])
    again.load_state(tmp_path / "cpp.safetensors")
    assert torch.equal(tokens(again.generate(None, 10)), greedy.generate(10))

    one = NativeSession(build, ckpt, dtype=dtype, batch=1)
    before = back.logits(V)
    with pytest.raises(NativeError, match="a batch of 2 rows; this session has batch 1"):
        one.load_state(tmp_path / "cpp.safetensors")
    with pytest.raises(NativeError, match="nothing to save"):
        one.save_state(tmp_path / "none.safetensors")
    assert not (tmp_path / "none.safetensors").exists()
    plain = NativeSession(build, checkpoints[False][0], dtype=dtype, batch=2)
    with pytest.raises(NativeError, match="another model: memory true vs false"):
        plain.load_state(tmp_path / "cpp.safetensors")
    assert torch.equal(back.logits(V), before)
    small = torch.empty(10, dtype=torch.float32)
    assert back.lib.mm_read_state(back.h, b"ssm", small.data_ptr(), 40) == -1
    assert b"is 32768 bytes; the host buffer is 40" in back.lib.mm_last_error()


def test_memmamba_chat_streams_bytes(build, checkpoints):
    ckpt, _ = checkpoints[True]
    run = subprocess.run([str(Path(build) / "memmamba_chat"), str(ckpt), "--prompt", "Hello, MemMamba", "--tokens",
                          "48", "--seed", "7"], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    err = run.stderr.decode()
    assert "native |" in err and "48 tokens in" in err and len(run.stdout) > 0
    record(test="memmamba_chat", stderr=err.strip().splitlines()[-1])
