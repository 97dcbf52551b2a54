"""Memory fidelity metrics (spec §10) on hand-computable cases, and reference vs backend comparison."""
import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import make_model
from memmamba_deploy.backends import TorchBackend
from memmamba_deploy.cli import app
from memmamba_deploy.fidelity import compare, eclmf, etmf, reference_decisions, ridge_score
from memmamba_deploy.selfcheck import pool_insertions

def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + sum(shape)), dtype=torch.float64)


def token_ids(batch, length, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- ECLMF --------------------------------------------------------------------------------------------------------
def test_identity_layers_give_eclmf_one():
    h = randn(3, 50, 16)
    scores = eclmf([h] * 12)                      # h^{l+G} = h^l for every l
    assert set(scores) == {2, 5, 10}
    assert all(abs(v - 1.0) < 1e-6 for v in scores.values())


def test_linear_map_gives_eclmf_about_one():
    x = randn(4, 64, 16)
    maps = [randn(16, 16, seed=i) / 4 + torch.eye(16) for i in range(6)]
    hidden = [x]
    for m in maps:
        hidden.append(hidden[-1] @ m)             # every layer a linear map of the one before
    scores = eclmf(hidden, gaps=(2, 5))
    assert all(v > 0.999 for v in scores.values()), scores


def test_independent_noise_gives_eclmf_about_zero():
    hidden = [randn(8, 512, 16, seed=i) for i in range(4)]    # N = 4096 rows, D = 16: the fit explains ~D/N
    score = eclmf(hidden, gaps=(2,))[2]
    assert abs(score) < 0.02, score


def test_ridge_score_by_hand():
    # X = I (2x2), Y = 2X: W = 2/(1+λ) I, Y - XW = 2λ/(1+λ) I, r = 2λ/(1+λ)·√2 / (√2 + 1e-6)
    lam = 0.5
    r = (2 * lam / (1 + lam)) * 2 ** 0.5 / (2 ** 0.5 + 1e-6)
    assert ridge_score(torch.eye(2), 2 * torch.eye(2), lam) == pytest.approx(1 - r, abs=1e-12)


def test_eclmf_masks_padding_and_needs_layers():
    x = randn(2, 40, 8)
    y = x.clone()
    y[:, 30:] = randn(2, 10, 8, seed=1) * 100     # garbage in the padding only
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, :30] = True
    assert eclmf([x, x, y], mask, gaps=(2,))[2] == pytest.approx(1.0, abs=1e-5)   # λ = 1e-4 shrinks W a little
    assert eclmf([x, x, y], None, gaps=(2,))[2] < 0.5
    assert eclmf([x, x, y], mask, gaps=(5,)) == {5: None}     # 3 hidden states: no pair 5 apart


# ---- ETMF ---------------------------------------------------------------------------------------------------------
def test_etmf_is_one_when_logits_put_all_mass_on_the_input_token():
    E = randn(256, 12)
    ids = token_ids(3, 40)
    logits = 1e4 * F.one_hot(ids, 256).double()
    assert etmf(logits, ids, E)[0] == pytest.approx(1.0, abs=1e-9)
    # distance form: the logits at i+Δ pointing at token i give ETMF_Δ = 1
    shifted = torch.zeros_like(logits)
    shifted[:, 8:] = logits[:, :-8]
    out = etmf(shifted, ids, E, deltas=(0, 8))
    assert out[8] == pytest.approx(1.0, abs=1e-9) and out[0] < 0.5


def test_etmf_by_hand_uniform_and_mask():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 1, 2, 0]])
    logits = torch.zeros(1, 4, 3, dtype=torch.float64)   # uniform: t̂ = mean(E) = (2/3, 2/3), cos = 1/√2 or 1
    expected = (2 ** -0.5 + 2 ** -0.5 + 1.0 + 2 ** -0.5) / 4
    assert etmf(logits, ids, E, deltas=(0,))[0] == pytest.approx(expected, abs=1e-12)
    mask = torch.tensor([[True, True, False, False]])
    junk = logits.clone()
    junk[0, 2:] = randn(2, 3)
    assert etmf(junk, ids, E, mask, deltas=(0,))[0] == pytest.approx(2 ** -0.5, abs=1e-12)
    assert etmf(logits, ids, E, deltas=(8,)) == {8: None}
    with pytest.raises(ValueError, match="logits"):
        etmf(logits[0], ids, E)


# ---- reference vs a backend ---------------------------------------------------------------------------------------
class NoisyBackend(TorchBackend):
    """The same model with its logits nudged: a deployment that lost precision."""

    name = "noisy"

    def step(self, token_ids, state):
        logits, state = super().step(token_ids, state)
        return logits + 0.5 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)), state


def test_torch_backend_on_the_same_model_matches(tiny):
    ids = token_ids(2, 48)
    report = compare(tiny, TorchBackend(tiny), ids)
    assert report.ok and report.insertion_flips == 0 and report.argmax_disagreements == 0
    assert all(d < 1e-6 for d in report.etmf_diff.values())          # step ≡ forward: a difference of rounding
    assert report.decisions == tiny.config.n_layers * 2 * 48
    assert report.reference["eclmf"] == report.backend["eclmf"] and report.reference["eclmf"][2] is not None
    assert set(report.margins) == {"insert (a vs tau1)", "read (b vs tau2)", "replace (a vs min prio)"}


def test_lossy_backend_fails_the_tolerance(tiny):
    ids = token_ids(2, 48)
    report = compare(tiny, NoisyBackend(tiny), ids)
    assert not report.ok and max(report.etmf_diff.values()) > 1e-4
    assert report.insertion_flips == 0                               # its state (the pools) is still right


def test_insertion_flips_are_counted(tiny):
    """A backend whose pool decisions differ (another τ1) is caught through the priorities in its state."""
    ids = token_ids(2, 48)
    other = make_model(0, insert_threshold=0.6)
    report = compare(tiny, TorchBackend(other), ids)
    ref = reference_decisions(tiny, ids)["inserted"]
    theirs = reference_decisions(other, ids)["inserted"]
    assert report.insertion_flips == int((ref != theirs).sum()) > 0


def test_reference_decisions_count_the_insertions(tiny):
    ids = token_ids(2, 64)
    inserted = reference_decisions(tiny, ids)["inserted"]            # [L, B, T]
    assert inserted.sum(dim=(1, 2)).tolist() == pool_insertions(tiny, ids)


def test_memory_off_model_has_no_decisions():
    model = make_model(0, memory=False)
    ids = token_ids(1, 24)
    report = compare(model, TorchBackend(model), ids)
    assert report.ok and report.insertion_flips is None and report.margins == {}


def test_cli_fidelity(tmp_path):
    make_model(0).save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "f.json"
    r = CliRunner().invoke(app, ["fidelity", str(tmp_path / "ckpt"), "--samples", "2", "--length", "40", "--json",
                                 str(out)])
    assert r.exit_code == 0, r.output
    assert "ETMF" in r.output and "ECLMF G=2" in r.output and "insertion flips" in r.output
    data = json.loads(out.read_text())
    assert data["ok"] and set(data["reference"]["etmf"]) == {"0", "8", "16", "32"}
    r = CliRunner().invoke(app, ["fidelity", str(tmp_path / "ckpt"), "--backend", "onnxruntime"])
    assert r.exit_code == 2 and "runs an export directory" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["fidelity", str(tmp_path / "nowhere")])
    assert r.exit_code == 2 and "no such directory" in r.output
    for tol in ("-1", "nan", "inf"):
        r = CliRunner().invoke(app, ["fidelity", str(tmp_path / "ckpt"), "--tol", tol])
        assert r.exit_code == 2 and "--tol must be a finite number >= 0" in r.output, r.output


def _ort_backend(model, tmp_path):
    from memmamba_deploy.backends.ort_backend import OrtBackend
    from memmamba_deploy.export import export_model

    model.save_pretrained(tmp_path / "ckpt")
    export_model(tmp_path / "ckpt", tmp_path / "out", show_progress=False)
    return OrtBackend.open(tmp_path / "out")


def test_ort_backend_fidelity_within_tolerance(tiny, tmp_path):
    """ONNX Runtime vs PyTorch: ETMF within 1e-4, and its pool decisions (read from its state) all agree."""
    ids = token_ids(2, 64)
    report = compare(tiny, _ort_backend(tiny, tmp_path), ids)
    assert report.ok and max(report.etmf_diff.values()) < 1e-6
    assert report.insertion_flips == 0 and report.decisions == tiny.config.n_layers * 2 * 64
    assert sum(pool_insertions(tiny, ids)) > 0                       # the pools were exercised


def test_cli_fidelity_on_an_export(tiny, tmp_path):
    _ort_backend(tiny, tmp_path)
    r = CliRunner().invoke(app, ["fidelity", str(tmp_path / "out"), "--backend", "onnxruntime", "--samples", "2",
                                 "--length", "40", "--json", str(tmp_path / "fidelity.json")])
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "fidelity.json").read_text())
    assert report["ok"] and report["insertion_flips"] == 0 and report["decisions"] > 0


def test_cli_fidelity_refuses_a_reference_of_another_shape(tiny, tmp_path):
    _ort_backend(tiny, tmp_path)
    make_model(1, n_layers=2).save_pretrained(tmp_path / "other")
    r = CliRunner().invoke(app, ["fidelity", str(tmp_path / "out"), "--backend", "onnxruntime", "--reference",
                                 str(tmp_path / "other"), "--samples", "2", "--length", "16"])
    assert r.exit_code == 2 and "config differs (n_layers 2 vs 4)" in r.output and "Traceback" not in r.output
