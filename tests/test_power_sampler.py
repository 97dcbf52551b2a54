"""bench_kernels.PowerSampler on the CPU: readings from a stand-in nvidia-smi on PATH, their summary, the note the
benchmark prints, and no readings (None) where nvidia-smi is absent or answers [N/A]."""
import os
import stat
import time

from memmamba_deploy.bench_kernels import PowerSampler, power_note


def fake_smi(tmp_path, lines):
    """An executable nvidia-smi answering the given lines in turn (the last one from then on)."""
    (tmp_path / "answers").write_text("\n".join(lines) + "\n")
    (tmp_path / "count").write_text("0")
    script = tmp_path / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
n=$(cat {tmp_path}/count); echo $((n + 1)) > {tmp_path}/count
total=$(wc -l < {tmp_path}/answers)
i=$((n + 1)); [ $i -gt $total ] && i=$total
sed -n "${{i}}p" {tmp_path}/answers
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def sample(monkeypatch, path, seconds=0.6):
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ['PATH']}" if path else "/nonexistent")
    with PowerSampler(period=0.01) as sampler:
        time.sleep(seconds)
    return sampler


def test_parse():
    assert PowerSampler.parse(" 1950, 692.31, 700.00\n") == (1950.0, 692.31, 700.0)
    for bad in ("[N/A], 600.0, 700.0", "", "1950, 692.31", "No devices were found"):
        assert PowerSampler.parse(bad) is None


def test_summary_of_readings(monkeypatch, tmp_path):
    path = fake_smi(tmp_path, ["1980, 500.0, 700.0", "1830, 690.0, 700.0", "[N/A], [N/A], [N/A]",
                               "1950, 695.0, 700.0"])
    s = sample(monkeypatch, path).summary()
    assert s is not None and s["power_samples"] >= 3
    assert s["sm_clock_min_mhz"] == 1830 and s["power_limit_w"] == 700
    assert s["sm_clock_mhz"] == 1950 and s["power_w"] == 695         # the last answer dominates the medians
    assert power_note(s) == "695 of 700 W, SM 1950 MHz (min 1830)"


def test_no_nvidia_smi_means_no_figures(monkeypatch, tmp_path):
    assert sample(monkeypatch, None).summary() is None
    assert sample(monkeypatch, fake_smi(tmp_path, ["[N/A], [N/A], [N/A]"])).summary() is None
    assert power_note({"ms": 1.0}) == ""
