"""The GPU check driver (memmamba_deploy/gpu_check.py) on the CPU: stage order, summary rows, failures, and a
time-out or a SIGTERM to the driver that kills what the stage started, not only its shell."""
import os
import subprocess
import sys
import time

import pytest

from memmamba_deploy import gpu_check


@pytest.fixture(autouse=True)
def a_gpu_machine(monkeypatch):
    """The driver refuses to start without a CUDA GPU; these tests play one."""
    monkeypatch.setattr(gpu_check, "_cuda_visible", lambda: True)


def test_without_a_gpu_it_stops_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "_cuda_visible", lambda: False)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert gpu_check.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_gpu_test_that_skips_inside_the_check_fails(tmp_path):
    """tests/conftest.py: inside the check (MEMMAMBA_GPU_CHECK) a skipped gpu test is a failure, else a skip."""
    test = tmp_path / "test_skips.py"
    test.write_text("import pytest\n\n@pytest.mark.gpu\ndef test_needs_a_gpu():\n    pytest.skip('needs a CUDA GPU')\n")
    conftest = os.path.join(os.path.dirname(__file__), "conftest.py")
    (tmp_path / "conftest.py").write_text(open(conftest).read())

    def run(env):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                              capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env})

    inside, outside = run({gpu_check.GPU_CHECK_ENV: "1"}), run({gpu_check.GPU_CHECK_ENV: ""})
    assert inside.returncode == 1 and "skipped inside the GPU check" in inside.stdout, inside.stdout[-2000:]
    assert outside.returncode == 0 and "1 skipped" in outside.stdout, outside.stdout[-2000:]


def stage(dir_, name, body):
    path = dir_ / f"{name}.sh"
    path.write_text("#!/usr/bin/env bash\n" + body + "\n")
    return path


def test_stages_run_in_order_and_report(tmp_path, monkeypatch, capsys):
    stages = tmp_path / "stages"
    stages.mkdir()
    stage(stages, "10-first", 'echo "@@ first: 1.5 ms"')
    stage(stages, "20-second", "echo not a row; exit 3")
    stage(stages, "30-skipped", "echo '@@ never'")
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rc = gpu_check.main(["--skip", "skipped"])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.index("=== first") < out.index("=== second") and "never" not in out
    assert "[     ok] first" in out and "first: 1.5 ms" in out and "[FAIL rc=3] second" in out
    assert "not a row" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_timeout_kills_the_stage_and_its_children(tmp_path, monkeypatch, capsys):
    stages = tmp_path / "stages"
    stages.mkdir()
    # a child that keeps the output pipe open: killing bash alone would leave the driver waiting 60 s
    stage(stages, "10-hang", "python3 -c 'import time; time.sleep(60)'")
    monkeypatch.setattr(gpu_check, "STAGES", stages)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    t0 = time.time()
    rc = gpu_check.main(["--timeout", "1"])
    assert time.time() - t0 < 20
    assert rc == 1 and "[TIMEOUT] hang" in capsys.readouterr().out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)   # a zombie is dead
    except FileNotFoundError:
        return True


def _driver_on_a_hanging_stage(tmp_path):
    """The driver in a child process: a stage that prints a row, then one that hangs. Returns (driver, the hanging
    stage's pid)."""
    stages = tmp_path / "stages"
    stages.mkdir()
    pidfile = tmp_path / "pid"
    stage(stages, "10-quick", 'echo "@@ quick: 2.5 ms"')
    stage(stages, "20-long", "python3 -c 'import os, time; "
                             "open(os.environ[\"PIDFILE\"], \"w\").write(str(os.getpid())); time.sleep(60)'")
    driver = subprocess.Popen(
        [sys.executable, "-c", f"import sys; from pathlib import Path; from memmamba_deploy import gpu_check; "
                               f"gpu_check.STAGES = Path({str(stages)!r}); gpu_check._cuda_visible = lambda: True; "
                               f"sys.exit(gpu_check.main([]))"],
        env={**os.environ, "OUT": str(tmp_path / "out"), "PIDFILE": str(pidfile)}, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 20
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    pid = int(pidfile.read_text())
    assert not _gone(pid)
    return driver, pid


def _dies(pid: int) -> bool:
    deadline = time.time() + 10
    while not _gone(pid) and time.time() < deadline:
        time.sleep(0.05)
    return _gone(pid)


def test_sigterm_to_the_driver_kills_the_running_stage_and_prints_the_summary(tmp_path):
    import signal

    driver, pid = _driver_on_a_hanging_stage(tmp_path)
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=20)
    assert driver.returncode == 143 and _dies(pid)
    assert "[     ok] quick" in out and "quick: 2.5 ms" in out and "[ KILLED] long" in out


def test_a_killed_driver_takes_the_running_stage_with_it(tmp_path):
    import signal

    driver, pid = _driver_on_a_hanging_stage(tmp_path)
    driver.send_signal(signal.SIGKILL)          # no handler runs: the parent-death signal and the wrapper's trap
    driver.wait(timeout=20)
    assert _dies(pid)
