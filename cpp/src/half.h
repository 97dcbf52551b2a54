// fp16 / bf16 <-> fp32 on the host (weights are converted once at load). Round to nearest even, as torch's .half().
#pragma once

#include <cstdint>
#include <cstring>

namespace memmamba
{

inline float halfToFloat(uint16_t h)
{
    uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F;
    uint32_t man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0)
    {
        if (man == 0)
        {
            bits = sign;
        }
        else // subnormal: renormalise
        {
            int e = -1;
            do
            {
                ++e;
                man <<= 1;
            } while ((man & 0x400) == 0);
            bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
        }
    }
    else if (exp == 31)
    {
        bits = sign | 0x7F800000 | man << 13; // inf / nan
    }
    else
    {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t floatToHalf(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t absx = x & 0x7FFFFFFF;
    if (absx >= 0x7F800000) // inf or nan (keep a nan a nan)
        return static_cast<uint16_t>(sign | 0x7C00 | (absx > 0x7F800000 ? 0x200 : 0));
    if (absx >= 0x477FF000) // rounds to >= 65520: overflow to inf
        return static_cast<uint16_t>(sign | 0x7C00);
    if (absx < 0x38800000) // below the smallest normal half (2^-14): subnormal or zero
    {
        if (absx < 0x33000000) // < 2^-25: rounds to zero
            return static_cast<uint16_t>(sign);
        // value = man * 2^(exp-150) with the implicit bit; in half subnormal units (2^-24): man >> (126-exp)
        uint32_t exp = absx >> 23;
        uint32_t man = (absx & 0x7FFFFF) | 0x800000;
        uint32_t drop = 126 - exp; // 14..24
        uint32_t shifted = man >> drop;
        uint32_t rem = man & ((1u << drop) - 1);
        uint32_t halfway = 1u << (drop - 1);
        if (rem > halfway || (rem == halfway && (shifted & 1)))
            ++shifted; // 0x400 is the smallest normal: the carry is right
        return static_cast<uint16_t>(sign | shifted);
    }
    uint32_t exp = (absx >> 23) - 127 + 15;
    uint32_t man = absx & 0x7FFFFF;
    uint32_t h = exp << 10 | man >> 13;
    uint32_t rem = man & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
        ++h; // may carry into the exponent, which is right (and reaches inf only past 65504)
    return static_cast<uint16_t>(sign | h);
}

inline float bf16ToFloat(uint16_t b)
{
    uint32_t bits = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

} // namespace memmamba
