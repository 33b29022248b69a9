// AVX2 + FMA + F16C kernels. Compiled with those flags; only called after
// matmul.cpp has checked the CPU and OS support them.
//
// This file is also the avxvnni path: kernels_avxvnni.cpp compiles it a second
// time with -mavxvnni and MQ_AVXVNNI defined, which swaps the int8
// multiply-adds (simd_avx2.h: dot_u8s8_add, madd16_add; kVnni) for vpdpbusd /
// vpdpwssd on ymm and exports avxvnni_kernels() instead of avx2_kernels(). The
// integer sums are the same in both builds, so are the float results.
//
// Same scheme as the AVX-512 file with 256-bit vectors and (the avx2 build) no VNNI:
// maddubs (u8 x s8 -> int16 pairs) then madd with the int16 sub-block scales
// (-> int32), as ggml's AVX2 vec_dot_q4_K_q8_K / vec_dot_q6_K_q8_K do.
// 16 ymm registers. Tiles: decode (<= 2 X rows) one W row at a time with
// software prefetch; larger M: Q4_K/Q6_K 8 X rows x 1 W row, Q8_0 and the float
// types 2 X rows x 4 W rows (see tile_q and MQ_PNX below). Q4_K/Q6_K/Q8_0 with
// M >= 16 take the panel GEMM ("panel GEMM" below): M = 512, 4096 x 4096, one
// thread: Q4_K 107 -> 89 ms, Q6_K 132 -> 89 ms vs the 8 x 1 tiles; Q8_0
// in the vision encode (M = 6432): 91.6 -> 155.1 GFLOP/s per core vs the 2 x 4 tiles
// (bench/results/2026-12-03-epyc-zen5-2c-vision.md).
// Activation quantizers (Q8_0, Q8_K) in 8 lanes giving ggml's reference bytes.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "cpu/kernels.h"
#include "cpu/panel_gemm.h"
#include "cpu/simd_avx2.h"
#include "cpu/simd_x86.h"
#include "quants/quants.h"

namespace mq::cpu::detail {
namespace {

// Decode (<= 2 X rows): the quantized tiles take one W row at a time
// (tile_q below) and prefetch that row kWPrefetch bytes ahead (simd_x86.h),
// the scheme of the AVX-512 decode tiles.
// Prefill tile sizes (X rows x W rows), measured here at M = 512, 4096 x 4096,
// one thread. Q4_K/Q6_K keep no X in registers across W rows, so one W row
// against 8 X rows shares each W unpack 8 ways (Q4_K 130 -> 111 ms, Q6_K
// 152 -> 136 ms vs 2 x 4; 4 x 2 spilled and was slower). Q8_0 reuses X across
// W rows, so it keeps 2 x 4 (4 x 1: 168 -> 183 ms).
// MQ_Q80_PW: W rows per Q8_0 panel micro call (4 or 8; 8 spills).
#ifndef MQ_Q80_PW
#define MQ_Q80_PW 4
#endif
#ifndef MQ_PNX
#define MQ_PNX 8
#define MQ_PNW 1
#define MQ_P8NX 2
#define MQ_P8NW 4
#endif

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------- activation quantizers
// X rows in ggml's reference formats, byte for byte (quantize_row_q8_0_ref /
// quantize_row_q8_K_ref, quants/quants_ref.cpp; test_matmul.py checks every
// path against ggml's bytes): 8 lanes instead of the reference's scalar loop,
// which took the AVX2 prefill's activations one float at a time.
inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}
// 8 int32 -> 8 int8 stored at p (values already in [-127, 127]).
inline void store_i8x8(int8_t* p, __m256i v) {
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
}
// Q8_0: d = amax / 127, q = roundf(x / d) (ties away from zero, as the
// reference's roundf: truncate, then step away from zero where |fraction| >= 0.5).
inline void quantize_q8_0_block(const float* x, block_q8_0* y) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4];
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i);
    const float amax = hmax(_mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                          _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]))));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 vid = _mm256_set1_ps(id), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    for (int i = 0; i < 4; i++) {
        const __m256 p = _mm256_mul_ps(v[i], vid);
        const __m256 t = _mm256_round_ps(p, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __m256 up = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(p, t)), half, _CMP_GE_OQ);
        const __m256 r = _mm256_add_ps(t, _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(p, sign))));
        store_i8x8(y->qs + 8 * i, _mm256_cvttps_epi32(r));
    }
}
// Q8_K: the signed value of largest magnitude (the first one on ties) maps to
// -127: iscale = -127 / it, q = min(127, nearest_int(iscale * x)) (round to
// nearest even, vcvtps2dq in the default MXCSR mode), d = 1 / iscale, bsums per 16.
inline void quantize_q8_K_block(const float* x, block_q8_K* y) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    for (int i = 0; i < 32; i++) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * i)));
    const float amax = hmax(vmax);
    if (!(amax > 0.0f)) {  // all zero (or NaN): the reference writes an all-zero block
        std::memset(y, 0, sizeof(*y));
        return;
    }
    float mx = amax;
    const __m256 va = _mm256_set1_ps(amax);
    for (int i = 0; i < 32; i++) {
        const int hit =
            _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * i)), va, _CMP_EQ_OQ));
        if (hit) {
            mx = x[8 * i + __builtin_ctz(hit)];
            break;
        }
    }
    const float iscale = -127.0f / mx;
    const __m256 vs = _mm256_set1_ps(iscale);
    const __m256i q127 = _mm256_set1_epi32(127);
    for (int j = 0; j < 16; j++) {
        const __m256i a = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16 * j), vs)), q127);
        const __m256i b =
            _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16 * j + 8), vs)), q127);
        store_i8x8(y->qs + 16 * j, a);
        store_i8x8(y->qs + 16 * j + 8, b);
        const __m256i s = _mm256_add_epi32(a, b);
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        y->bsums[j] = static_cast<int16_t>(_mm_cvtsi128_si32(t));
    }
    y->d = 1.0f / iscale;
}
void prep_q8_0(const float* x, void* xq, int64_t K) {
    block_q8_0* y = static_cast<block_q8_0*>(xq);
    for (int64_t b = 0; b < K / QK8_0; b++) quantize_q8_0_block(x + QK8_0 * b, y + b);
}
void prep_q8_K(const float* x, void* xq, int64_t K) {
    block_q8_K* y = static_cast<block_q8_K*>(xq);
    for (int64_t b = 0; b < K / QK_K; b++) quantize_q8_K_block(x + QK_K * b, y + b);
}

// ---------------------------------------------------------------- float weights
struct LoadF32 {
    static __m256 load(const uint8_t* p, int64_t k) { return _mm256_loadu_ps(reinterpret_cast<const float*>(p) + k); }
    static float at(const uint8_t* p, int64_t k) { return reinterpret_cast<const float*>(p)[k]; }
};
struct LoadF16 {
    static __m256 load(const uint8_t* p, int64_t k) {
        return _mm256_cvtph_ps(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(p) + k)));
    }
    static float at(const uint8_t* p, int64_t k) { return h2f(reinterpret_cast<const uint16_t*>(p)[k]); }
};
struct LoadBF16 {
    static __m256 load(const uint8_t* p, int64_t k) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(p) + k));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    static float at(const uint8_t* p, int64_t k) {
        const uint32_t u = uint32_t(reinterpret_cast<const uint16_t*>(p)[k]) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};

template <class L>
struct FloatTile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        __m256 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
            __m256 wv[NW];
            for (int j = 0; j < NW; j++) wv[j] = L::load(w + j * ws, k);
            for (int i = 0; i < NX; i++) {
                const __m256 xv = _mm256_loadu_ps(reinterpret_cast<const float*>(x + i * xs) + k);
                for (int j = 0; j < NW; j++) acc[i][j] = _mm256_fmadd_ps(wv[j], xv, acc[i][j]);
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) {
                float s = hsum(acc[i][j]);
                for (int64_t t = k; t < K; t++)
                    s += L::at(w + j * ws, t) * reinterpret_cast<const float*>(x + i * xs)[t];
                y[i * ldy + j] = s;
            }
    }
};

// ---------------------------------------------------------------- Q4_K x Q8_K
// 32 qs bytes g (g = 0..3) hold sub-block 2g in the low nibbles and 2g+1 in
// the high nibbles; X's Q8_K quants are in natural order.
template <bool PF>
struct Q4KTile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        __m256 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm256_setzero_ps();
        const int64_t nb = K / QK_K;
        for (int64_t b = 0; b < nb; b++) {
            for (int j = 0; j < NW; j++) {
                const block_q4_K* wb = reinterpret_cast<const block_q4_K*>(w + j * ws) + b;
                if constexpr (PF) prefetch_w<sizeof(block_q4_K)>(wb);
                uint64_t sc8, m8;
                unpack_q4_K_scales(wb->scales, &sc8, &m8);
                const __m128i scv = _mm_cvtsi64_si128(int64_t(sc8));
                const __m128i mv = _mm_cvtsi64_si128(int64_t(m8));
                __m256i isum[NX];
                for (int i = 0; i < NX; i++) isum[i] = _mm256_setzero_si256();
                for (int g = 0; g < 4; g++) {
                    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb->qs + 32 * g));
                    const __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                    // broadcast scale byte 2g / 2g+1 to 16 int16 lanes
                    const __m256i slo = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scv, _mm_set1_epi8(char(2 * g))));
                    const __m256i shi = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scv, _mm_set1_epi8(char(2 * g + 1))));
                    for (int i = 0; i < NX; i++) {
                        const int8_t* xq = reinterpret_cast<const block_q8_K*>(x + i * xs)[b].qs + 64 * g;
                        const __m256i p0 =
                            _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
                        const __m256i p1 =
                            _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32)));
                        // (vpdpwssd into the fresh product, not into isum: no chain of them across g)
                        isum[i] = _mm256_add_epi32(isum[i], madd16_add(_mm256_madd_epi16(p0, slo), p1, shi));
                        keep_in_register(isum[i]);
                    }
                }
                const __m256i mdup = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mv, mv));  // m0,m0,m1,m1,..
                const __m256 dw = _mm256_set1_ps(h2f(wb->d)), dmw = _mm256_set1_ps(h2f(wb->dmin));
                for (int i = 0; i < NX; i++) {
                    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x + i * xs) + b;
                    const __m256i mins =
                        _mm256_madd_epi16(mdup, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb->bsums)));
                    const __m256 f =
                        _mm256_fnmadd_ps(dmw, _mm256_cvtepi32_ps(mins), _mm256_mul_ps(dw, _mm256_cvtepi32_ps(isum[i])));
                    acc[i][j] = _mm256_fmadd_ps(f, _mm256_set1_ps(xb->d), acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = hsum(acc[i][j]);
    }
};

// ---------------------------------------------------------------- Q6_K x Q8_K
// Per half block h: ql0 = ql[64h..+31], ql1 = ql[64h+32..+63], qh = qh[32h..+31];
// the four 32-value groups (natural order, see ggml's dequantize_row_q6_K) are
//   (ql0 & 15) | (qh << 4 & 0x30), (ql1 & 15) | (qh << 2 & 0x30),
//   (ql0 >> 4) | (qh & 0x30),      (ql1 >> 4) | (qh >> 2 & 0x30).
// Each group spans two 16-value sub-blocks: int16 scale vector [s_a x8 | s_b x8].
template <bool PF>
struct Q6KTile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
        __m256 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm256_setzero_ps();
        const int64_t nb = K / QK_K;
        for (int64_t b = 0; b < nb; b++) {
            for (int j = 0; j < NW; j++) {
                const block_q6_K* wb = reinterpret_cast<const block_q6_K*>(w + j * ws) + b;
                if constexpr (PF) prefetch_w<sizeof(block_q6_K)>(wb);
                const __m128i scv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb->scales));
                __m256i isum[NX];
                for (int i = 0; i < NX; i++) isum[i] = _mm256_setzero_si256();
                const __m256i s16 = _mm256_cvtepi8_epi16(scv);  // the 16 sub-block scales as int16
                for (int h = 0; h < 2; h++) {
                    // scales 8h..8h+7 in both 128-bit halves
                    const __m256i sh =
                        h ? _mm256_permute2x128_si256(s16, s16, 0x11) : _mm256_permute2x128_si256(s16, s16, 0x00);
                    const __m256i ql0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb->ql + 64 * h));
                    const __m256i ql1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb->ql + 64 * h + 32));
                    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb->qh + 32 * h));
                    __m256i q[4];
                    q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
                    q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
                    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
                    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
                    for (int g = 0; g < 4; g++) {
                        // [scale 8h+2g x8 | scale 8h+2g+1 x8]: int16 lanes 2g / 2g+1 of sh
                        const __m256i sel = _mm256_setr_m128i(_mm_set1_epi16(short(((4 * g + 1) << 8) | (4 * g))),
                                                              _mm_set1_epi16(short(((4 * g + 3) << 8) | (4 * g + 2))));
                        const __m256i sv = _mm256_shuffle_epi8(sh, sel);
                        for (int i = 0; i < NX; i++) {
                            const int8_t* xq = reinterpret_cast<const block_q8_K*>(x + i * xs)[b].qs + 128 * h + 32 * g;
                            const __m256i p =
                                _mm256_maddubs_epi16(q[g], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
                            isum[i] = madd16_add(isum[i], p, sv);
                            keep_in_register(isum[i]);
                        }
                    }
                }
                const float dw = h2f(wb->d);
                for (int i = 0; i < NX; i++) {
                    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x + i * xs) + b;
                    // remove the +32 offset of the unsigned quants: 32 * sum_j sc_j * bsum_j
                    const __m256i corr =
                        _mm256_madd_epi16(s16, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb->bsums)));
                    const __m256i tot = _mm256_sub_epi32(isum[i], _mm256_slli_epi32(corr, 5));
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_set1_ps(dw * xb->d), acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = hsum(acc[i][j]);
    }
};

// ---------------------------------------------------------------- Q8_0 x Q8_0
// Signed x signed bytes with maddubs / vpdpbusd: |w| (unsigned) times x carrying w's sign.
// No int16 saturation on AVX2: |pair| <= 2 * 128 * 127 = 32512 (X quants are in [-127, 127]).
template <bool PF>
struct Q80Tile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        __m256 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm256_setzero_ps();
        const int64_t nb = K / QK8_0;
        for (int64_t b = 0; b < nb; b++) {
            __m256 dx[NX];  // X block scales, broadcast (one vector multiply per tile entry below)
            __m256i xv[NX];
            for (int i = 0; i < NX; i++) {
                const block_q8_0* xb = reinterpret_cast<const block_q8_0*>(x + i * xs) + b;
                dx[i] = _mm256_set1_ps(h2f(xb->d));
                xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb->qs));
            }
            for (int j = 0; j < NW; j++) {
                const block_q8_0* wb = reinterpret_cast<const block_q8_0*>(w + j * ws) + b;
                if constexpr (PF) prefetch_w<sizeof(block_q8_0)>(wb);
                const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb->qs));
                const __m256i aw = _mm256_sign_epi8(wq, wq);
                const __m256 dw = _mm256_set1_ps(h2f(wb->d));
                for (int i = 0; i < NX; i++) {
                    const __m256i p = dot_u8s8_add(_mm256_setzero_si256(), aw, _mm256_sign_epi8(xv[i], wq));
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, dx[i]), acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = hsum(acc[i][j]);
    }
};

// ---------------------------------------------------------------- panel GEMM (M >= 16)
// X panel layout, W unpacking and the driver: panel_gemm.h (shared with the AVX-512 file).
// One ymm holds 4 k of 8 rows, so a panel is worked as two halves of 8 rows.
// W rows are unpacked once per task.
// Per W row t, sub-block s and 8 X rows (one per int32 lane):
//   maddubs(4 W codes broadcast, 4 k of 8 rows) -> int16 pair sums; CH of them
//   are added in int16 before one madd with the sub-block scale -> int32.
//   No overflow: Q4_K |pair| <= 2*15*128 = 3840, CH = 8 -> 30720; Q6_K |pair|
//   <= 2*63*128 = 16128, CH = 2 -> 32256 (both < 32767). That is ~9 (Q4_K) /
//   12 (Q6_K) multiply-port ops per 256 MACs where the tiles need 16.
//   AVX-VNNI (kVnni): vpdpbusd sums a whole sub-block in int32 (no overflow:
//   |sum| <= 32 * 63 * 128), then one vpmulld with the scale: 8 + 1 (Q4_K) /
//   4 + 1 (Q6_K) ops per sub-block and W row; the same int32 s1 as the AVX2 build.
// The int32 block sums are the scalar reference's; only float order differs:
//   Q4_K: y += dx * (d * s1 - dmin * s2)      Q6_K: y += dx * d * (s1 - s2)
using WUnp = WUnpT<int16_t>;

// NWR W rows (row t: nb unpacked blocks at wu + t * nb) against half `hf` (rows 8hf..8hf+7)
// of one panel: out[t * 16 + 8 * hf + i] = dot(W row t, X row 8hf + i).
template <bool Q4, int NWR>
void panel_micro(const WUnp* wu, int64_t nb, const uint8_t* panel, int hf, float* out) {
    constexpr int NSUB = Q4 ? 8 : 16;  // sub-blocks per block
    constexpr int GPS = 64 / NSUB;     // 4-byte groups per sub-block
    // Groups summed before the sub-block scale is applied: AVX2 adds maddubs' int16 pair
    // sums (CH groups, the most that cannot overflow int16, then one madd with the scale);
    // AVX-VNNI adds vpdpbusd's int32 sums over the whole sub-block, then one vpmulld.
    constexpr int CH = kVnni ? GPS : Q4 ? 8 : 2;
    __m256 facc[NWR];
    for (int t = 0; t < NWR; t++) facc[t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* P = panel + b * kPanelBlock;
        __m256i s1[NWR];
        for (int t = 0; t < NWR; t++) s1[t] = _mm256_setzero_si256();
        for (int s = 0; s < NSUB; s++) {
            for (int c0 = 0; c0 < GPS; c0 += CH) {
                __m256i a[NWR];
                for (int t = 0; t < NWR; t++) a[t] = _mm256_setzero_si256();
                for (int gg = c0; gg < c0 + CH; gg++) {
                    const int g = s * GPS + gg;
                    const __m256i codes = _mm256_load_si256(reinterpret_cast<const __m256i*>(P + 64 * g + 32 * hf));
                    for (int t = 0; t < NWR; t++) {
                        int32_t w4;
                        std::memcpy(&w4, wu[t * nb + b].q + 4 * g, 4);
                        if constexpr (kVnni) a[t] = dot_u8s8_add(a[t], _mm256_set1_epi32(w4), codes);
                        else a[t] = _mm256_add_epi16(a[t], _mm256_maddubs_epi16(_mm256_set1_epi32(w4), codes));
                        keep_in_register(a[t]);  // in order: no add tree over the unrolled groups
                    }
                }
                for (int t = 0; t < NWR; t++) {
                    if constexpr (kVnni)
                        s1[t] =
                            _mm256_add_epi32(s1[t], _mm256_mullo_epi32(a[t], _mm256_set1_epi32(wu[t * nb + b].sc[s])));
                    else s1[t] = madd16_add(s1[t], a[t], _mm256_set1_epi16(wu[t * nb + b].sc[s]));
                }
            }
        }
        __m256i s2[NWR];
        for (int t = 0; t < NWR; t++) s2[t] = _mm256_setzero_si256();
        for (int pp = 0; pp < NSUB / 2; pp++) {
            const __m256i bsv = _mm256_load_si256(reinterpret_cast<const __m256i*>(P + 4096 + 64 + 64 * pp + 32 * hf));
            for (int t = 0; t < NWR; t++) {
                s2[t] = madd16_add(s2[t], bsv, _mm256_set1_epi32(int32_t(wu[t * nb + b].cm2[pp])));
                keep_in_register(s2[t]);
            }
        }
        const __m256 dx = _mm256_load_ps(reinterpret_cast<const float*>(P + 4096) + 8 * hf);
        for (int t = 0; t < NWR; t++) {
            const WUnp& u = wu[t * nb + b];
            if (Q4) {
                const __m256 f = _mm256_fmsub_ps(_mm256_cvtepi32_ps(s1[t]), _mm256_set1_ps(u.d),
                                                 _mm256_mul_ps(_mm256_cvtepi32_ps(s2[t]), _mm256_set1_ps(u.dmin)));
                facc[t] = _mm256_fmadd_ps(f, dx, facc[t]);
            } else {
                facc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s1[t], s2[t])),
                                          _mm256_mul_ps(_mm256_set1_ps(u.d), dx), facc[t]);
            }
        }
    }
    for (int t = 0; t < NWR; t++) _mm256_storeu_ps(out + 16 * t + 8 * hf, facc[t]);
}

// The micro-kernel of panel_gemm.h's driver: a ymm holds half a panel (8 rows).
struct PanelMicro {
    static constexpr int kMaxRows = 4, kLanes = 8;
    template <class U, int NWR>
    static void run(const WUnp* wu, int64_t nb, const uint8_t* panel, int part, float* out) {
        panel_micro<U::kQ4, NWR>(wu, nb, panel, part, out);
    }
};

// ---------------------------------------------------------------- Q8_0 panel GEMM (M >= 16)
// X panel of Q8_0 quants (panel_gemm.h), a whole panel (16 rows, two ymm) per
// call, so each W broadcast serves 16 rows (M = 1024, one thread, K x N 1280 x
// 5120: 104.7 -> 140.1 GFLOP/s vs 8 rows per call; 4 W rows x 2 halves of int32
// sums + 8 float accumulators fill the 16 ymm). Per W row t and 4-k group g:
//   kUnsigned = false (the avx2 build): the 4 W codes broadcast, ggml's sign trick for
//     signed x signed bytes (maddubs(|w|, sign(x, w)), as Q80Tile above and ggml's
//     mul_sum_i8_pairs_float), then madd with ones -> int32 per row. No int16 overflow:
//     |pair| <= 2 * 128 * 127 = 32512 (X quants are in [-127, 127]); it cannot take a
//     second pair, so each group gets its madd. Work per 32 MACs (8 rows x 4 k): sign,
//     maddubs, madd, add (the 2 x 4 tiles: 6 ops per 32 MACs of one X row).
//   kUnsigned = true (the avxvnni build): vpdpbusd takes unsigned x signed bytes, so W goes
//     in as u = w + 128 (PanelQ80U, as the AVX-512 panel) and 128 * sum(x) of each X row
//     and block comes off in int32: sum(u * x) - 128 * sum(x) = sum(w * x). Per group and
//     W row 1 broadcast + 2 vpdpbusd, where the sign trick takes 2 broadcasts, 2 vpsignb
//     and 2 vpdpbusd. The 128 * sum(x) sums are the panel's c field (prep_panel_q8_0),
//     loaded after the W rows' pass, so only 16 sums + 2 X vectors + 1 broadcast are live
//     in the hot loop (16 ymm without AVX-512). EVEX proxy (Zen 4, CMake
//     MLLAMA_Q_AVXVNNI_EVEX): Q8_0 M = 512 177-188 -> 218-235 GFLOP/s,
//     bench/results/2026-12-04-epyc-zen4-2c-vision.md section 6.
// Per block: the exact int32 sum of 32 products (dot_q8_0's sumi; the same in both forms),
// then y += (dw * dx) * sumi in float (only the float order differs from dot_q8_0), so the
// avxvnni path gives the avx2 path's bits.
template <bool kUnsigned, int NWR>
void panel_micro_q8_0(const std::conditional_t<kUnsigned, WUnpQ80U, WUnpQ80>* wu, int64_t nb, const uint8_t* panel,
                      float* out) {
    __m256 facc[NWR][2];
    for (int t = 0; t < NWR; t++) facc[t][0] = facc[t][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* P = panel + b * kPanelBlockQ80;
        __m256i s1[NWR][2];  // int32 sums, lanes = the panel's rows 0..7 / 8..15
        for (int t = 0; t < NWR; t++) s1[t][0] = s1[t][1] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(P + 64 * g));
            const __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(P + 64 * g + 32));
            for (int t = 0; t < NWR; t++) {
                if constexpr (kUnsigned) {
                    int32_t u4;
                    std::memcpy(&u4, wu[t * nb + b].u + 4 * g, 4);
                    const __m256i uv = _mm256_set1_epi32(u4);
                    s1[t][0] = dot_u8s8_add(s1[t][0], uv, c0);
                    s1[t][1] = dot_u8s8_add(s1[t][1], uv, c1);
                } else {
                    int32_t w4, a4;
                    std::memcpy(&w4, wu[t * nb + b].q + 4 * g, 4);
                    std::memcpy(&a4, wu[t * nb + b].a + 4 * g, 4);
                    const __m256i wv = _mm256_set1_epi32(w4), av = _mm256_set1_epi32(a4);
                    s1[t][0] = dot_u8s8_add(s1[t][0], av, _mm256_sign_epi8(c0, wv));
                    s1[t][1] = dot_u8s8_add(s1[t][1], av, _mm256_sign_epi8(c1, wv));
                }
            }
        }
        if constexpr (kUnsigned) {
            const __m256i x128[2] = {// 128 * sum(x) per row: the panel's c field
                                     _mm256_load_si256(reinterpret_cast<const __m256i*>(P + kQ80PanelC)),
                                     _mm256_load_si256(reinterpret_cast<const __m256i*>(P + kQ80PanelC + 32))};
            for (int t = 0; t < NWR; t++)
                for (int h = 0; h < 2; h++) s1[t][h] = _mm256_sub_epi32(s1[t][h], x128[h]);
        }
        const __m256 dx0 = _mm256_load_ps(reinterpret_cast<const float*>(P + kQ80PanelD));
        const __m256 dx1 = _mm256_load_ps(reinterpret_cast<const float*>(P + kQ80PanelD) + 8);
        for (int t = 0; t < NWR; t++) {
            const __m256 dw = _mm256_set1_ps(wu[t * nb + b].d);
            facc[t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[t][0]), _mm256_mul_ps(dw, dx0), facc[t][0]);
            facc[t][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[t][1]), _mm256_mul_ps(dw, dx1), facc[t][1]);
        }
    }
    for (int t = 0; t < NWR; t++) {
        _mm256_storeu_ps(out + 16 * t, facc[t][0]);
        _mm256_storeu_ps(out + 16 * t + 8, facc[t][1]);
    }
}

template <bool kUnsigned>
struct PanelMicroQ80T {
    static constexpr int kMaxRows = MQ_Q80_PW, kLanes = 16;
    template <class U, int NWR>
    static void run(const typename U::WUnp* wu, int64_t nb, const uint8_t* panel, int /*part: always 0*/, float* out) {
        panel_micro_q8_0<kUnsigned, NWR>(wu, nb, panel, out);
    }
};
// This build's Q8_0 panel: its W format and micro-kernel (see above).
using PanelQ80Path = std::conditional_t<kVnni, PanelQ80U, PanelQ80>;
using PanelMicroQ80Path = PanelMicroQ80T<kVnni>;

// Decode-sized calls (nx <= 2 X rows) stream W: one W row at a time with
// prefetch. Larger calls keep 4-row W groups and no prefetch (W is re-read
// from cache for every pair of X rows).
template <template <bool> class T, int PNX, int PNW>
void tile_q(const void* w, size_t ws, int nw, const void* x, size_t xs, int nx, int64_t K, float* y, int64_t ldy) {
    if (nx <= 2) run_tile<T<true>, 2, 1>(w, ws, nw, x, xs, nx, K, y, ldy);
    else run_tile<T<false>, PNX, PNW>(w, ws, nw, x, xs, nx, K, y, ldy);
}

}  // namespace

#if !defined(MQ_AVXVNNI)  // the avxvnni path uses these (no int8 multiply-adds in them)
void quantize_row_q8_K_avx2(const float* x, block_q8_K* y, int64_t k) { prep_q8_K(x, y, k); }
void quantize_row_q8_0_avx2(const float* x, block_q8_0* y, int64_t k) { prep_q8_0(x, y, k); }

uint64_t read_sum_avx2(const uint64_t* p, size_t n) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_epi64(s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
        s1 = _mm256_add_epi64(s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4)));
        s2 = _mm256_add_epi64(s2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 8)));
        s3 = _mm256_add_epi64(s3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 12)));
    }
    const __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
    uint64_t out[4];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), s);
    uint64_t r = out[0] + out[1] + out[2] + out[3];
    for (; i < n; i++) r += p[i];
    return r;
}
#endif

#if defined(MQ_AVXVNNI)
const KernelTable& avxvnni_kernels() {
#else
const KernelTable& avx2_kernels() {
#endif
    static const KernelTable k = {
        {DType::F32, {nullptr, nullptr, run_tile<FloatTile<LoadF32>, 2>}},
        {DType::F16, {nullptr, nullptr, run_tile<FloatTile<LoadF16>, 2>}},
        {DType::BF16, {nullptr, nullptr, run_tile<FloatTile<LoadBF16>, 2>}},
        {DType::Q8_0,
         {prep_q8_0, bytes_q8_0, tile_q<Q80Tile, MQ_P8NX, MQ_P8NW>, prep_panel_q8_0<quantize_q8_0_block>,
          panel_bytes_q8_0, panel_gemm<PanelQ80Path, PanelMicroQ80Path>}},
        {DType::Q4_K,
         {prep_q8_K, bytes_q8_K, tile_q<Q4KTile, MQ_PNX, MQ_PNW>, prep_panel<true, quantize_q8_K_block>, panel_bytes,
          panel_gemm<PanelQ4K<int16_t>, PanelMicro>}},
        {DType::Q6_K,
         {prep_q8_K, bytes_q8_K, tile_q<Q6KTile, MQ_PNX, MQ_PNW>, prep_panel<false, quantize_q8_K_block>, panel_bytes,
          panel_gemm<PanelQ6K<int16_t>, PanelMicro>}},
    };
    return k;
}

}  // namespace mq::cpu::detail
