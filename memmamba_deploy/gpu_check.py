"""Driver of scripts/gpu_check.sh: runs each stage script with a time limit and prints the summary last.

A stage is an executable file scripts/gpu_stages/NN-name.sh. It runs from the repo root with $OUT set, appends
JSON lines to $OUT/results.jsonl if it has figures, and prints summary lines that start with "@@ " (one row of the
final table each). Its exit status marks the stage ok/FAIL. The device returns at most 8 files from $OUT: stages
write into gpu_check.log (via this driver) and results.jsonl, plus at most one PNG each.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STAGES = Path(__file__).resolve().parent.parent / "scripts" / "gpu_stages"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:                 # it ended as the timer fired
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="", help="comma-separated stage names (without NN- and .sh)")
    ap.add_argument("--skip", default="")
    ap.add_argument("--timeout", type=float, default=540, help="seconds per stage")
    args = ap.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    out = Path(os.environ.get("OUT", "runs/gpu"))
    out.mkdir(parents=True, exist_ok=True)
    summary: list[tuple[str, str, float, list[str]]] = []
    # SIGTERM (a device call running out of time) unwinds like Ctrl-C, so the running stage's group is killed
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with open(out / "gpu_check.log", "a") as log:
            for script in sorted(STAGES.glob("*.sh")):
                name = script.stem.split("-", 1)[-1]
                if (only and name not in only) or name in skip:
                    continue
                print(f"=== {name}", flush=True)
                log.write(f"\n=== {name} ({script})\n")
                log.flush()
                t0 = time.time()
                status, rows = _run_stage(script, out, log, args.timeout)
                log.flush()
                dt = time.time() - t0
                print(f"    {status} in {dt:.0f}s", flush=True)
                summary.append((name, status, dt, rows))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print("\n================ summary ================")
    for name, status, dt, rows in summary:
        print(f"[{status:>7}] {name} ({dt:.0f}s)")
        for r in rows:
            print(f"          {r}")
    return 0 if all(s == "ok" for _, s, _, _ in summary) else 1


def _run_stage(script: Path, out: Path, log, timeout: float) -> tuple[str, list[str]]:
    """(status, its "@@ " rows). The stage runs in its own process group, so that a time-out, or the driver
    stopping, kills what it started too (pytest, a harness): killing bash alone would leave them holding the
    pipe and the GPU."""
    rows: list[str] = []
    try:
        proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OUT": str(out)}, start_new_session=True)
    except OSError as e:
        return f"FAIL {e}", rows
    fired = threading.Event()

    def time_out():                            # a silent hang is killed too
        fired.set()
        _kill_group(proc.pid)

    timer = threading.Timer(timeout, time_out)
    timer.start()
    try:
        for line in proc.stdout:
            log.write(line)
            if line.startswith("@@ "):
                rows.append(line[3:].rstrip())
        rc = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _kill_group(proc.pid)
    return ("ok" if rc == 0 else "TIMEOUT" if fired.is_set() else f"FAIL rc={rc}"), rows


if __name__ == "__main__":
    sys.exit(main())
