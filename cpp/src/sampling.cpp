// See sampling.h. Float64 arithmetic like sample_ref; the GPU kernel accumulates in fp32, so the two can differ
// only when the uniform falls within rounding of a boundary between two tokens' cumulative masses.
#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace memmamba
{

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k)
{
    for (int round = 0; round < 10; ++round)
    {
        uint64_t p0 = uint64_t{0xD2511F53} * c[0];
        uint64_t p1 = uint64_t{0xCD9E8D57} * c[2];
        c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<uint32_t>(p1),
            static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<uint32_t>(p0)};
        k = {k[0] + 0x9E3779B9u, k[1] + 0xBB67AE85u};
    }
    return c;
}

float samplerUniform(uint32_t row, uint32_t step, uint64_t seed)
{
    uint32_t bits = philox4x32_10({row, step, 0, 0}, {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)})[0];
    return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

int32_t sampleRow(float const* logits, int32_t vocab, SamplingParams const& params, uint64_t seed, uint32_t step,
    uint32_t row)
{
    params.validate();
    if (vocab <= 0)
        throw Error("sampleRow: vocab must be >= 1");
    if (params.temperature <= 0.f)
    {
        int32_t best = 0;
        for (int32_t i = 1; i < vocab; ++i)
            if (logits[i] > logits[best])
                best = i;
        return best;
    }
    std::vector<double> x(vocab);
    double mx = -std::numeric_limits<double>::infinity();
    for (int32_t i = 0; i < vocab; ++i)
    {
        x[i] = static_cast<double>(logits[i] / params.temperature); // the fp32 division, as the kernel
        mx = std::max(mx, x[i]);
    }
    if (!std::isfinite(mx))
        return 0;
    std::vector<char> keep(vocab, 1);
    if (params.topK > 0 && params.topK < vocab)
    {
        std::vector<double> sorted(x);
        std::nth_element(sorted.begin(), sorted.begin() + (params.topK - 1), sorted.end(), std::greater<double>());
        double kth = sorted[params.topK - 1];
        for (int32_t i = 0; i < vocab; ++i)
            keep[i] = x[i] >= kth;
    }
    std::vector<double> e(vocab, 0.0);
    for (int32_t i = 0; i < vocab; ++i)
        if (keep[i])
            e[i] = std::exp(x[i] - mx);
    if (params.topP < 1.f)
    {
        double z = 0;
        std::vector<std::pair<double, double>> byValue; // (value, mass) of kept tokens
        for (int32_t i = 0; i < vocab; ++i)
            if (keep[i])
            {
                z += e[i];
                byValue.emplace_back(x[i], e[i]);
            }
        std::sort(byValue.begin(), byValue.end(), [](auto const& a, auto const& b) { return a.first > b.first; });
        // the smallest value v whose mass strictly above stays <= top_p * z
        double above = 0, vMin = byValue.front().first, limit = static_cast<double>(params.topP) * z;
        for (size_t i = 0; i < byValue.size();)
        {
            size_t j = i;
            double group = 0;
            while (j < byValue.size() && byValue[j].first == byValue[i].first)
                group += byValue[j++].second;
            if (above <= limit)
                vMin = byValue[i].first;
            above += group;
            i = j;
        }
        for (int32_t i = 0; i < vocab; ++i)
            if (keep[i] && x[i] < vMin)
            {
                keep[i] = 0;
                e[i] = 0;
            }
    }
    double total = 0;
    int32_t last = 0;
    for (int32_t i = 0; i < vocab; ++i)
        if (keep[i])
        {
            total += e[i];
            last = i;
        }
    double target = static_cast<double>(samplerUniform(row, step, seed)) * total;
    double cum = 0;
    for (int32_t i = 0; i < vocab; ++i)
    {
        cum += e[i];
        if (keep[i] && cum > target)
            return i;
    }
    return last;
}

} // namespace memmamba
