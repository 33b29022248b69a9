// Scalar float <-> half / bfloat16 conversions, bit-exact with ggml's
// (round-to-nearest-even, as F16C's _cvtss_sh(x, 0) and ggml's
// ggml_compute_fp32_to_bf16 do). SIMD kernels use hardware instructions that
// give the same bits; these are the portable reference.
#pragma once
#include <cstdint>
#include <cstring>

namespace mq {

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float f32_from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// binary16 -> binary32 (exact: every half is representable as a float).
inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exp = (h >> 10) & 0x1f;
    const uint32_t man = h & 0x3ff;
    if (exp == 0) {
        // zero or subnormal: man * 2^-24, exact in float arithmetic
        const float v = static_cast<float>(man) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (man << 13));  // inf / nan
    return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

// binary32 -> binary16, round to nearest even; NaN -> quiet NaN 0x7e00.
inline uint16_t fp32_to_fp16(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00;   // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00;  // >= 65520 rounds to inf
    if (ax < 0x38800000u) {
        // Result is a half subnormal (or 0 / the smallest normal after rounding).
        // Adding 0.5f puts units of 2^-24 in the low mantissa bits of the sum,
        // and the FPU's own round-to-nearest-even does the rounding.
        const float v = f32_from_bits(ax) + 0.5f;
        return sign | static_cast<uint16_t>(f32_bits(v) - 0x3f000000u);
    }
    // Normal: rebias exponent (127 -> 15) and round the 13 dropped bits to even.
    const uint32_t r = ax - 0x38000000u + 0xfffu + ((ax >> 13) & 1u);
    return sign | static_cast<uint16_t>(r >> 13);
}

inline float bf16_to_fp32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// binary32 -> bfloat16, round to nearest even; NaN kept quiet (ggml's rule).
inline uint16_t fp32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64);
    return static_cast<uint16_t>((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

}  // namespace mq
