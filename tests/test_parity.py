"""memdeploy parity: the comparator passes a faithful backend and catches each kind of wrong one."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from memmamba_deploy.backends import TorchBackend
from memmamba_deploy.cli import app
from memmamba_deploy.models import MemMambaLM, State
from memmamba_deploy.parity import compare, parse_prompt, run_parity, state_like, state_view
from test_export import one_thread, tiny_export  # noqa: F401  (fixtures)
from conftest import DictStateBackend


def _reference(out) -> MemMambaLM:
    return MemMambaLM.from_pretrained(out / "reference")


def _prompt(B=2, T=20, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_cli_parity_prints_a_table_and_writes_json(tiny_export, tmp_path):
    out = tiny_export(memory=True)
    report = tmp_path / "parity.json"
    result = CliRunner().invoke(app, ["parity", str(out), "--steps", "24", "--prompt-len", "12", "--prompt",
                                      "1,2,3,4", "--json", str(report)], terminal_width=160)
    assert result.exit_code == 0, result.output
    for text in ("onnxruntime vs PyTorch reference", "decode logits, max rel", "greedy tokens agree", "insert flips",
                 "random T=12 x2", "prompt 1 T=4 x1"):
        assert text in result.output
    data = json.loads(report.read_text())
    assert data["ok"] and data["backend"] == "onnxruntime" and data["rtol"] == 1e-4
    assert [c["name"] for c in data["cases"]] == ["random T=12", "prompt 1 T=4"]
    case = data["cases"][0]
    assert len(case["step_logits_rel"]) == 24 and case["greedy_agreement"] == 1.0
    assert set(case["final_state_rel"]) == {"conv", "ssm", "pool", "prio"}
    assert case["insert_decisions"] == 24 * 2 * 4 and case["min_read_margin"] is not None


def test_cli_parity_exits_non_zero_past_the_tolerance(tiny_export):
    result = CliRunner().invoke(app, ["parity", str(tiny_export(memory=False)), "--steps", "4", "--rtol", "1e-12"],
                                terminal_width=160)
    assert result.exit_code == 1
    assert "FAIL" in result.output and "rel. error" in result.output


def test_cli_parity_user_errors(tiny_export, tmp_path):
    out = str(tiny_export(memory=False))
    for args, message in [([out, "--backend", "onnx"], "unknown backend 'onnx'"),
                          ([out, "--prompt", "1,x"], "comma-separated token ids"),
                          ([out, "--prompt", "1,999"], "outside the vocabulary"),
                          ([out, "--steps", "0"], "--steps must be >= 1"),
                          ([out, "--rtol", "-1"], "--rtol must be a finite number > 0"),
                          ([out, "--rtol", "inf"], "--rtol must be a finite number > 0"),
                          ([out, "--flip-radius", "nan"], "--flip-radius must be a finite number >= 0"),
                          ([out, "--backend", "trt"], "TensorRT"),
                          ([out, "--backend", "torch", "--device", "gpu0"], "use cpu, cuda or cuda:N"),
                          ([out, "--json", str(tmp_path)], "is a directory"),
                          ([out, "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
                          ([str(tmp_path)], "not an export directory")]:
        result = CliRunner().invoke(app, ["parity", *args], terminal_width=200)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output


def test_torch_backend_is_exact(tiny_export):
    report = run_parity(tiny_export(memory=True), "pytorch", steps=16, prompt_lens=(10,))
    assert report.backend == "torch"
    case = report.cases[0]
    assert report.ok and case.prefill_logits_rel == 0 and case.step_logits_max_rel == 0
    assert case.insert_flips == 0 and all(v == 0 for v in case.final_state_rel.values())


def test_exact_ties_are_counted_apart_from_the_smallest_margin():
    """A score equal to the priority it meets (a repeated token's, often) is a tie, not a margin of 0."""
    from conftest import make_model
    from memmamba_deploy.parity import _insert_margins

    tau1 = make_model().config.insert_threshold
    a = torch.tensor([[0.9], [0.8], [tau1], [0.9]])                      # [L=4, B=1]
    prio = torch.tensor([[[0.9, 0.95]], [[0.7, 0.75]], [[-1.0, -1.0]], [[0.7, 0.7]]])
    margins, tie = _insert_margins(a, prio, tau1)
    assert tie[:, 0].tolist() == [True, False, False, False]             # only a == the least priority is a tie
    assert margins[:, 0].tolist() == pytest.approx([0.0, 0.05, 0.0, 0.0])   # at τ1, and two equal least slots: 0
    assert torch.where(tie, (a - tau1).abs(), margins)[0, 0] == pytest.approx(0.9 - tau1)


# ---- wrong backends must fail ----------------------------------------------------------------------------------------
class Wrapped:
    """A TorchBackend whose results a test corrupts."""

    def __init__(self, model, logits_noise=0.0, ssm_scale=1.0):
        self.inner, self.config, self.name = TorchBackend(model), model.config, "wrapped"
        self.logits_noise, self.ssm_scale = logits_noise, ssm_scale

    def new_state(self, batch):
        return self.inner.new_state(batch)

    def _fix(self, logits, state):
        if self.ssm_scale != 1.0:
            state = dataclasses.replace(state, ssm=state.ssm * self.ssm_scale)
        return logits + self.logits_noise * logits.abs().max(), state

    def prefill(self, ids, state):
        return self._fix(*self.inner.prefill(ids, state))

    def step(self, tokens, state):
        return self._fix(*self.inner.step(tokens, state))

    def copy_state(self, state):
        return state.clone()

    def state_nbytes(self, state):
        return state.nbytes


def test_logit_errors_fail(tiny_export):
    ref = _reference(tiny_export(memory=True))
    r = compare(ref, Wrapped(ref, logits_noise=1e-3), _prompt(), steps=8, rtol=1e-4, flip_radius=1e-3)
    assert not r.ok and any("logits rel. error" in f for f in r.failures)


def test_nan_from_the_backend_fails(tiny_export, tmp_path):
    """NaN logits or state fail every check they reach (max() and `err > rtol` would let NaN through), and the
    JSON report holds null, not a bare NaN."""
    ref = _reference(tiny_export(memory=False))
    for noise in (float("nan"), float("inf")):
        r = compare(ref, Wrapped(ref, logits_noise=noise), _prompt(), steps=4, rtol=1e-4, flip_radius=1e-3)
        assert not r.ok and any("prefill logits" in f for f in r.failures) and any("step logits" in f
                                                                                    for f in r.failures)
    r = compare(ref, Wrapped(ref, ssm_scale=float("nan")), _prompt(), steps=4, rtol=1e-4, flip_radius=1e-3)
    assert not r.ok and any("final state.ssm" in f for f in r.failures)
    from memmamba_deploy.parity import ParityReport

    text = json.dumps(ParityReport("wrapped", "fp32", 1e-4, 1e-3, [r]).to_dict(), allow_nan=False)
    assert '"final_state_rel"' in text and "null" in text


def test_state_errors_fail(tiny_export):
    ref = _reference(tiny_export(memory=True))
    r = compare(ref, Wrapped(ref, ssm_scale=1.001), _prompt(), steps=8, rtol=1e-4, flip_radius=1e-3)
    assert not r.ok and any("final state.ssm" in f for f in r.failures)


def test_wrong_insert_decisions_are_flips_not_rounding(tiny_export):
    """A backend with another insert threshold takes decisions the reference takes far from its threshold:
    counted as flips with large margins and failed, separately from numeric error."""
    ref = _reference(tiny_export(memory=True))
    wrong = MemMambaLM(dataclasses.replace(ref.config, insert_threshold=0.3)).eval()
    wrong.load_state_dict(ref.state_dict())
    r = compare(ref, TorchBackend(wrong), _prompt(T=3), steps=32, rtol=1e-4, flip_radius=1e-3)   # pools not full
    assert r.insert_flips > 0 and max(r.flip_margins) > 1e-3
    assert any("flipped with margin" in f for f in r.failures)
    assert r.resyncs > 0


def test_rounding_flips_are_resynced_and_pass(tiny_export):
    """A flip whose reference margin is within the radius is rounding: reported, re-synced, not a failure.
    Forced here by making the backend's threshold differ from the reference's by a hair."""
    ref = _reference(tiny_export(memory=True))
    a = []
    hooks = [layer.note.register_forward_hook(lambda m, i, o: a.append(o[0].flatten())) for layer in ref.layers]
    with torch.no_grad():
        ref(_prompt(T=6))
    for h in hooks:
        h.remove()
    scores = torch.cat(a)
    near = scores[scores > 0.5].min().item()                 # a real score just above tau1
    hair = MemMambaLM(dataclasses.replace(ref.config, insert_threshold=near)).eval()   # ... now not above it
    hair.load_state_dict(ref.state_dict())
    r = compare(ref, TorchBackend(hair), _prompt(T=6), steps=8, rtol=1e-4, flip_radius=near - 0.5 + 1e-6)
    assert r.prefill_slot_mismatches > 0 and r.prefill_flips > 0 and r.resyncs > 0
    assert r.prefill_logits_rel > 1e-4                        # the flip changed the prompt's later tokens ...
    assert r.ok, r.failures                                   # ... which is not numeric error
    assert r.step_logits_max_rel <= 1e-4                      # re-synced: numeric error measured after the flip


class PermutedPrefill(Wrapped):
    """A prefill that leaves the reference's pool entries in reversed slots (as a parallel prefill may order
    near-equal priorities otherwise): the same memory, so parity must pass it."""

    def prefill(self, ids, state):
        logits, s = self.inner.prefill(ids, state)
        return logits, dataclasses.replace(s, pool=s.pool.flip(-2), prio=s.prio.flip(-1))


def test_a_prefill_pool_in_another_slot_order_passes(tiny_export):
    ref = _reference(tiny_export(memory=True))
    prompt = _prompt(T=40)                                  # the pools fill and replace
    r = compare(ref, PermutedPrefill(ref), prompt, steps=24, rtol=1e-4, flip_radius=1e-3)
    assert r.prefill_slots_permuted > 0 and r.prefill_slot_mismatches == 0 and r.insert_flips == 0
    assert r.ok and r.resyncs == 0, r.failures
    assert max(r.prefill_state_rel.values()) <= 1e-6 and max(r.final_state_rel.values()) <= 1e-4
    other = PermutedPrefill(ref)                            # a real difference still fails, whatever the slots
    other.prefill = lambda ids, s: (lambda lg, st: (lg, dataclasses.replace(st, pool=st.pool.flip(-2))))(
        *other.inner.prefill(ids, s))
    assert compare(ref, other, prompt, steps=4, rtol=1e-4, flip_radius=1e-3).prefill_slot_mismatches > 0


def test_backends_with_mapping_states_plug_in(tiny_export):
    ref = _reference(tiny_export(memory=True))
    backend = DictStateBackend(ref)
    r = compare(ref, backend, _prompt(), steps=8, rtol=1e-4, flip_radius=1e-3)
    assert r.ok and r.step_logits_max_rel == 0
    state = backend.new_state(2)
    view = state_view(backend, state)
    assert isinstance(view, State) and torch.equal(view.prio, state["pool_prio"])
    again = state_like(backend, view, state)
    assert set(again) == set(state) and all(again[k].dtype == state[k].dtype for k in state)


def test_parse_prompt():
    assert parse_prompt("5, 17,3", 256) == [5, 17, 3]
    with pytest.raises(ValueError, match="empty"):
        parse_prompt(",", 256)


def test_pool_entries_are_matched_across_slots():
    from memmamba_deploy.metrics import align_pool_slots

    g = torch.Generator().manual_seed(0)
    L, B, K, ds = 2, 3, 6, 4
    ref = State(conv=torch.zeros(L, B, 4, 3), ssm=torch.zeros(L, B, 4, 2), pool=torch.randn(L, B, K, ds, generator=g),
                prio=0.5 + 0.4 * torch.rand(L, B, K, generator=g))
    ref.prio[0, 0, :2] = torch.tensor([0.7, 0.7 + 1e-6])      # near-equal priorities: sorting alone could swap them
    ref.prio[1, 2, 4:] = -1.0                                  # empty slots
    ref.pool[1, 2, 4:] = 0.0
    perm = torch.stack([torch.randperm(K, generator=g) for _ in range(L * B)]).view(L, B, K)
    noisy = State(conv=ref.conv, ssm=ref.ssm, pool=ref.pool + 1e-4 * torch.randn(ref.pool.shape, generator=g),
                  prio=ref.prio.clone())
    noisy.prio[0, 0, :2] = torch.tensor([0.7 + 1e-6, 0.7])     # ... and on this side they are the other way round
    got = State(conv=ref.conv, ssm=ref.ssm, pool=torch.take_along_dim(noisy.pool, perm[..., None], -2),
                prio=torch.take_along_dim(noisy.prio, perm, -1))
    aligned = align_pool_slots(ref, got)
    assert (aligned.pool - ref.pool).abs().max() < 1e-3 and (aligned.prio - ref.prio).abs().max() < 1e-5
    assert sorted(aligned.prio.flatten().tolist()) == sorted(got.prio.flatten().tolist())   # moved, not changed
    other = State(conv=ref.conv, ssm=ref.ssm, pool=got.pool.clone(), prio=got.prio)
    other.pool[0, 1, 3] += 1.0                                  # one entry really differs: it stays different
    assert (align_pool_slots(ref, other).pool - ref.pool).abs().max() > 0.5
    other.pool[1, 0, :2, 0] = float("inf")                      # non-finite entries are moved, never duplicated
    moved = align_pool_slots(ref, other)
    assert sorted(moved.prio.flatten().tolist()) == sorted(other.prio.flatten().tolist())
    assert int(torch.isinf(moved.pool).sum()) == 2


def test_selfcheck_of_a_half_precision_checkpoint_matches_pools_across_slots():
    """The bundled demo in fp16, seed 0: the steps and the parallel sweep leave the same pool entries in other slots
    (near-equal priorities rounded apart); compared slot by slot the pool read 0.23 and the check failed."""
    from memmamba_deploy.cli_runtime import DEMO_ASSET
    from memmamba_deploy.selfcheck import step_vs_forward

    rows, info = step_vs_forward(MemMambaLM.from_pretrained(DEMO_ASSET).half(), seed=0)
    assert all(r.ok for r in rows), [(r.name, r.error) for r in rows]
    assert "note" not in info


def test_rel_err_is_the_worst_element_over_the_largest_reference():
    from memmamba_deploy.metrics import rel_err

    want = torch.zeros(1000)
    want[0] = 2.0
    got = want.clone()
    got[500] = 0.2                                          # one element off by 10% of the largest: not averaged away
    assert rel_err(got, want) == pytest.approx(0.1)
    assert rel_err(torch.full((4,), 3e-3), torch.zeros(4)) == pytest.approx(3e-3)   # a zero reference: absolute
    assert rel_err(torch.zeros(0), torch.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        rel_err(torch.zeros(2), torch.zeros(3))


def test_pool_matching_uses_the_priorities_where_summaries_agree():
    from memmamba_deploy.metrics import align_pool_slots

    same = torch.ones(1, 1, 3, 4)                           # three entries with one summary, told apart by priority
    ref = State(conv=torch.zeros(1, 1, 2, 1), ssm=torch.zeros(1, 1, 2, 1), pool=same, prio=torch.tensor([[[.9, .6, .7]]]))
    got = State(conv=ref.conv, ssm=ref.ssm, pool=same.clone(), prio=torch.tensor([[[.7, .9, .6]]]))
    assert torch.equal(align_pool_slots(ref, got).prio, ref.prio)
