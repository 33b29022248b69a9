// The amx path's flash attention (attention_flash.h): Q·Kᵀ and P·V on Intel AMX-BF16 tiles
// (TDPBF16PS: bf16 pairs multiplied exactly, summed into float32; Intel SDM vol. 2), with
// float32 accuracy kept by splitting every float32 operand into bf16 pieces.
//
// Why pieces: one bf16 rounding of Q and K costs ~5e-3 relative error in the attention output
// (bench/attn_precision.py), 500x the F32 parity bound (1e-5). x = h + m + l with
// h = bf16(x), m = bf16(x - h), l = bf16(x - h - m) carries 24 significant bits, float32's;
// the products of pieces whose orders add up to at most 2 leave an error of ~2^-24 |q||k|:
//   q·k ≈ qh·kh + qh·km + qm·kh + qh·kl + qm·km + ql·kh          (6 terms)
// These six products are one dot product over an extended head of E = 6 hd values:
//   Q' = [qh qh qm qh qm ql],  K' = [kh km kh kl km kh]        (Q'·K'ᵀ = the sum above)
// so the scores are a plain bf16 GEMM with K = E (hd 80: E = 480, 15 tile steps of 32).
// P·V: p ∈ [0, 1] and V split in two (h + l, 16 bits): p·v ≈ ph·vh + ph·vl + pl·vh.
// Measured against float64 (numpy model of exactly these products; 256 queries x 6432 keys,
// hd 80, scores of std 2.25): 6-term scores alone 6.9e-8 relative, with 3-term P·V 3.4e-6;
// cheaper splits fail the 1e-5 bound (3-term scores 1.2e-5, 4-term 8.7e-6: the pieces' own
// rounding, not the dropped products, dominates). Per key block the work is 6 x 1.2 (the
// padding of hd to the 32-value steps is absorbed by E) + 3 bf16 tile products where the
// float kernel does 2 float32 FMA passes; AMX's bf16 rate is 16x the zmm FMA rate per cycle
// (1024 vs 64 FLOP), so the products take about a third of the float kernel's time.
//
// Layout (tiles are 16 rows x 64 bytes throughout; A row-major, B in AMX's pair layout
// B[k/2][n][2], SDM "TDPBF16PS"):
//   packed K' of a KV group: [nkp/16 key groups][ES = E/32 steps][16 pairs][16 keys][2] bf16
//   packed V' of a KV group: [nkp/32 key steps][2 pieces h, l][hd/16 dim tiles][16 pairs][16 dims][2]
//   (nkp = nk rounded up to 32; the padding keys are zeros and masked to -inf)
// One task: up to kRows query rows of the group, in sub-blocks of 32 (two A tiles), keys in
// chunks of kChunk (the chunk's K' and V', 320 KiB at hd 80, stay in L2 while every
// sub-block of the task uses them). Per task (thread-local scratch):
//   qp [kRows][E] bf16   Q' (scale folded in before the split)
//   o  [kRows][hd] f32   output accumulators (C tiles loaded from / stored to it)
//   m, l [kRows]         running max and sum (online softmax, Dao 2023, arXiv:2307.08691,
//                        here per chunk of keys)
//   s  [2][32][kChunk] f32  the scores of two sub-blocks (one computed while the other's
//                        softmax runs) of a chunk
//   p  [kChunk/32][2 pieces][32 rows][32] bf16  P' as A tiles (ph, pl)
// The softmax, masking and the O rescale are the AVX-512 float code of the other kernels.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common/align.h"
#include "common/profile.h"
#include "cpu/attention_flash.h"
#include "cpu/simd_avx512.h"

namespace mq::cpu::detail {
namespace {

// query rows per task: every task streams its group's whole K' / V' (8 MiB at hd 80 and 6432
// keys) from L3 once; 512 rows measured 0.52 s against 0.56 s for 256 (6432 x 6432 x 16 heads,
// 2 threads), despite 13 tasks per group over 2 threads
constexpr int kRows = 512;
constexpr int kChunk = 256;  // keys per chunk (multiple of 32)

// Palette 1, all 8 tiles 16 rows x 64 bytes: C tmm0-3, A tmm4-5, B tmm6-7.
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Keys in the packed layout: nk rounded up to a whole key step of 32.
inline int64_t padded_keys(int64_t nk) { return (nk + 31) / 32 * 32; }

inline __m512 bf16_to_f32(__m256bh h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

// x (16 floats) -> its bf16 pieces h, m, l (x = h + m + l to float32's precision).
inline void split3(__m512 x, __m256i& h, __m256i& m, __m256i& l) {
    const __m256bh bh = _mm512_cvtneps_pbh(x);
    const __m512 r1 = _mm512_sub_ps(x, bf16_to_f32(bh));
    const __m256bh bm = _mm512_cvtneps_pbh(r1);
    const __m512 r2 = _mm512_sub_ps(r1, bf16_to_f32(bm));
    h = (__m256i)bh;
    m = (__m256i)bm;
    l = (__m256i)_mm512_cvtneps_pbh(r2);
}

inline void split2(__m512 x, __m256i& h, __m256i& l) {
    const __m256bh bh = _mm512_cvtneps_pbh(x);
    h = (__m256i)bh;
    l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, bf16_to_f32(bh)));
}

size_t amx_packed_elems(int64_t nk, int hd) {
    const int64_t nkp = padded_keys(nk);
    return size_t(nkp) * 6 * hd + size_t(nkp) * 2 * hd;  // K' then V'
}

// r[0..16) as a 16 x 16 matrix of 32-bit elements (row i = r[i]) -> its transpose. Recursive
// swap of the off-diagonal blocks of 8, 4, 2, 1: rows i and i + d (bit d of i clear) exchange
// row i's lanes with bit d set against row i + d's lanes with it clear, one masked permute each.
inline void transpose16x16_epi32(__m512i r[16]) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int d = 8; d >= 1; d /= 2) {
        __mmask16 hi = 0;  // lanes with bit d set
        for (int L = 0; L < 16; L++) hi = __mmask16(hi | ((L & d) ? (1u << L) : 0u));
        const __m512i minus = _mm512_sub_epi32(lane, _mm512_set1_epi32(d));
        const __m512i plus = _mm512_add_epi32(lane, _mm512_set1_epi32(d));
        for (int i = 0; i < 16; i++) {
            if (i & d) continue;
            const __m512i x = r[i], y = r[i + d];
            r[i] = _mm512_mask_permutexvar_epi32(x, hi, minus, y);                 // lane L (bit d set) <- y[L - d]
            r[i + d] = _mm512_mask_permutexvar_epi32(y, __mmask16(~hi), plus, x);  // lane L (clear) <- x[L + d]
        }
    }
}

// Keys [j0, j1) (j0 a multiple of 32) of a group's float32 K / V rows (key j at k + j * ks)
// into the packed K' / V' (dst: amx_packed_elems(nk, hd) bf16); a range ending at nk goes on
// to the padded end, whose keys become zeros. Per 16
// keys: their K' rows and V pieces (ext, vv), then per step of 32 extended values one 16 x 16
// transpose of bf16 pairs (tile row p = pair p of the 16 keys), and per pair of keys and 16
// dims one interleave of the two value rows (tile row = [16 dims][2 keys]).
void amx_pack(const float* k, const float* v, int64_t ks, int64_t nk, int hd, int64_t j0, int64_t j1, uint16_t* dst) {
    const int64_t nkp = padded_keys(nk);
    if (j1 == nk) j1 = nkp;
    const int E = 6 * hd, ES = E / 32, DT = hd / 16;
    uint16_t* kp = dst;
    uint16_t* vp = dst + size_t(nkp) * E;
    thread_local std::vector<uint16_t> buf;
    buf.resize(size_t(16) * E + size_t(16) * 2 * hd + 32);
    uint16_t* ext = align64(buf.data());  // [16 keys][E]
    uint16_t* vv = ext + size_t(16) * E;  // [16 keys][2 pieces][hd]
    // interleave of two 16 x u16 rows a (indices 0..15) and b (32..47): a0 b0 a1 b1 ...
    alignas(64) uint16_t il[32];
    for (int n = 0; n < 16; n++) {
        il[2 * n] = uint16_t(n);
        il[2 * n + 1] = uint16_t(32 + n);
    }
    const __m512i ilv = _mm512_load_si512(il);
    for (int64_t g0 = j0; g0 < j1; g0 += 16) {
        for (int n = 0; n < 16; n++) {
            const int64_t j = g0 + n;
            uint16_t* e = ext + size_t(n) * E;
            uint16_t* w = vv + size_t(n) * 2 * hd;
            if (j >= nk) {
                std::memset(e, 0, size_t(E) * sizeof(uint16_t));
                std::memset(w, 0, size_t(2) * hd * sizeof(uint16_t));
                continue;
            }
            for (int d = 0; d < hd; d += 16) {
                __m256i h, m, l;
                split3(_mm512_loadu_ps(k + j * ks + d), h, m, l);
                const __m256i pieces[6] = {h, m, h, l, m, h};  // K' = [kh km kh kl km kh]
                for (int t = 0; t < 6; t++) _mm256_store_si256((__m256i*)(e + t * hd + d), pieces[t]);
                split2(_mm512_loadu_ps(v + j * ks + d), h, l);
                _mm256_store_si256((__m256i*)(w + d), h);
                _mm256_store_si256((__m256i*)(w + hd + d), l);
            }
        }
        // K': tile (g0 / 16, step s) row p = pair p of step s of the 16 keys
        for (int s = 0; s < ES; s++) {
            __m512i r[16];
            for (int n = 0; n < 16; n++) r[n] = _mm512_load_si512(ext + size_t(n) * E + s * 32);
            transpose16x16_epi32(r);
            uint16_t* tile = kp + (size_t(g0 / 16) * ES + s) * 512;
            for (int p = 0; p < 16; p++) _mm512_store_si512(tile + p * 32, r[p]);
        }
        // V': [j/32][piece][d/16][(j%32)/2][d%16][j%2]
        for (int n = 0; n < 16; n += 2) {
            const int64_t j = g0 + n;
            for (int t = 0; t < 2; t++) {
                const uint16_t* ra = vv + size_t(n) * 2 * hd + t * hd;
                const uint16_t* rb = ra + 2 * hd;  // key j + 1, same piece
                uint16_t* out = vp + (size_t(j / 32) * 2 + t) * DT * 512 + ((j % 32) / 2) * 32;
                for (int dt = 0; dt < DT; dt++) {
                    const __m512i x = _mm512_castsi256_si512(_mm256_load_si256((const __m256i*)(ra + dt * 16)));
                    const __m512i y = _mm512_castsi256_si512(_mm256_load_si256((const __m256i*)(rb + dt * 16)));
                    _mm512_store_si512(out + dt * 512, _mm512_permutex2var_epi16(x, ilv, y));
                }
            }
        }
    }
}

// The task kernel (FlashKernel::run); a.packed: the group's K' / V' (amx_pack).
void amx_rows(const FlashArgs& a, int64_t r0, int nr, uint64_t* prof) {
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    const int hd = a.hd, E = 6 * hd, ES = E / 32, DT = hd / 16;
    const int64_t nk = a.nk, nkp = padded_keys(nk);
    const uint16_t* kp = a.packed;
    const uint16_t* vp = a.packed + size_t(nkp) * E;
    const int nrp = (nr + 31) / 32 * 32;  // rows in whole sub-blocks (pad rows: zero Q')
    // Every tile row is a whole 64-byte line: a row split over two lines measured ~3x slower
    // tile loads (Xeon guest), so the buffers are 64-byte aligned (and their strides, E * 2,
    // hd * 4, kChunk * 4 bytes, multiples of 64).
    thread_local std::vector<uint16_t> qbuf, pbuf;
    thread_local std::vector<float> fbuf;
    qbuf.resize(size_t(kRows) * E + 32);
    pbuf.resize(size_t(kChunk) * 2 * 32 + 32);
    fbuf.resize(size_t(kRows) * hd + 2 * kRows + size_t(64) * kChunk + 16);
    uint16_t* qp = align64(qbuf.data());
    uint16_t* pp = align64(pbuf.data());
    float* o = align64(fbuf.data());
    float* m = o + size_t(kRows) * hd;
    float* l = m + kRows;
    float* s = l + kRows;
    int64_t qi[kRows], last[kRows];
    int64_t max_last = -1;
    std::fill(o, o + size_t(nrp) * hd, 0.0f);
    const __m512 sc = _mm512_set1_ps(a.scale);
    for (int r = 0; r < nrp; r++) {
        m[r] = ninf;
        l[r] = 0.0f;
        uint16_t* dst = qp + size_t(r) * E;
        if (r >= nr) {
            std::memset(dst, 0, size_t(E) * sizeof(uint16_t));
            last[r] = nk - 1;
            continue;
        }
        const int64_t i = (r0 + r) / a.G, h = int64_t(a.g) * a.G + (r0 + r) % a.G;
        qi[r] = i;
        const float* src = a.q + (i * a.n_head + h) * hd;
        for (int d = 0; d < hd; d += 16) {
            __m256i ph, pm, pl;
            split3(_mm512_mul_ps(_mm512_loadu_ps(src + d), sc), ph, pm, pl);
            const __m256i pieces[6] = {ph, ph, pm, ph, pm, pl};  // Q' = [qh qh qm qh qm ql]
            for (int t = 0; t < 6; t++) _mm256_storeu_si256((__m256i*)(dst + t * hd + d), pieces[t]);
        }
        last[r] = a.causal ? std::min(i + a.q_offset, nk - 1) : nk - 1;
        max_last = std::max(max_last, last[r]);
    }
    uint64_t tp = prof ? prof::now_ns() : 0;
    auto lap = [&](int phase) {
        if (!prof) return;
        const uint64_t t = prof::now_ns();
        prof[phase] += t - tp;
        tp = t;
    };
    TileConfig cfg;
    _tile_loadconfig(&cfg);
    const int ldo = hd * 4;
    // 2. one row of a sub-block: masking, the online softmax update, P' pieces, O *= α.
    //   sb: the sub-block's scores [32][kChunk];  keys j0 .. j0 + nkc
    auto softmax_row = [&](int rb, float* sb, int r, int64_t j0, int nkc) {
        const int row = rb + r;
        float* sr = sb + size_t(r) * kChunk;
        // keys j0 + j visible for j < vis: last[row] <= nk - 1 excludes the padding keys too
        const int64_t vis = std::clamp<int64_t>(last[row] - j0 + 1, 0, nkc);
        const float* mr = (a.mask && row < nr) ? a.mask + qi[row] * a.ld_mask + j0 : nullptr;
        __m512 mx = _mm512_set1_ps(ninf);
        if (mr || vis < nkc) {
            for (int j = 0; j < nkc; j += 16) {
                __m512 x = _mm512_load_ps(sr + j);
                const int64_t nv = std::clamp<int64_t>(vis - j, 0, 16);
                const __mmask16 live = __mmask16((1u << nv) - 1);
                if (mr) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(live, mr + j));
                x = _mm512_mask_blend_ps(live, _mm512_set1_ps(ninf), x);
                _mm512_store_ps(sr + j, x);
                mx = _mm512_max_ps(mx, x);
            }
        } else {  // nothing masked in this chunk: the max only
            __m512 mx2 = mx;
            for (int j = 0; j < nkc; j += 32) {
                mx = _mm512_max_ps(mx, _mm512_load_ps(sr + j));
                mx2 = _mm512_max_ps(mx2, _mm512_load_ps(sr + j + 16));
            }
            mx = _mm512_max_ps(mx, mx2);
        }
        const float mold = m[row];
        const float mnew = std::max(mold, _mm512_reduce_max_ps(mx));
        // as the float kernels: subtract max(m', lowest) (nothing visible: all 0;
        // finfo.min everywhere: uniform)
        const float msub = std::max(mnew, std::numeric_limits<float>::lowest());
        const __m512 vsub = _mm512_set1_ps(msub);
        const float alpha = _mm512_cvtss_f32(V512::exp(_mm512_set1_ps(mold - msub)));
        __m512 sum = _mm512_setzero_ps();
        for (int j = 0; j < nkc; j += 16) {
            const __m512 p = V512::exp(_mm512_sub_ps(_mm512_load_ps(sr + j), vsub));
            sum = _mm512_add_ps(sum, p);
            __m256i ph, pl;
            split2(p, ph, pl);
            uint16_t* pt = pp + (size_t(j / 32) * 2 * 32 + r) * 32 + (j % 32);
            _mm256_store_si256((__m256i*)pt, ph);
            _mm256_store_si256((__m256i*)(pt + 32 * 32), pl);
        }
        l[row] = alpha * l[row] + _mm512_reduce_add_ps(sum);
        m[row] = mnew;
        if (alpha != 1.0f) {
            float* orow = o + size_t(row) * hd;
            const __m512 va = _mm512_set1_ps(alpha);
            for (int d = 0; d < hd; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(va, _mm512_loadu_ps(orow + d)));
        }
    };
    // 1. S [32][nkc] = Q'·K'ᵀ of sub-block rb: 2 x 2 tiles per 32 keys, ES steps of 32
    //    extended values. The tile unit works on its own while the vector units run
    //    independent code that follows in program order: every fourth step, one softmax row
    //    of the previous sub-block (`pending` rows left: prev_rb, prev_s) goes in between,
    //    so the two overlap (hd 80, 6432 x 6432, 2 threads: 0.63 -> 0.55-0.63 s a call;
    //    every 1 / 2 / 3 / 5 / 6 steps measured 0.61 / 0.65 / 0.60 / 0.61 / 0.65 s).
    int pending = 0, prev_rb = 0;
    float* prev_s = nullptr;
    auto qk = [&](int rb, float* sb, int64_t j0, int nkc) {
        const uint16_t* qa = qp + size_t(rb) * E;
        int tick = 0;
        for (int kb = 0; kb < nkc / 32; kb++) {
            const uint16_t* kbp = kp + (size_t(j0 / 16 + 2 * kb) * ES) * 512;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int st = 0; st < ES; st++) {
                _tile_loadd(4, qa + st * 32, E * 2);
                _tile_loadd(5, qa + size_t(16) * E + st * 32, E * 2);
                _tile_stream_loadd(6, kbp + size_t(st) * 512, 64);
                _tile_stream_loadd(7, kbp + size_t(ES + st) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
                if (pending && ++tick % 4 == 0) {
                    softmax_row(prev_rb, prev_s, 32 - pending, j0, nkc);
                    pending--;
                }
            }
            float* sk = sb + kb * 32;
            _tile_stored(0, sk, kChunk * 4);
            _tile_stored(1, sk + 16, kChunk * 4);
            _tile_stored(2, sk + 16 * kChunk, kChunk * 4);
            _tile_stored(3, sk + 16 * kChunk + 16, kChunk * 4);
        }
    };
    // 3. O [32][hd] += P'·V' of sub-block rb: per pair of dim tiles 2 x 2 C tiles; per 32
    //    keys ph·vh, ph·vl, pl·vh.
    auto pv = [&](int rb, int64_t j0, int nkc) {
        float* ob = o + size_t(rb) * hd;
        for (int dt = 0; dt < DT; dt += 2) {
            const bool two = dt + 1 < DT;
            _tile_loadd(0, ob + dt * 16, ldo);
            _tile_loadd(2, ob + 16 * hd + dt * 16, ldo);
            if (two) {
                _tile_loadd(1, ob + dt * 16 + 16, ldo);
                _tile_loadd(3, ob + 16 * hd + dt * 16 + 16, ldo);
            }
            for (int kb = 0; kb < nkc / 32; kb++) {
                const uint16_t* ph = pp + size_t(kb) * 2 * 32 * 32;  // [32 rows][32]
                const uint16_t* pl = ph + 32 * 32;
                const uint16_t* vh = vp + (size_t(j0 / 32 + kb) * 2 * DT + dt) * 512;
                const uint16_t* vl = vh + size_t(DT) * 512;
                // one product of the A tiles loaded (tmm4-5: a P' piece) with a V' piece at vb
                auto term = [&](const uint16_t* vb) {
                    _tile_stream_loadd(6, vb, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(2, 5, 6);
                    if (two) {
                        _tile_stream_loadd(7, vb + 512, 64);
                        _tile_dpbf16ps(1, 4, 7);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                };
                _tile_loadd(4, ph, 64);
                _tile_loadd(5, ph + 16 * 32, 64);
                term(vh);
                term(vl);
                _tile_loadd(4, pl, 64);
                _tile_loadd(5, pl + 16 * 32, 64);
                term(vh);
            }
            _tile_stored(0, ob + dt * 16, ldo);
            _tile_stored(2, ob + 16 * hd + dt * 16, ldo);
            if (two) {
                _tile_stored(1, ob + dt * 16 + 16, ldo);
                _tile_stored(3, ob + 16 * hd + dt * 16 + 16, ldo);
            }
        }
    };
    // Per chunk: QK of sub-block b overlapped with the softmax of b - 1, then P·V of b - 1
    // (scores double-buffered: s0, s1).
    float* sbuf[2] = {s, s + size_t(32) * kChunk};
    const int64_t n_chunks = max_last < 0 ? 0 : max_last / kChunk + 1;
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t j0 = c * kChunk;
        const int nkc = int(std::min<int64_t>(kChunk, nkp - j0));  // a multiple of 32
        for (int b = 0; b <= nrp / 32; b++) {
            if (b < nrp / 32) {
                qk(b * 32, sbuf[b % 2], j0, nkc);
                lap(0);
            }
            if (b == 0) {
                pending = 32;
                prev_rb = 0;
                prev_s = sbuf[0];
                continue;
            }
            while (pending) softmax_row(prev_rb, prev_s, 32 - pending--, j0, nkc);
            lap(1);
            pv(prev_rb, j0, nkc);
            lap(2);
            pending = 32;
            prev_rb = b * 32;
            prev_s = sbuf[b % 2];
        }
        pending = 0;
    }
    _tile_release();
    // 4. out = O / l; nothing visible (l = 0) -> zeros
    for (int r = 0; r < nr; r++) {
        const int64_t i = qi[r], h = int64_t(a.g) * a.G + (r0 + r) % a.G;
        float* dst = a.out + (i * a.n_head + h) * hd;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        const float* orow = o + size_t(r) * hd;
        for (int d = 0; d < hd; d++) dst[d] = orow[d] * inv;
    }
}

}  // namespace

FlashKernel flash_kernel_amx() { return {kRows, amx_rows, amx_packed_elems, amx_pack}; }

}  // namespace mq::cpu::detail
