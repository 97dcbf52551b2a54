// C entry points into the host code, for tests/test_cpp_unit.py (ctypes). Used only by tests.
#include <cstring>
#include <string>

#include "checkpoint.h"
#include "sampling.h"
#include "state_file.h"

namespace
{
thread_local std::string tError;
}

extern "C"
{
char const* mm_host_last_error() { return tError.c_str(); }

//! tokens[b] = sampleRow(logits + b * vocab, ...) for b < batch. Returns 0, or -1 (mm_host_last_error says why).
int mm_host_sample(float const* logits, int batch, int vocab, float temperature, int top_k, float top_p,
    unsigned long long seed, unsigned step, int* tokens)
{
    try
    {
        for (int b = 0; b < batch; ++b)
            tokens[b] = memmamba::sampleRow(logits + static_cast<size_t>(b) * vocab, vocab,
                {temperature, top_k, top_p}, seed, step, static_cast<unsigned>(b));
        return 0;
    }
    catch (std::exception const& e)
    {
        tError = e.what();
        return -1;
    }
}

//! weightsFingerprint of a safetensors file into out[65] (hex, or "" without OpenSSL). Returns 0 or -1.
int mm_host_weights_fingerprint(char const* file, char* out)
{
    try
    {
        std::string hex = memmamba::weightsFingerprint(memmamba::SafetensorsFile(file));
        std::strncpy(out, hex.c_str(), 65);
        return 0;
    }
    catch (std::exception const& e)
    {
        tError = e.what();
        return -1;
    }
}

//! Read the session state file `in` as a session of the checkpoint `directory` (batch, fp16 or fp32) would, and
//! write what it read to `out` (if not null) as the C++ Session's saveState does. Returns 0 or -1.
int mm_host_state_copy(char const* in, char const* out, char const* directory, int batch, int fp16)
{
    try
    {
        memmamba::Checkpoint ck(directory);
        memmamba::LazyFingerprint fingerprint(std::string(directory) + "/model.safetensors");
        auto layout = memmamba::stateLayout(ck.config(), batch, fp16 ? memmamba::DType::kFloat16 : memmamba::DType::kFloat32);
        auto data = memmamba::readSessionState(in, ck.config(), fingerprint.get(), layout, layout.front().dtype);
        if (out)
            memmamba::writeSessionState(out, ck.config(), fingerprint.get(), layout, data);
        return 0;
    }
    catch (std::exception const& e)
    {
        tError = e.what();
        return -1;
    }
}

//! Open a checkpoint directory; returns its parameter count, or -1 with the error message.
long long mm_host_checkpoint_parameters(char const* directory)
{
    try
    {
        return memmamba::Checkpoint(directory).parameterCount();
    }
    catch (std::exception const& e)
    {
        tError = e.what();
        return -1;
    }
}
}
