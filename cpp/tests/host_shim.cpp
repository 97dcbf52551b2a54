// C entry points into the host code, for tests/test_cpp_unit.py (ctypes). Used only by tests.
#include <cstring>
#include <string>

#include "checkpoint.h"
#include "sampling.h"

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
