// See opLaunch.h. Sizes, strides, grids and variant choices mirror the Python launchers of models/ops/triton
// (scan.py: scan_forward, _chunk_states, scan_chunk_plan, selective_state_step; pool.py: pool_sweep,
// _attention_forward) with the block sizes the AOT variants were compiled with (models/ops/triton/aot.py).
#include "opLaunch.h"

#include "memmamba_kernels.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <initializer_list>
#include <string>

namespace memmamba::plugin
{
namespace kernels = memmamba::kernels;

namespace
{
// Block sizes of the compiled variants (models/ops/triton/aot.py SCAN_BLOCKS and the step entry).
constexpr int32_t kScanBlockT = 16, kScanBlockD = 16, kScanBlockN = 16, kStepBlockD = 64;
// scan.py TARGET_PROGRAMS / MIN_CHUNK: split T into chunks only when batch x channel blocks give too few programs.
constexpr int64_t kTargetPrograms = 1024, kMinChunk = 256;
constexpr int32_t kAttentionBlockDh = 16;

int64_t cdiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

unsigned u(int64_t v)
{
    return static_cast<unsigned>(v);
}

//! The kernels compute offsets in int32: every tensor they index must stay below 2^31 elements.
std::string fitsInt32(char const* what, int64_t elements)
{
    if (elements > INT32_MAX)
    {
        return std::string(what) + " has " + std::to_string(elements)
            + " elements; the kernels index with 32-bit offsets (at most 2^31-1): use a smaller batch or prefill chunk";
    }
    return "";
}

struct ChunkPlan
{
    int32_t chunkLen, nChunks;
};

//! chunkPlan's chunk count before the chunk length is rounded to whole tiles (grows with t).
int64_t chunksWanted(int64_t b, int64_t t, int64_t di)
{
    return std::min(cdiv(kTargetPrograms, std::max<int64_t>(b * cdiv(di, kScanBlockD), 1)), cdiv(t, kMinChunk));
}

//! scan.py scan_chunk_plan with BLOCK_D = kScanBlockD.
ChunkPlan chunkPlan(int64_t b, int64_t t, int64_t di)
{
    int64_t const n = std::max<int64_t>(1, chunksWanted(b, t, di));
    if (n == 1)
    {
        return {static_cast<int32_t>(std::max<int64_t>(t, 1)), 1};
    }
    int64_t const len = cdiv(cdiv(t, n), kScanBlockT) * kScanBlockT;
    return {static_cast<int32_t>(len), static_cast<int32_t>(cdiv(t, len))};
}

bool preloadAll(std::initializer_list<aot::KernelImage const*> images)
{
    for (aot::KernelImage const* k : images)
    {
        if (aot::preload(*k) != CUDA_SUCCESS)
        {
            return false;
        }
    }
    return true;
}
} // namespace

// ---- limits -----------------------------------------------------------------------------------------------------------
std::string scanLimits(ScanSizes s)
{
    if (s.dState > kScanBlockN)
    {
        return "d_state N=" + std::to_string(s.dState) + " exceeds " + std::to_string(kScanBlockN)
            + ", the largest the compiled scan kernels take (models/ops/triton/aot.py SCAN_BLOCKS)";
    }
    int64_t const b = s.batch, t = s.tokens, di = s.dInner, n = s.dState;
    for (std::string const& e : {fitsInt32("x", b * t * di), fitsInt32("B", b * t * n), fitsInt32("h", b * di * n),
             fitsInt32("the chunk states", b * chunkPlan(b, t, di).nChunks * di * n)})
    {
        if (!e.empty())
        {
            return e;
        }
    }
    return "";
}

std::string poolSweepLimits(int32_t batch, int32_t tokens, int32_t slots)
{
    if (slots > 256)
    {
        return "pool_size K=" + std::to_string(slots) + " exceeds 256, the largest the compiled sweep kernels take";
    }
    return fitsInt32("index", static_cast<int64_t>(batch) * (tokens + 1) * slots);
}

std::string poolAttentionLimits(AttentionSizes s)
{
    int32_t const dh = s.heads > 0 ? s.dSummary / s.heads : 0;
    if (s.slots > 256)
    {
        return "an index row of " + std::to_string(s.slots) + " entries exceeds 256, the most the compiled attention "
            "kernels read per query";
    }
    if (dh > kAttentionBlockDh)
    {
        return "the head width ds/H=" + std::to_string(dh) + " exceeds " + std::to_string(kAttentionBlockDh)
            + ", the largest the compiled attention kernels take";
    }
    int64_t const b = s.batch, t = s.tokens;
    for (std::string const& e : {fitsInt32("q", b * t * s.dSummary), fitsInt32("values", b * s.entries * s.dModel),
             fitsInt32("keys", b * s.entries * s.dSummary), fitsInt32("index", b * t * s.slots),
             fitsInt32("o", b * t * s.dModel)})
    {
        if (!e.empty())
        {
            return e;
        }
    }
    return "";
}

// ---- SelectiveScanChunk ---------------------------------------------------------------------------------------------
size_t scanChunkWorkspace(ScanSizes s)
{
    // Bound the chunk count by chunkPlan's count before rounding the chunk length up to whole tiles: that one grows
    // with T, the rounded one does not (a shorter T can need more chunks than the profile's longest), and
    // cdiv(t, roundup(cdiv(t, n))) <= n. Fewer rows can mean more chunks too: take the worst batch up to the maximum.
    size_t bytes = 0;
    for (int64_t b = 1; b <= std::max(s.batch, 1); ++b)
    {
        int64_t const n = chunksWanted(b, std::max<int64_t>(s.tokens, 1), s.dInner);
        if (n > 1)
        {
            bytes = std::max(bytes, sizeof(float) * static_cast<size_t>(b * n * s.dInner * (s.dState + 1)));
        }
    }
    return bytes;
}

bool scanChunkPreload()
{
    return preloadAll({&kernels::selective_scan_fwd_fp32, &kernels::selective_scan_fwd_fp16,
        &kernels::selective_scan_chunk_states_fp32, &kernels::selective_scan_chunk_states_fp16,
        &kernels::selective_scan_chunk_out_fp32, &kernels::selective_scan_chunk_out_fp16,
        &kernels::scan_chunk_combine_fp32});
}

CUresult scanChunkLaunch(ScanTensors const& t, ScanSizes s, bool half, bool dtSoftplus, CUstream stream)
{
    if (std::string const e = scanLimits(s); !e.empty())
    {
        return aot::setError(CUDA_ERROR_INVALID_VALUE, "SelectiveScanChunk: " + e);
    }
    int32_t const B = s.batch, T = s.tokens, Di = s.dInner, N = s.dState, sp = dtSoftplus ? 1 : 0;
    int32_t const DiN = Di * N;
    if (T == 0) // no token: h = h0 (the chain kernel over zero chunks copies h0 through)
    {
        return kernels::launch_scan_chunk_combine_fp32(stream, {u(B), u(cdiv(Di, kScanBlockD)), 1}, t.A, t.A, t.h0,
            t.A, t.h, Di, N, 0, DiN, DiN);
    }
    auto const fwd = half ? kernels::launch_selective_scan_fwd_fp16 : kernels::launch_selective_scan_fwd_fp32;
    auto const states = half ? kernels::launch_selective_scan_chunk_states_fp16
                             : kernels::launch_selective_scan_chunk_states_fp32;
    auto const out = half ? kernels::launch_selective_scan_chunk_out_fp16 : kernels::launch_selective_scan_chunk_out_fp32;
    int32_t const sxb = T * Di, sbb = T * N; // contiguous [B,T,Di] and [B,T,N]
    ChunkPlan const p = chunkPlan(B, T, Di);
    unsigned const gd = u(cdiv(Di, kScanBlockD));
    if (p.nChunks == 1)
    {
        return fwd(stream, {u(B), gd, 1}, t.x, t.dt, t.A, t.B, t.C, t.D, t.z, t.dtBias, t.h0, t.y, t.h, t.A, T, Di, N,
            T, sp, sxb, Di, sxb, Di, sbb, N, sbb, N, sxb, Di, sxb, Di, DiN, 0, DiN, 0);
    }
    // Three passes through the workspace: chunk states [B, nc, Di, N], then Σδ per chunk [B, nc, Di] (fp32).
    if (!t.workspace)
    {
        return aot::setError(CUDA_ERROR_INVALID_VALUE, "SelectiveScanChunk: the chunked scan needs a workspace");
    }
    auto* statesBuf = static_cast<float*>(t.workspace);
    float* dtSum = statesBuf + static_cast<size_t>(B) * p.nChunks * DiN;
    int32_t const sStatesB = p.nChunks * DiN;
    unsigned const nc = u(p.nChunks);
    if (CUresult r = states(stream, {u(B), gd, nc}, t.x, t.dt, t.A, t.B, t.C, t.D, t.z, t.dtBias, t.A, t.A, statesBuf,
            dtSum, T, Di, N, p.chunkLen, sp, sxb, Di, sxb, Di, sbb, N, sbb, N, sxb, Di, 0, 0, 0, 0, sStatesB, DiN);
        r != CUDA_SUCCESS)
    {
        return r;
    }
    if (CUresult r = kernels::launch_scan_chunk_combine_fp32(
            stream, {u(B), gd, 1}, t.A, dtSum, t.h0, statesBuf, t.h, Di, N, p.nChunks, DiN, DiN);
        r != CUDA_SUCCESS)
    {
        return r;
    }
    return out(stream, {u(B), gd, nc}, t.x, t.dt, t.A, t.B, t.C, t.D, t.z, t.dtBias, statesBuf, t.y, t.A, t.A, T, Di,
        N, p.chunkLen, sp, sxb, Di, sxb, Di, sbb, N, sbb, N, sxb, Di, sxb, Di, sStatesB, DiN, 0, 0);
}

// ---- SelectiveScanStep ----------------------------------------------------------------------------------------------
bool scanStepPreload()
{
    return preloadAll({&kernels::selective_state_step_fp32, &kernels::selective_state_step_fp16});
}

CUresult scanStepLaunch(ScanTensors const& t, ScanSizes s, bool half, bool dtSoftplus, CUstream stream)
{
    if (std::string const e = scanLimits(s); !e.empty())
    {
        return aot::setError(CUDA_ERROR_INVALID_VALUE, "SelectiveScanStep: " + e);
    }
    int32_t const B = s.batch, Di = s.dInner, N = s.dState;
    auto const step = half ? kernels::launch_selective_state_step_fp16 : kernels::launch_selective_state_step_fp32;
    return step(stream, {u(B), u(cdiv(Di, kStepBlockD)), 1}, t.x, t.dt, t.A, t.B, t.C, t.D, t.z, t.dtBias, t.h0, t.y,
        t.h, Di, N, dtSoftplus ? 1 : 0, Di, Di, N, N, Di, Di, Di * N);
}

// ---- NotePoolSweep ----------------------------------------------------------------------------------------------------
bool poolSweepPreload()
{
    return preloadAll({&kernels::pool_sweep_k64_fp32, &kernels::pool_sweep_k256_fp32});
}

CUresult poolSweepLaunch(void const* scores, void const* prio0, void* index, void* prio, int32_t batch, int32_t tokens,
    int32_t slots, float insertThreshold, CUstream stream)
{
    if (std::string const e = poolSweepLimits(batch, tokens, slots); !e.empty())
    {
        return aot::setError(CUDA_ERROR_INVALID_VALUE, "NotePoolSweep: " + e);
    }
    auto const sweep = slots <= 64 ? kernels::launch_pool_sweep_k64_fp32 : kernels::launch_pool_sweep_k256_fp32;
    return sweep(stream, {u(batch), 1, 1}, scores, prio0, index, prio, tokens, slots, insertThreshold, tokens);
}

// ---- SparsePoolAttention -------------------------------------------------------------------------------------------
bool poolAttentionPreload()
{
    return preloadAll({&kernels::pool_attention_s64_fp32, &kernels::pool_attention_s64_fp16,
        &kernels::pool_attention_s256_fp32, &kernels::pool_attention_s256_fp16});
}

CUresult poolAttentionLaunch(void const* q, void const* keys, void const* values, void const* index, void* o,
    AttentionSizes s, bool half, CUstream stream)
{
    if (std::string const e = poolAttentionLimits(s); !e.empty())
    {
        return aot::setError(CUDA_ERROR_INVALID_VALUE, "SparsePoolAttention: " + e);
    }
    if (s.tokens == 0 || s.batch == 0)
    {
        return CUDA_SUCCESS;
    }
    // aot.py compiles pool.attention_blocks(S, 16, 64): (BLOCK_Q, BLOCK_V) = (32, 32) for S <= 64, (16, 16) for S <= 256
    bool const wide = s.slots > 64;
    int32_t const blockQ = wide ? 16 : 32;
    int32_t const blockV = wide ? 16 : 32;
    auto const attend = wide ? (half ? kernels::launch_pool_attention_s256_fp16 : kernels::launch_pool_attention_s256_fp32)
                             : (half ? kernels::launch_pool_attention_s64_fp16 : kernels::launch_pool_attention_s64_fp32);
    int32_t const T = s.tokens, S = s.slots, M = s.entries, ds = s.dSummary, d = s.dModel;
    int32_t const dh = ds / s.heads, dv = d / s.heads;
    int32_t const nv = static_cast<int32_t>(cdiv(dv, blockV));
    float const scale = static_cast<float>(std::pow(static_cast<double>(dh), -0.5)); // Python: dh ** -0.5
    int32_t const qt = s.qStrideT ? s.qStrideT : ds, qb = s.qStrideB ? s.qStrideB : T * qt;
    int32_t const ib = s.indexStrideB ? s.indexStrideB : T * S;
    return attend(stream, {u(s.batch), u(cdiv(T, blockQ)), u(s.heads)}, q, keys, values, index, o, T, S, dh, dv, nv,
        scale, qb, qt, M * ds, ds, M * d, d, ib, S, T * d, d);
}

} // namespace memmamba::plugin
