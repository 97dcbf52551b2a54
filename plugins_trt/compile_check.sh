#!/usr/bin/env bash
# Compile check of the plugin library and the harness against one set of TensorRT headers, with nvcc as the
# compiler driver (no CMake, no GPU, no libnvinfer):
#   bash plugins_trt/compile_check.sh TRT_INCLUDE AOT_DIR OUT_DIR
# TRT_INCLUDE  e.g. third_party/TensorRT/include (the 11.1 OSS headers, see README.md)
# AOT_DIR      a kernel library from `memdeploy aot --out AOT_DIR`
# OUT_DIR      where libmemmamba_plugins.so, libmemmamba_plugin_harness.so and plugin_harness go
# Prints the TensorRT version the headers declare. Fails if a symbol stays unresolved (-Wl,--no-undefined).
set -euo pipefail
TRT_INCLUDE=$1 AOT_DIR=$2 OUT_DIR=$3
HERE=$(cd "$(dirname "$0")" && pwd)
NVCC=${NVCC:-nvcc}
CUDA_INCLUDE=$(dirname "$(command -v "$NVCC")")/../include
mkdir -p "$OUT_DIR"
version=$(grep -hE "define (TRT|NV_TENSORRT)_(MAJOR|MINOR|PATCH)(_ENTERPRISE)? [0-9]" "$TRT_INCLUDE/NvInferVersion.h" \
  | awk '{print $3}' | head -3 | paste -sd.)
echo "TensorRT headers: $TRT_INCLUDE (version $version)"
# MEMMAMBA_AOT_TEST_HOOKS: this build is the tests', so the AOT runtime honours MEMMAMBA_AOT_DRYRUN
FLAGS=(-std=c++17 -O2 -shared -DMEMMAMBA_AOT_TEST_HOOKS -Xcompiler -fPIC,-fvisibility=hidden,-Wall -Xlinker --no-undefined
       -isystem "$TRT_INCLUDE" -I "$CUDA_INCLUDE" -I "$HERE/aot_runtime/include" -I "$HERE/common" -I "$AOT_DIR")
"$NVCC" "${FLAGS[@]}" -o "$OUT_DIR/libmemmamba_plugins.so" \
  "$HERE/pluginLibrary.cpp" "$HERE/common/memmambaPlugin.cpp" "$HERE/common/opLaunch.cpp" \
  "$HERE/selectiveScanChunkPlugin/selectiveScanChunkPlugin.cpp" "$HERE/selectiveScanStepPlugin/selectiveScanStepPlugin.cpp" \
  "$HERE/notePoolSweepPlugin/notePoolSweepPlugin.cpp" "$HERE/sparsePoolAttentionPlugin/sparsePoolAttentionPlugin.cpp" \
  "$HERE/aot_runtime/src/aot_runtime.cpp" "$AOT_DIR/memmamba_kernels.cpp" -ldl
"$NVCC" -std=c++17 -O2 -shared -Xcompiler -fPIC,-Wall -Xlinker --no-undefined -isystem "$TRT_INCLUDE" \
  -I "$CUDA_INCLUDE" -o "$OUT_DIR/libmemmamba_plugin_harness.so" "$HERE/harness/harness.cpp" -ldl
"$NVCC" -std=c++17 -O2 -Xcompiler -Wall -isystem "$TRT_INCLUDE" -I "$CUDA_INCLUDE" -o "$OUT_DIR/plugin_harness" \
  "$HERE/harness/main.cpp" "$HERE/harness/harness.cpp" -ldl
echo "compiled libmemmamba_plugins.so, libmemmamba_plugin_harness.so and plugin_harness in $OUT_DIR against TensorRT $version headers"
