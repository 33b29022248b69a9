// One-lane "vector" ops: the kernels written over a vector struct
// (attention_flash_impl.h, rowops_impl.h) become plain scalar code, the
// portable reference the SIMD paths are tested against. Internal linkage as
// simd_avx2.h (the portable files are compiled with the baseline ISA).
#pragma once
#include <cmath>

namespace mq::cpu::detail {
namespace {

struct VScalar {
    using T = float;
    static constexpr int W = 1;
    static T load(const float* p) { return *p; }
    static void store(float* p, T x) { *p = x; }
    static T set1(float f) { return f; }
    static T zero() { return 0.0f; }
    static T fma(T a, T b, T c) { return a * b + c; }
    static T mul(T a, T b) { return a * b; }
    static T div(T a, T b) { return a / b; }
    static T add(T a, T b) { return a + b; }
    static T sub(T a, T b) { return a - b; }
    static T max(T a, T b) { return a > b ? a : b; }
    static T abs(T a) { return std::fabs(a); }
    static T select_lt(T a, T b, T x, T y) { return a < b ? x : y; }
    static T exp(T x) { return std::exp(x); }  // exp(-inf) = 0
    static float hsum(T x) { return x; }
};

}  // namespace
}  // namespace mq::cpu::detail
