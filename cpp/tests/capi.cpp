// C entry points into libmemmamba for tests/gpu/test_native_gpu.py (ctypes). Used only by tests and the GPU stage.
// Every function returns 0 / a handle on success and -1 / null on failure, with mm_last_error() saying why.
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <execinfo.h>
#include <string>
#include <unistd.h>

#include "memmamba/memmamba.h"

using memmamba::Session;

namespace
{
thread_local std::string tError, tText;

template <typename F>
int guard(F&& f)
{
    try
    {
        f();
        return 0;
    }
    catch (std::exception const& e)
    {
        tError = e.what();
        return -1;
    }
}

Session* S(void* h) { return static_cast<Session*>(h); }

// MEMMAMBA_CAPI_BACKTRACE=1: a crash inside the library prints its native stack (Python's faulthandler shows
// only the Python frames above the ctypes call)
void printBacktrace(int sig)
{
    void* frames[64];
    int n = backtrace(frames, 64);
    backtrace_symbols_fd(frames, n, STDERR_FILENO);
    std::signal(sig, SIG_DFL);
    std::raise(sig);
}
struct BacktraceOnCrash
{
    BacktraceOnCrash()
    {
        char const* v = std::getenv("MEMMAMBA_CAPI_BACKTRACE");
        if (v && v[0] == '1')
            std::signal(SIGSEGV, printBacktrace);
    }
} const backtraceOnCrash;
} // namespace

extern "C"
{
char const* mm_last_error() { return tError.c_str(); }

void* mm_open(char const* path, char const* backend, char const* dtype, int batch, int device, int cudaGraph,
    unsigned long long seed, char const* pluginLibrary, char const* plan, int prefillRows)
{
    Session* out = nullptr;
    guard([&] {
        memmamba::SessionOptions o;
        o.backend = backend;
        std::string dt = dtype;
        if (dt != "fp16" && dt != "fp32")
            throw memmamba::Error("dtype must be fp16 or fp32, got " + dt);
        o.dtype = dt == "fp16" ? memmamba::DType::kFloat16 : memmamba::DType::kFloat32;
        o.batch = batch;
        o.device = device;
        o.cudaGraph = cudaGraph != 0;
        o.seed = seed;
        o.pluginLibrary = pluginLibrary ? pluginLibrary : "";
        o.plan = plan ? plan : "cublas";
        o.prefillRows = prefillRows;
        out = Session::open(path, o).release();
    });
    return out;
}

void mm_close(void* h) { delete S(h); }

char const* mm_describe(void* h)
{
    guard([&] { tText = S(h)->describe(); });
    return tText.c_str();
}

int mm_prefill(void* h, int const* tokens, int T) { return guard([&] { S(h)->prefill(tokens, T); }); }
int mm_prefill_rows(void* h, int const* tokens, int T, int const* lengths)
{
    return guard([&] { S(h)->prefill(tokens, T, lengths); });
}
int mm_step(void* h, int const* tokens) { return guard([&] { S(h)->step(tokens); }); }
int mm_logits(void* h, float* out) { return guard([&] { S(h)->logits(out); }); }

int mm_sample(void* h, float temperature, int topK, float topP, int* out)
{
    return guard([&] {
        auto t = S(h)->sample({temperature, topK, topP});
        std::memcpy(out, t.data(), t.size() * sizeof(int));
    });
}

//! out [batch, maxNew] (row-major); *produced = tokens per row actually generated. stop: nStop ids or null.
int mm_generate(void* h, int maxNew, float temperature, int topK, float topP, int const* stop, int nStop, int* out,
    int* produced)
{
    return guard([&] {
        std::vector<int32_t> stops(stop, stop + (stop ? nStop : 0));
        auto rows = S(h)->generate(maxNew, {temperature, topK, topP}, {}, stops);
        *produced = rows.empty() ? 0 : static_cast<int>(rows[0].size());
        for (size_t b = 0; b < rows.size(); ++b)
            std::memcpy(out + b * maxNew, rows[b].data(), rows[b].size() * sizeof(int));
    });
}

//! Greedy generation of n tokens, timed on the host clock (the GPU is synchronised before and after):
//! *msPerToken = wall time / n. What a user of generate() waits per token.
int mm_bench_generate(void* h, int n, float* msPerToken)
{
    return guard([&] {
        S(h)->synchronize();
        auto t0 = std::chrono::steady_clock::now();
        S(h)->generate(n, {}, {}, {});
        S(h)->synchronize();
        auto t1 = std::chrono::steady_clock::now();
        *msPerToken = std::chrono::duration<float, std::milli>(t1 - t0).count() / n;
    });
}

int mm_reset(void* h) { return guard([&] { S(h)->reset(); }); }
int mm_reseed(void* h, unsigned long long seed) { return guard([&] { S(h)->reseed(seed); }); }

void* mm_fork(void* h)
{
    Session* out = nullptr;
    guard([&] { out = S(h)->fork().release(); });
    return out;
}

void* mm_sibling(void* h, int batch)
{
    Session* out = nullptr;
    guard([&] { out = S(h)->sibling(batch).release(); });
    return out;
}

int mm_copy_row(void* h, void* from, int fromRow, int toRow)
{
    return guard([&] { S(h)->copyRow(*S(from), fromRow, toRow); });
}

long long mm_state_bytes(void* h, char const* name)
{
    long long n = -1;
    guard([&] {
        for (auto const& i : S(h)->stateInfo())
            if (i.name == name)
                n = static_cast<long long>(i.bytes());
        if (n < 0)
            throw memmamba::Error(std::string("no state tensor ") + name);
    });
    return n;
}

int mm_read_state(void* h, char const* name, void* out, unsigned long long bytes)
{
    return guard([&] { S(h)->readState(name, out, bytes); });
}
int mm_write_state(void* h, char const* name, void const* in, unsigned long long bytes)
{
    return guard([&] { S(h)->writeState(name, in, bytes); });
}
//! generate()'s pending tokens into out[batch]; returns how many (0: none) or -1.
int mm_pending(void* h, int* out)
{
    int n = -1;
    guard([&] {
        auto p = S(h)->pendingTokens();
        std::memcpy(out, p.data(), p.size() * sizeof(int));
        n = static_cast<int>(p.size());
    });
    return n;
}
int mm_save_state(void* h, char const* path) { return guard([&] { S(h)->saveState(path); }); }
int mm_load_state(void* h, char const* path) { return guard([&] { S(h)->loadState(path); }); }
}
