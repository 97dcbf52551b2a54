// The native backend: MemMambaLM.step (models/memmamba.py) on the GPU with cuBLASLt for every projection and the
// AOT-compiled Triton kernels of models/ops/triton for everything else, the whole step captured in a CUDA graph.
//
// One layer (spec §2), B rows at once, "act" = the model dtype:
//   norm       h = embedding[token] (layer 0) or h + out_proj(y) of the layer before; u = RMSNorm(h)
//                (decode.decode_norm_proj_kernel without its projection)
//   GEMM       mem = [W_q; W_score_in; W_summary; w_trigger; W_q_cross] u + [0; 0; 0; β; 0]   (memory path)
//   note_pool  §4 token read, §5 cross read (every p layers), ũ = u + r_tok + r_cross, §3 insert into the pool
//                (decode.decode_note_pool_kernel)
//   GEMM       xz = W_in ũ
//   conv_step  window shift + depthwise conv + SiLU (cpp_support.conv_step_kernel)
//   GEMM       (dt_r, B, C) = W_x xc;   GEMM  dt = W_dt dt_r
//   scan_step  δ = softplus(dt + dt_bias), h = exp(δA) h + δ x B, y = (C·h + D x) SiLU(z) (scan.selective_state_step)
//   GEMM       out = W_out y  (fp32: the next norm adds it to h after rounding it to act, as the reference)
// then norm_f, the tied LM head (GEMM), and the sampler (cpp_support.sample_kernel) drawing the next token.
//
// State is double-buffered: the step at parity p reads buffers p and writes buffers 1-p (conv window, SSM state,
// pools, priorities, logits, next token), so (a) every cross read of a §5 group sees the pools from before the
// token, (b) no captured kernel updates a buffer in place (deployment-notes), (c) a step can be undone.
// Prefill runs a prompt in the parallel form (spec §8; export/graphs.py's prefill graph spelled in launches), chunks
// of SessionOptions::prefillRows rows, each chunk from parity p into 1-p: per layer norm.residual_norm_kernel over
// B·T rows (layer 0: the decode norm kernel from the embedding), the memory projections as one batched GEMM,
// memory.note_scores_kernel, the pool sweep (pool.pool_sweep_ends' five kernels), the §4 and §5 reads (fp16:
// pool.pool_mix_kernel between per-head W_k and W_v GEMMs, as memory.fused_memory_read; fp32: the plugins' sparse
// pool attention, plugins_trt/common/opLaunch.cpp, over the group's joined banks with cpp_support.cross_index_kernel,
// gained_add_kernel), pool.pool_after_kernel; then in_proj, scan.causal_conv_kernel, x_proj, dt_proj,
// scan.scan_forward's three passes and out_proj. Two chunks are in flight on two streams, the later a layer behind
// (TritonBackend's prefill_in_halves). The last layer of the last chunk runs its gate, pass 3 and out_proj for the
// last token only (MemMambaLM.prefill's last_only), and the decode step's final norm, LM head and sampler give the
// logits and the next token. Shapes the compiled prefill kernels do not take fall back to feeding every token through
// the decode graph (describe() says which and why).
#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <tuple>

#include "backend.h"
#include "checkpoint.h"
#include "cuda_util.h"
#include "half.h"
#include "kernels.h"
#include "opLaunch.h"
#include "state_file.h"

namespace memmamba::detail
{
namespace
{

constexpr size_t kAlign = 256;
constexpr size_t kLtWorkspace = 8u << 20;
constexpr int64_t kScanProgramsPerSm = 8, kScanMinChunk = 16; // scan.SEQ_PROGRAMS_PER_SM, SEQ_MIN_CHUNK

size_t alignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

//! base + bytes
void* at(void* base, size_t bytes) { return static_cast<unsigned char*>(base) + bytes; }

cudaDataType_t ltType(DType t) { return t == DType::kFloat16 ? CUDA_R_16F : CUDA_R_32F; }

// ---- weights (shared by forks) ----------------------------------------------------------------------------------------------
struct LayerWeights
{
    void *norm, *memW, *memBias, *wk, *wv, *alpha, *xwk, *xwv, *xalpha, *wScore;
    void *inW, *convW, *convB, *xW, *dtW, *dtBias, *A, *D, *outW;
    void *memBias32, *xWT, *outWT; // the fused plan: fp32 bias, x_proj / out_proj transposed ([Di, X], [Di, d])
    void* xalpha32;                // the §5 read's α in fp32 (the parallel prefill's gained_add)
    void* AT;                      // A transposed [N, Di] fp32 (the prefill scan's state tiles)
    void *dtBiasAct, *DAct;        // the fused plan: dt_bias and D in the model dtype (as decode_ssm_out reads them)
    void *kT{nullptr}, *xkT{nullptr}; // fp16 + memory: the reads' W_k per head, transposed ([H, ds, dh]; prefill)
    int64_t memRows{0};
};

struct Weights
{
    Config config;
    DType dtype;
    int device;
    DeviceBuffer storage;
    std::vector<LayerWeights> layers;
    void *emb{nullptr}, *normF{nullptr};
    int64_t parameters{0};
    size_t bytes{0};
    int64_t memRows{0};                             // the widest layer's memory GEMM rows (buffers fit it)
    std::shared_ptr<LazyFingerprint> fingerprint;   // of model.safetensors, for session state files
};

class WeightPacker
{
public:
    WeightPacker(Checkpoint const& ck, DType dtype)
        : ck_(ck)
        , dtype_(dtype)
    {
    }
    //! Reserve space for a tensor (act dtype unless fp32) and remember its values; returns the slot index.
    size_t add(std::vector<float> values, bool fp32 = false)
    {
        size_t elem = fp32 || dtype_ == DType::kFloat32 ? 4 : 2;
        Item it{offset_, std::move(values), elem};
        offset_ = alignUp(offset_ + it.values.size() * elem);
        items_.push_back(std::move(it));
        return items_.size() - 1;
    }
    size_t tensor(std::string const& name, bool fp32 = false) { return add(ck_.values(name, dtype_), fp32); }
    std::vector<float> values(std::string const& name) const { return ck_.values(name, dtype_); }
    void upload(DeviceBuffer& storage)
    {
        storage = DeviceBuffer(std::max<size_t>(offset_, kAlign));
        std::vector<unsigned char> host(offset_);
        for (auto const& it : items_)
        {
            unsigned char* dst = host.data() + it.offset;
            for (size_t i = 0; i < it.values.size(); ++i)
            {
                if (it.elem == 4)
                {
                    std::memcpy(dst + 4 * i, &it.values[i], 4);
                }
                else
                {
                    uint16_t h = floatToHalf(it.values[i]);
                    std::memcpy(dst + 2 * i, &h, 2);
                }
            }
        }
        MM_CUDA(cudaMemcpy(storage.get(), host.data(), offset_, cudaMemcpyHostToDevice));
        MM_CUDA(cudaDeviceSynchronize()); // a pageable copy may still be in flight; sessions use their own streams
        base_ = static_cast<unsigned char*>(storage.get());
    }
    void* at(size_t slot) const { return base_ + items_[slot].offset; }
    size_t bytes() const { return offset_; }

private:
    struct Item
    {
        size_t offset;
        std::vector<float> values;
        size_t elem;
    };
    Checkpoint const& ck_;
    DType dtype_;
    std::vector<Item> items_;
    size_t offset_{0};
    unsigned char* base_{nullptr};
};

//! Row width of x_proj's output (dt_r, B, C): R + 2N padded to a multiple of 8 for 16-byte aligned rows.
int64_t xWidth(Config const& c) { return (c.dt_rank + 2 * c.d_state + 7) / 8 * 8; }

//! [rows, cols] row-major -> [cols, rows]
std::vector<float> transpose(std::vector<float> const& v, int64_t rows, int64_t cols)
{
    std::vector<float> t(v.size());
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
            t[c * rows + r] = v[r * cols + c];
    return t;
}

//! A read's W_k [ds, ds] (rows: head h's dh key channels) as [H, ds, dh]: head h's W_k,hᵀ, nn.Linear's layout of
//! the map q_h -> q'_h = W_k,hᵀ q_h (so that q'_h · s = q_h · k_h(s))
std::vector<float> headsTransposed(std::vector<float> const& wk, Config const& c)
{
    int64_t const ds = c.summary_dim, H = c.memory_heads, dh = ds / H;
    std::vector<float> out(wk.size());
    for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < ds; ++s)
            for (int64_t ch = 0; ch < dh; ++ch)
                out[(h * ds + s) * dh + ch] = wk[(h * dh + ch) * ds + s];
    return out;
}

std::shared_ptr<Weights> loadWeights(Checkpoint const& ck, DType dtype, int device, bool fused)
{
    Config const& c = ck.config();
    auto w = std::make_shared<Weights>();
    w->config = c;
    w->dtype = dtype;
    w->device = device;
    w->parameters = ck.parameterCount();
    w->fingerprint = std::make_shared<LazyFingerprint>(ck.directory() + "/model.safetensors");
    WeightPacker pk(ck, dtype);
    struct Slots
    {
        size_t norm, memW, memBias, wk, wv, alpha, xwk, xwv, xalpha, wScore, inW, convW, convB, xW, dtW, dtBias, A, D,
            outW, memBias32, xWT, outWT, dtBiasAct, DAct, xalpha32, AT, kT, xkT;
        int64_t memRows;
    };
    std::vector<Slots> slots;
    size_t emb = pk.tensor("embeddings.weight");
    for (int64_t l = 0; l < c.n_layers; ++l)
    {
        std::string p = "layers." + std::to_string(l) + ".";
        Slots s{};
        s.norm = pk.tensor(p + "norm.weight");
        if (c.memory)
        {
            // the GEMVs that share u, one matrix: q_tok, score hidden, summary, trigger logit (+ q_cross)
            std::vector<float> mem, bias;
            auto append = [&](std::string const& name) {
                auto v = pk.values(name);
                mem.insert(mem.end(), v.begin(), v.end());
            };
            append(p + "token_attn.q_proj.weight");
            append(p + "note.score_in.weight");
            append(p + "note.summary.weight");
            append(p + "token_attn.trigger.weight");
            if (c.isCrossLayer(l))
                append(p + "cross_attn.q_proj.weight");
            // rows padded to a multiple of 16 (zeros): 16-byte aligned rows for cuBLASLt, and the stride the
            // prefill's pool_mix is compiled for (cpp/aot_kernels.py); the kernels read mem with row stride R_mem
            s.memRows = (static_cast<int64_t>(mem.size()) / c.d_model + 15) / 16 * 16;
            mem.resize(static_cast<size_t>(s.memRows * c.d_model), 0.f);
            bias.assign(s.memRows, 0.f);
            bias[2 * c.summary_dim + c.d_model / 4] = pk.values(p + "token_attn.trigger.bias")[0];
            s.memW = pk.add(std::move(mem));
            s.memBias32 = pk.add(bias, true);
            s.memBias = pk.add(std::move(bias));
            s.wk = pk.tensor(p + "token_attn.k_proj.weight");
            s.wv = pk.tensor(p + "token_attn.v_proj.weight");
            s.alpha = pk.tensor(p + "token_attn.alpha");
            s.wScore = pk.tensor(p + "note.score_out.weight");
            bool cross = c.isCrossLayer(l);
            s.xwk = cross ? pk.tensor(p + "cross_attn.k_proj.weight") : s.wk;
            s.xwv = cross ? pk.tensor(p + "cross_attn.v_proj.weight") : s.wv;
            s.xalpha = cross ? pk.tensor(p + "cross_attn.alpha") : s.alpha;
            s.xalpha32 = pk.add(pk.values(p + (cross ? "cross_attn.alpha" : "token_attn.alpha")), true);
            if (dtype == DType::kFloat16) // the prefill's pool_mix reads: q'_h = W_k,hᵀ q_h per head
            {
                s.kT = pk.add(headsTransposed(pk.values(p + "token_attn.k_proj.weight"), c));
                if (cross)
                    s.xkT = pk.add(headsTransposed(pk.values(p + "cross_attn.k_proj.weight"), c));
            }
        }
        s.inW = pk.tensor(p + "mixer.in_proj.weight");
        s.convW = pk.tensor(p + "mixer.conv1d.weight");
        s.convB = pk.tensor(p + "mixer.conv1d.bias");
        std::vector<float> xW = pk.values(p + "mixer.x_proj.weight"); // rows padded like mem's (see xWidth)
        if (fused)
            s.xWT = pk.add(transpose(xW, c.dt_rank + 2 * c.d_state, c.dInner()));
        xW.resize(static_cast<size_t>(xWidth(c) * c.dInner()), 0.f);
        s.xW = pk.add(std::move(xW));
        s.dtW = pk.tensor(p + "mixer.dt_proj.weight");
        s.dtBias = pk.tensor(p + "mixer.dt_proj.bias", true);
        std::vector<float> A = pk.values(p + "mixer.A_log");
        for (float& a : A)
            a = -std::exp(a); // A = -exp(A_log.float()) in fp32, as Mixer.step
        s.AT = pk.add(transpose(A, c.dInner(), c.d_state), true);
        s.A = pk.add(std::move(A), true);
        s.D = pk.tensor(p + "mixer.D", true);
        s.outW = pk.tensor(p + "mixer.out_proj.weight");
        if (fused)
        {
            s.outWT = pk.add(transpose(pk.values(p + "mixer.out_proj.weight"), c.d_model, c.dInner()));
            s.dtBiasAct = pk.tensor(p + "mixer.dt_proj.bias");
            s.DAct = pk.tensor(p + "mixer.D");
        }
        slots.push_back(s);
    }
    size_t normF = pk.tensor("norm_f.weight");
    DeviceGuard onDevice(device);
    pk.upload(w->storage);
    w->bytes = pk.bytes();
    w->emb = pk.at(emb);
    w->normF = pk.at(normF);
    for (auto const& s : slots)
    {
        LayerWeights L{};
        L.norm = pk.at(s.norm);
        if (c.memory)
        {
            L.memW = pk.at(s.memW);
            L.memBias = pk.at(s.memBias);
            L.memBias32 = pk.at(s.memBias32);
            L.wk = pk.at(s.wk);
            L.wv = pk.at(s.wv);
            L.alpha = pk.at(s.alpha);
            L.xwk = pk.at(s.xwk);
            L.xwv = pk.at(s.xwv);
            L.xalpha = pk.at(s.xalpha);
            L.xalpha32 = pk.at(s.xalpha32);
            L.wScore = pk.at(s.wScore);
            L.memRows = s.memRows;
            w->memRows = std::max(w->memRows, s.memRows);
            if (dtype == DType::kFloat16)
            {
                L.kT = pk.at(s.kT);
                L.xkT = c.isCrossLayer(&s - slots.data()) ? pk.at(s.xkT) : nullptr;
            }
        }
        L.inW = pk.at(s.inW);
        L.convW = pk.at(s.convW);
        L.convB = pk.at(s.convB);
        L.xW = pk.at(s.xW);
        L.dtW = pk.at(s.dtW);
        L.dtBias = pk.at(s.dtBias);
        L.A = pk.at(s.A);
        L.AT = pk.at(s.AT);
        L.D = pk.at(s.D);
        L.outW = pk.at(s.outW);
        if (fused)
        {
            L.xWT = pk.at(s.xWT);
            L.outWT = pk.at(s.outWT);
            L.dtBiasAct = pk.at(s.dtBiasAct);
            L.DAct = pk.at(s.DAct);
        }
        w->layers.push_back(L);
    }
    return w;
}

// ---- GEMMs ------------------------------------------------------------------------------------------------------------
//! The largest alignment (bytes, <= 256) of a pointer whose rows are rowBytes apart and, batched, whose matrices
//! are batchBytes apart.
uint32_t ltAlignment(void const* p, int64_t rowBytes, int64_t batchBytes)
{
    uint32_t a = 256;
    while (a > 1 && ((reinterpret_cast<uintptr_t>(p) % a) != 0 || (rowBytes % a) != 0 || (batchBytes % a) != 0))
        a /= 2;
    return a;
}

//! A product's shape beyond m, n, k: batch, operand strides (Linear), and a C to add (nullptr: none).
struct GemmBatch
{
    int batch{1};
    int64_t strideX{0}, strideD{0}, strideW{0};
    void const* c{nullptr};
};

//! The alignments (bytes) cuBLASLt may take of W, X and D (and C, which shares D's layout) for a product with
//! these operands, elements of abElem / dElem bytes.
std::array<uint32_t, 3> ltAlignments(void const* w, void const* x, void const* d, int64_t k, int64_t ldx,
    int64_t ldd, size_t abElem, size_t dElem, GemmBatch const& g)
{
    bool const batched = g.batch > 1; // strides count only between a batch's matrices
    int64_t const sW = batched ? g.strideW * abElem : 0, sX = batched ? g.strideX * abElem : 0;
    int64_t const sD = batched ? g.strideD * dElem : 0;
    uint32_t alD = ltAlignment(d, ldd * dElem, sD);
    if (g.c)
        alD = std::min(alD, ltAlignment(g.c, ldd * dElem, sD));
    return {ltAlignment(w, k * abElem, sW), ltAlignment(x, ldx * abElem, sX), alD};
}

//! D[n, m] (row-major, row stride ldd) = X[n, k] (row stride ldx) · W[m, k]ᵀ (+ bias[m]): nn.Linear on n rows,
//! planned once (descriptors + algorithm) and replayed each step. cuBLASLt is column-major: D' = op(W') · X' with
//! W' = W viewed as [k x m], transposed. g.batch > 1: that many products with W, X and D strideW / strideX /
//! strideD elements apart (the prefill's batch rows in buffers laid out per row, or its heads); g.c: D = C + X · Wᵀ
//! for a C of D's layout (planned for g.c's alignment; run's c).
class Linear
{
public:
    Linear() = default;
    Linear(cublasLtHandle_t lt, int64_t m, int64_t n, int64_t k, cudaDataType_t abType, cudaDataType_t dType,
        void const* w, void const* x, int64_t ldx, void* d, int64_t ldd, void const* bias, GemmBatch const& g = {})
        : w_(w)
        , x_(x)
        , d_(d)
        , bias_(bias)
    {
        MM_CUBLAS(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
        MM_CUBLAS(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof(t)));
        MM_CUBLAS(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof(nt)));
        if (bias)
        {
            cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
            MM_CUBLAS(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
            MM_CUBLAS(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
        }
        MM_CUBLAS(cublasLtMatrixLayoutCreate(&a_, abType, k, m, k));
        MM_CUBLAS(cublasLtMatrixLayoutCreate(&b_, abType, k, n, ldx));
        MM_CUBLAS(cublasLtMatrixLayoutCreate(&c_, dType, m, n, ldd));
        if (g.batch > 1)
        {
            int const batch = g.batch;
            int64_t const strides[3] = {g.strideW, g.strideX, g.strideD};
            cublasLtMatrixLayout_t const layouts[3] = {a_, b_, c_};
            for (int i = 0; i < 3; ++i)
            {
                MM_CUBLAS(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch,
                    sizeof(batch)));
                MM_CUBLAS(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &strides[i], sizeof(strides[i])));
            }
        }
        cublasLtMatmulPreference_t pref{};
        MM_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
        size_t ws = kLtWorkspace;
        MM_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
        size_t abElem = abType == CUDA_R_16F ? 2 : 4, dElem = dType == CUDA_R_16F ? 2 : 4;
        auto [alA, alB, alD] = ltAlignments(w, x, d, k, ldx, ldd, abElem, dElem, g);
        MM_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &alA, 4));
        MM_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &alB, 4));
        MM_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &alD, 4));
        MM_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &alD, 4));
        int found = 0;
        cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(lt, desc_, a_, b_, c_, c_, pref, 1, &algo_, &found);
        cublasLtMatmulPreferenceDestroy(pref);
        if (s != CUBLAS_STATUS_SUCCESS || found == 0)
            throw Error("cuBLASLt has no algorithm for a [" + std::to_string(n) + " x " + std::to_string(k) + "] x ["
                + std::to_string(k) + " x " + std::to_string(m) + "] product (status " + std::to_string(int(s)) + ")");
    }
    Linear(Linear&& o) noexcept { *this = std::move(o); }
    Linear& operator=(Linear&& o) noexcept
    {
        std::swap(desc_, o.desc_);
        std::swap(a_, o.a_);
        std::swap(b_, o.b_);
        std::swap(c_, o.c_);
        algo_ = o.algo_;
        w_ = o.w_;
        x_ = o.x_;
        d_ = o.d_;
        bias_ = o.bias_;
        return *this;
    }
    ~Linear()
    {
        if (desc_)
            cublasLtMatmulDescDestroy(desc_);
        for (auto l : {a_, b_, c_})
            if (l)
                cublasLtMatrixLayoutDestroy(l);
    }
    void run(cublasLtHandle_t lt, void* workspace, cudaStream_t stream) const
    {
        run(lt, workspace, stream, w_, x_, d_);
    }
    //! The same product on other operands of the same shapes and alignments (GemmPlans).
    void run(cublasLtHandle_t lt, void* workspace, cudaStream_t stream, void const* w, void const* x, void* d,
        void const* c = nullptr) const
    {
        float one = 1.f, beta = c ? 1.f : 0.f;
        MM_CUBLAS(cublasLtMatmul(lt, desc_, &one, w, a_, x, b_, &beta, c ? c : d, c_, d, c_, &algo_.algo, workspace,
            kLtWorkspace, stream));
    }

private:
    cublasLtMatmulDesc_t desc_{};
    cublasLtMatrixLayout_t a_{}, b_{}, c_{};
    cublasLtMatmulHeuristicResult_t algo_{};
    void const* w_{nullptr};
    void const* x_{nullptr};
    void* d_{nullptr};
    void const* bias_{nullptr};
};

//! Products whose shapes change between calls (the prefill's chunk lengths): one Linear per shape and operand
//! alignment, planned on first use and replayed with each call's pointers.
class GemmPlans
{
public:
    void run(cublasLtHandle_t lt, void* workspace, cudaStream_t stream, int64_t m, int64_t n, int64_t k,
        cudaDataType_t abType, cudaDataType_t dType, void const* w, void const* x, int64_t ldx, void* d, int64_t ldd,
        GemmBatch const& g)
    {
        size_t const ab = abType == CUDA_R_16F ? 2 : 4, de = dType == CUDA_R_16F ? 2 : 4;
        auto const al = ltAlignments(w, x, d, k, ldx, ldd, ab, de, g);
        Key key{m, n, k, abType, dType, ldx, ldd, g.batch, g.strideX, g.strideD, g.strideW, al[0], al[1], al[2]};
        auto it = plans_.find(key);
        if (it == plans_.end())
        {
            if (plans_.size() >= 512) // prompts of many lengths: plans are cheap to make again
                plans_.clear();
            it = plans_.emplace(key, Linear(lt, m, n, k, abType, dType, w, x, ldx, d, ldd, nullptr, g)).first;
        }
        it->second.run(lt, workspace, stream, w, x, d, g.c);
    }

private:
    using Key = std::tuple<int64_t, int64_t, int64_t, int, int, int64_t, int64_t, int, int64_t, int64_t, int64_t,
        uint32_t, uint32_t, uint32_t>;
    std::map<Key, Linear> plans_;
};

// ---- the backend -------------------------------------------------------------------------------------------------------
class NativeBackend final : public Backend
{
public:
    NativeBackend(std::shared_ptr<Weights> weights, SessionOptions options)
        : w_(std::move(weights))
        , opt_(std::move(options))
        , c_(w_->config)
    {
        DeviceGuard onDevice(opt_.device);
        try
        {
            build();
        }
        catch (...)                 // no destructor runs for a constructor that throws: free what was made
        {
            release();
            throw;
        }
    }

    ~NativeBackend() override
    {
        int previous = -1;
        cudaGetDevice(&previous);
        cudaSetDevice(opt_.device);
        release();
        if (previous >= 0)
            cudaSetDevice(previous);
    }

    void build()
    {
        act_ = dtypeName(w_->dtype);
        actElem_ = w_->dtype == DType::kFloat16 ? 2 : 4;
        fused_ = opt_.plan == "fused";
        findKernels();
        findPrefillKernels();
        MM_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
        allocate();
        MM_CUBLAS(cublasLtCreate(&lt_));
        for (auto& e : nextReady_)
            MM_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        if (prefillMode_.empty())
        {
            sides_[0].stream = stream_;
            MM_CUDA(cudaStreamCreateWithFlags(&sides_[1].stream, cudaStreamNonBlocking));
            for (cudaEvent_t* e : {&prefillFork_, &prefillJoin_})
                MM_CUDA(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
            for (PrefillSide& S : sides_)
            {
                S.layerDone.resize(c_.n_layers);
                for (cudaEvent_t& e : S.layerDone)
                    MM_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
            }
        }
        planGemms();
        for (Kernel const* k : usedKernels())
            if (aot::preload(*k->image) != CUDA_SUCCESS) // module loads are not allowed inside graph capture
                throw Error(aot::lastError());
        setSampling({});
        resetState();
        enqueueStep(0, true); // warm-up: cuBLASLt and CUDA's lazy module loading must not happen inside capture
        MM_CUDA(cudaStreamSynchronize(stream_));
        resetState();
        setStream(opt_.seed, 0);
        if (opt_.cudaGraph)
            capture();
    }

    void release() noexcept // what build() made, in reverse; anything not made yet is null
    {
        if (stream_)
            cudaStreamSynchronize(stream_);
        for (auto& g : graphs_)
            for (auto& e : g)
                if (e)
                    cudaGraphExecDestroy(e), e = nullptr;
        for (auto& e : nextReady_)
            if (e)
                cudaEventDestroy(e), e = nullptr;
        for (PrefillSide& S : sides_)
        {
            if (&S != &sides_[0] && S.stream)
                cudaStreamSynchronize(S.stream), cudaStreamDestroy(S.stream);
            S.stream = nullptr;
            for (cudaEvent_t e : S.layerDone)
                if (e)
                    cudaEventDestroy(e);
            S.layerDone.clear();
        }
        for (cudaEvent_t* e : {&prefillFork_, &prefillJoin_})
            if (*e)
                cudaEventDestroy(*e), *e = nullptr;
        gemms_.clear();
        if (lt_)
            cublasLtDestroy(lt_), lt_ = nullptr;
        if (stream_)
            cudaStreamDestroy(stream_), stream_ = nullptr;
        if (pinned_)
            cudaFreeHost(pinned_), pinned_ = nullptr;
    }

    Config const& config() const override { return c_; }
    SessionOptions const& options() const override { return opt_; }

    std::string describe() const override
    {
        int major = 0, minor = 0;
        MM_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, opt_.device));
        MM_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, opt_.device));
        // snprintf, not an ostream: number formatting through iostreams crashed inside a Python process that had
        // imported torch 2.11+cu130 first (its C++ runtime's locale facets; H100, ctypes)
        char sizes[96];
        std::snprintf(sizes, sizeof(sizes), "%.6gM parameters (%.6g MB on device)", w_->parameters / 1e6,
            w_->bytes / 1e6);
        return "native | " + aot::deviceName(opt_.device) + " (sm_" + std::to_string(major) + std::to_string(minor)
            + ") | " + act_ + " | batch " + std::to_string(opt_.batch) + " | " + sizes + " | "
            + (opt_.cudaGraph ? "CUDA graph" : "eager launches") + " | plan " + opt_.plan + " | prefill "
            + (prefillMode_.empty() ? std::string("parallel") : "token by token (" + prefillMode_ + ")")
            + " | kernels: " + aot::binaryFor(*norm_.image, major * 10 + minor) + pdlNote();
    }

    //! Where kernels launch as programmatic dependents (PDL): the parallel prefill, the fused plan's decode graphs.
    std::string pdlNote() const
    {
        std::vector<std::string> on;
        if (prefillMode_.empty() && aot::launchesPdl(*pConv_.image))
            on.push_back("prefill");
        if (fused_ && opt_.cudaGraph && aot::launchesPdl(*fInConv_.image))
            on.push_back("decode graph");
        return on.empty() ? " | PDL off" : " | PDL: " + (on.size() == 2 ? on[0] + ", " + on[1] : on[0]);
    }

    // ---- feeding tokens ----------------------------------------------------------------------------------------------
    //! The tokens in the parallel form (chunks of SessionOptions::prefillRows), then the logits of the last token
    //! and the next token, as a step gives them. Shapes the compiled prefill kernels do not take, and single
    //! tokens, run token by token (prefillMode_ says why).
    void prefill(int32_t const* tokens, int T, int32_t const* lengths) override
    {
        DeviceGuard onDevice(opt_.device);
        if (lengths && !prefillMode_.empty())
            throw Error("rows of different lengths need the parallel prefill, and this session prefills token by "
                        "token (" + prefillMode_ + "): prefill each prompt in a sibling(1) and copyRow it");
        if (T > 1 && prefillMode_.empty())
            parallelPrefill(tokens, T, lengths);
        else
            prefillByStep(tokens, T);
    }

    void prefillByStep(int32_t const* tokens, int T)
    {
        int const B = opt_.batch;
        std::vector<int64_t> byStep(static_cast<size_t>(T) * B); // [T, B]: one contiguous row per step
        for (int b = 0; b < B; ++b)
            for (int t = 0; t < T; ++t)
                byStep[static_cast<size_t>(t) * B + b] = tokens[static_cast<size_t>(b) * T + t];
        if (prompt_.bytes() < byStep.size() * 8)
            prompt_ = DeviceBuffer(byStep.size() * 8);
        MM_CUDA(cudaMemcpyAsync(prompt_.get(), byStep.data(), byStep.size() * 8, cudaMemcpyHostToDevice, stream_));
        for (int t = 0; t < T; ++t)
        {
            MM_CUDA(cudaMemcpyAsync(tok_[cur_].get(), prompt_.as<int64_t>() + static_cast<size_t>(t) * B, B * 8,
                cudaMemcpyDeviceToDevice, stream_));
            runStep(t == T - 1);
        }
        MM_CUDA(cudaStreamSynchronize(stream_)); // byStep (pageable source) must outlive the copy
    }

    void step(int32_t const* tokens) override
    {
        DeviceGuard onDevice(opt_.device);
        std::vector<int64_t> t(tokens, tokens + opt_.batch);
        MM_CUDA(cudaMemcpyAsync(tok_[cur_].get(), t.data(), t.size() * 8, cudaMemcpyHostToDevice, stream_));
        runStep(true);
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

    bool hasLogits() const override { return hasLogits_; }

    void logits(float* out) const override
    {
        DeviceGuard onDevice(opt_.device);
        size_t n = static_cast<size_t>(opt_.batch) * c_.vocab_size;
        std::vector<uint16_t> half(actElem_ == 2 ? n : 0);
        void* dst = actElem_ == 2 ? static_cast<void*>(half.data()) : static_cast<void*>(out);
        MM_CUDA(cudaMemcpyAsync(dst, logits_[cur_].get(), n * actElem_, cudaMemcpyDeviceToHost, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
        for (size_t i = 0; i < half.size(); ++i)
            out[i] = halfToFloat(half[i]);
    }

    // ---- sampling and generation ---------------------------------------------------------------------------------------------
    void setSampling(SamplingParams const& p) override
    {
        p.validate();
        hostParams_[0] = p.temperature;
        hostParams_[1] = static_cast<float>(p.topK);
        hostParams_[2] = p.topP;
        MM_CUDA(cudaMemcpyAsync(params_.get(), hostParams_, sizeof(hostParams_), cudaMemcpyHostToDevice, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

    void resample() override
    {
        DeviceGuard onDevice(opt_.device);
        enqueueSample(cur_);
    }

    void stepNext() override
    {
        DeviceGuard onDevice(opt_.device);
        runStep(true);
    }

    void copyNextAsync(int slot) override
    {
        MM_CUDA(cudaMemcpyAsync(pinned_ + slot * opt_.batch, tok_[cur_].get(), opt_.batch * 8, cudaMemcpyDeviceToHost,
            stream_));
        MM_CUDA(cudaEventRecord(nextReady_[slot], stream_));
    }

    void waitNext(int slot, int32_t* out) override
    {
        MM_CUDA(cudaEventSynchronize(nextReady_[slot]));
        for (int b = 0; b < opt_.batch; ++b)
            out[b] = static_cast<int32_t>(pinned_[slot * opt_.batch + b]);
    }

    void undoStep() override
    {
        if (!canUndo_)
            throw Error("internal: undoStep without a step to undo");
        cur_ ^= 1;
        canUndo_ = false;
    }

    // ---- state ---------------------------------------------------------------------------------------------------------------
    void reset() override
    {
        DeviceGuard onDevice(opt_.device);
        resetState();
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

    void setStream(uint64_t seed, uint32_t step) override
    {
        uint32_t rng[4] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), step, 0};
        MM_CUDA(cudaMemcpyAsync(rng_.get(), rng, sizeof(rng), cudaMemcpyHostToDevice, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

    std::unique_ptr<Backend> sibling(int batch) const override
    {
        SessionOptions options = opt_;
        options.batch = batch;
        DeviceGuard onDevice(opt_.device);
        return std::make_unique<NativeBackend>(w_, options);
    }

    void const* weightsIdentity() const override { return w_.get(); }

    std::unique_ptr<Backend> fork() const override
    {
        DeviceGuard onDevice(opt_.device);
        MM_CUDA(cudaStreamSynchronize(stream_));
        auto other = std::make_unique<NativeBackend>(w_, opt_);
        int const o = other->cur_;
        auto copy = [&](void* dst, void const* src, size_t n) {
            MM_CUDA(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, other->stream_));
        };
        for (auto const& info : stateInfo())
            copy(other->state(info.name, o), state(info.name, cur_), info.bytes());
        copy(other->logits_[o].get(), logits_[cur_].get(), logits_[cur_].bytes());
        copy(other->tok_[o].get(), tok_[cur_].get(), tok_[cur_].bytes());
        copy(other->rng_.get(), rng_.get(), rng_.bytes());
        copy(other->params_.get(), params_.get(), params_.bytes());
        MM_CUDA(cudaStreamSynchronize(other->stream_));
        std::memcpy(other->hostParams_, hostParams_, sizeof(hostParams_));
        other->hasLogits_ = hasLogits_;
        return other;
    }

    std::vector<StateTensorInfo> stateInfo() const override { return stateLayout(c_, opt_.batch, w_->dtype); }

    void copyRow(Backend const& fromBase, int fromRow, int toRow, bool complete) override
    {
        auto const& from = rowSource<NativeBackend>(fromBase);
        DeviceGuard onDevice(opt_.device);
        MM_CUDA(cudaStreamSynchronize(from.stream_));       // its last step has left its state
        for (auto const& i : stateInfo())
            copyStateRow(state(i.name, cur_), opt_.batch, toRow, from.state(i.name, from.cur_), from.opt_.batch,
                fromRow, i, stream_);
        size_t const row = static_cast<size_t>(c_.vocab_size) * actElem_;
        MM_CUDA(cudaMemcpyAsync(static_cast<char*>(logits_[cur_].get()) + toRow * row,
            static_cast<char const*>(from.logits_[from.cur_].get()) + fromRow * row, row,
            cudaMemcpyDeviceToDevice, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));            // the source may go on (or away) at once
        hasLogits_ = hasLogits_ || complete;
        canUndo_ = false;
    }

    void readState(std::string const& name, void* host) const override
    {
        DeviceGuard onDevice(opt_.device);
        MM_CUDA(cudaMemcpyAsync(host, state(name, cur_), info(name).bytes(), cudaMemcpyDeviceToHost, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

    void writeState(std::string const& name, void const* host) override
    {
        DeviceGuard onDevice(opt_.device);
        MM_CUDA(cudaMemcpyAsync(state(name, cur_), host, info(name).bytes(), cudaMemcpyHostToDevice, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
        hasLogits_ = false;     // they were the old state's: the next token fed gives the restored state's
        canUndo_ = false;
    }

    void writeLogits(float const* host) override
    {
        DeviceGuard onDevice(opt_.device);
        size_t n = static_cast<size_t>(opt_.batch) * c_.vocab_size;
        std::vector<uint16_t> half(actElem_ == 2 ? n : 0);   // the model dtype's logits buffer
        for (size_t i = 0; i < half.size(); ++i)
            half[i] = floatToHalf(host[i]);
        void const* src = actElem_ == 2 ? static_cast<void const*>(half.data()) : static_cast<void const*>(host);
        MM_CUDA(cudaMemcpyAsync(logits_[cur_].get(), src, n * actElem_, cudaMemcpyHostToDevice, stream_));
        MM_CUDA(cudaStreamSynchronize(stream_));
        hasLogits_ = true;
        canUndo_ = false;
    }

    std::string weightsFingerprint() const override { return w_->fingerprint->get(); }
    DType logitsDtype() const override { return w_->dtype; }   // the model dtype's buffer (writeLogits)

    void synchronize() const override
    {
        DeviceGuard onDevice(opt_.device);
        MM_CUDA(cudaStreamSynchronize(stream_));
    }

private:
    std::shared_ptr<Weights> w_;
    SessionOptions opt_;
    Config const& c_;
    std::string act_;
    size_t actElem_{4};
    cudaStream_t stream_{};
    cublasLtHandle_t lt_{};
    int cur_{0};
    bool canUndo_{false};
    bool hasLogits_{false};
    float hostParams_[4]{0.f, 0.f, 1.f, 0.f};
    std::vector<float> prioInit_; // -1 for every slot, the source of reset's copy

    bool fused_{false};
    Kernel norm_, normRes_, pool_, poolCross_, conv_, scan_, sample_;
    Kernel fNormProjEmbed_, fNormProj_, fInConv_, fSsmOut_; // the fused plan
    int64_t nC_{0}, nD_{0}; // the fused plan's programs per batch row (in_proj_conv, ssm_out)

    // double-buffered (index = parity)
    DeviceBuffer conv[2], ssm[2], pool[2], prio[2], tok_[2], logits_[2];
    // per-step scratch
    DeviceBuffer h_[2], u_, mem_, ut_, xz_, xc_, dbc_, dt_, y_, out_, workspace_, prompt_, rng_, params_;
    DeviceBuffer z_; // the fused plan
    // per-layer fp32 sums of x_proj ([L,B,X]) then out_proj ([L,B,d]): the fused plan's kernels C and D add into
    // layer l's (atomics), its kernel A zeroes them; the cuBLAS plan's norms zero layer 0's, which it never reads
    DeviceBuffer acc_;
    int64_t* pinned_{nullptr};
    cudaEvent_t nextReady_[2]{};
    cudaEvent_t prefillFork_{}, prefillJoin_{}; // parallelPrefill's second side: after stream_, stream_ after it
    // the decode step's kernels launch as programmatic dependents (aot::launch) only into the fused plan's CUDA
    // graphs: 0.52 -> 0.38 ms/token (130m fp16, H100). The cublas plan's graphs (PDL kernels between cuBLAS GEMMs)
    // gained 9% only until a second session was opened in the process, then lost 2% (BENCHMARKS.md,
    // twenty-eighth session); eager steps (warm-up, cudaGraph off) launch plainly as well
    bool stepPdl_{false};
    struct LayerGemms
    {
        Linear mem, in, x, dt, out;
    };
    // gemms_[p][l]: the step's products at parity p (only the output/input buffers differ between parities: none
    // here, all GEMM operands are scratch) -- one set suffices.
    std::vector<LayerGemms> gemms_;
    Linear head_[2];
    cudaGraphExec_t graphs_[2][2]{}; // [parity][with head]

    // the parallel prefill (parallelPrefill): its kernels, why it is off ("" = on), and two sides, each a chunk's
    // buffers and a stream: consecutive chunks run on alternate sides, layer l of a chunk after the chunk before
    // has left its state at layer l
    Kernel pNorm_, pConv_, pScores_, pAfter_, pGained_, pCross_, pScanStates_, pScanPrefix_, pScanOut_;
    Kernel pConvL_, pScoresL_, pScanStatesL_; // the same with HAS_LENGTHS: rows of their own lengths
    Kernel pSweepTop_, pSweepEnter_, pSweepCompact_, pSweepReplay_, pSweepFill_, pMix_, pMixCross_;
    std::string prefillMode_;
    int64_t scanPrograms_{0};
    struct PrefillSide
    {
        cudaStream_t stream{};                    //!< side 0: the backend's stream; side 1: its own
        std::vector<cudaEvent_t> layerDone;       //!< recorded after each layer of the chunk this side runs
        int64_t cap{0}, scanChunks{0};            //!< tokens a row the buffers hold; scan chunks they hold
        DeviceBuffer tok, h, u, ut, part, xz, xc, dbc, dt, y;
        DeviceBuffer states, starts, dtSum, delta;            // scan_forward's chunk states, Σδ per chunk, δ
        DeviceBuffer scores, gain;                            // §3/§4: note scores, read gains
        DeviceBuffer top, segCount, enter, evTok, evA, ecount, hist; // the sweep's working buffers
        DeviceBuffer qk, m;                                   // fp16: the reads' queries through W_k, pool_mix's mixtures
        DeviceBuffer o, keys, vals, idxX;                     // fp32: the plugins' attention (keys, values, joined index)
        // a §5 group's layers: stacked GEMM outputs (their banks), sweep indices and entry ends
        std::vector<DeviceBuffer> g, idx, ends;
        DeviceBuffer workspace;                   //!< side 1's cuBLASLt workspace (side 0 uses the backend's)
        // rows of their own lengths (parallelPrefill with lengths): the chunk this side runs is `ragged` where a
        // row ends before its last token; lens [B] int64 its tokens a row (0..T), rowEnds the (row, token) of
        // the rows whose last token lies in it, whose logits it gives
        bool ragged{false};
        DeviceBuffer lens;
        std::vector<std::pair<int64_t, int64_t>> rowEnds;
    };
    PrefillSide sides_[2];
    int side_{0}; //!< the side the prefill's functions run on
    //! the prefill's kernels wait for their predecessor before they read or write anything (_after_predecessor,
    //! models/ops/triton/launch.py), so they launch as programmatic dependents after any kernel
    static constexpr bool kPrefillPdl = true;
    GemmPlans plans_;

    //! The variant keys of this model's shape (cpp/aot_kernels.py shape_keys builds the same strings).
    std::string decodeKey() const
    {
        std::string key = "d" + std::to_string(c_.d_model) + "_di" + std::to_string(c_.dInner()) + "_n"
            + std::to_string(c_.d_state) + "_r" + std::to_string(c_.dt_rank) + "_k" + std::to_string(c_.d_conv);
        return key + (c_.memory ? "_K" + std::to_string(c_.pool_size) + "_ds" + std::to_string(c_.summary_dim) + "_H"
                                      + std::to_string(c_.memory_heads) + "_p" + std::to_string(c_.cross_layer_every)
                                : std::string("_nomem"));
    }
    std::string convKey() const { return "di" + std::to_string(c_.dInner()) + "_k" + std::to_string(c_.d_conv); }
    std::string scanKey() const { return "di" + std::to_string(c_.dInner()) + "_n" + std::to_string(c_.d_state); }

    void findKernels()
    {
        std::string const key = decodeKey();
        norm_ = findKernel("decode_norm_proj_embed_noproj", act_, key);
        normRes_ = findKernel("decode_norm_proj_noproj", act_, key);
        sample_ = findKernel("sample", act_, "any");
        for (int64_t l = 0; c_.memory && l < c_.n_layers; ++l)
        {
            Kernel& k = c_.isCrossLayer(l) ? poolCross_ : pool_;
            if (!k.image)
                k = findKernel(c_.isCrossLayer(l) ? "decode_note_pool_cross" : "decode_note_pool", act_, key);
        }
        if (!fused_)
        {
            conv_ = findKernel("conv_step", act_, convKey());
            scan_ = findKernel("scan_step", act_, scanKey());
            return;
        }
        fInConv_ = findKernel("decode_in_proj_conv", act_, key);
        fSsmOut_ = findKernel("decode_ssm_out", act_, key);
        if (c_.memory)
        {
            fNormProjEmbed_ = findKernel("decode_norm_proj_embed", act_, key);
            fNormProj_ = findKernel("decode_norm_proj", act_, key);
        }
        nC_ = cdiv(c_.dInner(), fInConv_.at("BLOCK_C"));
        nD_ = cdiv(c_.dInner(), fSsmOut_.at("BLOCK_C"));
    }

    //! The prefill's kernels for this shape, or prefillMode_ saying why the prefill runs token by token.
    void findPrefillKernels()
    {
        int64_t const dh = c_.memory ? c_.summary_dim / c_.memory_heads : 0;
        if (opt_.prefillRows == 0)
            prefillMode_ = "SessionOptions::prefillRows is 0";
        else if (c_.d_conv < 2 || c_.d_conv > 4)
            prefillMode_ = "the prefill conv kernel takes d_conv 2 to 4";
        else if (c_.memory && actElem_ == 4 && (c_.pool_size * c_.cross_layer_every > 256 || dh > 16))
            prefillMode_ = "the compiled pool attention (fp32) takes at most 256 entries a read and 16 channels a head";
        if (!prefillMode_.empty())
            return;
        try
        {
            pNorm_ = findKernel("prefill_residual_norm", act_, "d" + std::to_string(c_.d_model));
            pConv_ = findKernel("prefill_conv", act_, convKey());
            pConvL_ = findKernel("prefill_conv_lengths", act_, convKey());
            std::string const scan = scanKey() + "_r" + std::to_string(c_.dt_rank);
            pScanStates_ = findKernel("prefill_scan_states", act_, scan);
            pScanStatesL_ = findKernel("prefill_scan_states_lengths", act_, scan);
            pScanPrefix_ = findKernel("prefill_scan_prefix", act_, scan);
            pScanOut_ = findKernel("prefill_scan_out", act_, scan);
            pGained_ = findKernel("gained_add", act_, "d" + std::to_string(c_.d_model));
            if (c_.memory)
            {
                pScores_ = findKernel("prefill_note_scores", act_, decodeKey());
                pScoresL_ = findKernel("prefill_note_scores_lengths", act_, decodeKey());
                pAfter_ = findKernel("pool_after", act_,
                    "K" + std::to_string(c_.pool_size) + "_ds" + std::to_string(c_.summary_dim));
                std::string const K = "K" + std::to_string(c_.pool_size);
                pSweepTop_ = findKernel("sweep_top", act_, K);
                pSweepEnter_ = findKernel("sweep_enter", act_, K);
                pSweepCompact_ = findKernel("sweep_compact", act_, K);
                pSweepReplay_ = findKernel("sweep_replay", act_, K);
                pSweepFill_ = findKernel("sweep_fill", act_, K);
                if (actElem_ == 2)
                {
                    std::string const key = "d" + std::to_string(c_.d_model) + "_" + K + "_ds"
                        + std::to_string(c_.summary_dim) + "_H" + std::to_string(c_.memory_heads) + "_p"
                        + std::to_string(c_.cross_layer_every);
                    pMix_ = findKernel("prefill_pool_mix", act_, key);
                    pMixCross_ = findKernel("prefill_pool_mix_cross", act_, key);
                }
                else
                    pCross_ = findKernel("cross_index", act_, K);
            }
        }
        catch (Error const& e)
        {
            prefillMode_ = std::string("the kernel library lacks its prefill kernels: ") + e.what();
            return;
        }
        if (c_.memory && actElem_ == 4 && !plugin::poolAttentionPreload())
            throw Error(aot::lastError());
        int sms = 0;
        MM_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, opt_.device));
        scanPrograms_ = int64_t{sms} * kScanProgramsPerSm;
    }

    //! scan.seq_chunk_plan's chunk count before rounding: as many chunks as batch x channel blocks x chunks fit in
    //! one wave, none under 16 tokens. It grows with T and bounds the rounded count (cdiv(T, cdiv(T, n)) <= n),
    //! which does not grow with T (an H100, 130m: 289 tokens in 17 chunks, 288 in 18).
    int64_t scanChunksWanted(int64_t T) const
    {
        int64_t const rows = opt_.batch * cdiv(c_.dInner(), pScanStates_.at("BLOCK_D"));
        return std::max<int64_t>(1, std::min<int64_t>(scanPrograms_ / rows, T / kScanMinChunk));
    }

    struct ScanPlan
    {
        int64_t chunkLen, chunks;
    };
    //! scan.seq_chunk_plan.
    ScanPlan scanPlan(int64_t T) const
    {
        int64_t const n = scanChunksWanted(T);
        int64_t const len = n == 1 ? T : (T + n - 1) / n;
        return {len, (T + len - 1) / len};
    }

    void check(CUresult r) const
    {
        if (r != CUDA_SUCCESS)
            throw Error("parallel prefill: " + aot::lastError());
    }

    //! Side `side`'s buffers for chunks of up to `cap` tokens a row (grown, never shrunk). The old ones go first,
    //! so the peak is the new size; an allocation that fails leaves none (cap 0: the next prefill allocates again).
    void allocatePrefill(int side, int64_t cap)
    {
        PrefillSide& S = sides_[side];
        if (cap <= S.cap)
            return;
        MM_CUDA(cudaStreamSynchronize(S.stream)); // the old buffers may still be read
        cudaStream_t const stream = S.stream;
        std::vector<cudaEvent_t> events = std::move(S.layerDone);
        S = PrefillSide{}; // the old buffers, swapped into the temporary, are freed here
        S.stream = stream;
        S.layerDone = std::move(events);
        int64_t const B = opt_.batch, d = c_.d_model, di = c_.dInner(), X = xWidth(c_), n = B * cap, N = c_.d_state;
        size_t const a = actElem_;
        int64_t const chunks = scanChunksWanted(cap); // bounds the scan plan's chunks for every T <= cap
        auto buffer = [](int64_t bytes) { return DeviceBuffer(static_cast<size_t>(bytes)); };
        S.tok = buffer(n * 8), S.h = buffer(n * d * 4), S.part = buffer(n * d * a), S.u = buffer(n * d * a);
        S.lens = buffer(B * 8);
        S.ut = buffer(n * d * a), S.xz = buffer(n * 2 * di * a), S.xc = buffer(n * di * a), S.dbc = buffer(n * X * a);
        S.dt = buffer(n * di * a), S.y = buffer(n * di * a), S.delta = buffer(n * di * 4);
        S.states = buffer(B * chunks * N * di * 4), S.starts = buffer(B * chunks * N * di * 4);
        S.dtSum = buffer(B * chunks * di * 4);
        if (side == 1)
            S.workspace = buffer(kLtWorkspace);
        if (c_.memory)
        {
            int64_t const K = c_.pool_size, ds = c_.summary_dim, P = c_.cross_layer_every, M = K + cap;
            for (int64_t j = 0; j < P; ++j)
            {
                S.g.push_back(buffer(B * M * w_->memRows * a));
                S.idx.push_back(buffer(B * (cap + 1) * K * 4));
                S.ends.push_back(buffer(B * M * 4));
            }
            S.scores = buffer(n * 4), S.gain = buffer(n * 4);
            int64_t const segs = cdiv(cap, pSweepTop_.at("SEG"));
            S.top = buffer(B * segs * pSweepTop_.at("BLOCK_K") * 4), S.segCount = buffer(B * segs * 4);
            S.enter = buffer(n * 4), S.evTok = buffer(n * 4), S.evA = buffer(n * 4);
            S.ecount = buffer(B * (cap + 1) * 4), S.hist = buffer(B * (cap + 1) * K * 4);
            if (a == 2)
                S.qk = buffer(B * M * 2 * qkWidth() * a), S.m = buffer(n * 2 * qkWidth() * a);
            else
            {
                S.o = buffer(n * d * a), S.keys = buffer(B * P * M * ds * a), S.vals = buffer(B * P * M * d * a);
                S.idxX = buffer(n * P * K * 4);
            }
        }
        S.cap = cap;
        S.scanChunks = chunks;
    }

    //! Feed tokens [B, T] in the parallel form (spec §8; MemMambaLM.prefill's layers as export/graphs.py's
    //! prefill graph spells them), from state cur_, in chunks of SessionOptions::prefillRows rows; chunk c reads the
    //! state at parity cur_ ^ (c & 1) and writes the other. Two chunks are in flight, on the two sides' streams, the
    //! later a layer behind: its layer l waits for the earlier chunk's layer l (where the state it reads is
    //! written, and the state it writes is read), so one chunk's small kernels run beside the other's large ones
    //! (TritonBackend's prefill_in_halves). Ends with the last token's logits and the next token (prefillLogits).
    //! lengths [B] (or null): rows of their own lengths; a chunk where some row has fewer than its tokens runs the
    //! kernels told each row's share (padding changes no state), and the chunks where rows end give their logits.
    void parallelPrefill(int32_t const* tokens, int T, int32_t const* lengths)
    {
        int64_t const B = opt_.batch, L = c_.n_layers;
        int64_t const chunk = std::max<int64_t>(1, opt_.prefillRows / B); // at least a token a row
        int64_t const chunks = (T + chunk - 1) / chunk;
        // buffers for the next power of two tokens (at least 256) up to a chunk: a conversation's growing prompts
        // reallocate a few times, not at every turn; the second side only for prompts longer than a chunk
        int64_t cap = 256;
        while (cap < T)
            cap *= 2;
        for (int side = 0; side < std::min<int64_t>(chunks, 2); ++side)
            allocatePrefill(side, std::min(chunk, cap));
        hasLogits_ = false; // from the first chunk on, the logits are no longer the state's (an error part way
        canUndo_ = false;   // leaves none, as the token-by-token path did)
        std::vector<int64_t> ids(tokens, tokens + B * T); // int64, as the embedding kernel reads ids
        // one upload (a pageable copy per chunk may wait for the GPU) into a buffer that only grows: a cudaFree per
        // call would synchronise the whole device, other sessions' work included
        if (prompt_.bytes() < ids.size() * 8)
            prompt_ = DeviceBuffer(ids.size() * 8);
        MM_CUDA(cudaMemcpyAsync(prompt_.get(), ids.data(), ids.size() * 8, cudaMemcpyHostToDevice, stream_));
        // each chunk's tokens a row (its share of the row's length), uploaded on the chunk's side before its layers
        std::vector<int64_t> lens(lengths ? static_cast<size_t>(chunks * B) : 0);
        for (int64_t c = 0; lengths && c < chunks; ++c)
            for (int64_t b = 0; b < B; ++b)
                lens[c * B + b] = std::clamp<int64_t>(lengths[b] - c * chunk, 0, std::min(chunk, T - c * chunk));
        int const first = cur_;
        if (chunks > 1)
        {
            MM_CUDA(cudaEventRecord(prefillFork_, stream_));
            MM_CUDA(cudaStreamWaitEvent(sides_[1].stream, prefillFork_));
        }
        auto join = [&] {
            side_ = 0;
            if (chunks > 1) // stream_ goes on after both sides' work (also after an error: none may run on)
            {
                cudaEventRecord(prefillJoin_, sides_[1].stream);
                cudaStreamWaitEvent(stream_, prefillJoin_);
            }
        };
        try
        {
            for (int64_t c0 = 0; c0 < chunks; c0 += 2) // chunks c0 and c0 + 1 on sides 0 and 1, layer by layer
            {
                int const pair = static_cast<int>(std::min<int64_t>(2, chunks - c0));
                for (int i = 0; i < pair; ++i)
                {
                    int64_t const c = c0 + i, t0 = c * chunk, n = std::min(chunk, T - t0);
                    PrefillSide& S = sides_[i];
                    MM_CUDA(cudaMemcpy2DAsync(S.tok.get(), n * 8, prompt_.as<int64_t>() + t0, T * 8, n * 8, B,
                        cudaMemcpyDeviceToDevice, S.stream));
                    S.ragged = false;
                    S.rowEnds.clear();
                    for (int64_t b = 0; lengths && b < B; ++b)
                    {
                        S.ragged |= lens[c * B + b] < n;
                        if (lengths[b] > t0 && lengths[b] <= t0 + n)
                            S.rowEnds.emplace_back(b, lengths[b] - t0 - 1);
                    }
                    if (S.ragged)
                        MM_CUDA(cudaMemcpyAsync(S.lens.get(), lens.data() + c * B, B * 8, cudaMemcpyHostToDevice,
                            S.stream));
                }
                for (int64_t l = 0; l < L; ++l)
                    for (int i = 0; i < pair; ++i)
                    {
                        int64_t const c = c0 + i, t0 = c * chunk, n = std::min(chunk, T - t0);
                        PrefillSide& S = sides_[i];
                        side_ = i;
                        if (c > 0)
                            MM_CUDA(cudaStreamWaitEvent(S.stream, sides_[1 - i].layerDone[l]));
                        prefillLayer(first ^ static_cast<int>(c & 1), static_cast<int>(n), l,
                            c == chunks - 1 && !lengths);
                        if (chunks > 1)
                            MM_CUDA(cudaEventRecord(S.layerDone[l], S.stream));
                    }
            }
        }
        catch (...)
        {
            join();
            cudaStreamSynchronize(stream_); // nothing of this call may still run (or read prompt_) after it throws
            throw;
        }
        join();
        cur_ = first ^ static_cast<int>(chunks & 1);
        prefillLogits();
        MM_CUDA(cudaStreamSynchronize(stream_)); // ids and lens (pageable) must outlive their uploads, prompt_
    }                                            // the chunks' copies

    //! Layer l of a chunk of T tokens a row (the side's tok [B, T]) from the state at parity p into 1 - p. The last
    //! layer's output is wanted at the prompt's last token only (MemMambaLM.prefill's last_only; the next chunk
    //! starts from the embedding): its in_proj gate half, pass 3 of the scan and out_proj run for the last scan
    //! chunk or row of the last chunk (`last`) alone (lastLayerTail), and not at all in the other chunks.
    void prefillLayer(int p, int T, int64_t l, bool last)
    {
        PrefillSide& S = sides_[side_];
        int const q = 1 - p;
        int64_t const B = opt_.batch, d = c_.d_model, di = c_.dInner(), N = c_.d_state, R = c_.dt_rank;
        int64_t const X = xWidth(c_), KW = c_.d_conv, n = B * T;
        size_t const a = actElem_;
        cudaDataType_t const t = ltType(w_->dtype);
        size_t const convLayer = B * di * (KW - 1) * a, ssmLayer = B * di * N * 4;
        LayerWeights const& W = w_->layers[l];
        bool const lastLayer = l == c_.n_layers - 1; // its y is wanted at the prompt's last token only
        bool const rowTails = lastLayer && !S.rowEnds.empty(); // rows of their own lengths end here: every y
        if (l == 0) // h = embedding, u = RMSNorm(h): decode kernel A on B·T rows; the sums it zeroes for the
            Launch(norm_) // decode step's atomics ([B·T, d] fp32) land in xz, which in_proj writes next
                .ptr("tok_ptr", S.tok.get())
                .ptr("emb_ptr", w_->emb)
                .ptr("h_prev_ptr", S.h.get())
                .ptr("part_ptr", S.part.get())
                .ptr("h_ptr", S.h.get())
                .ptr("u_ptr", S.u.get())
                .ptr("norm_w_ptr", W.norm)
                .ptr("w_ptr", W.norm)
                .ptr("bias_ptr", S.part.get())
                .ptr("out_ptr", S.u.get())
                .ptr("zx_ptr", S.xz.get())
                .ptr("zo_ptr", S.xz.get())
                .i32("d", d)
                .i32("R", 0)
                .i32("P", 0)
                .i32("X", 0)
                .f32("eps", c_.norm_eps)
                .i32("stride_emb", d)
                .run({1, static_cast<unsigned>(n), 1}, S.stream, kPrefillPdl);
        else // h += out_proj's output (the model dtype), u = RMSNorm(h): norm.residual_norm_kernel, in place
            Launch(pNorm_)
                .ptr("h_ptr", S.h.get())
                .ptr("y_ptr", S.part.get())
                .ptr("w_ptr", W.norm)
                .ptr("h_out_ptr", S.h.get())
                .ptr("u_ptr", S.u.get())
                .i32("rows", n)
                .i32("d", d)
                .f32("eps", c_.norm_eps)
                .run({cdiv(n, pNorm_.at("BLOCK_R")), 1, 1}, S.stream, kPrefillPdl);
        void* mixerIn = S.u.get();
        if (c_.memory)
        {
            prefillMemory(p, l, T);
            mixerIn = S.ut.get();
        }
        // §6: in_proj, the causal conv over [window, x], x_proj, dt_proj, the chunked scan from the SSM state
        // (the last layer: in_proj's x half; lastLayerTail projects the gate the last chunk needs)
        gemm(lastLayer && !rowTails ? di : 2 * di, n, d, W.inW, mixerIn, d, S.xz.get(), 2 * di, t);
        Kernel const& convKernel = S.ragged ? pConvL_ : pConv_;
        Launch(convKernel)
            .ptr("x_ptr", S.xz.get())
            .ptr("w_ptr", W.convW)
            .ptr("b_ptr", W.convB)
            .ptr("win_ptr", at(conv[p].get(), l * convLayer))
            .ptr("out_ptr", S.xc.get())
            .ptr("new_win_ptr", at(conv[q].get(), l * convLayer))
            .ptr("lengths_ptr", S.ragged ? S.lens.get() : nullptr) // each row's window after its own tokens
            .i32("T", T)
            .i32("Di", di)
            .i32("stride_x_b", T * 2 * di)
            .i32("stride_x_t", 2 * di)
            .i32("stride_win_b", di * (KW - 1))
            .i32("stride_out_b", T * di)
            .i32("stride_out_t", di)
            .i32("stride_new_win_b", di * (KW - 1))
            .run({static_cast<unsigned>(B), cdiv(di, pConv_.at("BLOCK_D")), cdiv(T, pConv_.at("CHUNK"))}, S.stream,
                kPrefillPdl);
        gemm(X, n, di, W.xW, S.xc.get(), di, S.dbc.get(), X, t);
        gemm(di, n, R, W.dtW, S.dbc.get(), X, S.dt.get(), di, t);
        scanForward(W, T, at(ssm[p].get(), l * ssmLayer), at(ssm[q].get(), l * ssmLayer), lastLayer && !rowTails);
        if (rowTails)
            lastLayerRows(W, T);
        else if (lastLayer && last)
            lastLayerTail(W, T, mixerIn);
        else if (!lastLayer)
            gemm(d, n, di, W.outW, S.y.get(), di, S.part.get(), d, t);
    }

    //! The last layer of a chunk where rows of their own lengths end (after its scan wrote every y): for each such
    //! row, out_proj at its last token (fp32 into out_'s row) and h before it into h_[(L + 1) % 2]'s row, as
    //! lastLayerTail leaves them for the prompt's last token.
    void lastLayerRows(LayerWeights const& W, int T)
    {
        PrefillSide& S = sides_[side_];
        int64_t const d = c_.d_model, di = c_.dInner();
        size_t const a = actElem_;
        for (auto const& [b, e] : S.rowEnds)
        {
            int64_t const row = b * T + e;
            gemm(d, 1, di, W.outW, at(S.y.get(), row * di * a), di, at(out_.get(), b * d * 4), d, CUDA_R_32F);
            MM_CUDA(cudaMemcpyAsync(at(h_[(c_.n_layers + 1) % 2].get(), b * d * 4), at(S.h.get(), row * d * 4), d * 4,
                cudaMemcpyDeviceToDevice, S.stream));
        }
    }

    //! The last layer of the prompt's last chunk, after its scan's passes 1 and 2: in_proj's gate half and pass 3
    //! for the last scan chunk's rows alone (the same sums as over the whole chunk, so the last token's y is the
    //! whole pass's), out_proj at the last token (fp32 [B, d] into out_, as the decode step leaves it), and h before
    //! it into h_[(L + 1) % 2], where the decode step's final norm reads them (prefillLogits).
    void lastLayerTail(LayerWeights const& W, int T, void* mixerIn)
    {
        PrefillSide& S = sides_[side_];
        int64_t const B = opt_.batch, d = c_.d_model, di = c_.dInner();
        size_t const a = actElem_;
        cudaDataType_t const t = ltType(w_->dtype);
        ScanPlan const plan = scanPlan(T);
        int64_t const t0 = (plan.chunks - 1) * plan.chunkLen, rows = T - t0;
        gemm(di, rows, d, at(W.inW, di * d * a), at(mixerIn, t0 * d * a), d,
            at(S.xz.get(), (t0 * 2 * di + di) * a), 2 * di, t, {int(B), T * d, T * 2 * di});
        scanPass(pScanOut_, W, T, plan, plan.chunks - 1);
        gemm(d, B, di, W.outW, at(S.y.get(), (T - 1) * di * a), T * di, out_.get(), d, CUDA_R_32F);
        MM_CUDA(cudaMemcpy2DAsync(h_[(c_.n_layers + 1) % 2].get(), d * 4, at(S.h.get(), (T - 1) * d * 4), T * d * 4,
            d * 4, B, cudaMemcpyDeviceToDevice, S.stream));
    }

    //! The logits and next token of the prompt's last token (state cur_, just written): the decode step's final
    //! norm over what lastLayerTail left, the LM head and the sampler.
    void prefillLogits()
    {
        enqueueNorm(normRes_, c_.n_layers, w_->normF, cur_);
        head_[cur_].run(lt_, workspace_.get(), stream_);
        enqueueSample(cur_);
        hasLogits_ = true;
    }

    //! scan.scan_forward's three passes over the chunk (TritonBackend's prefill scan): xc (S.xc), dt (S.dt), B and
    //! C (views of S.dbc), z (in_proj's second half) from the SSM state h0 -> y (S.y) and the state h (both
    //! [B, Di, N] fp32). Pass 1 runs each chunk from zero, keeping its final state, Σδ and δ; the prefix pass
    //! chains the chunks from h0 (and writes h); pass 3 runs each chunk again from its start, writing y (stateOnly:
    //! not here; lastLayerTail runs it for the prompt's last scan chunk).
    void scanForward(LayerWeights const& W, int T, void const* h0, void* h, bool stateOnly)
    {
        PrefillSide& S = sides_[side_];
        int64_t const B = opt_.batch, di = c_.dInner(), N = c_.d_state;
        ScanPlan const plan = scanPlan(T);
        if (plan.chunks > sides_[side_].scanChunks)
            throw Error("internal: the prefill scan plans " + std::to_string(plan.chunks) + " chunks for "
                + std::to_string(T) + " tokens, its buffers hold " + std::to_string(sides_[side_].scanChunks));
        scanPass(S.ragged ? pScanStatesL_ : pScanStates_, W, T, plan, 0);
        Launch(pScanPrefix_)
            .ptr("AT_ptr", W.AT)
            .ptr("dt_sum_ptr", S.dtSum.get())
            .ptr("h0_ptr", h0)
            .ptr("states_ptr", S.states.get())
            .ptr("starts_ptr", S.starts.get())
            .ptr("h_out_ptr", h)
            .i32("Di", di)
            .i32("N", N)
            .i32("n_chunks", plan.chunks)
            .i32("stride_h0_b", di * N)
            .i32("stride_hout_b", di * N)
            .run({static_cast<unsigned>(B), cdiv(N * di, pScanPrefix_.at("BLOCK_E")), 1}, S.stream, kPrefillPdl);
        if (!stateOnly)
            scanPass(pScanOut_, W, T, plan, 0);
    }

    //! Pass 1 (k = pScanStates_) or pass 3 (pScanOut_) of scanForward over the plan's scan chunks from `first` on
    //! (every input and output from that chunk's first token).
    void scanPass(Kernel const& k, LayerWeights const& W, int T, ScanPlan const& plan, int64_t first)
    {
        PrefillSide& S = sides_[side_];
        int64_t const B = opt_.batch, di = c_.dInner(), N = c_.d_state, R = c_.dt_rank, X = xWidth(c_);
        int64_t const t0 = first * plan.chunkLen, hs = plan.chunks * di * N; // a batch row's chunk states
        size_t const a = actElem_;
        bool const out = &k == &pScanOut_;     // pass 3 (else pass 1, pScanStates_ or pScanStatesL_)
        void* AT = W.AT; // stands in for the pointers a pass does not use
        void* dbc = at(S.dbc.get(), t0 * X * a);
        Launch(k)
            .ptr("x_ptr", at(S.xc.get(), t0 * di * a))
            .ptr("dt_ptr", out ? at(S.delta.get(), t0 * di * 4) : S.dt.get()) // pass 3: pass 1's δ (fp32)
            .ptr("AT_ptr", W.AT)
            .ptr("B_ptr", at(dbc, R * a))
            .ptr("C_ptr", at(dbc, (R + N) * a))
            .ptr("D_ptr", W.D)
            .ptr("z_ptr", at(S.xz.get(), (t0 * 2 * di + di) * a))
            .ptr("dt_bias_ptr", W.dtBias)
            .ptr("h_in_ptr", out ? at(S.starts.get(), first * di * N * 4) : AT)
            .ptr("y_ptr", out ? at(S.y.get(), t0 * di * a) : AT)
            .ptr("h_out_ptr", out ? AT : S.states.get())
            .ptr("dt_sum_ptr", out ? AT : S.dtSum.get())
            .i32("T", T - t0)
            .i32("Di", di)
            .i32("N", N)
            .i32("chunk_len", plan.chunkLen)
            .i32("dt_softplus", out ? 0 : 1)
            .i32("stride_x_b", T * di)
            .i32("stride_x_t", di)
            .i32("stride_dt_b", T * di)
            .i32("stride_dt_t", di)
            .i32("stride_B_b", T * X)
            .i32("stride_B_t", X)
            .i32("stride_C_b", T * X)
            .i32("stride_C_t", X)
            .i32("stride_z_b", T * 2 * di)
            .i32("stride_z_t", 2 * di)
            .i32("stride_y_b", T * di)
            .i32("stride_y_t", di)
            .i32("stride_hin_b", hs)
            .i32("stride_hin_c", di * N)
            .i32("stride_hout_b", hs)
            .i32("stride_hout_c", di * N)
            .ptr("delta_ptr", out ? AT : S.delta.get())
            .ptr("lengths_ptr", &k == &pScanStatesL_ ? S.lens.get() : nullptr) // pass 3 reads pass 1's δ
            .run({static_cast<unsigned>(B), cdiv(di, k.at("BLOCK_D")), static_cast<unsigned>(plan.chunks - first)}, S.stream, kPrefillPdl);
    }

    //! Columns a read's queries through W_k take in a side's qk and m (H·ds, in whole 16-element vectors).
    int64_t qkWidth() const { return (c_.memory_heads * c_.summary_dim + 15) / 16 * 16; }

    //! §3-§5 of layer l over the chunk: ũ (S.ut) from u (S.u), the pool and priorities at parity 1 - p.
    void prefillMemory(int p, int64_t l, int T)
    {
        PrefillSide& S = sides_[side_];
        int const q = 1 - p;
        int64_t const B = opt_.batch, d = c_.d_model, K = c_.pool_size, ds = c_.summary_dim;
        int64_t const hd = d / 4, P = c_.cross_layer_every, M = K + T, n = B * T;
        size_t const a = actElem_;
        cudaDataType_t const t = ltType(w_->dtype);
        LayerWeights const& W = w_->layers[l];
        int64_t const rows = W.memRows; // g's columns: q_tok [0, ds), score hidden, summary, trigger, q_cross
        int64_t const colSummary = ds + hd;
        void* g = S.g[l % P].get();      // [B, K + T, rows]: the pool's K rows (its summaries: the bank), then tokens'
        void* idx = S.idx[l % P].get();  // [B, T + 1, K] the sweep's index
        void* poolIn = at(pool[p].get(), l * B * K * ds * a);
        // the five projections that share u, without the trigger's bias (note_scores adds it, as the Python path)
        gemm(rows, T, d, W.memW, S.u.get(), d, at(g, K * rows * a), rows, t, {int(B), T * d, M * rows});
        Kernel const& scoresKernel = S.ragged ? pScoresL_ : pScores_;
        Launch(scoresKernel)
            .ptr("g_ptr", at(g, ds * a))
            .ptr("w2_ptr", W.wScore)
            .ptr("trig_bias_ptr", at(W.memBias, (colSummary + ds) * a))
            .ptr("alpha_ptr", W.alpha)
            .ptr("a_ptr", S.scores.get())
            .ptr("gain_ptr", S.gain.get())
            .ptr("pool0_ptr", poolIn)
            .ptr("lengths_ptr", S.ragged ? S.lens.get() : nullptr) // padding scores 0: it enters no pool
            .i32("M", n)
            .i32("T", T)
            .i32("K", K)
            .i32("hd", hd)
            .i32("ds", ds)
            .i32("col_trig", hd + ds)
            .i32("stride_g", rows)
            .i32("stride_pool_b", K * ds)
            .i32("stride_pool_k", ds)
            .i32("stride_pool_s", 1)
            .f32("tau2", static_cast<float>(c_.read_threshold))
            .run({cdiv(n, pScores_.at("BLOCK_M")), 1, 1}, S.stream, kPrefillPdl);
        sweep(T, at(prio[p].get(), l * B * K * 4), idx, S.ends[l % P].get(), at(prio[q].get(), l * B * K * 4));
        if (a == 2)
            mixReads(l, T);
        else
            attendReads(l, T);
        // the pool after the chunk: slot j holds bank row index[:, T, j] (an empty slot keeps pool0's row j)
        Launch(pAfter_)
            .ptr("bank_ptr", at(g, colSummary * a))
            .ptr("last_ptr", at(idx, T * K * 4))
            .ptr("out_ptr", at(pool[q].get(), l * B * K * ds * a))
            .i32("K", K)
            .i32("ds", ds)
            .i32("stride_bank_b", M * rows)
            .i32("stride_bank_m", rows)
            .i32("stride_last_b", (T + 1) * K)
            .i32("stride_last_k", 1)
            .i32("stride_out_b", K * ds)
            .i32("stride_out_k", ds)
            .run({static_cast<unsigned>(B), 1, 1}, S.stream, kPrefillPdl);
    }

    //! §3's sweep of the chunk's scores (S.scores) from priorities prio0: index [B, T + 1, K], the entry ends [B, K + T]
    //! and the priorities after it (pool.pool_sweep_ends: the segments' top lists, who enters, their list, the slot
    //! replay, the index rows).
    void sweep(int T, void const* prio0, void* index, void* ends, void* prioOut)
    {
        PrefillSide& S = sides_[side_];
        int64_t const B = opt_.batch, K = c_.pool_size, segs = cdiv(T, pSweepTop_.at("SEG"));
        float const tau1 = static_cast<float>(c_.insert_threshold);
        unsigned const b = static_cast<unsigned>(B);
        if (segs > pSweepCompact_.at("BLOCK_SEG"))
            throw Error("internal: the prefill sweep is compiled for " + std::to_string(pSweepCompact_.at("BLOCK_SEG"))
                + " segments, a chunk of " + std::to_string(T) + " tokens has " + std::to_string(segs));
        Launch(pSweepTop_)
            .ptr("scores_ptr", S.scores.get())
            .ptr("top_ptr", S.top.get())
            .ptr("seg_count_ptr", S.segCount.get())
            .i32("T", T)
            .f32("tau1", tau1)
            .i32("stride_scores_b", T)
            .run({b, static_cast<unsigned>(segs), 1}, S.stream, kPrefillPdl);
        Launch(pSweepEnter_)
            .ptr("scores_ptr", S.scores.get())
            .ptr("prio0_ptr", prio0)
            .ptr("top_ptr", S.top.get())
            .ptr("enter_ptr", S.enter.get())
            .ptr("seg_count_ptr", S.segCount.get())
            .i32("T", T)
            .i32("K", K)
            .i32("n_seg", segs)
            .f32("tau1", tau1)
            .i32("stride_scores_b", T)
            .run({b, cdiv(T, pSweepEnter_.at("BLOCK_T")), 1}, S.stream, kPrefillPdl);
        Launch(pSweepCompact_)
            .ptr("enter_ptr", S.enter.get())
            .ptr("seg_count_ptr", S.segCount.get())
            .ptr("ev_tok_ptr", S.evTok.get())
            .ptr("ev_a_ptr", S.evA.get())
            .ptr("ecount_ptr", S.ecount.get())
            .ptr("ends_ptr", ends)
            .i32("T", T)
            .i32("K", K)
            .i32("n_seg", segs)
            .run({b, static_cast<unsigned>(segs), 1}, S.stream, kPrefillPdl);
        Launch(pSweepReplay_)
            .ptr("seg_count_ptr", S.segCount.get())
            .ptr("prio0_ptr", prio0)
            .ptr("ev_tok_ptr", S.evTok.get())
            .ptr("ev_a_ptr", S.evA.get())
            .ptr("ecount_ptr", S.ecount.get())
            .ptr("hist_ptr", S.hist.get())
            .ptr("prio_ptr", prioOut)
            .ptr("ends_ptr", ends)
            .i32("T", T)
            .i32("K", K)
            .i32("n_seg", segs)
            .run({b, 1, 1}, S.stream, kPrefillPdl);
        Launch(pSweepFill_)
            .ptr("ecount_ptr", S.ecount.get())
            .ptr("hist_ptr", S.hist.get())
            .ptr("index_ptr", index)
            .ptr("ends_ptr", ends)
            .i32("T", T)
            .i32("K", K)
            .run({b, cdiv(T + 1, pSweepFill_.at("BLOCK_T")), 1}, S.stream, kPrefillPdl);
    }

    //! fp16: layer l's reads as the Python prefill does them (memory.fused_memory_read): each read's queries through
    //! W_k per head (q'_h = W_k,hᵀ q_h), pool.pool_mix on the summaries themselves (the §5 read over its group's
    //! banks where they lie), then ũ = u + Σ_reads W_v m per head, added onto u by the GEMMs.
    void mixReads(int64_t l, int T)
    {
        PrefillSide& S = sides_[side_];
        int64_t const B = opt_.batch, d = c_.d_model, K = c_.pool_size, ds = c_.summary_dim, H = c_.memory_heads;
        int64_t const hd = d / 4, P = c_.cross_layer_every, M = K + T, n = B * T, dh = ds / H, dv = d / H;
        int64_t const Hq = qkWidth(), Wq = 2 * Hq;
        size_t const a = actElem_;
        cudaDataType_t const t = ltType(w_->dtype);
        LayerWeights const& W = w_->layers[l];
        int const heads = static_cast<int>(H);
        // q' for every row of g (its pool rows too: one row stride) into read r's columns of qk [B·M, Wq]
        auto project = [&](int r, int64_t qColumn, void const* kT) {
            gemm(ds, B * M, dh, kT, at(S.g[l % P].get(), qColumn * a), W.memRows, at(S.qk.get(), r * Hq * a), Wq, t,
                {heads, dh, ds, ds * dh});
        };
        auto mix = [&](Kernel const& k, int r, int64_t pools, void const* gain, int64_t gainStride) {
            Launch L(k);
            for (int64_t j = 0; j < pools; ++j) // the group's layers in order, this one last
            {
                int64_t const m = l - pools + 1 + j, mRows = w_->layers[m].memRows;
                std::string const J = "_" + std::to_string(j);
                L.ptr("banks" + J, at(S.g[m % P].get(), (ds + hd) * a))
                    .ptr("indices" + J, S.idx[m % P].get())
                    .ptr("ends" + J, S.ends[m % P].get())
                    .i32("strides_s_b" + J, M * mRows)
                    .i32("strides_s_m" + J, mRows)
                    .i32("strides_i_b" + J, (T + 1) * K)
                    .i32("strides_i_t" + J, K)
                    .i32("strides_e_b" + J, M);
            }
            L.ptr("q_ptr", at(S.qk.get(), (K * Wq + r * Hq) * a))
                .ptr("gain_ptr", gain)
                .ptr("m_ptr", at(S.m.get(), r * Hq * a))
                .i32("T", T)
                .i32("K", K)
                .i32("ds", ds)
                .i32("H", H)
                .f32("scale", 1.0 / std::sqrt(static_cast<double>(dh)))
                .i32("stride_q_b", M * Wq)
                .i32("stride_q_t", Wq)
                .i32("stride_g_b", T * gainStride)
                .i32("stride_g_t", gainStride)
                .i32("stride_m_b", T * Wq)
                .i32("stride_m_t", Wq)
                .run({static_cast<unsigned>(B), cdiv(T, k.at("BLOCK_Q")), cdiv(H, k.at("BLOCK_H"))}, S.stream, kPrefillPdl);
        };
        // o_h = W_v,h m_h per head, added to C: u for the first read, ũ for the second
        auto out = [&](int r, void const* wv, void const* c) {
            gemm(dv, n, ds, wv, at(S.m.get(), r * Hq * a), Wq, S.ut.get(), d, t, {heads, ds, dv, dv * ds, c});
        };
        project(0, 0, W.kT);
        mix(pMix_, 0, 1, S.gain.get(), 1);
        out(0, W.wv, S.u.get());
        if (c_.isCrossLayer(l))
        {
            project(1, 2 * ds + hd + 1, W.xkT);
            mix(pMixCross_, 1, P, W.xalpha32, 0);
            out(1, W.xwv, S.ut.get());
        }
    }

    //! fp32 (pool_mix's dots are half-precision ones): layer l's reads through the plugins' sparse pool attention,
    //! on keys and values projected from the banks.
    void attendReads(int64_t l, int T)
    {
        PrefillSide& S = sides_[side_];
        int64_t const B = opt_.batch, d = c_.d_model, K = c_.pool_size, ds = c_.summary_dim, H = c_.memory_heads;
        int64_t const hd = d / 4, P = c_.cross_layer_every, M = K + T, n = B * T;
        size_t const a = actElem_;
        cudaDataType_t const t = ltType(w_->dtype);
        LayerWeights const& W = w_->layers[l];
        int64_t const rows = W.memRows, colSummary = ds + hd, colTrig = 2 * ds + hd;
        void* g = S.g[l % P].get();
        void* idx = S.idx[l % P].get();
        // §4: the token read over this layer's bank [pool0; summaries]
        void* bank = at(g, colSummary * a);
        gemm(ds, B * M, ds, W.wk, bank, rows, S.keys.get(), ds, t);
        gemm(d, B * M, ds, W.wv, bank, rows, S.vals.get(), d, t);
        // a read: queries (a column block of g's token rows) over keys / vals [B, entries, ...] -> o
        auto attend = [&](size_t qColumn, int64_t entries, int64_t slots, void const* index, int64_t indexStrideB) {
            plugin::AttentionSizes as{static_cast<int32_t>(B), T, static_cast<int32_t>(entries),
                static_cast<int32_t>(slots), static_cast<int32_t>(ds), static_cast<int32_t>(d),
                static_cast<int32_t>(H)};
            as.qStrideT = static_cast<int32_t>(rows);
            as.qStrideB = static_cast<int32_t>(M * rows);
            as.indexStrideB = static_cast<int32_t>(indexStrideB);
            check(plugin::poolAttentionLaunch(at(g, (K * rows + qColumn) * a), S.keys.get(), S.vals.get(), index,
                S.o.get(), as, false, S.stream));
        };
        attend(0, M, K, idx, (T + 1) * K);
        gainedAdd(S.u.get(), S.gain.get(), 1, n);
        if (!c_.isCrossLayer(l))
            return;
        // §5: the group's banks joined ([B, P·M, ds] keys and [B, P·M, d] values), their indices shifted
        for (int64_t j = 0; j < P; ++j)
        {
            int64_t const m = l - P + 1 + j, mRows = w_->layers[m].memRows;
            void* mBank = at(S.g[m % P].get(), colSummary * a);
            gemm(ds, M, ds, W.xwk, mBank, mRows, at(S.keys.get(), j * M * ds * a), ds, t,
                {int(B), M * mRows, P * M * ds});
            gemm(d, M, ds, W.xwv, mBank, mRows, at(S.vals.get(), j * M * d * a), d, t, {int(B), M * mRows, P * M * d});
            Launch(pCross_)
                .ptr("index_ptr", S.idx[m % P].get())
                .ptr("out_ptr", S.idxX.get())
                .i32("T", T)
                .i32("K", K)
                .i32("width", P * K)
                .i32("col0", j * K)
                .i32("shift", j * M)
                .run({static_cast<unsigned>(n), 1, 1}, S.stream, kPrefillPdl);
        }
        attend(colTrig + 1, P * M, P * K, S.idxX.get(), T * P * K);
        gainedAdd(S.ut.get(), W.xalpha32, 0, n);
    }

    //! One of the prefill's products (GemmPlans), in the model dtype unless dType says otherwise; batched, strided
    //! or added to a C as `g` says.
    void gemm(int64_t m, int64_t n, int64_t k, void const* w, void const* x, int64_t ldx, void* d, int64_t ldd,
        cudaDataType_t dType, GemmBatch const& g = {})
    {
        PrefillSide const& S = sides_[side_];
        plans_.run(lt_, S.workspace.get() ? S.workspace.get() : workspace_.get(), S.stream, m, n, k, ltType(w_->dtype), dType,
            w, x, ldx, d, ldd, g);
    }

    //! ũ = res + round(o · gain) into ut (gained_read): gain fp32 per row (stride 1) or one for all (stride 0).
    void gainedAdd(void const* res, void const* gain, int strideGain, int64_t rows)
    {
        PrefillSide& S = sides_[side_];
        Launch(pGained_)
            .ptr("res_ptr", res)
            .ptr("o_ptr", S.o.get())
            .ptr("gain_ptr", gain)
            .ptr("out_ptr", S.ut.get())
            .i32("d", c_.d_model)
            .i32("stride_gain", strideGain)
            .run({static_cast<unsigned>(rows), 1, 1}, S.stream, kPrefillPdl);
    }

    std::vector<Kernel const*> usedKernels() const
    {
        std::vector<Kernel const*> out;
        for (Kernel const* k : {&norm_, &normRes_, &pool_, &poolCross_, &conv_, &scan_, &sample_, &fNormProjEmbed_,
                 &fNormProj_, &fInConv_, &fSsmOut_, &pNorm_, &pConv_, &pScores_, &pAfter_, &pGained_, &pCross_, &pScanStates_,
                 &pScanPrefix_, &pScanOut_, &pSweepTop_, &pSweepEnter_, &pSweepCompact_, &pSweepReplay_, &pSweepFill_,
                 &pMix_, &pMixCross_})
            if (k->image)
                out.push_back(k);
        return out;
    }

    StateTensorInfo info(std::string const& name) const
    {
        for (auto const& i : stateInfo())
            if (i.name == name)
                return i;
        throw Error("no state tensor '" + name + "'" + (c_.memory ? "" : " (the model has memory=false)")
            + "; the state has conv, ssm" + (c_.memory ? ", pool, prio" : ""));
    }

    void* state(std::string const& name, int parity) const
    {
        info(name);
        if (name == "conv")
            return conv[parity].get();
        if (name == "ssm")
            return ssm[parity].get();
        if (name == "pool")
            return pool[parity].get();
        return prio[parity].get();
    }

    void allocate()
    {
        int64_t B = opt_.batch, d = c_.d_model, di = c_.dInner(), L = c_.n_layers;
        int64_t X = xWidth(c_);
        for (int p = 0; p < 2; ++p)
        {
            for (auto const& i : stateInfo())
                (i.name == "conv" ? conv[p] : i.name == "ssm" ? ssm[p] : i.name == "pool" ? pool[p] : prio[p])
                    = DeviceBuffer(i.bytes());
            tok_[p] = DeviceBuffer(B * 8);
            logits_[p] = DeviceBuffer(B * c_.vocab_size * actElem_);
            h_[p] = DeviceBuffer(B * d * 4);
        }
        u_ = DeviceBuffer(B * d * actElem_);
        ut_ = DeviceBuffer(B * d * actElem_);
        mem_ = DeviceBuffer(std::max<int64_t>(1, B * w_->memRows) * actElem_);
        xz_ = DeviceBuffer(B * 2 * di * actElem_);
        xc_ = DeviceBuffer(B * di * actElem_);
        dbc_ = DeviceBuffer(B * X * actElem_);
        dt_ = DeviceBuffer(B * di * actElem_);
        y_ = DeviceBuffer(B * di * actElem_);
        out_ = DeviceBuffer(B * d * 4);
        if (fused_)
            z_ = DeviceBuffer(B * di * actElem_);
        acc_ = DeviceBuffer(L * B * (X + d) * 4);
        workspace_ = DeviceBuffer(kLtWorkspace);
        rng_ = DeviceBuffer(16);
        params_ = DeviceBuffer(16);
        for (DeviceBuffer* b : {&tok_[0], &tok_[1], &logits_[0], &logits_[1], &rng_}) // token 0, no garbage ids
            MM_CUDA(cudaMemsetAsync(b->get(), 0, b->bytes(), stream_));
        for (auto const& i : stateInfo())
            if (i.name == "prio")
                prioInit_.assign(i.bytes() / 4, -1.f); // State.zeros: every slot empty
        MM_CUDA(cudaMallocHost(reinterpret_cast<void**>(&pinned_), 2 * B * sizeof(int64_t)));
    }

    void resetState()
    {
        for (int p = 0; p < 2; ++p)
        {
            for (auto const& i : stateInfo())
            {
                void* dst = state(i.name, p);
                if (i.name == "prio")
                    MM_CUDA(cudaMemcpyAsync(dst, prioInit_.data(), i.bytes(), cudaMemcpyHostToDevice, stream_));
                else
                    MM_CUDA(cudaMemsetAsync(dst, 0, i.bytes(), stream_));
            }
        }
        hasLogits_ = false;
        canUndo_ = false;
    }

    void planGemms()
    {
        int64_t B = opt_.batch, d = c_.d_model, di = c_.dInner(), X = xWidth(c_);
        cudaDataType_t t = ltType(w_->dtype);
        void* in = c_.memory ? ut_.get() : u_.get();
        for (auto const& L : w_->layers)
        {
            if (fused_)
                break; // the fused plan's projections are inside its kernels; only the LM head is a GEMM
            LayerGemms g;
            if (c_.memory)
                g.mem = Linear(lt_, L.memRows, B, d, t, t, L.memW, u_.get(), d, mem_.get(), L.memRows, L.memBias);
            g.in = Linear(lt_, 2 * di, B, d, t, t, L.inW, in, d, xz_.get(), 2 * di, nullptr);
            g.x = Linear(lt_, X, B, di, t, t, L.xW, xc_.get(), di, dbc_.get(), X, nullptr);
            g.dt = Linear(lt_, di, B, c_.dt_rank, t, t, L.dtW, dbc_.get(), X, dt_.get(), di, nullptr);
            g.out = Linear(lt_, d, B, di, t, CUDA_R_32F, L.outW, y_.get(), di, out_.get(), d, nullptr);
            gemms_.push_back(std::move(g));
        }
        for (int p = 0; p < 2; ++p)
            head_[p] = Linear(lt_, c_.vocab_size, B, d, t, t, w_->emb, u_.get(), d, logits_[p].get(), c_.vocab_size,
                nullptr);
    }

    void capture()
    {
        for (int p = 0; p < 2; ++p)
            for (int head = 0; head < 2; ++head)
            {
                cudaGraph_t g{};
                MM_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
                stepPdl_ = fused_;
                try
                {
                    enqueueStep(p, head == 1);
                    stepPdl_ = false;
                }
                catch (...)
                {
                    stepPdl_ = false;
                    cudaStreamEndCapture(stream_, &g);
                    if (g)
                        cudaGraphDestroy(g);
                    throw;
                }
                MM_CUDA(cudaStreamEndCapture(stream_, &g));
                cudaError_t e = cudaGraphInstantiate(&graphs_[p][head], g, 0);
                cudaGraphDestroy(g);
                MM_CUDA(e);
            }
    }

    //! Feed tok_[cur_] from state cur_ into state 1-cur_ (+ logits and the next token when withHead).
    void runStep(bool withHead)
    {
        if (opt_.cudaGraph)
            MM_CUDA(cudaGraphLaunch(graphs_[cur_][withHead ? 1 : 0], stream_));
        else
            enqueueStep(cur_, withHead);
        cur_ ^= 1;
        canUndo_ = true;
        hasLogits_ = withHead;
    }

    void enqueueSample(int p)
    {
        Launch(sample_)
            .ptr("logits_ptr", logits_[p].get())
            .ptr("params_ptr", params_.get())
            .ptr("rng_ptr", rng_.get())
            .ptr("token_ptr", tok_[p].get())
            .i32("V", c_.vocab_size)
            .i32("stride_row", c_.vocab_size)
            .i32("n_rows", opt_.batch)
            .run({static_cast<unsigned>(opt_.batch), 1, 1}, stream_, stepPdl_);
    }

    void enqueueNorm(Kernel const& k, int64_t l, void* normW, int tokParity)
    {
        int64_t B = opt_.batch, d = c_.d_model;
        // layer l writes h_[l % 2] and reads h_[(l + 1) % 2] (the residual after layer l-1); no projection here
        Launch(k)
            .ptr("tok_ptr", tok_[tokParity].get())
            .ptr("emb_ptr", w_->emb)
            .ptr("h_prev_ptr", h_[(l + 1) % 2].get())
            .ptr("part_ptr", out_.get())
            .ptr("h_ptr", h_[l % 2].get())
            .ptr("u_ptr", u_.get())
            .ptr("norm_w_ptr", normW)
            .ptr("w_ptr", normW)
            .ptr("bias_ptr", out_.get())
            .ptr("out_ptr", u_.get())
            .ptr("zx_ptr", xAcc(0))
            .ptr("zo_ptr", oAcc(0))
            .i32("d", d)
            .i32("R", 0)
            .i32("P", 1)
            .i32("X", xWidth(c_))
            .f32("eps", c_.norm_eps)
            .i32("stride_emb", d)
            .run({1, static_cast<unsigned>(B), 1}, stream_, stepPdl_);
    }

    //! §3-§5 for layer l: reads the pools of parity p, writes ũ and this layer's pool/prio at parity 1-p.
    void enqueueNotePool(int p, int64_t l)
    {
        int const q = 1 - p;
        int64_t const B = opt_.batch, d = c_.d_model, K = c_.pool_size, ds = c_.summary_dim, H = c_.memory_heads;
        size_t poolLayer = B * K * ds * actElem_, prioLayer = B * K * 4;
        LayerWeights const& W = w_->layers[l];
        bool cross = c_.isCrossLayer(l);
        int64_t first = cross ? l - c_.cross_layer_every + 1 : l;
        auto* poolIn = static_cast<unsigned char*>(pool[p].get());
        auto* prioIn = static_cast<unsigned char*>(prio[p].get());
        Kernel const& k = cross ? poolCross_ : pool_;
        unsigned oblocks = cdiv(d / H, k.at("BLOCK_O"));
        Launch(k)
            .ptr("u_ptr", u_.get())
            .ptr("mem_ptr", mem_.get())
            .ptr("pool_ptr", poolIn + l * poolLayer)
            .ptr("prio_ptr", prioIn + l * prioLayer)
            .ptr("group_pool_ptr", poolIn + first * poolLayer)
            .ptr("group_prio_ptr", prioIn + first * prioLayer)
            .ptr("pool_out_ptr", static_cast<unsigned char*>(pool[q].get()) + l * poolLayer)
            .ptr("prio_out_ptr", static_cast<unsigned char*>(prio[q].get()) + l * prioLayer)
            .ptr("ut_ptr", ut_.get())
            .ptr("wk_ptr", W.wk)
            .ptr("wv_ptr", W.wv)
            .ptr("alpha_ptr", W.alpha)
            .ptr("x_wk_ptr", W.xwk)
            .ptr("x_wv_ptr", W.xwv)
            .ptr("x_alpha_ptr", W.xalpha)
            .ptr("w_score_ptr", W.wScore)
            .i32("d", d)
            .i32("K", K)
            .i32("ds", ds)
            .i32("dh", ds / H)
            .i32("dv", d / H)
            .i32("d4", d / 4)
            .i32("R_mem", W.memRows)
            .i32("n_oblocks", oblocks)
            .i32("stride_pool_l", B * K * ds)
            .i32("stride_prio_l", B * K)
            .f32("tau1", static_cast<float>(c_.insert_threshold))
            .f32("tau2", static_cast<float>(c_.read_threshold))
            .f32("scale", 1.0 / std::sqrt(static_cast<double>(ds / H)))
            .run({static_cast<unsigned>(H) * oblocks, static_cast<unsigned>(B), 1}, stream_, stepPdl_);
    }

    //! Layer l's x_proj and out_proj sums in acc_ (fp32 [B,X] and [B,d]).
    void* xAcc(int64_t l) const
    {
        return static_cast<unsigned char*>(acc_.get()) + l * opt_.batch * xWidth(c_) * 4;
    }
    void* oAcc(int64_t l) const
    {
        return static_cast<unsigned char*>(acc_.get()) + (c_.n_layers * xWidth(c_) + l * c_.d_model) * opt_.batch * 4;
    }

    //! The fused plan: per layer decode.py's norm_proj, note_pool, in_proj_conv and ssm_out (TritonBackend's
    //! sequence); the x_proj / out_proj shares meet in layer l's sums (acc_), which its norm_proj zeroes.
    void enqueueFusedStep(int p, bool withHead)
    {
        int const q = 1 - p;
        int64_t const B = opt_.batch, d = c_.d_model, di = c_.dInner(), N = c_.d_state, R = c_.dt_rank;
        int64_t const X = R + 2 * N, KW = c_.d_conv;
        auto* convIn = static_cast<unsigned char*>(conv[p].get());
        auto* convOut = static_cast<unsigned char*>(conv[q].get());
        auto* ssmIn = static_cast<unsigned char*>(ssm[p].get());
        auto* ssmOut = static_cast<unsigned char*>(ssm[q].get());
        size_t convLayer = B * di * (KW - 1) * actElem_, ssmLayer = B * di * N * 4;
        auto norm = [&](Kernel const& k, int64_t l, void* normW, LayerWeights const* W) {
            bool proj = W != nullptr;
            int64_t rows = proj ? W->memRows : 0;
            Launch(k)
                .ptr("tok_ptr", tok_[p].get())
                .ptr("emb_ptr", w_->emb)
                .ptr("h_prev_ptr", h_[(l + 1) % 2].get())
                .ptr("part_ptr", oAcc(l == 0 ? 0 : l - 1))
                .ptr("h_ptr", h_[l % 2].get())
                .ptr("u_ptr", u_.get())
                .ptr("norm_w_ptr", normW)
                .ptr("w_ptr", proj ? W->memW : normW)
                .ptr("bias_ptr", proj ? W->memBias32 : oAcc(0))
                .ptr("out_ptr", proj ? mem_.get() : u_.get())
                .ptr("zx_ptr", xAcc(l % c_.n_layers))
                .ptr("zo_ptr", oAcc(l % c_.n_layers))
                .i32("d", d)
                .i32("R", rows)
                .i32("P", l == 0 ? 0 : 1)
                .i32("X", X)
                .f32("eps", c_.norm_eps)
                .i32("stride_emb", d)
                .run({proj ? cdiv(rows, k.at("BLOCK_R")) : 1u, static_cast<unsigned>(B), 1}, stream_, stepPdl_);
        };
        for (int64_t l = 0; l < c_.n_layers; ++l)
        {
            LayerWeights const& W = w_->layers[l];
            if (c_.memory)
            {
                norm(l == 0 ? fNormProjEmbed_ : fNormProj_, l, W.norm, &W);
                enqueueNotePool(p, l);
            }
            else
            {
                norm(l == 0 ? norm_ : normRes_, l, W.norm, nullptr);
            }
            Launch(fInConv_)
                .ptr("ut_ptr", c_.memory ? ut_.get() : u_.get())
                .ptr("w_in_ptr", W.inW)
                .ptr("conv_w_ptr", W.convW)
                .ptr("conv_b_ptr", W.convB)
                .ptr("win_in_ptr", convIn + l * convLayer)
                .ptr("win_out_ptr", convOut + l * convLayer)
                .ptr("w_xT_ptr", W.xWT)
                .ptr("xc_ptr", xc_.get())
                .ptr("z_ptr", z_.get())
                .ptr("xacc_ptr", xAcc(l))
                .i32("d", d)
                .i32("Di", di)
                .i32("KW", KW)
                .i32("X", X)
                .run({static_cast<unsigned>(nC_), static_cast<unsigned>(B), 1}, stream_, stepPdl_);
            Launch(fSsmOut_)
                .ptr("xc_ptr", xc_.get())
                .ptr("z_ptr", z_.get())
                .ptr("xacc_ptr", xAcc(l))
                .ptr("w_dt_ptr", W.dtW)
                .ptr("dt_bias_ptr", W.dtBiasAct)
                .ptr("A_ptr", W.A)
                .ptr("D_ptr", W.DAct)
                .ptr("h_in_ptr", ssmIn + l * ssmLayer)
                .ptr("h_out_ptr", ssmOut + l * ssmLayer)
                .ptr("w_outT_ptr", W.outWT)
                .ptr("oacc_ptr", oAcc(l))
                .i32("d", d)
                .i32("Di", di)
                .i32("N", N)
                .i32("R", R)
                .i32("X", X)
                .run({static_cast<unsigned>(nD_), static_cast<unsigned>(B), 1}, stream_, stepPdl_);
        }
        if (!withHead)
            return;
        norm(normRes_, c_.n_layers, w_->normF, nullptr);
        head_[q].run(lt_, workspace_.get(), stream_);
        enqueueSample(q);
    }

    void enqueueStep(int p, bool withHead)
    {
        if (fused_)
            return enqueueFusedStep(p, withHead);
        int const q = 1 - p;
        int64_t const B = opt_.batch, di = c_.dInner(), N = c_.d_state, R = c_.dt_rank;
        int64_t const X = xWidth(c_), KW = c_.d_conv;
        auto* convIn = static_cast<unsigned char*>(conv[p].get());
        auto* convOut = static_cast<unsigned char*>(conv[q].get());
        auto* ssmIn = static_cast<unsigned char*>(ssm[p].get());
        auto* ssmOut = static_cast<unsigned char*>(ssm[q].get());
        size_t convLayer = B * di * (KW - 1) * actElem_, ssmLayer = B * di * N * 4;
        for (int64_t l = 0; l < c_.n_layers; ++l)
        {
            LayerWeights const& W = w_->layers[l];
            LayerGemms const& G = gemms_[l];
            enqueueNorm(l == 0 ? norm_ : normRes_, l, W.norm, p);
            if (c_.memory)
            {
                G.mem.run(lt_, workspace_.get(), stream_);
                enqueueNotePool(p, l);
            }
            G.in.run(lt_, workspace_.get(), stream_);
            Launch(conv_)
                .ptr("x_ptr", xz_.get())
                .ptr("w_ptr", W.convW)
                .ptr("bias_ptr", W.convB)
                .ptr("win_in_ptr", convIn + l * convLayer)
                .ptr("win_out_ptr", convOut + l * convLayer)
                .ptr("out_ptr", xc_.get())
                .i32("Di", di)
                .i32("KW", KW)
                .i32("stride_x_b", 2 * di)
                .run({cdiv(di, conv_.at("BLOCK_C")), static_cast<unsigned>(B), 1}, stream_, stepPdl_);
            G.x.run(lt_, workspace_.get(), stream_);
            G.dt.run(lt_, workspace_.get(), stream_);
            auto* dbc = static_cast<unsigned char*>(dbc_.get());
            Launch(scan_)
                .ptr("x_ptr", xc_.get())
                .ptr("dt_ptr", dt_.get())
                .ptr("A_ptr", W.A)
                .ptr("B_ptr", dbc + R * actElem_)
                .ptr("C_ptr", dbc + (R + N) * actElem_)
                .ptr("D_ptr", W.D)
                .ptr("z_ptr", static_cast<unsigned char*>(xz_.get()) + di * actElem_)
                .ptr("dt_bias_ptr", W.dtBias)
                .ptr("h_in_ptr", ssmIn + l * ssmLayer)
                .ptr("y_ptr", y_.get())
                .ptr("h_out_ptr", ssmOut + l * ssmLayer)
                .i32("Di", di)
                .i32("N", N)
                .i32("dt_softplus", 1)
                .i32("stride_x_b", di)
                .i32("stride_dt_b", di)
                .i32("stride_B_b", X)
                .i32("stride_C_b", X)
                .i32("stride_z_b", 2 * di)
                .i32("stride_y_b", di)
                .i32("stride_h_b", di * N)
                .run({static_cast<unsigned>(B), cdiv(di, scan_.at("BLOCK_D")), 1}, stream_, stepPdl_);
            G.out.run(lt_, workspace_.get(), stream_);
        }
        if (!withHead)
            return;
        enqueueNorm(normRes_, c_.n_layers, w_->normF, p);
        head_[q].run(lt_, workspace_.get(), stream_);
        enqueueSample(q);
    }
};

} // namespace

std::unique_ptr<Backend> openNative(std::string const& checkpoint, SessionOptions const& options)
{
    Checkpoint ck(checkpoint); // a bad checkpoint is reported as such, GPU or not
    requireDevice(options.device, "the native backend");
    auto weights = loadWeights(ck, options.dtype, options.device, options.plan == "fused");
    return std::make_unique<NativeBackend>(std::move(weights), options);
}

} // namespace memmamba::detail
