// The sampler's definition on the host: models/ops/triton/cpp_support.py sample_ref in C++. It is the reference
// the GPU sampler (the AOT-compiled cpp_support.sample_kernel) is checked against, and needs no GPU.
#pragma once

#include <array>
#include <cstdint>

#include "memmamba/memmamba.h"

namespace memmamba
{

//! Random123 philox4x32-10.
std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

//! The uniform in [0, 1) that row `row` draws at sampler step `step`: 24 bits of philox(row, step, 0, 0; seed).
float samplerUniform(uint32_t row, uint32_t step, uint64_t seed);

//! One row: greedy when params.temperature == 0, else temperature / top-k / top-p as cpp_support.py describes.
int32_t sampleRow(float const* logits, int32_t vocab, SamplingParams const& params, uint64_t seed, uint32_t step,
    uint32_t row);

} // namespace memmamba
