#!/usr/bin/env bash
# Triton path benchmarks (issue 3): copy bandwidth, 130m decode ms/token (reference / Triton eager / Triton CUDA
# graph, fp16 + fp32, vs parameter bytes / copy bandwidth), prefill tokens/s at 2k/16k/64k, every kernel vs its
# bytes floor (memmamba_deploy/bench_kernels.py). A few minutes on an H100; skip parts with BENCH_SKIP=prefill,...
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
python3 -m memmamba_deploy.bench_kernels --out "$OUT" --skip "${BENCH_SKIP:-}"
