#!/usr/bin/env bash
# TensorRT plugins (issue 5): build the AOT kernel library, the plugin library and the harness with CMake against
# the TensorRT headers carried in third_party/ (git-ignored: the lead passes carry=["third_party"]), then run the
# harness tests on this GPU: every plugin vs the PyTorch reference (fp32/fp16, several shapes), the PTX (JIT) path,
# and a plugins-flavour tiny model (prefill + decode). A few minutes on an H100.
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
BUILD=/tmp/memmamba-plugins-build
HEADERS=third_party/TensorRT/include
if [ ! -f "$HEADERS/NvInferRuntime.h" ]; then
  echo "@@ plugins: FAIL no TensorRT headers in $HEADERS (fetch NVIDIA/TensorRT v11.1 include/ there and carry third_party)"
  exit 1
fi
trt_version=$(grep -hE "define TRT_(MAJOR|MINOR|PATCH)_ENTERPRISE [0-9]" "$HEADERS/NvInferVersion.h" | awk '{print $3}' | paste -sd.)

t0=$(date +%s)
mkdir -p "$BUILD"
if ! { cmake -S plugins_trt -B "$BUILD" -DPython3_EXECUTABLE="$(command -v python3)" \
       && cmake --build "$BUILD" -j "$(nproc)"; } > "$BUILD.log" 2>&1; then
  tail -40 "$BUILD.log"
  echo "@@ plugins: FAIL cmake build (see the log above)"
  exit 1
fi
size_kb=$(( $(stat -c %s "$BUILD/libmemmamba_plugins.so") / 1024 ))
echo "@@ plugins: built in $(( $(date +%s) - t0 ))s against TensorRT $trt_version headers: libmemmamba_plugins.so ${size_kb} KiB, exports $(nm -D --defined-only "$BUILD/libmemmamba_plugins.so" | awk '$3 !~ /^_/ {print $3}' | paste -sd,)"
"$BUILD/plugin_harness" "$BUILD/libmemmamba_plugins.so" | sed 's/^/    /'

if [ -f third_party/TensorRT-10.3/include/NvInferRuntime.h ]; then
  if bash plugins_trt/compile_check.sh third_party/TensorRT-10.3/include "$BUILD/aot" /tmp/memmamba-cc-10.3 > /tmp/cc.log 2>&1; then
    echo "@@ plugins: compile check against the TensorRT 10.3 headers (JetPack 6) ok"
  else
    tail -20 /tmp/cc.log; echo "@@ plugins: compile check against the TensorRT 10.3 headers FAILED"
  fi
fi

export MEMMAMBA_PLUGIN_BUILD=$BUILD MEMMAMBA_RESULTS=/tmp/memmamba-plugins.jsonl
rm -f "$MEMMAMBA_RESULTS"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_plugins_gpu.py 2>&1 | tail -25
rc=${PIPESTATUS[0]}
# The forward-compatible path: every kernel JIT-compiled from the embedded PTX instead of the device's cubin.
MEMMAMBA_AOT_FORCE_PTX=1 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu/test_plugins_gpu.py \
  -k "scan_step or pool_sweep or (pool_attention and fp32)" 2>&1 | tail -3 | sed 's/^/    [PTX JIT] /'
rc_ptx=${PIPESTATUS[0]}

python3 - "$rc" "$rc_ptx" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(os.environ["MEMMAMBA_RESULTS"])] if os.path.exists(os.environ["MEMMAMBA_RESULTS"]) else []
with open(os.path.join(os.environ.get("OUT", "runs/gpu"), "results.jsonl"), "a") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
by = {}
for r in rows:
    errs = [v for k, v in r.items() if k.startswith("err")] or [r.get("index_mismatches", 0)]
    key = (r["op"], r.get("dtype", "").replace("torch.", ""))
    by[key] = max(by.get(key, 0.0), max(errs))
for (op, dtype), worst in sorted(by.items()):
    what = "index mismatches" if op == "NotePoolSweep" else "max rel. error"
    print(f"@@ plugins: {op:<20} {dtype or '-':<8} worst {what} {worst:.2e}")
rc, rc_ptx = map(int, sys.argv[1:])
print(f"@@ plugins: harness tests {'passed' if rc == 0 else 'FAILED'} (cubins); PTX JIT path {'passed' if rc_ptx == 0 else 'FAILED'}")
PY
exit $(( rc != 0 || rc_ptx != 0 ))
