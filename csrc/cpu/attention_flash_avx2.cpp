// AVX2 + FMA kernel of the flash attention (attention_flash.h): 8 lanes, key
// blocks of 32 (4 vectors). Score micro-kernel 3 rows x 4 vectors (12
// accumulators), PV micro-kernel 2 rows x up to 5 vectors (16 registers).
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "cpu/attention_flash_impl.h"
#include "cpu/simd_exp_avx2.h"

namespace mq::cpu::detail {
namespace {

struct V256 {
    using T = __m256;
    static constexpr int W = 8;
    static T load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
    static T set1(float f) { return _mm256_set1_ps(f); }
    static T zero() { return _mm256_setzero_ps(); }
    static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
    static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
    static T add(T a, T b) { return _mm256_add_ps(a, b); }
    static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
    static T max(T a, T b) { return _mm256_max_ps(a, b); }
    static T exp(T x) { return exp8_nonpos(x); }  // simd_exp_avx2.h
    static float exp1(float x) { return _mm256_cvtss_f32(exp(_mm256_set1_ps(x))); }
    static float hmax(T x) {
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        return _mm_cvtss_f32(m);
    }
    static float hsum(T x) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        return _mm_cvtss_f32(s);
    }
};

}  // namespace

FlashKernel flash_kernel_avx2() { return {8, 32, flash_rows<V256, 4, 3, 2, 5>}; }

}  // namespace mq::cpu::detail
