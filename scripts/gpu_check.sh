#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for the device machine:
#   bash scripts/gpu_check.sh [--only NAME[,NAME]] [--skip NAME[,NAME]]
# Installs the repo, runs the stages in scripts/gpu_stages/ in order (gpu-marked tests, kernel benchmarks, plugin
# harness, C++ runtime, ...), writes the full log to $OUT/gpu_check.log and JSON lines to $OUT/results.jsonl, and
# prints a short summary table last.
# All stages take about 25 minutes on an H100 (stage times in BENCHMARKS.md). Where one call may run 10 minutes,
# split it: --only env,baselines,kernel-tests,kernel-bench (~6-9 min) | --only plugins,export-parity (~4 min, needs
# third_party/ TensorRT headers) | --only native (~5 min, the same) | --only bench (~6 min) | --only train-demo
# --timeout 590 (~6 min). A stage past --timeout (540 s) is killed with everything it started.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/gpu_check.log" 2>&1 \
  || { cat "$OUT/gpu_check.log"; exit 1; }
exec python3 -m memmamba_deploy.gpu_check "$@"
