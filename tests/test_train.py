"""Training script and its data (issue 8): seeded, well-formed batches; loss goes down; resume is bit-exact."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from memmamba_deploy.models import MemMambaLM
from memmamba_deploy.models.checkpoint import read_safetensors
from memmamba_deploy.models.data import (FILLER_SENTENCES, KEY_DIGITS, KEY_INTRO, QUESTION, make_batch,
                                         passkey_min_length, passkey_prompt, passkey_sample, stdlib_text)
from memmamba_deploy.models.memmamba import State
from memmamba_deploy.models.train import (TrainConfig, _swap_recurrent, compute_loss, init_model, main,
                                          parse_args, phases, train)

TINY = dict(d_model=32, n_layers=2, pool_size=8, summary_dim=8)   # ~60k parameters: fast on 2 cores


def tiny_cfg(out, **kw):
    base = dict(out=str(out), preset="tiny", model=TINY, steps=8, curriculum="96x4", lr=5e-3, warmup=2,
                text_fraction=0.5, text_bytes=1 << 20, save_every=3, log_every=1)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def text():
    return stdlib_text(1 << 20)


# ---- data ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [80, 200, 1000, 5000])
def test_passkey_prompt_is_seeded_and_well_formed(length):
    for i in range(4):
        p = passkey_prompt(length, seed=3, index=i)
        again = passkey_prompt(length, seed=3, index=i)
        assert np.array_equal(p.ids, again.ids) and p.key == again.key
        text = bytes(p.ids).decode("ascii")
        assert len(text) == length == p.answer_pos
        assert text.endswith(QUESTION)                                  # the question is at the end
        assert len(p.key) == KEY_DIGITS and p.key.isdigit()
        assert text.count(p.key) == 1                                   # the key appears once ...
        assert sum(c.isdigit() for c in text) == KEY_DIGITS             # ... and no other digit
        assert text[p.key_pos:p.key_pos + KEY_DIGITS] == p.key
        assert text[p.key_pos - len(KEY_INTRO):p.key_pos] == KEY_INTRO
        filler = text.replace(KEY_INTRO + p.key + ". Remember it. ", "").removesuffix(QUESTION)
        assert all(filler.count(s) >= (length - 150) // 120 for s in FILLER_SENTENCES)
    assert passkey_prompt(length, 3, 0).key != passkey_prompt(length, 3, 1).key or length == 80


def test_passkey_depth_and_errors():
    rng = np.random.default_rng(0)
    first = passkey_sample(rng, 2000, depth=0.0)
    last = passkey_sample(rng, 2000, depth=1.0)
    assert first.key_pos < 100 < 1900 < last.key_pos      # depth: where the key sits, 0 = start, 1 = by the question
    with pytest.raises(ValueError, match="too short"):
        passkey_sample(rng, 40)
    with pytest.raises(ValueError, match="5 digits"):
        passkey_sample(rng, 200, key="12a45")


def test_batches_are_a_function_of_seed_and_step(text):
    a = make_batch(7, 11, 8, 160, text, 0.25, 5.0, 1.0)
    b = make_batch(7, 11, 8, 160, text, 0.25, 5.0, 1.0)
    c = make_batch(7, 12, 8, 160, text, 0.25, 5.0, 1.0)
    for f in ("ids", "weight", "note_target", "note_mask", "partner"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.split == b.split and not torch.equal(a.ids, c.ids)
    assert a.ids.shape == (8, 160) and a.weight.shape == (8, 159)


def test_batch_rows_pairs_split_and_targets(text):
    b = make_batch(0, 5, 8, 200, text, 0.25, 5.0, swap_fraction=1.0)
    assert b.split is not None
    n_pass = int((b.note_mask.sum(1) > 0).sum())
    assert n_pass == 6                                                  # 8 rows, 2 of them text
    for r in range(n_pass):
        row = bytes(b.ids[r].numpy().astype(np.uint8)).decode("ascii")
        pos = torch.nonzero(b.note_target[r]).flatten().tolist()
        assert len(pos) == KEY_DIGITS and pos == list(range(pos[0], pos[0] + KEY_DIGITS))
        key = row[pos[0]:pos[0] + KEY_DIGITS]
        assert row.endswith(QUESTION + key + ".")                       # trained answer = the key
        assert pos[-1] < b.split <= len(row) - len(QUESTION) - KEY_DIGITS - 1   # key before the split, question after
        answer = torch.nonzero(b.weight[r] > 1).flatten().tolist()      # weight t predicts ids[t+1]
        assert [row[t + 1] for t in answer] == list(key)
        assert b.note_mask[r, len(row) - KEY_DIGITS - 1:].sum() == 0    # no score target on the answer
        p = int(b.partner[r])
        other = b.ids[p]
        differ = torch.nonzero(b.ids[r] != other).flatten().tolist()    # partners differ in the key digits only
        assert differ and set(differ) <= set(pos) | set(range(len(row) - KEY_DIGITS - 1, len(row)))
    for r in range(n_pass, 8):                                          # text rows: Python source, no targets
        assert b.note_mask[r].sum() == 0 and int(b.partner[r]) == r and (b.weight[r] == 1).all()
        window = bytes(b.ids[r].numpy().astype(np.uint8))
        assert window in text


# ---- the step -----------------------------------------------------------------------------------------------------
def test_swap_gives_partners_ssm_and_keeps_own_pool(tiny):
    state = State.zeros(tiny.config, 4)
    for k, v in state.tensors().items():
        v.copy_(torch.randn(v.shape))
    partner = torch.tensor([1, 0, 2, 3])
    s = _swap_recurrent(state, partner, torch.float32)
    assert torch.equal(s.ssm[:, 0], state.ssm[:, 1]) and torch.equal(s.conv[:, 1], state.conv[:, 0])
    assert torch.equal(s.ssm[:, 2], state.ssm[:, 2])
    assert torch.equal(s.pool, state.pool) and torch.equal(s.prio, state.prio)


def test_split_step_without_swap_equals_forward(text):
    """A split batch whose rows are their own partners computes the same loss as one forward pass."""
    cfg = tiny_cfg("unused").resolved()
    model = init_model(cfg.model_config(), 0, "torch")
    batch = make_batch(0, 3, 4, 128, text, 0.5, 5.0, 1.0)
    assert batch.split is not None
    whole, _ = compute_loss(model, batch, TrainConfig(**{**cfg.__dict__, "swap_fraction": 0.0}))
    batch.partner = torch.arange(4)
    split, _ = compute_loss(model, batch, cfg)
    assert abs(whole.item() - split.item()) <= 1e-5 * abs(whole.item())


TRITON_STEP = """
import json, torch
from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models.data import make_batch
from memmamba_deploy.models.train import TrainConfig, compute_loss, init_model
cfg = TrainConfig(preset="tiny", model=dict(d_model=16, n_layers=2, summary_dim=8, d_state=4), kernels="torch",
                  device="cpu", curriculum="112x2").resolved()
batch = make_batch(0, 1, 2, 112, None, 0.0, 5.0, 1.0)
out = {"split": batch.split}
grads = {}
for kernels in ("torch", "triton"):
    model = init_model(cfg.model_config(), 0, kernels)
    loss, _ = compute_loss(model, batch, cfg)
    loss.backward()
    out[kernels] = loss.item()
    grads[kernels] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
out["n_params"] = sum(1 for _ in model.parameters())
out["n_grads"] = [len(grads["torch"]), len(grads["triton"])]
out["grad_err"] = max(rel_err(grads["triton"][n], g) for n, g in grads["torch"].items())
print(json.dumps(out))
"""


def test_training_step_with_triton_kernels_matches_the_reference():
    """The GPU training path (kernels="triton": forward and backward, state swap at a split) gives the reference's
    loss and gradients. On CPU the kernels run in Triton's interpreter, chosen before triton is imported: a fresh
    process."""
    pytest.importorskip("triton", reason="kernels='triton' needs the triton package (pip install triton)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", TRITON_STEP], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["split"] is not None                                       # the swap path ran
    assert r["n_grads"] == [r["n_params"]] * 2                          # every parameter gets a gradient
    assert abs(r["triton"] - r["torch"]) <= 1e-5 * abs(r["torch"])
    assert r["grad_err"] <= 1e-4, r


def test_training_lowers_the_loss(tmp_path, text):
    cfg = tiny_cfg(tmp_path / "run", steps=20, save_every=100)
    held = make_batch(0, 10 ** 6, 4, 96, text, 0.5, 5.0, 0.0)           # a batch training never sees
    before = compute_loss(init_model(cfg.resolved().model_config(), 0, "torch"), held, cfg.resolved())[0].item()
    summary = train(cfg, quiet=True)
    after = compute_loss(MemMambaLM.from_pretrained(tmp_path / "run" / "model"), held, cfg.resolved())[0].item()
    assert summary["steps"] == 20
    assert after < before - 1.0, (before, after)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert {"loss", "lm_loss", "answer_loss", "note_loss", "lr", "seq_len"} <= set(log[-1])


# ---- resume -------------------------------------------------------------------------------------------------------
def _weights(run):
    return read_safetensors(run / "model" / "model.safetensors")


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_and_resume_is_bit_exact(tmp_path):
    train(tiny_cfg(tmp_path / "a"), quiet=True)
    r = train(tiny_cfg(tmp_path / "b"), stop_after=4, quiet=True)      # "killed" after step 4 (not a save step)
    assert r["stopped"] and r["step"] == 4 and not (tmp_path / "b" / "model").exists()
    train(tiny_cfg(tmp_path / "b"), quiet=True)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    logs = [[json.loads(x)["loss"] for x in (p / "train_log.jsonl").read_text().splitlines()]
            for p in (tmp_path / "a", tmp_path / "b")]
    assert logs[0] == logs[1] and len(logs[0]) == 8                    # no duplicated or missing log line
    # a third run with the same settings finds the run finished and changes nothing
    train(tiny_cfg(tmp_path / "b"), quiet=True)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    """Kill the real command with SIGKILL mid-run (maybe mid-save), run it again: same weights as no kill."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "memmamba_deploy.models.train", "--preset", "tiny", "--set", "d_model=32",
            "--set", "n_layers=2", "--set", "summary_dim=8", "--steps", "14", "--curriculum", "96x4", "--lr", "5e-3",
            "--warmup", "2", "--text-fraction", "0.5", "--text-bytes", str(1 << 20), "--save-every", "3",
            "--log-every", "1"]
    subprocess.run(args + ["--out", str(tmp_path / "a")], env=env, check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen(args + ["--out", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "b" / "train_log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline:
        if log.is_file() and any(json.loads(x)["step"] >= 5 for x in log.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "model").exists(), "the run finished before it could be killed"
    assert (tmp_path / "b" / "last" / "trainer.pt").is_file()
    done = subprocess.run(args + ["--out", str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    steps = [json.loads(x)["step"] for x in log.read_text().splitlines()]
    assert steps == list(range(1, 15))


def test_resume_refuses_other_settings(tmp_path):
    train(tiny_cfg(tmp_path / "a", steps=3), quiet=True)
    with pytest.raises(ValueError, match=r"different settings \(lr: 0.005 -> 0.001\)"):
        train(tiny_cfg(tmp_path / "a", steps=3, lr=1e-3), quiet=True)


# ---- settings -----------------------------------------------------------------------------------------------------
def test_command_line_and_bad_settings(tmp_path):
    cfg = parse_args(["--out", "x", "--no-memory", "--set", "d_model=64", "--steps", "5", "--curriculum", "128x4"])
    assert not cfg.memory and cfg.model == {"d_model": 64} and cfg.steps == 5
    assert cfg.resolved().swap_fraction == 0.0 and cfg.resolved().model_config().d_model == 64
    assert TrainConfig().resolved().swap_fraction == 0.5
    assert phases("256x64, 1024x16") == [(256, 64), (1024, 16)]
    for bad, msg in [("256", "LENGTHxBATCH"), ("79x4", "length must be >= 80"), ("128x1", "batch >= 2")]:
        with pytest.raises(ValueError, match=msg):
            phases(bad)
    with pytest.raises(ValueError, match="needs the memory path"):
        train(tiny_cfg(tmp_path / "x", memory=False, swap_fraction=0.5), quiet=True)
    with pytest.raises(ValueError, match="unknown preset"):
        train(tiny_cfg(tmp_path / "x", preset="huge"), quiet=True)
    with pytest.raises(ValueError, match="unknown config key"):
        train(tiny_cfg(tmp_path / "x", model={"width": 3}), quiet=True)
    with pytest.raises(ValueError, match="vocab_size 100 < 256"):
        train(tiny_cfg(tmp_path / "x", model={"vocab_size": 100}), quiet=True)
    with pytest.raises(ValueError, match="vocab_size 259: the training data is bytes, so a new model's vocabulary is 256"):
        train(tiny_cfg(tmp_path / "x", model={"vocab_size": 259}), quiet=True)     # generate would refuse it text
    big = TrainConfig(out=str(tmp_path / "b"), preset="130m").model_config()      # 130m's shape, the bytes' vocabulary
    assert (big.vocab_size, big.d_model, big.n_layers) == (256, 768, 24)
    (tmp_path / "b" / "last" / "model").mkdir(parents=True)                   # a run begun before: its vocabulary
    (tmp_path / "b" / "last" / "model" / "config.json").write_text(json.dumps({"vocab_size": 50280}))
    assert TrainConfig(out=str(tmp_path / "b"), preset="130m").model_config().vocab_size == 50280
    with pytest.raises(ValueError, match="unknown device 'foo'"):
        train(tiny_cfg(tmp_path / "x", device="foo"), quiet=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train(tiny_cfg(tmp_path / "x", device="cuda"), quiet=True)
    assert phases(f"{passkey_min_length()}x2") == [(80, 2)]           # the shortest phase a passkey row fits
    assert not (tmp_path / "x").exists()                              # nothing written for a refused run
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        train(tiny_cfg(tmp_path / "afile" / "sub"), quiet=True)


def test_command_line_errors_are_one_line(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    (tmp_path / "afile").write_text("")
    assert main(["--out", str(tmp_path / "afile"), "--preset", "tiny", "--steps", "1", "--curriculum", "80x2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "is a file" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before                 # main() put SIGTERM's handler back


def test_a_diverged_run_is_named_not_a_traceback(tmp_path, monkeypatch):
    from memmamba_deploy.models import train as train_mod

    real = train_mod.compute_loss

    def diverged(model, batch, cfg):                   # NaN weights reach the Note Block's scores first
        with torch.no_grad():
            model.layers[0].norm.weight.fill_(float("nan"))
        return real(model, batch, cfg)

    monkeypatch.setattr(train_mod, "compute_loss", diverged)
    with pytest.raises(FloatingPointError, match=r"Note Block's scores are NaN at step 1: lower --lr"):
        train(tiny_cfg(tmp_path / "d", steps=2), quiet=True)


def test_resume_recovers_a_swap_killed_half_way_and_a_torn_log_line(tmp_path):
    out = tmp_path / "r"
    train(tiny_cfg(out, steps=2, save_every=1), stop_after=1, quiet=True)
    aside = tmp_path / "r" / ".last.old-killed"                       # the fallback's first rename done, not its
    aside.mkdir()                                                     # second: `last` is only aside
    (out / "last").rename(aside / "x")
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 9, "lm_lo')                                 # killed mid-line
    summary = train(tiny_cfg(out, steps=2, save_every=1), quiet=True)
    assert summary["steps"] == 2 and not aside.exists()
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    again = train(tiny_cfg(out, steps=2, save_every=1), quiet=True)    # finished: nothing rewritten
    assert again == summary


def test_non_finite_last_checkpoint_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "n"
    train(tiny_cfg(out, steps=2, save_every=1), stop_after=1, quiet=True)
    path = out / "last" / "model" / "model.safetensors"
    t = load_file(str(path))
    t["layers.0.mixer.D"][0] = float("inf")
    save_file(t, str(path))
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.D.*NaN or infinite"):
        train(tiny_cfg(out, steps=2, save_every=1), quiet=True)


def test_demo_config_is_a_few_megabytes():
    cfg = TrainConfig(memory=True).model_config()
    n = sum(p.numel() for p in MemMambaLM(cfg).parameters())
    assert 1.0 <= n * 4 / 2 ** 20 <= 8.0                               # fp32 safetensors, MB
    twin = TrainConfig(memory=False).model_config()
    assert not twin.memory and twin.d_model == cfg.d_model and twin.n_layers == cfg.n_layers


def test_fine_tuning_starts_from_the_checkpoint(tmp_path):
    from memmamba_deploy.models import MemMambaConfig

    start = MemMambaLM(MemMambaConfig.from_dict({**MemMambaConfig.preset("tiny").to_dict(), **TINY}))
    start.save_pretrained(tmp_path / "ck")
    summary = train(tiny_cfg(tmp_path / "ft", model={}, init_from=str(tmp_path / "ck"), steps=1, lr=0.0), quiet=True)
    assert summary["steps"] == 1
    assert _same(_weights(tmp_path / "ft"), start.state_dict())          # lr 0: the checkpoint's weights, kept
    with pytest.raises(ValueError, match="--set cannot change the model"):
        train(tiny_cfg(tmp_path / "x", init_from=str(tmp_path / "ck")), quiet=True)
    with pytest.raises(ValueError, match="has the memory path on: drop --no-memory"):
        train(tiny_cfg(tmp_path / "x", model={}, init_from=str(tmp_path / "ck"), memory=False, swap_fraction=0.0),
              quiet=True)


@pytest.mark.parametrize("bad, message", [(["--set", "memory=false"], "drop --set memory"),
                                          (["--set", "d_model=abc"], "d_model must be a positive integer, got 'abc'")])
def test_set_values_the_model_cannot_take_are_one_line_errors(tmp_path, capsys, bad, message):
    from memmamba_deploy.models.train import main

    assert main(["--out", str(tmp_path / "x"), "--preset", "tiny", "--steps", "1", *bad]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_run_saved_before_a_setting_existed_resumes(tmp_path):
    out = tmp_path / "old"
    train(tiny_cfg(out, steps=2, save_every=1), stop_after=1, quiet=True)
    saved = torch.load(out / "last" / "trainer.pt", weights_only=True)
    del saved["train_config"]["init_from"]                            # as the version before --init-from wrote it
    torch.save(saved, out / "last" / "trainer.pt")
    assert train(tiny_cfg(out, steps=2, save_every=1), quiet=True)["steps"] == 2


def test_a_fresh_start_drops_the_log_of_a_run_killed_before_its_first_save(tmp_path):
    out = tmp_path / "f"
    out.mkdir()
    (out / "train_log.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "lm_lo')
    train(tiny_cfg(out, steps=2, save_every=5), quiet=True)
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
