"""Passkey evaluation (issue 8): backends with known answers score 1.0 and 0.0; lengths parse; the CLI works."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_model
from memmamba_deploy.backends import Backend, TorchBackend
from memmamba_deploy.cli import app
from memmamba_deploy.models import MemMambaConfig
from memmamba_deploy.models.data import KEY_DIGITS, KEY_INTRO
from memmamba_deploy.passkey import evaluate_passkey, format_length, parse_lengths


class ReaderBackend:
    """A backend whose state is the token history: it answers by finding "The pass key is DDDDD" in what it has
    read (so a key read in an earlier prefill chunk must survive in the state), optionally getting one digit
    wrong. Its answers are known in advance: always the key, or never."""

    name = "reader"

    def __init__(self, wrong_digit: int | None = None):
        self.config = MemMambaConfig.preset("tiny")
        self.wrong_digit = wrong_digit
        self.prefills = 0

    def new_state(self, batch):
        return [([], 0) for _ in range(batch)]                 # per row: tokens read, tokens stepped

    def copy_state(self, state):
        return [(list(seen), n) for seen, n in state]

    def state_nbytes(self, state):
        return sum(len(seen) for seen, _ in state)

    def _logits(self, state):
        out = torch.full((len(state), 256), -1.0)
        intro = list(KEY_INTRO.encode())
        for b, (seen, n) in enumerate(state):
            start = next((i for i in range(len(seen)) if seen[i:i + len(intro)] == intro), None)
            if start is None:                                     # key not read yet (an early prefill chunk)
                continue
            start += len(intro)
            digit = seen[start + n] if n < KEY_DIGITS else ord(".")   # the n-th answer digit
            if self.wrong_digit is not None and n == self.wrong_digit:
                digit = ord("0") + (digit - ord("0") + 1) % 10
            out[b, digit] = 1.0
        return out

    def prefill(self, input_ids, state):
        self.prefills += 1
        state = [(seen + row, n) for (seen, n), row in zip(state, torch.as_tensor(input_ids).tolist())]
        return self._logits(state), state

    def step(self, token_ids, state):
        state = [(seen + [t], n + 1) for (seen, n), t in zip(state, torch.as_tensor(token_ids).tolist())]
        return self._logits(state), state


def test_reader_backend_is_a_backend():
    assert isinstance(ReaderBackend(), Backend)


@pytest.mark.parametrize("chunk", [64, 100000])
def test_backend_that_always_answers_scores_one(chunk):
    be = ReaderBackend()
    results = evaluate_passkey(be, [200, 700], samples=3, batch=2, chunk=chunk)
    assert [r.accuracy for r in results] == [1.0, 1.0]
    assert [r.digit_accuracy for r in results] == [1.0, 1.0]
    for r in results:
        assert all(p["answer"] == p["key"] and len(p["key"]) == KEY_DIGITS for p in r.predictions)
    # chunk 64: a 200-token prompt takes 4 prefills, a 700-token one 11 (the key came from an early one); each
    # length has 2 batches of prompts
    assert be.prefills == (2 * (4 + 11) if chunk == 64 else 2 * 2)


def test_backend_that_never_answers_scores_zero():
    results = evaluate_passkey(ReaderBackend(wrong_digit=KEY_DIGITS - 1), [300], samples=4, batch=3, chunk=128)
    assert results[0].accuracy == 0.0 and results[0].correct == 0
    assert results[0].digit_accuracy == pytest.approx((KEY_DIGITS - 1) / KEY_DIGITS)   # all but the last digit
    assert results[0].to_dict()["accuracy"] == 0.0


def test_real_model_chunked_prefill_gives_the_same_answers(tiny):
    be = TorchBackend(tiny)
    whole = evaluate_passkey(be, [160], samples=3, batch=3, chunk=1000)[0]
    chunked = evaluate_passkey(be, [160], samples=3, batch=1, chunk=48)[0]
    assert [p["answer"] for p in whole.predictions] == [p["answer"] for p in chunked.predictions]
    assert all(len(p["answer"]) >= KEY_DIGITS for p in whole.predictions)


def test_parse_lengths():
    assert parse_lengths("1k,4k,16k,64k") == [1024, 4096, 16384, 65536]
    assert parse_lengths("100, 2K,1m") == [100, 2048, 1024 ** 2]
    assert parse_lengths("1.5k") == [1536]
    assert [format_length(n) for n in (1024, 65536, 100)] == ["1k", "64k", "100"]
    for bad in ("", "4x", "k", "0", "1.1"):
        with pytest.raises(ValueError):
            parse_lengths(bad)


def test_errors():
    for vocab in (100, 512):                       # too few symbols for bytes; another tokenizer's ids
        other = ReaderBackend()
        other.config = MemMambaConfig.preset("tiny", vocab_size=vocab)
        with pytest.raises(ValueError, match=f"has {vocab} tokens, not 256 bytes"):
            evaluate_passkey(other, [200])
    with pytest.raises(ValueError, match="too short"):
        evaluate_passkey(ReaderBackend(), [50])


def test_nan_logits_score_as_wrong_answers_not_an_abort():
    """An evaluation scores whatever comes out: one model or length going NaN (fp16 overflow, say) must not lose
    the whole run's results (generate itself refuses NaN logits; eval passkey asks it not to)."""
    class NaNReader(ReaderBackend):
        def _logits(self, state):
            return super()._logits(state) * float("nan")

    results = evaluate_passkey(NaNReader(), [200], samples=2, batch=2)
    assert results[0].correct == 0 and results[0].samples == 2


def test_cli_eval_passkey_two_checkpoints(tmp_path):
    for name, memory in (("mem", True), ("twin", False)):
        make_model(0, memory=memory).save_pretrained(tmp_path / name)
    out = tmp_path / "pk.json"
    r = CliRunner().invoke(app, ["eval", "passkey", str(tmp_path / "mem"), str(tmp_path / "twin"), "--lengths",
                                 "100,128", "--samples", "2", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "passkey retrieval accuracy" in r.output and "memory on" in r.output and "memory off" in r.output
    data = json.loads(out.read_text())
    assert data["lengths"] == [100, 128] and [run["memory"] for run in data["runs"]] == [True, False]
    for run in data["runs"]:
        assert [len(x["predictions"]) for x in run["results"]] == [2, 2]
        assert all(0.0 <= x["accuracy"] <= 1.0 for x in run["results"])


@pytest.mark.parametrize("args, message", [
    (["eval", "passkey", "NOPE"], "no such directory"),
    (["eval", "passkey", "{ckpt}", "--backend", "onnxruntime"], "runs an export directory"),
    (["eval", "passkey", "{ckpt}", "--backend", "magic"], "unknown backend 'magic'"),
    (["eval", "passkey", "{ckpt}", "--lengths", "4q"], "bad length '4q'"),
    (["eval", "passkey", "{ckpt}", "--seed", "-3"], "--seed"),
])
def test_cli_bad_input_is_one_clear_line(tmp_path, args, message):
    make_model(0).save_pretrained(tmp_path / "ckpt")
    args = [a.replace("{ckpt}", str(tmp_path / "ckpt")).replace("NOPE", str(tmp_path / "nope")) for a in args]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_ort_and_torch_give_the_same_answers(tiny, tmp_path):
    from memmamba_deploy.backends.ort_backend import OrtBackend
    from memmamba_deploy.export import export_model

    tiny.save_pretrained(tmp_path / "ckpt")
    export_model(tmp_path / "ckpt", tmp_path / "out", show_progress=False)
    ort = evaluate_passkey(OrtBackend.open(tmp_path / "out"), [100, 300], samples=3, batch=3, chunk=128)
    ref = evaluate_passkey(TorchBackend(tiny), [100, 300], samples=3, batch=3, chunk=128)
    assert [p for r in ort for p in r.predictions] == [p for r in ref for p in r.predictions]


ASSETS = Path(__file__).resolve().parent.parent / "memmamba_deploy" / "assets"


@pytest.mark.parametrize("name", ["demo-memmamba", "demo-mamba"])
def test_bundled_checkpoints_give_the_same_answers_on_torch_and_ort(name, tmp_path):
    """The bundled checkpoints (trained by scripts/gpu_stages/50-train-demo.sh) load in the reference and in ONNX
    Runtime and answer alike; the MemMamba one retrieves the key, as BENCHMARKS.md reports up to 64k."""
    from memmamba_deploy.backends.ort_backend import OrtBackend
    from memmamba_deploy.export import export_model

    ckpt = ASSETS / name
    export_model(ckpt, tmp_path / "out", show_progress=False)
    ref = evaluate_passkey(TorchBackend.open(ckpt), [1024], samples=4, batch=4)[0]
    ort = evaluate_passkey(OrtBackend.open(tmp_path / "out"), [1024], samples=4, batch=4)[0]
    assert ref.predictions == ort.predictions
    if name == "demo-memmamba":
        assert ref.accuracy >= 0.75


def test_cli_eval_passkey_checks_every_model_and_length_first(tmp_path, monkeypatch):
    """A length too short or a model that is not byte-level anywhere in the run fails before any prompt runs, and
    two checkpoints with the same folder name (DIR/model, the training layout) get columns by their paths."""
    import memmamba_deploy.passkey as passkey

    for run, vocab in (("r1", 256), ("r2", 256), ("r3", 300)):
        make_model(0, vocab_size=vocab).save_pretrained(tmp_path / run / "model")
    ran = []
    real = passkey.evaluate_passkey
    monkeypatch.setattr(passkey, "evaluate_passkey", lambda *a, **k: ran.append(1) or real(*a, **k))
    r1, r2, r3 = (str(tmp_path / r / "model") for r in ("r1", "r2", "r3"))
    for args, message in ((["--lengths", "100,50"], "50 too short"), ([r3, "--lengths", "100"], "has 300 tokens")):
        r = CliRunner().invoke(app, ["eval", "passkey", r1, *args, "--samples", "1"])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert ran == []
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["eval", "passkey", r1, r2, "--lengths", "100", "--samples", "1"])
    assert r.exit_code == 0 and r1 in r.output and r2 in r.output, r.output
