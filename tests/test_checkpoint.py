import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_model
from memmamba_deploy.cli import app
from memmamba_deploy.models import MemMambaConfig, MemMambaLM
from memmamba_deploy.models.checkpoint import CheckpointError, atomic_directory, save_pretrained


def test_round_trip_is_bit_exact(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "ck")
    back = MemMambaLM.from_pretrained(tmp_path / "ck")
    assert back.config == tiny.config
    a, b = tiny.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        assert torch.equal(tiny(ids), back(ids))


def test_saving_into_a_directory_keeps_what_else_is_there(tmp_path, tiny, monkeypatch):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    (tmp_path / "ck" / "data").mkdir()
    make_model(3).save_pretrained(tmp_path / "ck")
    tiny.save_pretrained(tmp_path / "ck")                              # the checkpoint's files replaced, no others
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "data", "model.safetensors",
                                                                    "notes.txt"]
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"
    back = MemMambaLM.from_pretrained(tmp_path / "ck")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in tiny.state_dict().items())
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]          # no temp files or dirs left behind
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(tiny, tmp_path / "ck", force=False)
    monkeypatch.chdir(tmp_path / "ck")                                 # "." and a path through the working dir
    tiny.save_pretrained(".")
    tiny.save_pretrained("../ck")
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine" and Path.cwd() == tmp_path / "ck"


def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with torch.no_grad():
        tiny.layers[0].mixer.D[0] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.0\.mixer\.D.*NaN"):
        tiny.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before


def test_failure_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_replacing_a_directory_is_one_exchange(tmp_path, monkeypatch):
    from memmamba_deploy.models import checkpoint

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):           # a non-empty directory only with force
        with atomic_directory(tmp_path / "out"):
            pass
    with atomic_directory(tmp_path / "out", force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "A").write_text("")
    if checkpoint._exchange(tmp_path / "a", tmp_path / "out"):        # Linux: one atomic swap, no moment without
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["A"]      # "out" (elsewhere: two renames)
        assert [p.name for p in (tmp_path / "a").iterdir()] == ["new.txt"]
        calls = []
        real = checkpoint._exchange
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: calls.append(b) or real(a, b))
        with atomic_directory(tmp_path / "out", force=True) as tmp:
            (tmp / "third.txt").write_text("")
        assert calls == [tmp_path / "out"] and [p.name for p in (tmp_path / "out").iterdir()] == ["third.txt"]
    assert not checkpoint._exchange(tmp_path / "missing", tmp_path / "out")   # a failure: False, nothing moved


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    import os

    from memmamba_deploy.models import checkpoint

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):                         # moving the old one aside works; renaming the new one in fails
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)    # a system without renameat2
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_directory(tmp_path / "out", force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(os, "replace", real_replace)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".out.old-")) == ["out"]


def test_a_directory_left_aside_by_a_killed_swap_comes_back(tmp_path):
    from memmamba_deploy.models.checkpoint import recover_directory

    aside = tmp_path / ".out.old-abc123"           # a process killed between the fallback's two renames
    aside.mkdir()
    (aside / "x").mkdir()
    (aside / "x" / "old.txt").write_text("old")
    assert recover_directory(tmp_path / "out")
    assert (tmp_path / "out" / "old.txt").read_text() == "old" and not aside.exists()
    assert not recover_directory(tmp_path / "out")                   # nothing missing: nothing done
    for name in ("run[1]", "x*"):                                     # names are not patterns
        (tmp_path / f".{name}.old-abc").mkdir()
        (tmp_path / f".{name}.old-abc" / "x").mkdir()
    (tmp_path / ".xyz.old-abc").mkdir()
    (tmp_path / ".xyz.old-abc" / "x").mkdir()
    assert recover_directory(tmp_path / "run[1]") and (tmp_path / "run[1]").is_dir()
    assert recover_directory(tmp_path / "x*") and (tmp_path / ".xyz.old-abc" / "x").is_dir()


def test_a_save_after_a_killed_swap_recovers_then_saves(tmp_path, tiny):
    aside = tmp_path / ".ck.old-abc"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "notes.txt").write_text("mine")
    tiny.save_pretrained(tmp_path / "ck")                             # force: into the recovered folder
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors", "notes.txt"]


def test_a_failed_save_into_a_folder_leaves_it_as_it_was(tmp_path, tiny, monkeypatch):
    from memmamba_deploy.models import checkpoint

    make_model(3).save_pretrained(tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}

    def full(tensors, path, metadata=None):           # what safetensors raises on a full disk: not an OSError
        from safetensors import SafetensorError
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(OSError, match="could not write .*No space"):
        checkpoint.save_pretrained(tiny, tmp_path / "ck", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before    # no temporaries either
    result = CliRunner().invoke(app, ["init", str(tmp_path / "new")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "could not write" in result.output and not (tmp_path / "new").exists()


def test_written_files_get_the_usual_modes(tmp_path, tiny):
    import os

    umask = os.umask(0o022)
    try:
        tiny.save_pretrained(tmp_path / "ck")
    finally:
        os.umask(umask)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777 == 0o644


@pytest.fixture
def saved(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


def test_missing_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        MemMambaLM.from_pretrained(tmp_path / "nope")
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        MemMambaLM.from_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        MemMambaLM.from_pretrained(saved)


def test_corrupt_weights(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        MemMambaLM.from_pretrained(saved)
    (saved / "model.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match="corrupt"):
        MemMambaLM.from_pretrained(saved)


def test_corrupt_config(saved):
    (saved / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        MemMambaLM.from_pretrained(saved)


def test_shape_mismatch_names_tensor_and_shapes(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["d_state"] = 4
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"tensor 'layers.0.mixer.A_log' has shape \[128, 8\] in the file but "
                                              r"the config needs \[128, 4\]"):
        MemMambaLM.from_pretrained(saved)


def test_memory_mismatch_lists_unexpected_tensors(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["memory"] = False
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        MemMambaLM.from_pretrained(saved)


def test_unknown_architecture(saved):
    (saved / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        MemMambaLM.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**make_model().config.to_dict(), "architecture": "rwkv"}))
    with pytest.raises(CheckpointError, match="unknown architecture 'rwkv'"):
        MemMambaLM.from_pretrained(saved)


def test_load_to_dtype(saved):
    m = MemMambaLM.from_pretrained(saved, dtype=torch.float16)
    assert m.dtype == torch.float16 and m.new_state(1).ssm.dtype == torch.float32


def test_cli_init_then_load_gives_identical_logits(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["init", str(tmp_path / "x"), "--preset", "tiny", "--seed", "3"])
    assert r.exit_code == 0, r.output
    r2 = runner.invoke(app, ["init", str(tmp_path / "y"), "--preset", "tiny", "--seed", "3"])
    assert r2.exit_code == 0
    a, b = MemMambaLM.from_pretrained(tmp_path / "x"), MemMambaLM.from_pretrained(tmp_path / "y")
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))                          # seeded: same seed, same model
    r = runner.invoke(app, ["init", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not empty" in r.output


def test_cli_selfcheck_passes_and_reports_errors(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(tmp_path / "x")]).exit_code == 0
    r = runner.invoke(app, ["selfcheck", str(tmp_path / "x"), "--tokens", "40"])
    assert r.exit_code == 0, r.output
    assert "step vs forward: logits" in r.output and "FAIL" not in r.output
    r = runner.invoke(app, ["selfcheck", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "no checkpoint directory" in r.output


def test_selfcheck_fails_a_step_that_does_not_reproduce_forward(tmp_path, monkeypatch):
    """The check the demo gates on can fail: a step whose logits are 0.1% off fails both logits rows, exit 1."""
    MemMambaLM(MemMambaConfig()).save_pretrained(tmp_path / "m")
    step = MemMambaLM.step
    monkeypatch.setattr(MemMambaLM, "step", lambda self, ids, state: (lambda lg, st: (lg * 1.001, st))(
        *step(self, ids, state)))
    r = CliRunner().invoke(app, ["selfcheck", str(tmp_path / "m"), "--tokens", "40"])
    assert r.exit_code == 1, r.output
    assert r.output.count("FAIL") >= 2 and "step vs forward: logits" in r.output


@pytest.mark.parametrize("module", ["memmamba_deploy", "memmamba_deploy.cli"])
def test_every_verb_is_there_however_the_cli_is_started(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for verb in ("init", "selfcheck", "export", "parity", "bench", "generate", "demo", "aot", "build", "selftest",
                 "fidelity", "eval"):
        assert f" {verb} " in out.stdout, verb


@pytest.mark.parametrize("bad, message", [
    (lambda t: t.to(torch.int32), "is torch.int32; parameters must be fp32, fp16 or bf16"),
    (lambda t: t.to(torch.float8_e4m3fn), "is torch.float8_e4m3fn; parameters must be fp32, fp16 or bf16"),
    (lambda t: t.clone().fill_(float("nan")), "holds NaN or infinite values"),
])
def test_loader_names_a_tensor_of_the_wrong_kind(tmp_path, tiny, bad, message):
    from safetensors.torch import load_file, save_file

    tiny.save_pretrained(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["embeddings.weight"] = bad(tensors["embeddings.weight"])
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="'embeddings.weight' " + message.replace("(", r"\(")):
        MemMambaLM.from_pretrained(tmp_path / "ck")
    r = CliRunner().invoke(app, ["selfcheck", str(tmp_path / "ck")])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_outputs_under_a_file_fail_before_any_work(tmp_path, tiny, monkeypatch):
    """A path through a file, or on a file system that takes no new entry, is refused up front with a line that
    names it (not a raw errno about a temporary name, not after a long run)."""
    import memmamba_deploy.bench as bench
    from memmamba_deploy.models.checkpoint import creatable_dir, writable_file

    (tmp_path / "afile").write_text("x")
    tiny.save_pretrained(tmp_path / "ck")
    runner = CliRunner()
    r = runner.invoke(app, ["init", str(tmp_path / "afile" / "sub")])
    assert r.exit_code == 2 and "afile is a file, not a directory" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "ck"), "-o", str(tmp_path / "afile" / "sub")])
    assert r.exit_code == 2 and "afile is a file, not a directory" in r.output

    def no_run(*a, **k):
        raise AssertionError("the benchmark ran before its --out was checked")
    monkeypatch.setattr(bench, "run_bench", no_run)
    r = runner.invoke(app, ["bench", str(tmp_path / "ck"), "--device", "cpu", "--out",
                            str(tmp_path / "afile" / "sub" / "deeper")])
    assert r.exit_code == 2 and "is a file, not a directory" in r.output, r.output
    for json_path in (tmp_path / "afile" / "x.json", tmp_path / "afile" / "sub" / "x.json"):
        with pytest.raises(NotADirectoryError, match="afile is a file, not a directory"):
            writable_file(json_path)
    r = runner.invoke(app, ["aot", "--out", str(tmp_path / "afile" / "lib"), "--arch", "90"])
    assert r.exit_code == 2 and "afile is a file, not a directory" in r.output
    with pytest.raises(OSError, match="cannot write .*target"):
        monkeypatch.setattr("tempfile.mkdtemp", lambda **k: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
        creatable_dir(tmp_path / "new", tmp_path / "target")


def test_cli_selfcheck_validates_its_settings_and_follows_the_dtype(tmp_path, tiny):
    runner = CliRunner()
    tiny.save_pretrained(tmp_path / "ck")
    for args, message in ((["--batch", "0"], "--batch must be >= 1"), (["--tokens", "1"], "--tokens must be >= 2"),
                          (["--tokens", "0"], "--tokens must be >= 2"), (["--tol", "0"], "--tol must be > 0")):
        r = runner.invoke(app, ["selfcheck", str(tmp_path / "ck"), *args])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, args
    tiny.half().save_pretrained(tmp_path / "ck16")                   # fp16 weights: half-precision tolerance
    r = runner.invoke(app, ["selfcheck", str(tmp_path / "ck16"), "--tokens", "16", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 0, r.output
    checks = json.loads((tmp_path / "s.json").read_text())["checks"]
    assert {c["tolerance"] for c in checks} == {1e-2} and max(c["error"] for c in checks) > 1e-5  # fp32's would fail
    make_model(0).double().save_pretrained(tmp_path / "ck64")        # fp64 loads, and keeps fp32's tolerance
    r = runner.invoke(app, ["selfcheck", str(tmp_path / "ck64"), "--tokens", "16", "--json", str(tmp_path / "d.json")])
    assert r.exit_code == 0, r.output
    assert {c["tolerance"] for c in json.loads((tmp_path / "d.json").read_text())["checks"]} == {1e-5}


def test_triton_kernels_on_the_cpu_are_refused_before_loading(tmp_path, tiny, monkeypatch):
    """Refused where this process runs Triton compiled, allowed where it runs interpreted (the CPU tests)."""
    import memmamba_deploy.models.ops.triton as triton_ops
    from memmamba_deploy.models.ops import check_kernels_on

    tiny.save_pretrained(tmp_path / "ck")
    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    with pytest.raises(ValueError, match="the Triton kernels run on a CUDA GPU"):
        MemMambaLM.from_pretrained(tmp_path / "ck", kernels="triton", device="cpu")
    MemMambaLM.from_pretrained(tmp_path / "ck", kernels="triton")   # no device yet: the caller may move it
    check_kernels_on("torch", "cpu")                                  # the reference runs anywhere
    with pytest.raises(ValueError, match="device 'gpu': use cpu, cuda or cuda:N"):
        check_kernels_on("triton", "gpu")
    monkeypatch.setattr(triton_ops, "INTERPRETED", True)
    check_kernels_on("triton", torch.device("cpu"))                  # the interpreter: allowed (tests use it)


def test_mixed_dtypes_load_as_one_and_dtype_names_are_understood(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    tiny.half().save_pretrained(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    t = load_file(str(path))
    t["layers.0.norm.weight"] = t["layers.0.norm.weight"].float()    # fp16 weights with an fp32 norm
    save_file(t, str(path))
    model = MemMambaLM.from_pretrained(tmp_path / "ck")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        model(ids)                                                      # runs: one dtype throughout
    fp32 = MemMambaLM.from_pretrained(tmp_path / "ck", dtype="fp32")
    assert fp32.dtype == torch.float32 and torch.equal(fp32.layers[0].norm.weight, t["layers.0.norm.weight"])
    assert MemMambaLM.from_pretrained(tmp_path / "ck", dtype="bfloat16").dtype == torch.bfloat16
    for bad in ("fp8", torch.int8):
        with pytest.raises(ValueError, match="dtype must be fp32, fp16, bf16 or fp64"):
            MemMambaLM.from_pretrained(tmp_path / "ck", dtype=bad)


def test_a_killed_writers_temporary_is_removed_and_a_live_ones_kept(tmp_path):
    import os
    import socket
    import subprocess

    done = subprocess.run(["true"])                                  # a PID no process holds now
    host = socket.gethostname()
    dead = tmp_path / f".out.tmp-{host}-{2 ** 22 + 7}-abc"           # above pid_max's default: never live
    live = tmp_path / f".out.tmp-{host}-{os.getppid()}-def"          # our parent: alive
    other = tmp_path / f".out.tmp-otherhost-{2 ** 22 + 7}-ghi"       # another host's (a shared folder): kept
    for d in (dead, live, other):
        d.mkdir()
        (d / "half.onnx").write_bytes(b"x")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("new")
    assert not dead.exists() and live.exists() and other.exists() and done.returncode == 0
    assert (tmp_path / "out" / "new.txt").is_file()


def test_sigterm_unwinds_a_verb_like_ctrl_c():
    import os
    import signal

    from memmamba_deploy.models.checkpoint import terminate_as_interrupt

    with pytest.raises(KeyboardInterrupt), terminate_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.1) if hasattr(signal, "sigtimedwait") else None


@pytest.mark.parametrize("signame, code, word", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")])
def test_a_signal_mid_verb_is_one_line_and_the_usual_exit_code(tmp_path, signame, code, word):
    """memdeploy init with the write slowed down, signalled half way: one line, 130 / 143, nothing left."""
    import signal

    script = (f"import sys, time, safetensors.torch as st\n"
              f"save = st.save_file\n"
              f"st.save_file = lambda *a, **k: (time.sleep(600), save(*a, **k))\n"   # until the signal
              f"from memmamba_deploy.cli import app\n"
              f"sys.argv = ['memdeploy', 'init', {str(tmp_path / 'ck')!r}]\n"
              f"app()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300                  # a loaded 2-core machine can take a minute to import torch
    while not list(tmp_path.glob(".ck.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    if not list(tmp_path.glob(".ck.tmp-*")):
        proc.kill()
        pytest.fail(f"memdeploy init never reached the write: {proc.communicate()}")
    proc.send_signal(getattr(signal, signame))        # inside the write
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, (out, err)
    assert err.strip().startswith(word) and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())                                          # nothing half-written


def test_a_config_lacking_a_field_is_refused(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    del cfg["pool_size"]
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"lacks \['pool_size'\]"):
        MemMambaLM.from_pretrained(tmp_path / "ck")
    cfg["pool_szie"] = 8
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"lacks \['pool_size'\].*unknown key\(s\) \['pool_szie'\]"):
        MemMambaLM.from_pretrained(tmp_path / "ck")


def test_a_training_run_folder_points_to_its_model(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "run" / "model")
    with pytest.raises(CheckpointError, match="the checkpoint of a training run is its model/ folder"):
        MemMambaLM.from_pretrained(tmp_path / "run")


def test_a_value_the_cast_overflows_is_named(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    tiny.half().save_pretrained(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    t = load_file(str(path))
    t["layers.0.mixer.D"] = torch.full_like(t["layers.0.mixer.D"], 1e5, dtype=torch.float32)
    save_file(t, str(path))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mixer\.D.*beyond torch.float16's range"):
        MemMambaLM.from_pretrained(tmp_path / "ck")
    assert MemMambaLM.from_pretrained(tmp_path / "ck", dtype="fp32").layers[0].mixer.D[0] == 1e5
