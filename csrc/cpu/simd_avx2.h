// 8-lane AVX2 + FMA vector ops for the CPU kernels written once over a vector
// struct (attention_flash_impl.h, rowops_impl.h), the AVX2 attention kernels and
// the int8 multiply-adds of the AVX2 / AVX-VNNI matmul kernels (kernels_avx2.cpp).
// Include only from *_avx2.cpp / *_avxvnni.cpp files (compiled with AVX2 + FMA); everything
// here has internal linkage so no copy built for this ISA can be picked by the
// linker for code compiled for another.
#pragma once
#include <immintrin.h>

namespace mq::cpu::detail {
namespace {

// exp(x) for x <= 0 on 8 lanes (softmax arguments after the row max). x = n·ln2
// + r with |r| <= ln2/2 (ln2 split hi + lo), e^r by a degree-6 Taylor
// polynomial (truncation error < 2e-8 there; within 2 ulp of std::exp), 2^n
// added to the exponent bits. x < -87.3 (including -inf and
// masked scores near -FLT_MAX) gives exactly 0.
inline __m256 exp8_nonpos(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 xc = _mm256_max_ps(x, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
    return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), _mm256_castsi256_ps(bits));
}

// ---- int8 multiply-adds of the quantized kernels. kernels_avx2.cpp is compiled twice: as the avx2
// path, and by kernels_avxvnni.cpp with MQ_AVXVNNI defined and -mavxvnni as the avxvnni path
// (Alder Lake and later Intel cores, Zen 4 and later: the VEX-encoded vpdpbusd / vpdpwssd on ymm,
// without AVX-512). Only these helpers (and what the kernels build on kVnni) differ between the two;
// both give the same int32 results wherever the AVX2 sequence does not saturate (see dot_u8s8_add).
#if defined(MQ_AVXVNNI)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// An empty asm that takes v in a ymm register and may change it: GCC must then add each
// step's products into the accumulator in order. Without it GCC 12 -O3 reassociates integer
// sums over unrolled loops (all the products first, then one add tree: in the K-quant panel
// micro-kernel 32 live ymm for Q4_K) and spills them to the stack. Q4_K panel, M = 256, one
// thread, Zen 4: 154-162 -> 188-197 GFLOP/s (bench/results/2026-12-04-epyc-zen4-2c-peer.md
// section 4). Integer adds: the results are the same bits either way.
inline void keep_in_register(__m256i& v) { asm("" : "+x"(v)); }

// acc + per int32 lane l: sum over k < 4 of u[4l + k] (unsigned bytes) * s[4l + k] (signed bytes).
// AVX2: vpmaddubsw (pairs -> int16, SATURATING) + vpmaddwd with ones + vpaddd, exact only while
// every pair sum u0*s0 + u1*s1 fits in int16 (each caller states its bound); AVX-VNNI: one
// vpdpbusd, which never saturates, so the two agree exactly wherever the AVX2 one is exact.
inline __m256i dot_u8s8_add(__m256i acc, __m256i u, __m256i s) {
#if defined(MQ_AVXVNNI) && defined(MQ_AVXVNNI_EVEX)  // developer check build (CMake MLLAMA_Q_AVXVNNI_EVEX): EVEX
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(MQ_AVXVNNI)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// acc + per int32 lane a[2l] * b[2l] + a[2l + 1] * b[2l + 1] (int16 pairs): vpmaddwd + vpaddd, or one
// vpdpwssd (AVX-VNNI). The same bits (both wrap in int32; the int16 products cannot overflow a pair sum
// unless both pairs are -32768 * -32768, which no caller produces).
inline __m256i madd16_add(__m256i acc, __m256i a, __m256i b) {
#if defined(MQ_AVXVNNI) && defined(MQ_AVXVNNI_EVEX)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(MQ_AVXVNNI)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

struct V256 {
    using T = __m256;
    static constexpr int W = 8;
    static T load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
    static T set1(float f) { return _mm256_set1_ps(f); }
    static T zero() { return _mm256_setzero_ps(); }
    static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
    static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
    static T div(T a, T b) { return _mm256_div_ps(a, b); }
    static T add(T a, T b) { return _mm256_add_ps(a, b); }
    static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
    static T max(T a, T b) { return _mm256_max_ps(a, b); }
    static T abs(T a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
    static T select_lt(T a, T b, T x, T y) {
        return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
    }  // a < b ? x : y
    static T exp(T x) { return exp8_nonpos(x); }
    static float hsum(T x) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        return _mm_cvtss_f32(s);
    }
};

}  // namespace
}  // namespace mq::cpu::detail
