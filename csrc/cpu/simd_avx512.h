// 16-lane AVX-512F vector ops for the CPU kernels written once over a vector
// struct (attention_flash_impl.h, rowops_impl.h). Include only from
// *_avx512.cpp files; internal linkage as simd_avx2.h.
#pragma once
#include <immintrin.h>

namespace mq::cpu::detail {
namespace {

struct V512 {
    using T = __m512;
    static constexpr int W = 16;
    static T load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, T x) { _mm512_storeu_ps(p, x); }
    static T set1(float f) { return _mm512_set1_ps(f); }
    static T zero() { return _mm512_setzero_ps(); }
    static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
    static T mul(T a, T b) { return _mm512_mul_ps(a, b); }
    static T div(T a, T b) { return _mm512_div_ps(a, b); }
    static T add(T a, T b) { return _mm512_add_ps(a, b); }
    static T sub(T a, T b) { return _mm512_sub_ps(a, b); }
    static T max(T a, T b) { return _mm512_max_ps(a, b); }
    static T abs(T a) { return _mm512_abs_ps(a); }
    static T select_lt(T a, T b, T x, T y) {  // a < b ? x : y
        return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
    }
    // exp(x) for x <= 0: simd_avx2.h's exp8_nonpos on 16 lanes; x < -87.3
    // (including -inf) gives 0.
    static T exp(T x) {
        const T lo = _mm512_set1_ps(-87.3f);
        const T xc = _mm512_max_ps(x, lo);
        const T n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        T r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
        r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
        T p = _mm512_set1_ps(1.0f / 720.0f);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(p), _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
        const __mmask16 dead = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
        return _mm512_mask_blend_ps(dead, _mm512_castsi512_ps(bits), _mm512_setzero_ps());
    }
    static float hsum(T x) { return _mm512_reduce_add_ps(x); }
};

}  // namespace
}  // namespace mq::cpu::detail
