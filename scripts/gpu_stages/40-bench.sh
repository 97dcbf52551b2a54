#!/usr/bin/env bash
# Issue 6: Session on the GPU matches the reference (gpu-marked tests), then `memdeploy bench` from 1k to 64k context:
#   130m preset (random weights, fp16): triton (decode step in a CUDA graph) and torch (eager decode; bench prefills it
#   with the Triton kernels, since the reference scan is a Python loop); the demo checkpoint (fp32): triton and torch.
# Each bench also times the KV-cache transformer of the same width and depth. Prints @@ lines (ms/token per context,
# flatness, KV baseline ratios), appends one JSON line per bench to $OUT/results.jsonl, returns one PNG (130m, triton).
set -uo pipefail
OUT=${OUT:-runs/gpu}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
status=0
# the CLI through its module (the console script may not be on PATH); `python -m memmamba_deploy.cli` would import
# cli.py twice and lose the verbs that other modules register
memdeploy() { python3 -c 'import sys; from memmamba_deploy.cli import app; sys.argv[0] = "memdeploy"; app()' "$@"; }

python3 -m pytest -q -m gpu tests/test_session.py tests/test_bench.py -p no:cacheprovider 2>&1 | tail -n 15
rc=${PIPESTATUS[0]}
[ "$rc" -eq 0 ] && echo "@@ session on GPU (triton CUDA graph, torch) == CPU reference: ok" \
                 || { echo "@@ session on GPU == CPU reference: FAIL (pytest rc=$rc)"; status=1; }

memdeploy init "$WORK/ckpt-130m" --preset 130m --seed 0 || exit 1
DEMO=memmamba_deploy/assets/demo-memmamba
if [ ! -f "$DEMO/config.json" ]; then
  echo "@@ no bundled demo checkpoint yet: benching a seeded tiny init in its place"
  memdeploy init "$WORK/demo" --preset tiny --seed 0 || exit 1
  DEMO=$WORK/demo
fi
# `bench` prefills the torch backend with the Triton kernels when they load (the 64k reference prefill takes minutes).
if python3 -c "from memmamba_deploy.models.ops import load_ops; load_ops('triton')" 2>/dev/null; then
  TORCH_ARGS=(--contexts 1k,4k,16k,64k)
else
  echo "@@ Triton kernels unavailable: torch bench limited to 1k,4k (reference prefill)"
  TORCH_ARGS=(--contexts 1k,4k)
fi

run() {   # run NAME ARGS...: one bench, its @@ lines and JSON line
  local name=$1; shift
  echo "=== bench $name: memdeploy bench $*"
  if memdeploy bench "$@" --out "$WORK/$name"; then
    python3 - "$WORK/$name/bench.json" "$name" "$OUT/results.jsonl" <<'PY'
import json, sys
from memmamba_deploy.bench import summary_lines
path, name, jsonl = sys.argv[1:]
r = json.load(open(path))
for line in summary_lines(r):
    print(f"@@ {name}: {line}")
with open(jsonl, "a") as f:
    f.write(json.dumps({"stage": "bench", "name": name, **r}) + "\n")
PY
  else
    echo "@@ $name: FAIL"; status=1
  fi
}

run 130m-triton "$WORK/ckpt-130m" --backend triton --dtype fp16 --contexts 1k,4k,16k,64k --tokens 512
cp "$WORK/130m-triton/bench.png" "$OUT/bench-130m-triton.png" 2>/dev/null
run 130m-torch "$WORK/ckpt-130m" --backend torch --device cuda --dtype fp16 "${TORCH_ARGS[@]}" --tokens 512 --rounds 8
run demo-triton "$DEMO" --backend triton --contexts 1k,4k,16k,64k --tokens 512
run demo-torch "$DEMO" --backend torch --device cuda "${TORCH_ARGS[@]}" --tokens 512 --rounds 8
exit $status
