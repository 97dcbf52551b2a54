"""Driver of scripts/gpu_check.sh: runs each stage script with a time limit and prints the summary last.

A stage is an executable file scripts/gpu_stages/NN-name.sh. It runs from the repo root with $OUT set, appends
JSON lines to $OUT/results.jsonl if it has figures, and prints summary lines that start with "@@ " (one row of the
final table each). Its exit status marks the stage ok/FAIL. The device returns at most 8 files from $OUT: stages
write into gpu_check.log (via this driver) and results.jsonl, plus at most one PNG each.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STAGES = Path(__file__).resolve().parent.parent / "scripts" / "gpu_stages"
GPU_CHECK_ENV = "MEMMAMBA_GPU_CHECK"          # set for the stages: their gpu tests may not skip (tests/conftest.py)


# A stage runs in its own process group (a new session), so that a time-out kills what it started too (pytest, a
# harness): killing bash alone would leave them holding the output pipe and the GPU. The group is killed when the
# stage times out, when the driver gets SIGTERM or SIGHUP (a device call out of time, a dropped terminal), and,
# through the kernel's parent-death signal and the wrapper's trap, when the driver itself is SIGKILLed.
WRAPPER = 'trap "kill -KILL 0" TERM HUP; bash "$0" & wait $!'
_running: list[int] = []                       # the running stage's group, for the signal handler


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):      # it ended already
        pass


def _on_signal(signum, frame):
    for pgid in _running:
        _kill_group(pgid)
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    """In the stage's wrapper before exec: SIGTERM when the driver's thread dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)         # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="comma-separated stage names (without NN- and .sh)")
    ap.add_argument("--skip", default="")
    ap.add_argument("--timeout", type=float, default=540, help="seconds per stage")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    if not _cuda_visible():                 # every stage needs one: say so once instead of nine stages failing
        print("no CUDA GPU is visible to torch here: the GPU checks need one (the CPU tests: python -m pytest -m "
              "'not gpu')", file=sys.stderr)
        return 2
    out = Path(os.environ.get("OUT", "runs/gpu"))
    out.mkdir(parents=True, exist_ok=True)
    summary: list[tuple[str, str, float, list[str]]] = []
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    stopped = None
    try:
        with open(out / "gpu_check.log", "a") as log:
            for script in sorted(STAGES.glob("*.sh")):
                name = script.stem.split("-", 1)[-1]
                if (only and name not in only) or name in skip:
                    continue
                print(f"=== {name}", flush=True)
                log.write(f"\n=== {name} ({script})\n")
                log.flush()
                t0, rows = time.time(), []
                try:
                    status = _run_stage(script, out, log, args.timeout, rows)
                except (SystemExit, KeyboardInterrupt) as e:   # the driver was stopped: report what ran
                    stopped, status = e, "KILLED"
                log.flush()
                dt = time.time() - t0
                print(f"    {status} in {dt:.0f}s", flush=True)
                summary.append((name, status, dt, rows))
                if stopped:
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("\n================ summary ================")
    for name, status, dt, rows in summary:
        print(f"[{status:>7}] {name} ({dt:.0f}s)")
        for r in rows:
            print(f"          {r}")
    if stopped:
        raise stopped
    return 0 if all(s == "ok" for _, s, _, _ in summary) else 1


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _run_stage(script: Path, out: Path, log, timeout: float, rows: list[str]) -> str:
    """Runs one stage; its "@@ " rows go to `rows` as they come. Returns its status."""
    try:
        proc = subprocess.Popen(["bash", "-c", WRAPPER, str(script)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OUT": str(out), GPU_CHECK_ENV: "1"},
                                start_new_session=True, preexec_fn=_die_with_parent)
    except OSError as e:
        return f"FAIL {e}"
    _running.append(proc.pid)                  # a new session: its group id is the wrapper's pid
    fired = threading.Event()

    def time_out():                            # a silent hang is killed too
        fired.set()
        _kill_group(proc.pid)

    timer = threading.Timer(timeout, time_out)
    timer.start()
    try:
        with proc:
            for line in proc.stdout:
                log.write(line)
                if line.startswith("@@ "):
                    rows.append(line[3:].rstrip())
            rc = proc.wait()
    finally:
        timer.cancel()
        _kill_group(proc.pid)                  # what the stage left running in the background goes too
        _running.remove(proc.pid)
    return "ok" if rc == 0 else "TIMEOUT" if fired.is_set() else f"FAIL rc={rc}"


if __name__ == "__main__":
    sys.exit(main())
