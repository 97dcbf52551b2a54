// The four custom ops of export/contract.py launched with the AOT-compiled Triton kernels (memmamba_kernels.h,
// from models.ops.triton.AOT_KERNELS). TensorRT-free: the plugins call these from enqueue; the C++ runtime may too.
// Every pointer is a device pointer to a contiguous row-major tensor; "act" tensors are float16 when `half`,
// else float32; the SSM state, A, D, dt_bias, scores and priorities are float32; indices int32.
// A launcher returns CUDA_SUCCESS or an error whose message aot::lastError() gives.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "memmamba/aot_runtime.h"

namespace memmamba::plugin
{

struct ScanTensors
{
    void const* x;      // act [B,T,Di]  ([B,Di] for the step)
    void const* dt;     // act like x
    void const* A;      // f32 [Di,N]
    void const* B;      // act [B,T,N]   ([B,N])
    void const* C;      // act like B
    void const* D;      // f32 [Di]
    void const* z;      // act like x
    void const* dtBias; // f32 [Di]
    void const* h0;     // f32 [B,Di,N]
    void* y;            // act like x
    void* h;            // f32 [B,Di,N]
    void* workspace;    // scanChunkWorkspace() bytes (chunk only)
};

struct ScanSizes
{
    int32_t batch, tokens, dInner, dState; // tokens = 1 for the step
};

struct AttentionSizes
{
    int32_t batch, tokens, entries, slots, dSummary, dModel, heads; // B, T, M, S, ds, d, H
    // optional strides in elements, 0 = contiguous: q's token and batch strides (q a view of a wider GEMM output)
    // and index's batch stride (index a view of the sweep's [B, T+1, S] rows)
    int32_t qStrideT{0}, qStrideB{0}, indexStrideB{0};
};

//! "" when the compiled kernels take these sizes, else what is out of range (checked before any launch).
std::string scanLimits(ScanSizes s);
std::string poolSweepLimits(int32_t batch, int32_t tokens, int32_t slots);
std::string poolAttentionLimits(AttentionSizes s);

//! SelectiveScanChunk: y, h = selective_scan(x, dt, A, B, C, D, z, dt_bias, h0): one pass when the batch x channel
//! programs fill the GPU, else three (chunk states, chain, outputs) through the workspace.
CUresult scanChunkLaunch(ScanTensors const& t, ScanSizes s, bool half, bool dtSoftplus, CUstream stream);
//! Workspace bytes scanChunkLaunch may need for any batch <= s.batch and tokens <= s.tokens (a profile's max).
size_t scanChunkWorkspace(ScanSizes s);
bool scanChunkPreload();

//! SelectiveScanStep: one token.
CUresult scanStepLaunch(ScanTensors const& t, ScanSizes s, bool half, bool dtSoftplus, CUstream stream);
bool scanStepPreload();

//! NotePoolSweep: scores f32 [B,T], prio0 f32 [B,K] -> index i32 [B,T+1,K], prio f32 [B,K].
CUresult poolSweepLaunch(void const* scores, void const* prio0, void* index, void* prio, int32_t batch, int32_t tokens,
    int32_t slots, float insertThreshold, CUstream stream);
bool poolSweepPreload();

//! SparsePoolAttention: q act [B,T,ds], keys act [B,M,ds], values act [B,M,d], index i32 [B,T,S] -> o act [B,T,d].
CUresult poolAttentionLaunch(void const* q, void const* keys, void const* values, void const* index, void* o,
    AttentionSizes s, bool half, CUstream stream);
bool poolAttentionPreload();

} // namespace memmamba::plugin
