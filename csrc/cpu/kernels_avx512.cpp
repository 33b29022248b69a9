// AVX-512 (F/BW/VL/DQ + VNNI) kernels. Compiled with AVX-512 flags; only
// called after matmul.cpp has checked the CPU and OS support them.
//
// Tiles are up to 4 X rows x 4 W rows. For each weight block the 4 W rows
// are unpacked once into registers (nibbles, scale vectors) and reused for
// all X rows of the tile; that reuse is what makes M >> 1 fast.
//
// Integer arithmetic per block (exact, as ggml's vec_dot_*_q8_K):
//   maddubs(u8 quants, s8 activations) -> int16 pair sums (no saturation:
//   |15*127*2| and |63*127*2| < 32767), then vpdpwssd with the int16
//   sub-block scales -> int32 (VNNI), then one float FMA per block.
#include <immintrin.h>

#include <cstring>

#include "cpu/kernels.h"
#include "quants/quants.h"

namespace mq::cpu::detail {
namespace {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// ---------------------------------------------------------------- float weights
// W rows as float32 / fp16 (F16C) / bf16 (bf16 is the top half of a float32).
struct LoadF32 {
    static __m512 load(const uint8_t* p, int64_t k) { return _mm512_loadu_ps(reinterpret_cast<const float*>(p) + k); }
    static __m512 load_tail(const uint8_t* p, int64_t k, __mmask16 m) {
        return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(p) + k);
    }
};
struct LoadF16 {
    static __m512 load(const uint8_t* p, int64_t k) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(p) + k)));
    }
    static __m512 load_tail(const uint8_t* p, int64_t k, __mmask16 m) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p) + k));
    }
};
struct LoadBF16 {
    static __m512 widen(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
    static __m512 load(const uint8_t* p, int64_t k) {
        return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(p) + k)));
    }
    static __m512 load_tail(const uint8_t* p, int64_t k, __mmask16 m) {
        return widen(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p) + k));
    }
};

template <class L>
struct FloatTile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        __m512 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m512 wv[NW];
            for (int j = 0; j < NW; j++) wv[j] = L::load(w + j * ws, k);
            for (int i = 0; i < NX; i++) {
                const __m512 xv = _mm512_loadu_ps(reinterpret_cast<const float*>(x + i * xs) + k);
                for (int j = 0; j < NW; j++) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
            }
        }
        if (k < K) {   // K % 16 values left: masked loads read nothing past the row
            const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1);
            __m512 wv[NW];
            for (int j = 0; j < NW; j++) wv[j] = L::load_tail(w + j * ws, k, m);
            for (int i = 0; i < NX; i++) {
                const __m512 xv = _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(x + i * xs) + k);
                for (int j = 0; j < NW; j++) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
};

// ---------------------------------------------------------------- Q4_K x Q8_K
// A Q4_K block's 128 qs bytes, loaded as two zmm, give in their low/high
// nibbles the sub-blocks [0|2], [1|3], [4|6], [5|7] (32 values each). The X
// rows are prepared with their Q8_K quants in that same order (prep_q8_K_q4),
// so each 64-byte X load lines up with one nibble vector; bsums stay in
// natural order (they only meet the mins).
void prep_q8_K_q4(const float* x, void* xq, int64_t K) {
    block_q8_K* y = static_cast<block_q8_K*>(xq);
    quantize_row_q8_K_ref(x, y, K);
    static const int order[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    for (int64_t b = 0; b < K / QK_K; b++) {
        int8_t tmp[QK_K];
        std::memcpy(tmp, y[b].qs, QK_K);
        for (int s = 0; s < 8; s++) std::memcpy(y[b].qs + 32 * s, tmp + 32 * order[s], 32);
    }
}
void prep_q8_K(const float* x, void* xq, int64_t K) { quantize_row_q8_K_ref(x, static_cast<block_q8_K*>(xq), K); }
size_t bytes_q8_K(int64_t K) { return size_t(K / QK_K) * sizeof(block_q8_K); }

// vpermw index vectors: int16 lane t of scale vector v takes sub-block scale
// idx(v, t) from the 8 (Q4_K) or 16 (Q6_K) int16 scales.
inline __m512i q4_scale_idx(int a, int b) {   // lanes 0..15 -> a, 16..31 -> b
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(short(a))), _mm256_set1_epi16(short(b)), 1);
}
inline __m512i q6_scale_idx(int v) {          // lanes 8s..8s+7 -> 4v + s
    return _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16(short(4 * v + 1)), _mm_set1_epi16(short(4 * v)))),
        _mm256_set_m128i(_mm_set1_epi16(short(4 * v + 3)), _mm_set1_epi16(short(4 * v + 2))), 1);
}

struct Q4KTile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        const __m512i idx0 = q4_scale_idx(0, 2), idx1 = q4_scale_idx(1, 3);
        const __m512i idx2 = q4_scale_idx(4, 6), idx3 = q4_scale_idx(5, 7);
        __m512 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm512_setzero_ps();
        const int64_t nb = K / QK_K;
        for (int64_t b = 0; b < nb; b++) {
            for (int j = 0; j < NW; j++) {
                const block_q4_K* wb = reinterpret_cast<const block_q4_K*>(w + j * ws) + b;
                uint64_t sc8, m8;
                unpack_q4_K_scales(wb->scales, &sc8, &m8);
                const __m512i s16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(int64_t(sc8))));
                const __m512i sv0 = _mm512_permutexvar_epi16(idx0, s16), sv1 = _mm512_permutexvar_epi16(idx1, s16);
                const __m512i sv2 = _mm512_permutexvar_epi16(idx2, s16), sv3 = _mm512_permutexvar_epi16(idx3, s16);
                // mins as 16 int16 [m0,m0,m1,m1,..]: madd with the 16 bsums gives m_j*(bs_2j + bs_2j+1)
                const __m128i mv = _mm_cvtsi64_si128(int64_t(m8));
                const __m256i mdup = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mv, mv));
                const __m512i q0 = _mm512_loadu_si512(wb->qs), q1 = _mm512_loadu_si512(wb->qs + 64);
                const __m512i w0 = _mm512_and_si512(q0, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
                const __m512i w2 = _mm512_and_si512(q1, m4), w3 = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
                const __m512 dw = _mm512_set1_ps(h2f(wb->d)), dmw = _mm512_set1_ps(h2f(wb->dmin));
                for (int i = 0; i < NX; i++) {
                    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x + i * xs) + b;
                    __m512i isum = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                                       _mm512_maddubs_epi16(w0, _mm512_loadu_si512(xb->qs)), sv0);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(w1, _mm512_loadu_si512(xb->qs + 64)), sv1);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(w2, _mm512_loadu_si512(xb->qs + 128)), sv2);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(w3, _mm512_loadu_si512(xb->qs + 192)), sv3);
                    const __m256i mins = _mm256_madd_epi16(mdup, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb->bsums)));
                    const __m512 fm = _mm512_cvtepi32_ps(_mm512_zextsi256_si512(mins));
                    // dx * (dw * isum - dmin * mins)
                    const __m512 f = _mm512_fnmadd_ps(dmw, fm, _mm512_mul_ps(dw, _mm512_cvtepi32_ps(isum)));
                    acc[i][j] = _mm512_fmadd_ps(f, _mm512_set1_ps(xb->d), acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
};

// ---------------------------------------------------------------- Q6_K x Q8_K
// Per half block (128 values): ql as one zmm [ql0..31 | ql32..63], qh as one
// ymm. H = [qh | qh >> 2] puts the 2 high bits of values 0..31 / 32..63 in
// bits 0-1 and of values 64..95 / 96..127 in bits 4-5 of each byte, so
//   values   0..63  = (ql & 15) | ((H << 4) & 0x30)
//   values 64..127  = (ql >> 4) | (H & 0x30)
// come out in natural order (ggml's dequantize_row_q6_K layout). The "-32"
// offset is applied once per block through the bsums:
//   sum_j sc_j * sum (q - 32) qx = sum_j sc_j * sum q qx  - 32 * sum_j sc_j * bsum_j.
struct Q6KTile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
        const __m512i idx0 = q6_scale_idx(0), idx1 = q6_scale_idx(1), idx2 = q6_scale_idx(2), idx3 = q6_scale_idx(3);
        __m512 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm512_setzero_ps();
        const int64_t nb = K / QK_K;
        for (int64_t b = 0; b < nb; b++) {
            for (int j = 0; j < NW; j++) {
                const block_q6_K* wb = reinterpret_cast<const block_q6_K*>(w + j * ws) + b;
                __m512i q[4];
                for (int h = 0; h < 2; h++) {
                    const __m512i ql = _mm512_loadu_si512(wb->ql + 64 * h);
                    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb->qh + 32 * h));
                    const __m512i H = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
                    q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_slli_epi16(H, 4), m30));
                    q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), _mm512_and_si512(H, m30));
                }
                const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb->scales)));
                const __m512i sz = _mm512_castsi256_si512(s16);
                const __m512i sv0 = _mm512_permutexvar_epi16(idx0, sz), sv1 = _mm512_permutexvar_epi16(idx1, sz);
                const __m512i sv2 = _mm512_permutexvar_epi16(idx2, sz), sv3 = _mm512_permutexvar_epi16(idx3, sz);
                // -32 * scales in the low 16 int16 lanes, zero above (|.| <= 4096)
                const __m512i scm = _mm512_zextsi256_si512(_mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(s16, 5)));
                const float dw = h2f(wb->d);
                for (int i = 0; i < NX; i++) {
                    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x + i * xs) + b;
                    __m512i isum = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                                       _mm512_maddubs_epi16(q[0], _mm512_loadu_si512(xb->qs)), sv0);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[1], _mm512_loadu_si512(xb->qs + 64)), sv1);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[2], _mm512_loadu_si512(xb->qs + 128)), sv2);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_maddubs_epi16(q[3], _mm512_loadu_si512(xb->qs + 192)), sv3);
                    const __m512i bs = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb->bsums)));
                    isum = _mm512_dpwssd_epi32(isum, bs, scm);   // upper lanes of scm are 0
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(dw * xb->d), acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
};

// ---------------------------------------------------------------- Q8_0 x Q8_0
// vpdpbusd multiplies unsigned by signed bytes, so W is shifted to unsigned
// (w + 128, an XOR with 0x80) and the extra 128 * sum(x) is removed by
// starting the int32 accumulator at -16 * sum(x) in each of the block's 8 lanes.
// X rows are prepared per pair of Q8_0 blocks (64 values) as:
struct XQ8Pair {
    int8_t qs[64];       // quants of blocks 2p, 2p+1 (ggml's quantize_row_q8_0_ref)
    int32_t corr[16];    // -16 * sum(qs of the block), lanes 0..7 block 2p, 8..15 block 2p+1
    float d[16];         // block scale (fp16-rounded as in Q8_0), same lane split
};
static_assert(sizeof(XQ8Pair) == 192, "XQ8Pair layout");

size_t bytes_xq8_pairs(int64_t K) { return size_t((K / QK8_0 + 1) / 2) * sizeof(XQ8Pair); }
void prep_xq8_pairs(const float* x, void* xq, int64_t K) {
    const int64_t nblk = K / QK8_0;
    XQ8Pair* out = static_cast<XQ8Pair*>(xq);
    for (int64_t p = 0; p < (nblk + 1) / 2; p++) {
        block_q8_0 blk[2];
        std::memset(blk, 0, sizeof(blk));   // odd tail: block 2p+1 is all zero (scale 0)
        quantize_row_q8_0_ref(x + 64 * p, blk, 2 * p + 1 < nblk ? 64 : 32);
        for (int h = 0; h < 2; h++) {
            int sum = 0;
            for (int l = 0; l < 32; l++) sum += blk[h].qs[l];
            std::memcpy(out[p].qs + 32 * h, blk[h].qs, 32);
            const float d = h2f(blk[h].d);
            for (int l = 0; l < 8; l++) {
                out[p].corr[8 * h + l] = -16 * sum;
                out[p].d[8 * h + l] = d;
            }
        }
    }
}

struct Q80Tile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        const __m512i sgn = _mm512_set1_epi8(char(0x80));
        __m512 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm512_setzero_ps();
        const int64_t nblk = K / QK8_0;
        for (int64_t p = 0; p < (nblk + 1) / 2; p++) {
            const bool full = 2 * p + 1 < nblk;
            for (int j = 0; j < NW; j++) {
                const block_q8_0* wb = reinterpret_cast<const block_q8_0*>(w + j * ws) + 2 * p;
                const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[0].qs));
                // never read past the row: the odd last block pairs with zeros
                const __m256i hi = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[1].qs)) : _mm256_setzero_si256();
                const __m512i wu = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), sgn);
                const __m512 dw = _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16(short(full ? wb[1].d : 0)),
                                                                   _mm_set1_epi16(short(wb[0].d))));
                for (int i = 0; i < NX; i++) {
                    const XQ8Pair* xp = reinterpret_cast<const XQ8Pair*>(x + i * xs) + p;
                    const __m512i dot = _mm512_dpbusd_epi32(_mm512_loadu_si512(xp->corr), wu, _mm512_loadu_si512(xp->qs));
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_loadu_ps(xp->d)), acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
};

}  // namespace

uint64_t read_sum_avx512(const uint64_t* p, size_t n) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(p + i));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(p + i + 8));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(p + i + 16));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(p + i + 24));
    }
    uint64_t s = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    for (; i < n; i++) s += p[i];
    return s;
}

const PathKernels& avx512_kernels() {
    static const PathKernels k = {
        {nullptr, nullptr, run_tile<FloatTile<LoadF32>, 4>},
        {nullptr, nullptr, run_tile<FloatTile<LoadF16>, 4>},
        {nullptr, nullptr, run_tile<FloatTile<LoadBF16>, 4>},
        {prep_xq8_pairs, bytes_xq8_pairs, run_tile<Q80Tile, 4>},
        {prep_q8_K_q4, bytes_q8_K, run_tile<Q4KTile, 4>},
        {prep_q8_K, bytes_q8_K, run_tile<Q6KTile, 4>},
    };
    return k;
}

}  // namespace mq::cpu::detail
