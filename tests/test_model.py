"""The reference model's invariants (spec §8): step ≡ forward, resumable prefill, pool semantics."""
import types

import pytest
import torch

from conftest import make_model
from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models import MemMambaConfig, MemMambaLM, State
from memmamba_deploy.models.ops.pool import pool_attention_ref, pool_insert_ref, pool_sweep_ref
from memmamba_deploy.selfcheck import pool_insertions

VARIANTS = [
    dict(),                                                        # tiny preset: K=8, p=2, H=2
    dict(pool_size=4, cross_layer_every=4, memory_heads=1),        # one cross-layer group over all 4 layers
    dict(n_layers=3, cross_layer_every=2, summary_dim=8, memory_heads=4, d_state=4),  # a trailing layer outside any group
    dict(memory=False),                                            # plain Mamba
]


def run_steps(model, ids, state=None):
    state = model.new_state(ids.shape[0]) if state is None else state
    out = []
    for t in range(ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        out.append(logits)
    return torch.stack(out, 1), state


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", VARIANTS, ids=["tiny", "K4-p4", "L3-trailing", "no-memory"])
@torch.no_grad()
def test_step_reproduces_forward(seed, variant):
    model = make_model(seed, **variant)
    c = model.config
    T = 16 * c.pool_size if c.memory else 48
    ids = torch.randint(0, c.vocab_size, (3, T), generator=torch.Generator().manual_seed(seed + 100))
    full, full_state = model.prefill(ids)
    steps, state = run_steps(model, ids)
    assert rel_err(steps, full) <= 1e-5
    for k, v in state.tensors().items():
        assert rel_err(v, full_state.tensors()[k]) <= 1e-5, k
    if c.memory:
        # every pool must fill and then replace its entries (>= K replacements per row), or the test proves little
        assert min(pool_insertions(model, ids)) >= 2 * c.pool_size * ids.shape[0]
        assert (full_state.prio >= 0).all()


@torch.no_grad()
def test_memory_path_changes_the_output_and_trigger_fires_both_ways(tiny):
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
    with_memory = tiny(ids)
    gates = []
    for layer in tiny.layers:
        u = layer.norm(tiny.embeddings(ids).float())
        gates.append(torch.sigmoid(layer.token_attn.trigger(u))[..., 0] > 0.3)
    g = torch.cat([x.flatten() for x in gates])
    assert g.any() and not g.all(), "random init should fire some reads and skip others"
    for layer in tiny.layers:
        layer.token_attn.alpha.zero_()
        if layer.cross_attn is not None:
            layer.cross_attn.alpha.zero_()
    assert rel_err(tiny(ids), with_memory) > 1e-4


@pytest.mark.parametrize("variant", VARIANTS[:1] + VARIANTS[3:], ids=["tiny", "no-memory"])
@torch.no_grad()
def test_prefill_then_step_and_prefill_resume_equal_forward(variant):
    model = make_model(7, **variant)
    ids = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(9))
    full = model(ids)
    _, mid = model.prefill(ids[:, :50])
    steps, _ = run_steps(model, ids[:, 50:], mid)
    assert rel_err(steps, full[:, 50:]) <= 1e-5
    second, end = model.prefill(ids[:, 50:], mid)
    assert rel_err(second, full[:, 50:]) <= 1e-5
    last, end_last = model.prefill(ids[:, 50:], mid, last_only=True)      # generation's prefill: last logits
    assert last.shape == (2, 1, 256) and rel_err(last, second[:, -1:]) <= 1e-6   # a GEMM of another shape
    for k, v in end.tensors().items():
        assert torch.equal(v, end_last.tensors()[k]), k


@pytest.mark.parametrize("variant", VARIANTS, ids=["tiny", "K4-p4", "L3-trailing", "no-memory"])
@torch.no_grad()
def test_prefill_in_halves_is_the_halves_one_after_the_other(variant):
    # TritonBackend's two-stream prefill (here in order, on the CPU): each layer of the second half reads the
    # state the first half's same layer left, so it is exactly prefilling the halves in turn, from any state
    from memmamba_deploy.backends.triton_backend import prefill_in_halves

    model = make_model(4, **variant)
    ids = torch.randint(0, 256, (2, 90), generator=torch.Generator().manual_seed(6))
    _, start = model.prefill(ids[:, :30])
    before = start.clone()
    logits, state = prefill_in_halves(model, ids[:, 30:], start)
    _, mid = model.prefill(ids[:, 30:60], start, last_only=True)
    ref_logits, ref_state = model.prefill(ids[:, 60:], mid, last_only=True)
    assert torch.equal(logits, ref_logits)
    for k, v in state.tensors().items():
        assert torch.equal(v, ref_state.tensors()[k]), k
        assert torch.equal(start.tensors()[k], before.tensors()[k]), k          # the input state is not modified
    whole, whole_state = model.prefill(ids[:, 30:], start, last_only=True)     # and a split of one prefill
    assert rel_err(logits, whole) <= 1e-5
    for k, v in state.tensors().items():
        assert rel_err(v, whole_state.tensors()[k]) <= 1e-5, k
    with pytest.raises(ValueError, match="T >= 2"):
        prefill_in_halves(model, ids[:, :1], start)
    with pytest.raises(ValueError, match="state.conv has shape"):
        prefill_in_halves(model, ids[:1], start)                                 # a state of another batch


def row_of(state, b):
    return State(**{k: v[:, b:b + 1].clone() for k, v in state.tensors().items()})


@pytest.mark.parametrize("variant", VARIANTS, ids=["tiny", "K4-p4", "L3-trailing", "no-memory"])
@torch.no_grad()
def test_prefill_of_rows_of_different_lengths_is_each_row_alone(variant):
    """prefill(..., lengths): row b's state and logits are those of ids[b, :lengths[b]] prefilled alone, from any
    state; what the padding holds changes nothing; a row of length 0 keeps its state exactly; and prefill_in_halves
    (the Triton backend's long pieces) splits the lengths between its halves."""
    from memmamba_deploy.backends.triton_backend import prefill_in_halves

    model = make_model(5, **variant)
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 256, (5, 72), generator=gen)
    lengths = torch.tensor([72, 40, 1, 0, 37])               # whole, in each half of prefill_in_halves, none
    _, start = model.prefill(torch.randint(0, 256, (5, 30), generator=gen))
    last, state = model.prefill(ids, start, last_only=True, lengths=lengths)
    full, state_full = model.prefill(ids, start, lengths=lengths.tolist())
    other = torch.where(torch.arange(72) >= lengths[:, None], torch.randint(0, 256, (5, 72), generator=gen), ids)
    last_other, state_other = model.prefill(other, start, last_only=True, lengths=lengths)
    assert torch.equal(last, last_other)
    halves, state_halves = prefill_in_halves(model, ids, start, lengths=lengths)
    assert rel_err(halves, last) <= 1e-5
    for b, n in enumerate(lengths.tolist()):
        alone_state = row_of(start, b)
        if n:
            alone_full, alone_state = model.prefill(ids[b:b + 1, :n], alone_state)
            assert rel_err(last[b:b + 1], alone_full[:, -1:]) <= 1e-5, b
            assert rel_err(full[b:b + 1, :n], alone_full) <= 1e-5, b
        else:
            assert not last[b].any()                           # no token, no logits
        assert not full[b, n:].any()                           # logits at padding are 0
        for k, v in state.tensors().items():
            assert rel_err(v[:, b:b + 1], alone_state.tensors()[k]) <= 1e-5, (b, k)
            assert torch.equal(v, state_full.tensors()[k]) and torch.equal(v, state_other.tensors()[k]), k
            assert rel_err(state_halves.tensors()[k], v) <= 1e-5, k
            if n == 0:
                assert torch.equal(v[:, b], start.tensors()[k][:, b]), k
    if model.config.memory:                  # padding scores that would enter the pools: the test's masking sees them
        a = model.layers[0].note(model.layers[0].norm(model.embeddings(ids[1:2, 40:]).float()))[0]
        assert (a > model.config.insert_threshold).any()
    for bad, message in [([72, 40, 1], r"lengths must be 5 integers \(one a row\)"),
                         ([72.0, 40, 1, 0, 37], "5 integers"), ([73, 40, 1, 0, 37], r"\[0, 72\].*73"),
                         ([72, 40, -1, 0, 37], r"\[0, 72\].*-1"), ("x", "lengths must be 5 integers")]:
        with pytest.raises(ValueError, match=message):
            model.prefill(ids, start, lengths=bad)


@torch.no_grad()
def test_kernel_sets_without_lengths_prefill_whole_rows():
    """A kernel set written before lengths (a plugin harness's, a user's) still runs every prefill of whole rows:
    the model passes lengths to the ops only for rows of their own lengths."""
    from memmamba_deploy.models.ops import TORCH_OPS
    from memmamba_deploy.models.ops.scan import causal_conv_ref, selective_scan_ref

    def scan(x, dt, A, B, C, D, z=None, dt_bias=None, h0=None, dt_softplus=True, last_only=False):
        return selective_scan_ref(x, dt, A, B, C, D, z, dt_bias, h0, dt_softplus, last_only)

    def memory(layer, u, pool0, prio0, group, u_is_scratch=False):
        return None

    model = make_model(5)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    want, want_state = model.prefill(ids, last_only=True)
    model.ops = types.SimpleNamespace(**{**vars(TORCH_OPS), "selective_scan": scan, "fused_memory_read": memory,
                                         "causal_conv": lambda x, w, b, window: causal_conv_ref(x, w, b, window)})
    got, got_state = model.prefill(ids, last_only=True)
    assert torch.equal(got, want) and all(torch.equal(v, want_state.tensors()[k]) for k, v in got_state.tensors().items())


@torch.no_grad()
def test_step_does_not_modify_its_input_state(tiny):
    state = tiny.new_state(2)
    for t in range(20):
        _, state = tiny.step(torch.tensor([t, 3 * t]), state)
    before = state.clone()
    tiny.step(torch.tensor([1, 2]), state)
    for k, v in state.tensors().items():
        assert torch.equal(v, before.tensors()[k])


@torch.no_grad()
def test_batch_rows_are_independent(tiny):
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(3))
    full = tiny(ids)
    for b in range(3):
        assert rel_err(tiny(ids[b:b + 1]), full[b:b + 1]) <= 1e-5


def test_sweep_equals_repeated_insertion_with_ties():
    # scores drawn from a few values so ties (with each other and with tau1) are frequent
    g = torch.Generator().manual_seed(0)
    B, T, K, ds = 4, 200, 5, 3
    levels = torch.tensor([0.2, 0.5, 0.55, 0.6, 0.6, 0.7, 0.9])
    scores = levels[torch.randint(0, len(levels), (B, T), generator=g)]
    summaries = torch.randn(B, T, ds, generator=g)
    prio0 = torch.tensor([-1.0, 0.65, -1.0, 0.55, 0.8]).repeat(B, 1)
    pool0 = torch.randn(B, K, ds, generator=g)
    index, prio = pool_sweep_ref(scores, prio0, 0.5)
    bank = torch.cat([pool0, summaries], 1)
    pool, p = pool0, prio0
    for t in range(T + 1):
        expect_index = torch.where(p >= 0, torch.arange(K), -1)
        assert torch.equal(index[:, t], expect_index.int()) or _same_contents(index[:, t], bank, pool, p)
        if t < T:
            pool, p = pool_insert_ref(pool, p, scores[:, t], summaries[:, t], 0.5)
    assert torch.equal(prio, p)


def _same_contents(index, bank, pool, prio):
    rows = torch.arange(bank.shape[0])[:, None]
    got = bank[rows, index.long().clamp(min=0)]
    occupied = prio >= 0
    return torch.equal(index >= 0, occupied) and torch.equal(got[occupied], pool[occupied])


def test_pool_holds_top_k_by_score():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 300, generator=g)
    index, prio = pool_sweep_ref(scores, torch.full((2, 6), -1.0), 0.5)
    for b in range(2):
        above = [(s, i) for i, s in enumerate(scores[b].tolist()) if s > 0.5]
        top = sorted(above, key=lambda x: (-x[0], x[1]))[:6]
        assert sorted(i for _, i in top) == sorted(x - 6 for x in index[b, -1].tolist())


def test_pool_attention_matches_a_loop_over_queries():
    g = torch.Generator().manual_seed(2)
    B, T, M, S, ds, d, H = 2, 5, 9, 4, 8, 12, 2
    q, keys, values = torch.randn(B, T, ds, generator=g), torch.randn(B, M, ds, generator=g), torch.randn(B, M, d, generator=g)
    index = torch.randint(-1, M, (B, T, S), generator=g, dtype=torch.int32)
    index[0, 0] = -1                                              # a query with nothing to read
    o = pool_attention_ref(q, keys, values, index, H)
    for b in range(B):
        for t in range(T):
            sel = [int(i) for i in index[b, t] if i >= 0]
            if not sel:
                assert torch.equal(o[b, t], torch.zeros(d))
                continue
            for h in range(H):
                qh = q[b, t, h * 4:(h + 1) * 4]
                kh, vh = keys[b, sel, h * 4:(h + 1) * 4], values[b, sel, h * 6:(h + 1) * 6]
                w = torch.softmax(kh @ qh / 2.0, 0)
                torch.testing.assert_close(o[b, t, h * 6:(h + 1) * 6], w @ vh, rtol=1e-5, atol=1e-6)


def test_straight_through_keeps_values_and_trains_memory_scores(tiny):
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tiny(ids)
    out = tiny(ids)
    assert torch.equal(out, ref)                                  # the straight-through factors are exactly 1
    out.logsumexp(-1).mean().backward()
    layer = tiny.layers[1]
    assert layer.note.score_in.weight.grad.abs().sum() > 0
    assert layer.token_attn.trigger.weight.grad.abs().sum() > 0
    assert layer.cross_attn.q_proj.weight.grad.abs().sum() > 0


def test_state_shapes_and_errors(tiny):
    c = tiny.config
    s = State.zeros(c, 3)
    assert s.conv.shape == (4, 3, 128, 3) and s.ssm.shape == (4, 3, 128, 8)
    assert s.pool.shape == (4, 3, 8, 16) and (s.prio == -1).all()
    assert s.nbytes == 4 * (4 * 3 * 128 * 3 + 4 * 3 * 128 * 8 + 4 * 3 * 8 * 16 + 4 * 3 * 8)
    bad = State(conv=s.conv[:, :, :, :2], ssm=s.ssm, pool=s.pool, prio=s.prio)
    with pytest.raises(ValueError, match=r"state.conv has shape \[4, 3, 128, 2\], expected \[4, 3, 128, 3\]"):
        tiny.step(torch.zeros(3, dtype=torch.long), bad)
    with pytest.raises(ValueError, match="state.ssm has dtype torch.float16"):
        tiny.step(torch.zeros(3, dtype=torch.long), State(s.conv, s.ssm.half(), s.pool, s.prio))
    with pytest.raises(ValueError, match="state.pool is missing"):
        tiny.step(torch.zeros(3, dtype=torch.long), State(s.conv, s.ssm))
    with pytest.raises(ValueError, match="token_ids must be"):
        tiny.step(torch.zeros(3, 2, dtype=torch.long), s)
    with pytest.raises(ValueError, match="input_ids must be"):
        tiny(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        tiny.prefill(torch.zeros(3, 0, dtype=torch.long))
    for ids, words in [(torch.tensor([[5, 256]]), r"input_ids must lie in \[0, 256\), got 256"),
                       (torch.tensor([[-1, 3]]), "got -1"), (torch.zeros(1, 2), "must be integers"),
                       (torch.zeros(1, 2, dtype=torch.long, device="meta"), "input_ids is on meta")]:
        with pytest.raises(ValueError, match=words):
            tiny.prefill(ids)
    with pytest.raises(ValueError, match="token_ids must lie in"):
        tiny.step(torch.tensor([0, 1, 999]), s)
    with pytest.raises(ValueError, match="state must be a State"):
        tiny.step(torch.zeros(3, dtype=torch.long), tuple(s.tensors().values()))
    with pytest.raises(ValueError, match="state.conv is on meta"):
        tiny.step(torch.zeros(3, dtype=torch.long), s.to("meta"))
    plain = State.zeros(MemMambaConfig.preset("tiny", memory=False), 1)
    assert plain.pool is None and set(plain.tensors()) == {"conv", "ssm"}


@torch.no_grad()
def test_half_precision_step_tracks_forward():
    model = make_model(3).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(6))
    full = model(ids)
    steps, state = run_steps(model, ids)
    assert state.ssm.dtype == torch.float32 and state.pool.dtype == torch.bfloat16
    assert rel_err(steps, full) <= 1e-2


@torch.no_grad()
def test_autocast_states_resume_in_the_models_dtypes():
    """Under torch.autocast the conv window and the pool come out of bf16 matmuls: prefill and step still return
    a State in the model's dtypes, which step and prefill take back."""
    from conftest import make_model
    model = make_model(0)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = model.prefill(ids[:, :4])
        assert {k: v.dtype for k, v in state.tensors().items()} == State.dtypes(torch.float32)
        _, state = model.step(ids[:, 4], state)
        model(ids[:, 5:], state)
    with pytest.raises(TypeError, match="State.to takes a device"):
        state.to(torch.float16)
