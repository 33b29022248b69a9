// AVX-512 (F/BW/VL/DQ + VNNI) kernels. Compiled with AVX-512 flags; only
// called after matmul.cpp has checked the CPU and OS support them.
//
// Three kinds of kernels:
//  * tiles (all types, any M): up to 8 X rows x 4 W rows; for each weight
//    block a W row is unpacked once into registers (nibbles, scale vectors)
//    and reused for the X rows of the tile. Tiles of one W row (decode, and
//    Q4_K / Q6_K for any M < 16) use software prefetch: that streams W from
//    DRAM fastest here.
//    Integer arithmetic per block (exact, as ggml's vec_dot_*_q8_K):
//    Q4_K / Q6_K: vpdpbusd(u8 quants, s8 activations) -> int32 sums of 4,
//    packed to int16 (no saturation: |4*15*128| and |4*63*128| < 32767), then
//    vpdpwssd with the int16 sub-block scales -> int32, then the float FMAs, for
//    K <= kPairMaxK once per PAIR of blocks (the two blocks' sums share one vector:
//    XQ4KPair, XQ6KPair, pair_isum); Q8_0: W shifted to unsigned, vpdpbusd (see Q80Tile).
//  * panel GEMM (Q4_K, Q6_K, Q8_0 with M >= 16): see "panel GEMM" below; about
//    twice the tile kernels' speed at M = 512.
//  * activation quantizers (Q8_K, Q8_0) giving ggml's reference bytes.
// MQ_Q4K_NX/NW, MQ_Q6K_NX/NW: tile sizes. With the panel GEMM taking M >= 16, the
// tiles serve M < 16: a batched decode step of several sequences. Tiles of up to 8 X
// rows x ONE W row (with software prefetch) are fastest there: the W block's unpack
// (scales, mins, nibbles: ~25 instructions) is shared by 8 rows, and 8 accumulators plus
// the unpacked block fit the 32 zmm registers, where 4 x 4 (16 accumulators) spilled and
// 4 x 2 still did. Measured (bench kernels, 2 threads, load ~1): M = 4, 2 x 1 -> 8 x 1:
// Q4_K 14336x4096 1.27 -> 1.07 ms, 4096x14336 1.35 -> 1.04 ms; Q6_K 128256x4096
// 15.8 -> 10.4 ms; M = 8: Q6_K 128256x4096 29.5 -> 18.4 ms; M <= 2 unchanged.
#include <immintrin.h>

#include <cstring>

#include "cpu/kernels.h"
#include "cpu/panel_gemm.h"
#include "cpu/simd_x86.h"
#include "quants/quants.h"

#ifndef MQ_Q4K_NX
#define MQ_Q4K_NX 8
#define MQ_Q4K_NW 1
#endif
#ifndef MQ_Q6K_NX
#define MQ_Q6K_NX 8
#define MQ_Q6K_NW 1
#endif

namespace mq::cpu::detail {
namespace {

// Decode tiles (<= 2 X rows) take one W row at a time (NWGD = 1 below), the quantized
// K tiles always do (NW = 1); one-W-row tiles use software prefetch (prefetch_w, simd_x86.h).

// ---------------------------------------------------------------- float weights
// W rows as float32 / fp16 (F16C) / bf16 (bf16 is the top half of a float32).
// kPrefetch: software prefetch distance in bytes along each W row; measured
// here (M = 1, one thread): 2 KiB ahead makes the 2-byte types ~15% faster,
// while F32 streams best with the hardware prefetcher alone.
struct LoadF32 {
    static constexpr int kBytes = 4, kPrefetch = 0;
    static __m512 load(const uint8_t* p, int64_t k) { return _mm512_loadu_ps(reinterpret_cast<const float*>(p) + k); }
    static __m512 load_tail(const uint8_t* p, int64_t k, __mmask16 m) {
        return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(p) + k);
    }
};
struct LoadF16 {
    static constexpr int kBytes = 2, kPrefetch = 2048;
    static __m512 load(const uint8_t* p, int64_t k) {
        return _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const uint16_t*>(p) + k)));
    }
    static __m512 load_tail(const uint8_t* p, int64_t k, __mmask16 m) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(p) + k));
    }
};
struct LoadBF16 {
    static constexpr int kBytes = 2, kPrefetch = 2048;
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
            for (int j = 0; j < NW; j++) {
                if constexpr (L::kPrefetch > 0)
                    _mm_prefetch(reinterpret_cast<const char*>(w + j * ws) + k * L::kBytes + L::kPrefetch, _MM_HINT_T0);
                wv[j] = L::load(w + j * ws, k);
            }
            for (int i = 0; i < NX; i++) {
                const __m512 xv = _mm512_loadu_ps(reinterpret_cast<const float*>(x + i * xs) + k);
                for (int j = 0; j < NW; j++) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
            }
        }
        if (k < K) {  // K % 16 values left: masked loads read nothing past the row
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
//
// The activation quantizer is a vector version of ggml's quantize_row_q8_K_ref
// giving the same bytes: scale from the first value of largest magnitude
// (with its sign), iscale = -127 / that value, q = min(127, nearest_int(iscale * x))
// (round to nearest even: vcvtps2dq with explicit rounding), d = 1 / iscale.
inline void quantize_q8_K_block(const float* x, block_q8_K* y, bool q4_order) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 vmax = _mm512_setzero_ps();
    for (int i = 0; i < 16; i++) vmax = _mm512_max_ps(vmax, _mm512_andnot_ps(sign, _mm512_loadu_ps(x + 16 * i)));
    const float amax = _mm512_reduce_max_ps(vmax);
    if (!(amax > 0.0f)) {  // all zero (or NaN): the reference writes an all-zero block
        std::memset(y, 0, sizeof(*y));
        return;
    }
    float mx = amax;
    const __m512 va = _mm512_set1_ps(amax);
    for (int i = 0; i < 16; i++) {
        const __m512 v = _mm512_loadu_ps(x + 16 * i);
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_andnot_ps(sign, v), va, _CMP_EQ_OQ);
        if (hit) {
            mx = x[16 * i + __builtin_ctz(hit)];
            break;
        }
    }
    const float iscale = -127.0f / mx;
    const __m512 vs = _mm512_set1_ps(iscale);
    const __m512i q127 = _mm512_set1_epi32(127);
    static const int slot[8] = {0, 2, 1, 3, 4, 6, 5, 7};  // sub-block j -> position (q4 order)
    for (int i = 0; i < 16; i++) {
        __m512i v = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 16 * i), vs),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_epi32(v, q127);
        y->bsums[i] = static_cast<int16_t>(_mm512_reduce_add_epi32(v));
        const int pos = q4_order ? 32 * slot[i / 2] + 16 * (i & 1) : 16 * i;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y->qs + pos), _mm512_cvtepi32_epi8(v));
    }
    y->d = 1.0f / iscale;
}
// Q4_K's activations for K > kPairMaxK (Q4KTile::run_blocks): Q8_K quants in the nibble order above, and instead of
// bsums the 8 floats dx * (bsum_2s + bsum_2s+1), so the mins term of a block,
// sum_s (dmin * m_s) * (dx * bsum pair_s), is one float FMA per X row.
struct XQ4K {
    float d;          // Q8_K scale dx
    int8_t qs[QK_K];  // quants, sub-blocks in order 0 2 1 3 4 6 5 7
    float dm[8];      // dx * (bsums[2s] + bsums[2s+1])
};
static_assert(sizeof(XQ4K) == sizeof(block_q8_K), "XQ4K has block_q8_K's size (prepared in place)");
void prep_xq4k_blocks(const float* x, void* xq, int64_t K) {
    XQ4K* y = static_cast<XQ4K*>(xq);
    for (int64_t b = 0; b < K / QK_K; b++) {
        block_q8_K* q = reinterpret_cast<block_q8_K*>(y + b);
        quantize_q8_K_block(x + QK_K * b, q, true);
        int16_t bs[16];
        std::memcpy(bs, q->bsums, sizeof(bs));
        float dm[8];
        for (int s = 0; s < 8; s++) dm[s] = q->d * float(bs[2 * s] + bs[2 * s + 1]);
        std::memcpy(y[b].dm, dm, sizeof(dm));
    }
}
// X rows as pairs of Q8_K blocks (XQ4KPair, XQ6KPair: qs[8][64] with chunk k of block
// 2p + h at qs[2k + h], dx[16] with lane l the scale of block 2p + ((l >> 1) & 1), the
// lanes of the tiles' pair sums); fill(o, h, q) writes the type's bsum-derived fields of
// block 2p + h. An odd last block pairs with an all-zero block (dx = 0, bsums 0).
template <class Pair, class Fill>
void prep_block_pairs(const float* x, void* xq, int64_t K, bool q4_order, Fill fill) {
    Pair* y = static_cast<Pair*>(xq);
    const int64_t nb = K / QK_K;
    for (int64_t p = 0; p < (nb + 1) / 2; p++) {
        Pair& o = y[p];
        for (int h = 0; h < 2; h++) {
            block_q8_K q;
            if (2 * p + h < nb) {
                quantize_q8_K_block(x + QK_K * (2 * p + h), &q, q4_order);
            } else {
                std::memset(&q, 0, sizeof(q));
            }
            for (int k = 0; k < 4; k++) std::memcpy(o.qs[2 * k + h], q.qs + 64 * k, 64);
            for (int l = 0; l < 16; l++)
                if (((l >> 1) & 1) == h) o.dx[l] = q.d;
            fill(o, h, q);
        }
    }
}
// Q4_K's activations for K <= kPairMaxK (Q4KTile::run_pairs), per PAIR of blocks (b = 2p, 2p + 1): the Q8_K quants of both blocks
// in the nibble order above, and the two blocks' float factors laid out in the int32 lanes
// Q4KTile's block-pair sum comes out in (lanes 4L + 0, 1: block 2p; 4L + 2, 3: block 2p + 1,
// see q4_pair_scale_idx), so that one cvt + mul + FMA serve two blocks. An odd last block
// pairs with an all-zero block (dx = 0, dm = 0); prep_block_pairs fills qs and dx.
struct XQ4KPair {
    // quants of blocks 2p + h, sub-blocks in order 0 2 1 3 4 6 5 7, by 64-value chunk k:
    // qs[2k + h] (the order the kernel reads them in: one sequential stream per row)
    int8_t qs[8][64];
    float dx[16];  // lane l: the Q8_K scale dx of block 2p + ((l >> 1) & 1)
    float dm[16];  // lanes 8h + s: dx * (bsums[2s] + bsums[2s+1]) of block 2p + h
};
static_assert(sizeof(XQ4KPair) == 640, "XQ4KPair layout");
void prep_xq4k_pairs(const float* x, void* xq, int64_t K) {
    prep_block_pairs<XQ4KPair>(x, xq, K, true, [](XQ4KPair& o, int h, const block_q8_K& q) {
        for (int s = 0; s < 8; s++) o.dm[8 * h + s] = q.d * float(q.bsums[2 * s] + q.bsums[2 * s + 1]);
    });
}
// The block-pair tiles are faster while a tile's X rows stay in L1 (K = 4096: M = 4 / 8
// rows of 5 KiB); at K = 14336 (72 KiB for M = 4) they were slower than the one-block tiles
// (measured, one thread: M = 4 Q4_K 4096x14336 2.0 -> 4.1 ms; the cause, likely the X
// rows' re-streaming from L2 for every W row, is not pinned down), so the X layout and the
// tile loop are chosen by K (prep_xq4k and Q4KTile::run see the same K).
constexpr int64_t kPairMaxK = 4096;
size_t bytes_xq4k(int64_t K) { return K <= kPairMaxK ? size_t((K / QK_K + 1) / 2) * sizeof(XQ4KPair) : bytes_q8_K(K); }
void prep_xq4k(const float* x, void* xq, int64_t K) {
    if (K <= kPairMaxK) {
        prep_xq4k_pairs(x, xq, K);
    } else {
        prep_xq4k_blocks(x, xq, K);
    }
}
void prep_q8_K(const float* x, void* xq, int64_t K) {
    block_q8_K* y = static_cast<block_q8_K*>(xq);
    for (int64_t b = 0; b < K / QK_K; b++) quantize_q8_K_block(x + QK_K * b, y + b, false);
}

// Q6_K's activations for K <= kPairMaxK (Q6KTile::run_pairs), per pair of blocks 2p + h:
// quants in natural order by 64-value chunk k (qs[2k + h]); bsums placed where Q6KTile's
// bsum term must land (int16 lane 8L + 4h + r: sub-block 4L + r of block 2p + h, so the
// vpdpwssd with the -32 * scales puts block 2p + h in int32 lanes 4L + 2h, 4L + 2h + 1, the
// pair sum's lanes); dx as XQ4KPair. An odd last block pairs with an all-zero block.
struct XQ6KPair {
    int8_t qs[8][64];
    int16_t bs[32];
    float dx[16];
};
static_assert(sizeof(XQ6KPair) == 640, "XQ6KPair layout");
void prep_xq6k_pairs(const float* x, void* xq, int64_t K) {
    prep_block_pairs<XQ6KPair>(x, xq, K, false, [](XQ6KPair& o, int h, const block_q8_K& q) {
        for (int L = 0; L < 4; L++)
            for (int r = 0; r < 4; r++) o.bs[8 * L + 4 * h + r] = q.bsums[4 * L + r];
    });
}
size_t bytes_xq6k(int64_t K) { return K <= kPairMaxK ? size_t((K / QK_K + 1) / 2) * sizeof(XQ6KPair) : bytes_q8_K(K); }
void prep_xq6k(const float* x, void* xq, int64_t K) {
    if (K <= kPairMaxK) {
        prep_xq6k_pairs(x, xq, K);
    } else {
        prep_q8_K(x, xq, K);
    }
}

// vpermw index vectors: int16 lane t of a scale vector takes sub-block scale idx(t)
// from the 8 (Q4_K) or 16 (Q6_K) int16 scales.
// For Q4_K's packed sums (Q4KTile::run_blocks): packs_epi32(p, q) puts, in each 128-bit lane L,
// p's int32 lanes 4L..4L+3 then q's as int16 (lanes 8L+u, u < 4 from p). p and q hold
// the 4-value dot products of two 64-value chunks (int32 lanes 0..7: the chunk's first
// sub-block, 8..15: its second), so int16 lane 8L+u belongs to sub-block
//   L < 2: u < 4 ? p1 : q1      L >= 2: u < 4 ? p2 : q2    (pX: chunk p's first / second).
inline __m512i q4_packed_scale_idx(int p1, int q1, int p2, int q2) {
    alignas(64) int16_t t[32];
    for (int L = 0; L < 4; L++)
        for (int u = 0; u < 8; u++) t[8 * L + u] = int16_t(L < 2 ? (u < 4 ? p1 : q1) : (u < 4 ? p2 : q2));
    return _mm512_load_si512(t);
}
// For Q4_K's block-pair sums (Q4KTile::run_pairs): packs_epi32(p, q) puts, in each 128-bit lane L,
// p's int32 lanes 4L..4L+3 then q's as int16 (lanes 8L+u, u < 4 from p). p and q hold the
// 4-value dot products of chunk c of blocks 2p / 2p + 1 (int32 lanes 0..7: the chunk's
// first sub-block f, 8..15: its second g), so int16 lane 8L+u takes, from the 16 int16
// scales [8 of block 2p | 8 of block 2p + 1], scale (u < 4 ? 0 : 8) + (L < 2 ? f : g); the
// vpdpwssd pair sums then land block 2p in int32 lanes 4L + 0, 1 and 2p + 1 in 4L + 2, 3.
inline __m512i q4_pair_scale_idx(int f, int g) {
    alignas(64) int16_t t[32];
    for (int L = 0; L < 4; L++)
        for (int u = 0; u < 8; u++) t[8 * L + u] = int16_t((u < 4 ? 0 : 8) + (L < 2 ? f : g));
    return _mm512_load_si512(t);
}
// Q6_K's (Q6KTile): chunks a and b of 64 values hold sub-blocks 4a..4a+3 / 4b..4b+3 of 16
// values (int32 lanes 4s..4s+3: sub-block 4a+s), so int16 lane 8L+u -> u < 4 ? 4a+L : 4b+L.
inline __m512i q6_packed_scale_idx(int a, int b) {
    alignas(64) int16_t t[32];
    for (int L = 0; L < 4; L++)
        for (int u = 0; u < 8; u++) t[8 * L + u] = int16_t(u < 4 ? 4 * a + L : 4 * b + L);
    return _mm512_load_si512(t);
}
// Q6_K's block-pair sums (Q6KTile::run_pairs): chunk k of blocks 2p (pa) and 2p + 1 (pc),
// packs_epi32(pa, pc): int16 lane 8L+u -> scale (u < 4 ? 0 : 16) + 4k + L of the 32 int16
// scales [16 of block 2p | 16 of block 2p + 1]; k = 4: the bsum term's lanes (XQ6KPair::bs),
// 8L + 4h + r -> 16h + 4L + r.
inline __m512i q6_pair_scale_idx(int k) {
    alignas(64) int16_t t[32];
    for (int L = 0; L < 4; L++)
        for (int u = 0; u < 8; u++) t[8 * L + u] = int16_t((u < 4 ? 0 : 16) + (k < 4 ? 4 * k + L : 4 * L + (u & 3)));
    return _mm512_load_si512(t);
}

// Block-pair tiles (Q4KTile / Q6KTile::run_pairs), per X row: the int32 pair sum of two
// blocks' 4 chunks (wa / wc: u8 quants of blocks 2p / 2p + 1; qs: the XQ*Pair quants; sv:
// the chunks' int16 scale vectors, see q4_pair_scale_idx): vpdpbusd per chunk and block,
// packed to int16 (|4*15*128|, |4*63*128| < 32767: exact), times the sub-block scales,
// summed in pairs: block 2p in int32 lanes 4L + 0, 1, block 2p + 1 in 4L + 2, 3.
inline __m512i pair_isum(const __m512i* wa, const __m512i* wc, const int8_t (*qs)[64], const __m512i* sv) {
    const __m512i z = _mm512_setzero_si512();
    __m512i isum = z;
    for (int k = 0; k < 4; k++) {
        const __m512i pa = _mm512_dpbusd_epi32(z, wa[k], _mm512_loadu_si512(qs[2 * k]));
        const __m512i pc = _mm512_dpbusd_epi32(z, wc[k], _mm512_loadu_si512(qs[2 * k + 1]));
        const __m512i pk = _mm512_packs_epi32(pa, pc);
        isum = k == 0 ? _mm512_madd_epi16(pk, sv[k]) : _mm512_dpwssd_epi32(isum, pk, sv[k]);
    }
    return isum;
}
// fp16 pairs (lo | hi << 16) of blocks 2p (a) and 2p + 1 (c) -> floats [a.lo, a.hi, c.lo, c.hi],
// and the lo values in the pair sum's lanes (lane l: block 2p + ((l >> 1) & 1)).
inline __m512 pair_f4(uint32_t a, uint32_t c) {
    return _mm512_castps128_ps512(_mm_cvtph_ps(_mm_set_epi32(0, 0, int(c), int(a))));
}
inline __m512 pair_lanes_lo(__m512 f4) {
    return _mm512_permutexvar_ps(_mm512_set_epi32(2, 2, 0, 0, 2, 2, 0, 0, 2, 2, 0, 0, 2, 2, 0, 0), f4);
}

// W side of one Q4_K block for Q4KTile (an absent block, the odd last one's partner,
// is all zero): nibble vectors w[c] of chunks c = sub-blocks (0, 2), (1, 3), (4, 6),
// (5, 7), the 8 scales / 8 mins as bytes, and d | dmin << 16 (fp16 bits).
struct Q4KW {
    __m512i w[4];
    uint64_t sc = 0, m = 0;
    uint32_t dd = 0;
};
inline Q4KW load_q4k_w(const block_q4_K* wb, __m512i m4) {
    Q4KW o;
    if (!wb) {
        for (auto& v : o.w) v = _mm512_setzero_si512();
        return o;
    }
    unpack_q4_K_scales(wb->scales, &o.sc, &o.m);
    std::memcpy(&o.dd, &wb->d, 4);  // d, dmin: adjacent fp16 fields
    const __m512i q0 = _mm512_loadu_si512(wb->qs), q1 = _mm512_loadu_si512(wb->qs + 64);
    o.w[0] = _mm512_and_si512(q0, m4);
    o.w[1] = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
    o.w[2] = _mm512_and_si512(q1, m4);
    o.w[3] = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
    return o;
}

// Two blocks (one XQ4KPair) per step, so the float work (int32 -> float, scale, mins) of
// both blocks is one vector's: per block and X row 4 vpdpbusd + 2 packs + 2 vpdpwssd (the
// exact int32 sums) + 2 float ops, where one block per step took 5 (measured, one thread:
// M = 4 Q4_K 14336x4096 1.72 -> 1.48 ms, Q6_K 128256x4096 16.6 -> 13.7 ms; the table is
// in bench/results/2026-12-03-epyc-zen5-2c-sessions.md section 4).
struct Q4KTile {
    template <int NX, int NW>
    static void run(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        if (K <= kPairMaxK) {
            run_pairs<NX, NW>(w, ws, x, xs, K, y, ldy);
        } else {
            run_blocks<NX, NW>(w, ws, x, xs, K, y, ldy);
        }
    }
    // One block per step, X as XQ4K (K > kPairMaxK).
    template <int NX, int NW>
    static void run_blocks(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        // chunks of XQ4K / w0..w3: sub-blocks (0, 2), (1, 3), (4, 6), (5, 7)
        const __m512i idx01 = q4_packed_scale_idx(0, 1, 2, 3), idx23 = q4_packed_scale_idx(4, 5, 6, 7);
        __m512 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm512_setzero_ps();
        const int64_t nb = K / QK_K;
        for (int64_t b = 0; b < nb; b++) {
            for (int j = 0; j < NW; j++) {
                const block_q4_K* wb = reinterpret_cast<const block_q4_K*>(w + j * ws) + b;
                if constexpr (NW == 1) prefetch_w<sizeof(block_q4_K)>(wb);
                uint64_t sc8, m8;
                unpack_q4_K_scales(wb->scales, &sc8, &m8);
                const __m512i s16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(int64_t(sc8))));
                const __m512i sv01 = _mm512_permutexvar_epi16(idx01, s16), sv23 = _mm512_permutexvar_epi16(idx23, s16);
                // dmin * m_s for the 8 sub-blocks, lanes 0..7 (8..15 zero)
                const __m512 wm = _mm512_zextps256_ps512(
                    _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(m8)))),
                                  _mm256_set1_ps(h2f(wb->dmin))));
                const __m512i q0 = _mm512_loadu_si512(wb->qs), q1 = _mm512_loadu_si512(wb->qs + 64);
                const __m512i w0 = _mm512_and_si512(q0, m4), w1 = _mm512_and_si512(_mm512_srli_epi16(q0, 4), m4);
                const __m512i w2 = _mm512_and_si512(q1, m4), w3 = _mm512_and_si512(_mm512_srli_epi16(q1, 4), m4);
                const __m512 dw = _mm512_set1_ps(h2f(wb->d));
                for (int i = 0; i < NX; i++) {
                    const XQ4K* xb = reinterpret_cast<const XQ4K*>(x + i * xs) + b;
                    // 4-value dot products per chunk (vpdpbusd), packed to int16 (|4*15*128| <
                    // 32767: exact), times the sub-block scales and summed in pairs (vpdpwssd):
                    // 6 multiplies per block and row instead of maddubs + dpwssd's 8.
                    const __m512i z = _mm512_setzero_si512();
                    const __m512i p0 = _mm512_dpbusd_epi32(z, w0, _mm512_loadu_si512(xb->qs));
                    const __m512i p1 = _mm512_dpbusd_epi32(z, w1, _mm512_loadu_si512(xb->qs + 64));
                    const __m512i p2 = _mm512_dpbusd_epi32(z, w2, _mm512_loadu_si512(xb->qs + 128));
                    const __m512i p3 = _mm512_dpbusd_epi32(z, w3, _mm512_loadu_si512(xb->qs + 192));
                    __m512i isum = _mm512_dpwssd_epi32(z, _mm512_packs_epi32(p0, p1), sv01);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(p2, p3), sv23);
                    // + dw * dx * isum  - sum_s (dmin m_s) * (dx bsum pair_s)
                    acc[i][j] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(xb->d)), acc[i][j]);
                    acc[i][j] = _mm512_fnmadd_ps(wm, _mm512_zextps256_ps512(_mm256_loadu_ps(xb->dm)), acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
    // Two blocks per step, X as XQ4KPair (K <= kPairMaxK).
    template <int NX, int NW>
    static void run_pairs(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        const __m512i m4 = _mm512_set1_epi8(0x0F);
        const __m512i sidx[4] = {q4_pair_scale_idx(0, 2), q4_pair_scale_idx(1, 3), q4_pair_scale_idx(4, 6),
                                 q4_pair_scale_idx(5, 7)};
        // [d0, dmin0, d1, dmin1] -> lane l: dmin of block l >> 3
        const __m512i midx = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
        __m512 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm512_setzero_ps();
        const int64_t nb = K / QK_K;
        for (int64_t p = 0; p < (nb + 1) / 2; p++) {
            const bool two = 2 * p + 1 < nb;
            for (int j = 0; j < NW; j++) {
                const block_q4_K* wb = reinterpret_cast<const block_q4_K*>(w + j * ws) + 2 * p;
                if constexpr (NW == 1) prefetch_w<2 * sizeof(block_q4_K)>(wb);
                const Q4KW a = load_q4k_w(wb, m4), c = load_q4k_w(two ? wb + 1 : nullptr, m4);
                const __m512i s16 = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_set_epi64x(c.sc, a.sc)));
                __m512i sv[4];
                for (int k = 0; k < 4; k++) sv[k] = _mm512_permutexvar_epi16(sidx[k], s16);
                const __m512 f4 = pair_f4(a.dd, c.dd);
                const __m512 dw = pair_lanes_lo(f4);
                // lanes 8h + s: dmin * m_s of block 2p + h
                const __m512 wm = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(c.m, a.m))),
                                                _mm512_permutexvar_ps(midx, f4));
                for (int i = 0; i < NX; i++) {
                    const XQ4KPair* xp = reinterpret_cast<const XQ4KPair*>(x + i * xs) + p;
                    const __m512i isum = pair_isum(a.w, c.w, xp->qs, sv);
                    // + dw * dx * isum  - sum_s (dmin m_s) * (dx bsum pair_s), both blocks
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_loadu_ps(xp->dx)),
                                                acc[i][j]);
                    acc[i][j] = _mm512_fnmadd_ps(wm, _mm512_loadu_ps(xp->dm), acc[i][j]);
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
        if (K <= kPairMaxK) {
            run_pairs<NX, NW>(w, ws, x, xs, K, y, ldy);
        } else {
            run_blocks<NX, NW>(w, ws, x, xs, K, y, ldy);
        }
    }
    // W side of one block (all zero for an absent one): the 4 chunks' 6-bit quants.
    static void load_w(const block_q6_K* wb, __m512i q[4]) {
        const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
        for (int h = 0; h < 2; h++) {
            if (!wb) {
                q[2 * h] = q[2 * h + 1] = _mm512_setzero_si512();
                continue;
            }
            const __m512i ql = _mm512_loadu_si512(wb->ql + 64 * h);
            const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb->qh + 32 * h));
            const __m512i H = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
            q[2 * h] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_slli_epi16(H, 4), m30));
            q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), _mm512_and_si512(H, m30));
        }
    }
    // Two blocks per step, X as XQ6KPair (K <= kPairMaxK): as Q4KTile::run_pairs, one cvt +
    // mul + FMA per two blocks and X row.
    template <int NX, int NW>
    static void run_pairs(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        __m512i sidx[5];
        for (int k = 0; k < 5; k++) sidx[k] = q6_pair_scale_idx(k);
        __m512 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm512_setzero_ps();
        const int64_t nb = K / QK_K;
        for (int64_t p = 0; p < (nb + 1) / 2; p++) {
            const bool two = 2 * p + 1 < nb;
            for (int j = 0; j < NW; j++) {
                const block_q6_K* wb = reinterpret_cast<const block_q6_K*>(w + j * ws) + 2 * p;
                if constexpr (NW == 1) prefetch_w<2 * sizeof(block_q6_K)>(wb);
                __m512i qa[4], qc[4];
                load_w(wb, qa);
                load_w(two ? wb + 1 : nullptr, qc);
                const __m128i sa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb->scales));
                const __m128i sc =
                    two ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb[1].scales)) : _mm_setzero_si128();
                const __m512i s32 = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(sa), sc, 1));
                __m512i sv[4];
                for (int k = 0; k < 4; k++) sv[k] = _mm512_permutexvar_epi16(sidx[k], s32);
                // -32 * scales in the bsum lanes (|.| <= 4096)
                const __m512i scm = _mm512_permutexvar_epi16(
                    sidx[4], _mm512_sub_epi16(_mm512_setzero_si512(), _mm512_slli_epi16(s32, 5)));
                const __m512 dw = pair_lanes_lo(pair_f4(wb->d, two ? wb[1].d : 0));
                for (int i = 0; i < NX; i++) {
                    const XQ6KPair* xp = reinterpret_cast<const XQ6KPair*>(x + i * xs) + p;
                    __m512i isum = pair_isum(qa, qc, xp->qs, sv);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_loadu_si512(xp->bs), scm);
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_loadu_ps(xp->dx)),
                                                acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
    // One block per step, X as block_q8_K (K > kPairMaxK).
    template <int NX, int NW>
    static void run_blocks(const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
        const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
        const __m512i idx01 = q6_packed_scale_idx(0, 1), idx23 = q6_packed_scale_idx(2, 3);
        __m512 acc[NX][NW];
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) acc[i][j] = _mm512_setzero_ps();
        const int64_t nb = K / QK_K;
        for (int64_t b = 0; b < nb; b++) {
            for (int j = 0; j < NW; j++) {
                const block_q6_K* wb = reinterpret_cast<const block_q6_K*>(w + j * ws) + b;
                if constexpr (NW == 1) prefetch_w<sizeof(block_q6_K)>(wb);
                __m512i q[4];
                for (int h = 0; h < 2; h++) {
                    const __m512i ql = _mm512_loadu_si512(wb->ql + 64 * h);
                    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb->qh + 32 * h));
                    const __m512i H = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
                    q[2 * h] =
                        _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_slli_epi16(H, 4), m30));
                    q[2 * h + 1] =
                        _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4), _mm512_and_si512(H, m30));
                }
                const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb->scales)));
                const __m512i sz = _mm512_castsi256_si512(s16);
                const __m512i sv01 = _mm512_permutexvar_epi16(idx01, sz), sv23 = _mm512_permutexvar_epi16(idx23, sz);
                // -32 * scales in the low 16 int16 lanes, zero above (|.| <= 4096)
                const __m512i scm =
                    _mm512_zextsi256_si512(_mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16(s16, 5)));
                const float dw = h2f(wb->d);
                for (int i = 0; i < NX; i++) {
                    const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x + i * xs) + b;
                    // as Q4KTile: vpdpbusd per chunk, packed to int16 (|4*63*128| = 32256 <
                    // 32767: exact), vpdpwssd with the scales
                    const __m512i z = _mm512_setzero_si512();
                    const __m512i p0 = _mm512_dpbusd_epi32(z, q[0], _mm512_loadu_si512(xb->qs));
                    const __m512i p1 = _mm512_dpbusd_epi32(z, q[1], _mm512_loadu_si512(xb->qs + 64));
                    const __m512i p2 = _mm512_dpbusd_epi32(z, q[2], _mm512_loadu_si512(xb->qs + 128));
                    const __m512i p3 = _mm512_dpbusd_epi32(z, q[3], _mm512_loadu_si512(xb->qs + 192));
                    __m512i isum = _mm512_dpwssd_epi32(z, _mm512_packs_epi32(p0, p1), sv01);
                    isum = _mm512_dpwssd_epi32(isum, _mm512_packs_epi32(p2, p3), sv23);
                    const __m512i bs =
                        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb->bsums)));
                    isum = _mm512_dpwssd_epi32(isum, bs, scm);  // upper lanes of scm are 0
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
    int8_t qs[64];     // quants of blocks 2p, 2p+1 (ggml's quantize_row_q8_0_ref)
    int32_t corr[16];  // -16 * sum(qs of the block), lanes 0..7 block 2p, 8..15 block 2p+1
    float d[16];       // block scale (fp16-rounded as in Q8_0), same lane split
};
static_assert(sizeof(XQ8Pair) == 192, "XQ8Pair layout");

// Vector version of ggml's quantize_row_q8_0_ref, same bytes: d = amax / 127
// (stored as fp16, round to nearest even as F16C), q = roundf(x * (1 / d)),
// where roundf rounds halves away from zero: truncate, then step one away
// from zero when the dropped fraction is >= 0.5 (both steps exact).
inline void quantize_q8_0_block(const float* x, block_q8_0* y) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y->d = _cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 vid = _mm512_set1_ps(id), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    const __m512 vs[2] = {v0, v1};
    for (int h = 0; h < 2; h++) {
        const __m512 p = _mm512_mul_ps(vs[h], vid);
        const __m512 t = _mm512_roundscale_ps(p, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        const __mmask16 up = _mm512_cmp_ps_mask(_mm512_andnot_ps(sign, _mm512_sub_ps(p, t)), half, _CMP_GE_OQ);
        // t +/- 1 with the sign of p where the fraction was >= 0.5
        const __m512 r = _mm512_mask_add_ps(t, up, t, _mm512_or_ps(one, _mm512_and_ps(p, sign)));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y->qs + 16 * h), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r)));
    }
}

size_t bytes_xq8_pairs(int64_t K) { return size_t((K / QK8_0 + 1) / 2) * sizeof(XQ8Pair); }
void prep_xq8_pairs(const float* x, void* xq, int64_t K) {
    const int64_t nblk = K / QK8_0;
    XQ8Pair* out = static_cast<XQ8Pair*>(xq);
    for (int64_t p = 0; p < (nblk + 1) / 2; p++) {
        block_q8_0 blk[2];
        std::memset(blk, 0, sizeof(blk));  // odd tail: block 2p+1 is all zero (scale 0)
        quantize_q8_0_block(x + 64 * p, &blk[0]);
        if (2 * p + 1 < nblk) quantize_q8_0_block(x + 64 * p + 32, &blk[1]);
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
                if constexpr (NX <= 2) prefetch_w<2 * sizeof(block_q8_0)>(wb);
                const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[0].qs));
                // never read past the row: the odd last block pairs with zeros
                const __m256i hi =
                    full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb[1].qs)) : _mm256_setzero_si256();
                const __m512i wu = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), sgn);
                const __m512 dw = _mm512_cvtph_ps(
                    _mm256_set_m128i(_mm_set1_epi16(short(full ? wb[1].d : 0)), _mm_set1_epi16(short(wb[0].d))));
                for (int i = 0; i < NX; i++) {
                    const XQ8Pair* xp = reinterpret_cast<const XQ8Pair*>(x + i * xs) + p;
                    const __m512i dot =
                        _mm512_dpbusd_epi32(_mm512_loadu_si512(xp->corr), wu, _mm512_loadu_si512(xp->qs));
                    acc[i][j] =
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dw, _mm512_loadu_ps(xp->d)), acc[i][j]);
                }
            }
        }
        for (int i = 0; i < NX; i++)
            for (int j = 0; j < NW; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
    }
};

// ---------------------------------------------------------------- panel GEMM (M >= 16)
// X panel layout, W unpacking (int32 sub-block scales here) and the driver: panel_gemm.h.
// Per block and W row t, for the 16 X rows at once (one per lane):
//   s1 = sum_s sc_s * (sum_{k in s} q_k * x_k)      (vpdpbusd, then vpmulld)
//   s2 = sum_s coef_s * bsum_s                      (vpdpwssd)
//   Q4_K: y += dx * (d * s1 - dmin * s2)      Q6_K: y += dx * d * (s1 - s2)
// (the same int32 block sums as the scalar reference, see kernels_scalar.cpp).
using WUnp = WUnpT<int32_t>;
static_assert(sizeof(WUnp) % 64 == 0, "WUnp size");
void quantize_block_simd(const float* x, block_q8_K* y) { quantize_q8_K_block(x, y, false); }

// NWR W rows (row t: nb unpacked blocks at wu + t * nb) against one panel:
// out[t * 16 + i] = dot(W row t, X row i).
template <bool Q4, int NWR>
void panel_micro(const WUnp* wu, int64_t nb, const uint8_t* panel, float* out) {
    constexpr int NSUB = Q4 ? 8 : 16;  // sub-blocks per block
    constexpr int GPS = 64 / NSUB;     // 4-byte groups per sub-block
    __m512 facc[NWR];
    for (int t = 0; t < NWR; t++) facc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* P = panel + b * kPanelBlock;
        __m512i s1[NWR];
        for (int t = 0; t < NWR; t++) s1[t] = _mm512_setzero_si512();
        for (int s = 0; s < NSUB; s++) {
            __m512i a[NWR];
            for (int t = 0; t < NWR; t++) a[t] = _mm512_setzero_si512();
            for (int gg = 0; gg < GPS; gg++) {
                const int g = s * GPS + gg;
                const __m512i codes = _mm512_load_si512(P + 64 * g);
                for (int t = 0; t < NWR; t++) {
                    int32_t w4;
                    std::memcpy(&w4, wu[t * nb + b].q + 4 * g, 4);
                    a[t] = _mm512_dpbusd_epi32(a[t], _mm512_set1_epi32(w4), codes);
                }
            }
            for (int t = 0; t < NWR; t++)
                s1[t] = _mm512_add_epi32(s1[t], _mm512_mullo_epi32(a[t], _mm512_set1_epi32(wu[t * nb + b].sc[s])));
        }
        __m512i s2[NWR];
        for (int t = 0; t < NWR; t++) s2[t] = _mm512_setzero_si512();
        for (int pp = 0; pp < NSUB / 2; pp++) {
            const __m512i bsv = _mm512_load_si512(P + 4096 + 64 + 64 * pp);
            for (int t = 0; t < NWR; t++)
                s2[t] = _mm512_dpwssd_epi32(s2[t], bsv, _mm512_set1_epi32(int32_t(wu[t * nb + b].cm2[pp])));
        }
        const __m512 dx = _mm512_load_ps(reinterpret_cast<const float*>(P + 4096));
        for (int t = 0; t < NWR; t++) {
            const WUnp& u = wu[t * nb + b];
            if (Q4) {
                const __m512 f = _mm512_fmsub_ps(_mm512_cvtepi32_ps(s1[t]), _mm512_set1_ps(u.d),
                                                 _mm512_mul_ps(_mm512_cvtepi32_ps(s2[t]), _mm512_set1_ps(u.dmin)));
                facc[t] = _mm512_fmadd_ps(f, dx, facc[t]);
            } else {
                facc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s1[t], s2[t])),
                                          _mm512_mul_ps(_mm512_set1_ps(u.d), dx), facc[t]);
            }
        }
    }
    for (int t = 0; t < NWR; t++) _mm512_storeu_ps(out + 16 * t, facc[t]);
}

// The micro-kernel of panel_gemm.h's driver: a zmm holds a whole panel (16 rows).
// Q4_K takes its 8-row groups as two calls of 4 W rows: with 8, its int32 sums, per
// sub-block partial sums, bsum terms and float accumulators (4 x 8 zmm) plus the codes
// spill (bench kernels, Zen 4, 2 threads, M = 256: 14336x4096 349 -> 613 GFLOP/s,
// 4096x4096 341 -> 595, 4096x14336 508 -> 589; M = 48: 322 -> 505). Q6_K keeps 8
// (with 4: M = 256 14336x4096 559 -> 444).
struct PanelMicro {
    static constexpr int kMaxRows = 8, kLanes = 16;
    template <class U, int NWR>
    static void run(const WUnp* wu, int64_t nb, const uint8_t* panel, int /*part: always 0*/, float* out) {
        if constexpr (U::kQ4 && NWR == 8) {
            panel_micro<U::kQ4, 4>(wu, nb, panel, out);
            panel_micro<U::kQ4, 4>(wu + 4 * nb, nb, panel, out + 64);
        } else {
            panel_micro<U::kQ4, NWR>(wu, nb, panel, out);
        }
    }
};

// ---------------------------------------------------------------- Q8_0 panel GEMM (M >= 16)
// X panel of Q8_0 quants (panel_gemm.h): one zmm holds a group of the whole panel
// (16 rows x 4 consecutive k), so each 4-byte W broadcast serves 16 rows, and one
// vpdpbusd does 64 multiply-adds (the Q80Tile above: one vpdpbusd + cvt + mul + FMA
// per 64 MACs of one X row and W row). W is unpacked to u = w + 128 (PanelQ80U):
// sum_k u_k x_k = sum_k w_k x_k + 128 sum_k x_k, and c = 128 * sum_k x_k of each
// row and block is stored in the panel (its c field, made by prep_panel_q8_0), one
// load per block shared by every W row of the call. Exact int32 sums (|u x| <=
// 255 * 127, 32 of them: < 2^21), the same as dot_q8_0's sumi; then
// y += (dw * dx) * sumi in float (only the float order differs from the scalar
// reference). NWR = 8: 8 int32 + 8 float
// accumulators, the codes and c: 18 of the 32 zmm.
template <int NWR>
void panel_micro_q8_0(const WUnpQ80U* wu, int64_t nb, const uint8_t* panel, float* out) {
    __m512 facc[NWR];
    for (int t = 0; t < NWR; t++) facc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* P = panel + b * kPanelBlockQ80;
        __m512i s1[NWR];
        for (int t = 0; t < NWR; t++) s1[t] = _mm512_setzero_si512();
        for (int g = 0; g < 8; g++) {
            const __m512i codes = _mm512_load_si512(P + 64 * g);
            for (int t = 0; t < NWR; t++) {
                int32_t u4;
                std::memcpy(&u4, wu[t * nb + b].u + 4 * g, 4);
                s1[t] = _mm512_dpbusd_epi32(s1[t], _mm512_set1_epi32(u4), codes);
            }
        }
        const __m512 dx = _mm512_load_ps(reinterpret_cast<const float*>(P + kQ80PanelD));
        const __m512i c = _mm512_load_si512(P + kQ80PanelC);
        for (int t = 0; t < NWR; t++) {
            const __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(s1[t], c));
            facc[t] = _mm512_fmadd_ps(f, _mm512_mul_ps(_mm512_set1_ps(wu[t * nb + b].d), dx), facc[t]);
        }
    }
    for (int t = 0; t < NWR; t++) _mm512_storeu_ps(out + 16 * t, facc[t]);
}

struct PanelMicroQ80 {
    static constexpr int kMaxRows = 8, kLanes = 16;
    template <class U, int NWR>
    static void run(const WUnpQ80U* wu, int64_t nb, const uint8_t* panel, int /*part: always 0*/, float* out) {
        panel_micro_q8_0<NWR>(wu, nb, panel, out);
    }
};

}  // namespace

void quantize_row_q8_K_avx512(const float* x, block_q8_K* y, int64_t k) { prep_q8_K(x, y, k); }
void quantize_row_q8_0_avx512(const float* x, block_q8_0* y, int64_t k) {
    for (int64_t b = 0; b < k / QK8_0; b++) quantize_q8_0_block(x + QK8_0 * b, y + b);
}

uint64_t read_sum_avx512(const uint64_t* p, size_t n) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        // same software prefetch as the decode kernels, so the probe is not the weaker streamer
        prefetch_w<256>(p + i);
        s0 = _mm512_add_epi64(s0, _mm512_loadu_si512(p + i));
        s1 = _mm512_add_epi64(s1, _mm512_loadu_si512(p + i + 8));
        s2 = _mm512_add_epi64(s2, _mm512_loadu_si512(p + i + 16));
        s3 = _mm512_add_epi64(s3, _mm512_loadu_si512(p + i + 24));
    }
    uint64_t s = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3)));
    for (; i < n; i++) s += p[i];
    return s;
}

const KernelTable& avx512_kernels() {
    static const KernelTable k = {
        {DType::F32, {nullptr, nullptr, run_tile<FloatTile<LoadF32>, 4>}},
        {DType::F16, {nullptr, nullptr, run_tile<FloatTile<LoadF16>, 4>}},
        {DType::BF16, {nullptr, nullptr, run_tile<FloatTile<LoadBF16>, 4>}},
        {DType::Q8_0,
         {prep_xq8_pairs, bytes_xq8_pairs, run_tile<Q80Tile, 4, 4, 1>, prep_panel_q8_0<quantize_q8_0_block>,
          panel_bytes_q8_0, panel_gemm<PanelQ80U, PanelMicroQ80>}},
        {DType::Q4_K,
         {prep_xq4k, bytes_xq4k, run_tile<Q4KTile, MQ_Q4K_NX, MQ_Q4K_NW, 1>, prep_panel<true, quantize_block_simd>,
          panel_bytes, panel_gemm<PanelQ4K<int32_t>, PanelMicro>}},
        {DType::Q6_K,
         {prep_xq6k, bytes_xq6k, run_tile<Q6KTile, MQ_Q6K_NX, MQ_Q6K_NW, 1>, prep_panel<false, quantize_block_simd>,
          panel_bytes, panel_gemm<PanelQ6K<int32_t>, PanelMicro>}},
    };
    return k;
}

}  // namespace mq::cpu::detail
