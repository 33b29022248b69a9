// AVX2 + FMA + F16C chunk kernel of the direct attention (attention.h).
// Same function as attn_chunk_scalar; needs hd % 8 == 0 (the driver falls
// back to the scalar kernel otherwise). Per chunk of n keys and R query rows:
//   1. scores: blocks of 8 keys are converted once to float32 (kb [8, hd]);
//      each row's 8 dot products accumulate in 8 registers and are reduced
//      together by a horizontal-add tree into one vector of 8 scores.
//   2. softmax numerators: p = exp(s - m) with an 8-lane polynomial exp.
//   3. acc[r, :] += p[r, j] * v_j: for each 8-wide slice of the head, the R
//      accumulators stay in registers while the chunk's V rows stream by
//      (R is a template parameter so the compiler keeps them in registers).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/attention.h"
#include "cpu/simd_avx2.h"

namespace mq::cpu::detail {
namespace {

inline __m256 load8(const void* base, bool f16, int64_t off) {
    if (f16)
        return _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + off)));
    return _mm256_loadu_ps(static_cast<const float*>(base) + off);
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// acc[r, d0:d0+8W] = sum_j p[r, j] v[j, d0:d0+8W] for the slices d0 in
// [d_begin, d_end) (a multiple of 8W long): R x W accumulators in registers,
// each broadcast p[r, j] used W times.
template <int R, int W>
void pv_slices(const AttnChunk& a, const float* p, float* acc, int d_begin, int d_end) {
    const int64_t n = a.n;
    for (int d0 = d_begin; d0 < d_end; d0 += 8 * W) {
        __m256 o[R][W];
        for (int r = 0; r < R; r++)
            for (int w = 0; w < W; w++) o[r][w] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            __m256 vv[W];
            for (int w = 0; w < W; w++) vv[w] = load8(a.v, a.f16, j * a.kv_stride + d0 + 8 * w);
            for (int r = 0; r < R; r++) {
                const __m256 pr = _mm256_broadcast_ss(p + r * n + j);
                for (int w = 0; w < W; w++) o[r][w] = _mm256_fmadd_ps(pr, vv[w], o[r][w]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int w = 0; w < W; w++) _mm256_storeu_ps(acc + r * a.hd + d0 + 8 * w, o[r][w]);
    }
}

// Widest slice group whose R x W accumulators (+ W loads + 1 broadcast) fit
// in the 16 ymm registers; a remainder of the head in single slices.
template <int R>
void pv(const AttnChunk& a, const float* p, float* acc) {
    constexpr int W = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    const int main_end = a.hd / (8 * W) * (8 * W);
    pv_slices<R, W>(a, p, acc, 0, main_end);
    if (main_end < a.hd) pv_slices<R, 1>(a, p, acc, main_end, a.hd);
}
using PvFn = void (*)(const AttnChunk&, const float*, float*);
constexpr PvFn kPv[kAttnDirectMaxRows] = {pv<1>, pv<2>,  pv<3>,  pv<4>,  pv<5>,  pv<6>,  pv<7>,  pv<8>,
                                          pv<9>, pv<10>, pv<11>, pv<12>, pv<13>, pv<14>, pv<15>, pv<16>};
static_assert(kAttnDirectMaxRows == 16, "kPv lists one instance per row count");

}  // namespace

void attn_chunk_avx2(const AttnChunk& a, float* s, float* m, float* l, float* acc) {
    const float ninf = -std::numeric_limits<float>::infinity();
    const int64_t n = a.n;
    const int hd = a.hd;
    alignas(32) float kb[8 * kAttnDirectMaxHd];  // [8, hd] float32 keys of one block
    // 1. s[r, j] = scale * q_r · k_j + mask[r, j]; -inf after last[r]
    // Key rows are kv_stride apart (2 KiB in the 11B cache), so every row
    // starts a new page run the hardware prefetcher does not follow: prefetch
    // the K rows kPrefetch keys ahead into L1, and this block's V rows into L2
    // for step 3 (which walks them once per 8-wide slice of the head).
    const int64_t row_bytes = int64_t(hd) * (a.f16 ? 2 : 4);
    const int64_t stride_bytes = a.kv_stride * (a.f16 ? 2 : 4);
    const char* kbytes = static_cast<const char*>(a.k);
    const char* vbytes = static_cast<const char*>(a.v);
    constexpr int64_t kPrefetch = 16;
    for (int64_t j = 0; j < std::min<int64_t>(n, kPrefetch); j++)
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(kbytes + j * stride_bytes + b, _MM_HINT_T0);
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
        const int nb = int(std::min<int64_t>(8, n - j0));
        for (int64_t j = j0 + kPrefetch; j < std::min(n, j0 + kPrefetch + 8); j++)
            for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(kbytes + j * stride_bytes + b, _MM_HINT_T0);
        for (int64_t j = j0; j < j0 + nb; j++)
            for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(vbytes + j * stride_bytes + b, _MM_HINT_T1);
        const float* kr[8];
        for (int t = 0; t < 8; t++) {
            const int64_t j = j0 + std::min(t, nb - 1);  // a short last block repeats its last key
            if (a.f16) {
                float* dst = kb + t * hd;
                for (int d = 0; d < hd; d += 8) _mm256_store_ps(dst + d, load8(a.k, true, j * a.kv_stride + d));
                kr[t] = dst;
            } else {
                kr[t] = static_cast<const float*>(a.k) + j * a.kv_stride;
            }
        }
        for (int r = 0; r < a.R; r++) {
            float* sr = s + r * n + j0;
            if (a.last[r] < j0) {
                for (int t = 0; t < nb; t++) sr[t] = ninf;
                continue;
            }
            const float* qr = a.qrows[r];
            __m256 c[8];
            for (int t = 0; t < 8; t++) c[t] = _mm256_setzero_ps();
            for (int d = 0; d < hd; d += 8) {
                const __m256 qv = _mm256_loadu_ps(qr + d);
                for (int t = 0; t < 8; t++) c[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kr[t] + d), c[t]);
            }
            // horizontal sums of c[0..7] into lanes 0..7
            const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(c[0], c[1]), _mm256_hadd_ps(c[2], c[3]));
            const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(c[4], c[5]), _mm256_hadd_ps(c[6], c[7]));
            const __m256 dots =
                _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
            alignas(32) float sc[8];
            _mm256_store_ps(sc, _mm256_mul_ps(dots, _mm256_set1_ps(a.scale)));
            for (int t = 0; t < nb; t++)
                sr[t] = j0 + t > a.last[r] ? ninf : sc[t] + (a.mrows[r] ? a.mrows[r][j0 + t] : 0.0f);
        }
    }
    // 2. p[r, j] = exp(s[r, j] - m_r) in place, l_r = sum_j p[r, j]
    for (int r = 0; r < a.R; r++) {
        float* sr = s + r * n;
        __m256 vm = _mm256_set1_ps(ninf);
        int64_t j = 0;
        for (; j + 8 <= n; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(sr + j));
        float mx = hmax(vm);
        for (; j < n; j++) mx = std::max(mx, sr[j]);
        m[r] = mx;
        if (mx == ninf) {
            std::fill(sr, sr + n, 0.0f);
            l[r] = 0.0f;
            continue;
        }
        const __m256 vmx = _mm256_set1_ps(mx);
        __m256 vs = _mm256_setzero_ps();
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_loadu_ps(sr + j), vmx));
            _mm256_storeu_ps(sr + j, e);
            vs = _mm256_add_ps(vs, e);
        }
        if (j < n) {  // last partial vector through a padded copy (padding -inf -> 0)
            alignas(32) float tail[8];
            for (int t = 0; t < 8; t++) tail[t] = j + t < n ? sr[j + t] : ninf;
            const __m256 e = exp8_nonpos(_mm256_sub_ps(_mm256_load_ps(tail), vmx));
            _mm256_store_ps(tail, e);
            for (int t = 0; j + t < n; t++) sr[j + t] = tail[t];
            // Added as a vector: key j0 + t always lands in lane t % 8, and the
            // padding adds exact zeros, so a row's sum does not depend on how
            // many keys after its last visible one the chunk holds (batch
            // invariance, attention.h).
            vs = _mm256_add_ps(vs, e);
        }
        l[r] = hsum(vs);
    }
    // 3. acc[r, :] = sum_j p[r, j] v_j
    kPv[a.R - 1](a, s, acc);
}

}  // namespace mq::cpu::detail
