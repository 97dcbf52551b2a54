"""`memdeploy bench` (memmamba_deploy/bench.py), its KV-cache baseline, and the main job `memdeploy demo`."""
import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_model
from memmamba_deploy.backends import TorchBackend
from memmamba_deploy.bench import measure, parse_contexts, run_bench, write_results
from memmamba_deploy.cli import app
from memmamba_deploy.kv_baseline import KVBaseline
from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models.checkpoint import save_pretrained

CONTEXTS = [16, 48, 96]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(make_model(0), path)
    return path


def test_parse_contexts():
    assert parse_contexts("1k, 4k,16k,64k") == [1024, 4096, 16384, 65536]
    assert parse_contexts("100,0.5k") == [100, 512]
    assert parse_contexts("1m,") == [1024 ** 2]
    for bad, msg in [("1k,x", "bad context length"), ("4k,1k", "increasing"), ("0", "not a whole number"),
                     ("", "no context"), ("infk", "bad context length"), ("nan", "bad context length"),
                     ("1e9k", "bad context length"), ("1.0001k", "not a whole number")]:
        with pytest.raises(ValueError, match=msg):
            parse_contexts(bad)


def test_kv_baseline_heads_split_any_width():
    from memmamba_deploy.kv_baseline import heads_for
    assert [heads_for(d) for d in (768, 1024, 128, 200, 130, 45, 3, 1)] == [12, 16, 2, 4, 2, 1, 1, 1]


@pytest.mark.parametrize("d_model", [128, 130, 45, 3])
@torch.no_grad()
def test_kv_baseline_cache_reproduces_full_recompute(d_model):
    """Chunked prefill + steps through the cache give the logits of a fresh full prefill at every position, for
    widths that are no multiple of 64 (odd head widths included)."""
    kv = KVBaseline(256, d_model, 3, capacity=8)             # capacity 8: the cache must grow on the way
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    state, got = kv.new_state(2), []
    for a, b in [(0, 7), (7, 20)]:
        logits, state = kv.prefill(ids[:, a:b], state)
    got.append(logits)
    for t in range(20, 40):
        logits, state = kv.step(ids[:, t], state)
        got.append(logits)
    want = [kv.prefill(ids[:, :t + 1], kv.new_state(2))[0] for t in range(19, 40)]
    assert rel_err(torch.stack(got), torch.stack(want)) <= 1e-5
    assert state.length == 40
    assert kv.state_nbytes(state) == 2 * 3 * 2 * 40 * d_model * 4    # K and V, layers, batch, tokens, width, fp32
    copy = kv.copy_state(state, headroom=4)
    assert copy.capacity == 44 and torch.equal(copy.k[:, :, :, :40], state.k[:, :, :, :40])


@torch.no_grad()
def test_kv_baseline_static_step_matches_the_eager_step():
    """The graph-capturable step (whole-capacity attention under a mask; what CUDA graphs replay on a GPU) gives
    the eager step's logits and cache, with slots past the written ones left as they were."""
    kv = KVBaseline(256, 128, 3, capacity=64)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    _, eager = kv.prefill(ids[:, :20], kv.new_state(2))
    static = kv.copy_state(eager)
    for t in range(20, 30):
        want, eager = kv.step(ids[:, t], eager)
        pos = torch.tensor([static.length])
        got = kv.model.decode_static(ids[:, t:t + 1], pos, static.k, static.v)
        static = type(static)(static.k, static.v, static.length + 1)
        assert rel_err(got, want) <= 1e-5, t
    assert torch.allclose(static.k[:, :, :, :30], eager.k[:, :, :, :30], atol=1e-6)
    assert static.k[:, :, :, 30:].abs().max() == 0                       # a new cache is zeros past its length


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@torch.no_grad()
def test_kv_baseline_graphed_step_matches_eager_on_gpu():
    graphed = KVBaseline(256, 128, 3, device="cuda", capacity=64)
    eager = KVBaseline(256, 128, 3, device="cuda", capacity=64, graph=False)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2)).cuda()
    _, sg = graphed.prefill(ids[:, :20], graphed.new_state(2))
    _, se = eager.prefill(ids[:, :20], eager.new_state(2))
    for t in range(20, 40):
        lg, sg = graphed.step(ids[:, t], sg)
        le, se = eager.step(ids[:, t], se)
        assert rel_err(lg, le) <= 1e-5, t
    assert len(graphed._graphs) == 1 and sg.length == 40


class Recording:
    """A backend wrapper that records what the bench feeds it."""

    def __init__(self, backend):
        self.inner, self.name, self.config = backend, backend.name, backend.config
        self.prefilled, self.steps, self.copied = [], 0, []

    def new_state(self, batch):
        return self.inner.new_state(batch)

    def prefill(self, ids, state):
        self.prefilled.append(ids.clone())
        return self.inner.prefill(ids, state)

    def step(self, token, state):
        self.steps += 1
        return self.inner.step(token, state)

    def copy_state(self, state):
        self.copied.append(self.inner.copy_state(state))
        return self.inner.copy_state(state)

    def state_nbytes(self, state):
        return self.inner.state_nbytes(state)


@torch.no_grad()
def test_decode_is_timed_on_states_reached_by_prefilling_each_context():
    model = make_model(0)
    rec = Recording(TorchBackend(model))
    res = measure(rec, CONTEXTS, tokens=6, warmup=2, rounds=3, chunk=20, seed=1)
    prompt = torch.cat(rec.prefilled, 1)
    assert prompt.shape == (1, CONTEXTS[-1]) and max(p.shape[1] for p in rec.prefilled) <= 20
    assert rec.steps == len(CONTEXTS) * (2 + 6)
    for ctx, kept in zip(CONTEXTS, rec.copied):                   # each decoded state = prefill of ctx tokens
        _, want = model.prefill(prompt[:, :ctx])
        for k, v in want.tensors().items():
            assert rel_err(kept.tensors()[k], v) <= 1e-5, (ctx, k)
    assert [r["context"] for r in res["rows"]] == CONTEXTS
    assert [r["decode_tokens"] for r in res["rows"]] == [6] * len(CONTEXTS)
    assert [r["prefill_tokens"] for r in res["rows"]] == [16, 32, 48]


def test_bench_writes_json_and_png_with_both_models_and_all_contexts(checkpoint, tmp_path):
    results = run_bench(checkpoint, "torch", CONTEXTS, tokens=8, batch=2, device="cpu", warmup=2, rounds=2, chunk=32)
    json_path, png_path = write_results(results, tmp_path / "out")
    data = json.loads(json_path.read_text())
    meta = data["meta"]
    assert meta["backend"] == "torch" and meta["device"] == "cpu" and meta["dtype"] == "fp32" and meta["batch"] == 2
    assert meta["commit"] and meta["contexts"] == CONTEXTS and "perf_counter" in meta["timer"]
    assert set(data["models"]) == {"memmamba", "kv_baseline"}
    for name, res in data["models"].items():
        assert [r["context"] for r in res["rows"]] == CONTEXTS, name
        for r in res["rows"]:
            for key in ("decode_ms_median", "decode_ms_p90", "prefill_tok_s", "state_bytes"):
                assert math.isfinite(r[key]) and r[key] > 0, (name, key)
            assert r["decode_ms_p90"] >= r["decode_ms_median"]
        rows = res["rows"]
        assert res["flatness"] == pytest.approx(rows[-1]["decode_ms_median"] / rows[0]["decode_ms_median"])
    mm, kv = data["models"]["memmamba"]["rows"], data["models"]["kv_baseline"]["rows"]
    assert len({r["state_bytes"] for r in mm}) == 1                # fixed-size state ...
    assert [r["state_bytes"] for r in kv] == [2 * 4 * 2 * c * 64 * 4 for c in CONTEXTS]   # ... vs a growing cache
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(str(png_path)).shape[1] > 600
    assert not list((tmp_path / "out").glob(".*tmp*"))             # no temporary files left behind


def test_bench_cli(checkpoint, tmp_path):
    res = CliRunner().invoke(app, ["bench", str(checkpoint), "--contexts", "16,32", "--tokens", "4", "--warmup", "1",
                                   "--rounds", "1", "--device", "cpu", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "flatness" in res.output and (tmp_path / "b" / "bench.json").is_file()
    assert (tmp_path / "b" / "bench.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["--contexts", "4k,1k"], "increasing"),
    (["--backend", "onnxruntime"], "runs an export directory"),
    (["--tokens", "0"], "bad bench settings"),
    (["--contexts", "1024m"], "GiB free on cpu"),
    (["--prefill-kernels", "torch", "--backend", "onnxruntime"], "--prefill-kernels is for the torch backend"),
])
def test_bench_cli_errors_are_one_line(checkpoint, tmp_path, args, message):
    res = CliRunner().invoke(app, ["bench", str(checkpoint), "--device", "cpu", "--out", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "bench.json").exists()


def test_one_context_has_no_flatness_and_the_kv_baseline_names_its_own_dtype(checkpoint, tmp_path):
    res = CliRunner().invoke(app, ["bench", str(checkpoint), "--contexts", "16", "--tokens", "2", "--warmup", "0",
                                   "--rounds", "1", "--device", "cpu", "--dtype", "bf16", "--out", str(tmp_path)],
                             terminal_width=250)
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["models"]["memmamba"]["flatness"] is None and re.search(r"flatness\s+n/a", res.output)
    kv = data["models"]["kv_baseline"]
    assert data["meta"]["dtype"] == "bf16" and kv["dtype"] == "fp32" and kv["label"].endswith(", fp32)")


def test_demo_runs_the_main_job(tmp_path):
    """The README's main job, at small sizes: every stage runs (none skipped, none failed) and leaves its files."""
    res = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path / "demo"), "--contexts", "32,64", "--tokens",
                                   "4", "--parity-steps", "8"])
    assert res.exit_code == 0, res.output
    for stage in ("checkpoint", "self-check", "export", "parity", "bench"):
        assert stage in res.output
    assert "skipped" not in res.output and "FAIL" not in res.output
    assert (tmp_path / "demo" / "export" / "manifest.json").is_file()
    data = json.loads((tmp_path / "demo" / "bench" / "bench.json").read_text())
    assert data["meta"]["contexts"] == [32, 64] and set(data["models"]) == {"memmamba", "kv_baseline"}
    if not torch.cuda.is_available():
        assert data["meta"]["backend"] == "onnxruntime"
    summary = json.loads((tmp_path / "demo" / "demo.json").read_text())          # the reports README promises
    assert [s["stage"] for s in summary["stages"]][:5] == ["checkpoint", "self-check", "export", "parity", "bench"]
    assert summary["selfcheck"] and all(r["ok"] for r in summary["selfcheck"])
    assert json.loads((tmp_path / "demo" / "parity.json").read_text())["ok"]


def test_noise_note_flags_spread_timings_only():
    from memmamba_deploy.bench import NOISY_P90, noise_note

    def run(p90_over_median):
        rows = [{"context": 1024, "decode_ms_median": 0.5, "decode_ms_p90": 0.5 * p90_over_median}]
        return {"models": {"memmamba": {"label": "MemMamba (onnxruntime)", "rows": rows}}}
    assert noise_note(run(1.2)) is None and noise_note(run(NOISY_P90)) is None
    note = noise_note(run(1.1), run(8.0))
    assert note and "p90 is 8.0x the median" in note and "1k" in note


class Counting:
    """A backend whose state is the number of tokens it has consumed: each step records the position it runs at."""

    def __init__(self, config):
        self.name, self.config, self.positions = "counting", config, []

    def new_state(self, batch):
        return {"n": 0}

    def prefill(self, ids, state):
        return torch.zeros(ids.shape[0], self.config.vocab_size), {"n": state["n"] + ids.shape[1]}

    def step(self, token, state):
        self.positions.append(state["n"])
        return torch.zeros(token.shape[0], self.config.vocab_size), {"n": state["n"] + 1}

    def copy_state(self, state):
        return dict(state)

    def state_nbytes(self, state):
        return 8


def test_each_context_is_decoded_from_its_own_state():
    backend = Counting(make_model(0).config)
    measure(backend, CONTEXTS, tokens=6, warmup=2, rounds=3, chunk=20, seed=1)
    for ctx in CONTEXTS:                              # warm-up and timed steps go on from that context's state
        assert sorted(p for p in backend.positions if ctx <= p < ctx + 8) == list(range(ctx, ctx + 8)), ctx
    assert len(backend.positions) == len(CONTEXTS) * 8


def test_flatness_verdict():
    from memmamba_deploy.bench import FLATNESS_TARGET, flatness_verdict

    assert flatness_verdict(1.0) == "ok" and flatness_verdict(FLATNESS_TARGET) == "ok"
    assert flatness_verdict(FLATNESS_TARGET + 0.01) == "MISS" and flatness_verdict(None) == "n/a"
