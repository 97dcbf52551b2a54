#!/usr/bin/env bash
# Triton kernels (issue 3) on this GPU: every kernel vs its PyTorch reference in fp32/fp16/bf16, the scan backward
# vs autograd, the whole model kernels="triton" vs "torch" over 2k tokens, and TritonBackend (CUDA graph) over 1k
# greedy decode steps (tests/gpu/test_kernels_gpu.py). 3-7 minutes on an H100 (7 on 2026-11-26, 71 tests), most of it
# Triton compiling.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export MEMMAMBA_RESULTS=/tmp/memmamba-kernel-tests.jsonl
rm -f "$MEMMAMBA_RESULTS"
t0=$(date +%s)
python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_kernels_gpu.py 2>&1 | tail -40
rc=${PIPESTATUS[0]}
python3 - "$rc" "$(( $(date +%s) - t0 ))" <<'PY'
import json, os, sys
path = os.environ["MEMMAMBA_RESULTS"]
rows = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
with open(os.path.join(os.environ.get("OUT", "runs/gpu"), "results.jsonl"), "a") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
worst = {}
for r in rows:
    key = (r.get("kernel") or r.get("test"), r.get("dtype", "fp32"))
    errs = [v for k, v in r.items() if k.startswith("err") and isinstance(v, float)]
    worst[key] = max(worst.get(key, 0.0), max(errs, default=0.0))
    for k in ("decision_flips", "index_mismatches", "greedy_disagreements", "share_off"):
        if r.get(k):
            print(f"@@ kernel-tests: {key[0]} {key[1]} {r.get('variant', '')} {k}={r[k]}")
for (what, dtype), err in sorted(worst.items()):
    print(f"@@ kernel-tests: {what:<28} {dtype:<5} worst rel. error {err:.2e}")
rc, secs = map(int, sys.argv[1:])
print(f"@@ kernel-tests: pytest {'ok' if rc == 0 else f'FAILED (rc={rc})'} in {secs}s")
sys.exit(rc)
PY
