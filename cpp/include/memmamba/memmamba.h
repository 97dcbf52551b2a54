// memmamba C++ runtime: generate with a MemMamba model on an NVIDIA GPU, from C++.
//
//   auto session = memmamba::Session::open("memmamba_deploy/assets/demo-memmamba", {});  // a checkpoint folder
//   session->prefill(prompt.data(), prompt.size());             // batch 1: T = the prompt's size
//   session->generate(64, {0.8f, 40, 0.95f}, [](int, int32_t const* tok) { putchar(tok[0]); return true; });
//
// Two backends behind this one interface (SessionOptions::backend):
//   "native"    loads the checkpoint itself and runs the decode step with cuBLAS (projections) and the Triton
//               kernels of models/ops/triton compiled ahead of time, the whole step captured in a CUDA graph.
//   "tensorrt"  runs the engines `memdeploy build` wrote into an export directory, with the plugin library.
// Every failure (bad file, bad shape, no GPU, no TensorRT) is a memmamba::Error with a message; nothing aborts.
// The model is defined in docs/memmamba-spec.md; MemMambaLM.step (models/memmamba.py) is what `step` reproduces.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

// What the library exports: this header's API and nothing else (it is built with hidden visibility).
#if defined(__GNUC__)
#define MEMMAMBA_API __attribute__((visibility("default")))
#else
#define MEMMAMBA_API
#endif

namespace memmamba
{

class MEMMAMBA_API Error : public std::runtime_error
{
public:
    using std::runtime_error::runtime_error;
};

//! MemMambaConfig (models/config.py): the same keys, defaults and validation.
struct MEMMAMBA_API Config
{
    int64_t vocab_size{256};
    int64_t d_model{64};
    int64_t n_layers{4};
    int64_t d_state{8};
    int64_t expand{2};
    int64_t d_conv{4};
    int64_t dt_rank{0}; //!< 0 in the file means ceil(d_model / 16); always resolved after parsing
    double norm_eps{1e-5};
    bool memory{true};
    int64_t pool_size{8};
    int64_t summary_dim{16};
    int64_t memory_heads{2};
    int64_t cross_layer_every{2};
    double insert_threshold{0.5};
    double read_threshold{0.3};
    std::string architecture{"memmamba"};

    int64_t dInner() const { return expand * d_model; }
    //! §5: layers l (from 0) with (l+1) % p == 0 read the pools of layers l-p+1..l.
    bool isCrossLayer(int64_t layer) const { return memory && (layer + 1) % cross_layer_every == 0; }

    //! Parse config.json text: unknown keys, wrong types and invalid values are errors naming the key.
    static Config fromJson(std::string const& text);
    static Config load(std::string const& path); //!< fromJson of a file; errors name the file
    void validate() const;                       //!< throws Error like MemMambaConfig.validate
};

enum class DType
{
    kFloat32,
    kFloat16
};
MEMMAMBA_API char const* dtypeName(DType dtype); //!< "fp32" / "fp16"

//! Token sampling, done on the GPU. temperature 0: greedy (argmax, lowest id on ties).
struct MEMMAMBA_API SamplingParams
{
    float temperature{0.f};
    int32_t topK{0};   //!< 0: off
    float topP{1.f};   //!< 1: off
    void validate() const;
};

struct MEMMAMBA_API SessionOptions
{
    std::string backend{"native"}; //!< "native" or "tensorrt"
    DType dtype{DType::kFloat16};  //!< native: weights and activations (the SSM state is fp32 always);
                                   //!< tensorrt: the engines' dtype, whatever is asked (options() reports it)
    int batch{1};
    int device{0};
    bool cudaGraph{true};          //!< native: capture the decode step in a CUDA graph
    //! native: "cublas" (projections with cuBLASLt, the model's other kernels between them: 9 launches per layer;
    //! bit-for-bit reproducible) or "fused" (models/ops/triton/decode.py's four launches per layer, projections
    //! inside the Triton kernels, as the Python fast path: 0.38 vs 0.88 ms/token for 130m fp16 on an H100, but its
    //! partial sums meet in fp32 atomics, so two runs agree within rounding, not bit for bit); the same math
    std::string plan{"cublas"};
    uint64_t seed{0};              //!< the sampling stream's seed (see Session::reseed)
    std::string pluginLibrary;     //!< tensorrt: overrides the library recorded in manifest.json
    //! native: rows (batch x tokens, at least one token a row) of one parallel prefill chunk, at most 65535. The
    //! session's prefill buffers fit its longest prompt so far (rounded up to a power of two tokens, at least 256),
    //! at most a chunk, and stay until it closes: about 36 KB a row for 130m in fp16, 290 MB at the default (a
    //! fork has its own). A prompt longer than a chunk runs two chunks at once, on two streams, with a second set
    //! (580 MB at the default). 0: no parallel prefill, prompts go token by token through the decode graph (no
    //! buffers, ~1,100 tokens/s on an H100).
    int prefillRows{8192};
};

//! One tensor of the recurrent state, in MemMambaLM's State layout (models/memmamba.py).
struct MEMMAMBA_API StateTensorInfo
{
    std::string name;          //!< "conv", "ssm", "pool", "prio"
    std::vector<int64_t> shape; //!< e.g. conv [L, B, d_inner, d_conv-1]
    DType dtype;               //!< conv/pool: the model dtype; ssm/prio: fp32
    size_t bytes() const;
};

namespace detail
{
class Backend;
}

//! A model instance with its own recurrent state, CUDA stream (and, for the parallel prefill, a second one that
//! rejoins the first before prefill returns) and buffers. Not thread-safe: one thread at a time
//! per session (fork() gives independent sessions that share the weights).
class MEMMAMBA_API Session
{
public:
    //! `path`: a checkpoint directory (native) or an export directory with engines (tensorrt).
    static std::unique_ptr<Session> open(std::string const& path, SessionOptions const& options = {});
    ~Session();
    Session(Session const&) = delete;
    Session& operator=(Session const&) = delete;

    Config const& config() const;
    SessionOptions const& options() const;
    int batch() const;
    std::string describe() const; //!< backend, device, dtype, weights, graph

    //! Feed `tokens` [batch, T] (row-major, T >= 1) from the current state; afterwards logits() are those of
    //! the last token. The native backend runs them in the parallel form (spec §8, chunks of
    //! SessionOptions::prefillRows); the result equals feeding them one by one within rounding (the pools may hold
    //! the same entries in other slots where priorities tie exactly).
    //! After generate(), its last tokens are fed first (see generate).
    void prefill(int32_t const* tokens, int T);
    //! Rows of their own lengths in one call (prompts of different lengths as one batch): row b feeds
    //! tokens[b*T, b*T + lengths[b]), 1 <= lengths[b] <= T; the rest of its T ids is padding (any ids in the
    //! vocabulary), which changes no state (columns past every row's end are not run at all). As with the other
    //! overload, generate()'s pending tokens are fed first, each row's own. Afterwards each row's logits are those
    //! after its own last token, and each row's state is what prefilling its tokens alone gives (within
    //! rounding). The native backend runs it in the
    //! parallel form; the tensorrt backend, and a native session whose prefill runs token by token, take rows of
    //! one length only (prefill each prompt in a sibling(1) and copyRow it instead).
    void prefill(int32_t const* tokens, int T, int32_t const* lengths);
    //! Feed one token per row, tokens [batch] (after generate()'s last tokens, if pending).
    void step(int32_t const* tokens);
    //! Logits after the last token consumed, [batch, vocab] fp32 (copied to the host). After generate(), that is
    //! the token before the last one it returned (the one the last token was drawn from).
    std::vector<float> logits() const;
    void logits(float* out) const;
    //! Draw one token per row from the current logits on the GPU. The state does not change, except that
    //! generate()'s pending last tokens are fed first, so the draw continues the generated text.
    std::vector<int32_t> sample(SamplingParams const& params);

    //! Sample a token from the current logits, feed it, and repeat: up to maxNewTokens (>= 1) tokens per row. `onToken`
    //! gets (index, tokens[batch]) for each new token and may return false to stop; generation also stops once
    //! every row has produced a token in `stop`. Needs a prefill (or step) first. Like the Python `Session`, the
    //! session follows the stream: the last tokens returned are pending, consumed (fed) by the next prefill,
    //! step, sample or generate, so continuing costs nothing extra and stopping wastes no step; until then
    //! logits() and the state are those after the tokens before them. reset() and writeState() drop them,
    //! fork() copies them. If `onToken` throws, the exception propagates and the tokens returned until then
    //! count as generated (the last of them pending). Returns the tokens, row by row.
    using TokenCallback = std::function<bool(int index, int32_t const* tokens)>;
    std::vector<std::vector<int32_t>> generate(int maxNewTokens, SamplingParams const& params,
        TokenCallback const& onToken = {}, std::vector<int32_t> const& stop = {});

    void reset();                   //!< the empty state (State.zeros); no logits until the next token (the
                                    //!< sampling stream goes on: reseed restarts it)
    //! Restart the sampling stream: (seed, step 0). The stream takes one step per sampled token handed out by
    //! sample() or generate() (all rows at once; greedy tokens take none), and only then, so generate(8) draws what generate(4) twice does, and the same
    //! seed, prompt and calls give the same tokens. (Python's Session draws with torch's generator instead: the
    //! two runtimes agree on greedy tokens, not on sampled ones.)
    void reseed(uint64_t seed);
    //! Same weights, a copy of the state, logits, sampling stream and pending tokens. A fork is a session of its
    //! own: its buffers, stream, cuBLASLt handle and captured CUDA graphs are made anew (milliseconds, like open()
    //! without loading weights), so fork a conversation, not every candidate token; to go back a step cheaply
    //! keep a state with readState()/writeState() or saveState().
    std::unique_ptr<Session> fork() const;
    //! A new session on this one's weights and options but with `batch` rows, in the empty state (nothing loaded
    //! again; its buffers and graphs are its own, as a fork's): e.g. the batch-1 session that prefills new prompts
    //! for a batch session's copyRow. Its sampling stream starts from options().seed.
    std::unique_ptr<Session> sibling(int batch) const;

    //! Continuous batching: row `toRow` of this session goes on from row `fromRow` of `from`, a session of the same
    //! model, backend, dtype and GPU with any batch (e.g. a sibling(1) that has just prefilled a new prompt, whose
    //! length the other rows need not share). The weights must be the same: shared (forks, siblings) or, for
    //! sessions opened apart, equal by their sha256 (hashed once a session; builds without OpenSSL, and exports
    //! without their reference weights, need siblings or forks). The row's
    //! recurrent state and logits are copied on the GPU; the other rows stay as they are. generate()'s pending
    //! tokens of both sessions are fed first. `from` must hold logits (a token fed); this session may be fresh,
    //! and holds logits once every row has been copied into or a token fed. Decoding the rows together then gives
    //! each row what its own session would (the same kernels at another batch: within rounding). The sampling
    //! stream is this session's. `from` may be this session. The call uses both sessions: neither may be in use by
    //! another thread meanwhile.
    void copyRow(Session& from, int fromRow, int toRow);

    //! generate()'s last tokens [batch], not yet fed (empty: none); saveState keeps them, readState does not.
    std::vector<int32_t> pendingTokens() const { return pending_; }

    std::vector<StateTensorInfo> stateInfo() const;
    //! Copy one state tensor to the host; `bytes`, the buffer's size, must be its StateTensorInfo::bytes().
    void readState(std::string const& name, void* host, size_t bytes) const;
    //! And back (same layout and dtype); drops generate()'s pending tokens and the logits (both belong to the old
    //! state): feed the next token (step or prefill) before logits(), sample() or generate().
    void writeState(std::string const& name, void const* host, size_t bytes);
    //! The same without the size check: `host` must hold stateInfo()'s bytes() for `name`.
    void readState(std::string const& name, void* host) const;
    void writeState(std::string const& name, void const* host);

    //! Write the stream so far to a session state file: a safetensors file in the format of Python's
    //! Session.save_state (the recurrent state, the logits, generate()'s pending tokens, the sampling stream's seed
    //! and draws, the model's config and, in builds with OpenSSL, its weights' sha256). It appears whole or not at
    //! all. A stream saved by either runtime goes on in the other, e.g. a prompt prefilled by the Python
    //! Triton backend, then decoded here; each runtime keeps its own sampling stream (they draw with different
    //! generators: greedy tokens agree, sampled ones do not). Needs logits (a token fed since open/reset/writeState).
    void saveState(std::string const& path) const;
    //! Go on from a state file of the same model (config; weights where both sides know their sha256) and batch:
    //! replaces the state, the logits, the pending tokens and, from a file this runtime wrote, the sampling stream.
    //! A file that does not fit is refused with an Error naming the problem, and the session stays as it was.
    void loadState(std::string const& path);

    void synchronize() const; //!< wait for the session's stream

private:
    explicit Session(std::unique_ptr<detail::Backend> backend);
    void feedPending();             //!< consume generate()'s last tokens, if any
    std::unique_ptr<detail::Backend> backend_;
    std::vector<int32_t> pending_;  //!< generate()'s last tokens [batch], not yet fed (empty: none)
    std::vector<char> rowsCopied_;  //!< while no token has been fed: the rows copyRow has filled
    uint64_t seed_{0};              //!< the sampling stream: seed, and the tokens drawn from it so far
    uint32_t draws_{0};
};

} // namespace memmamba
