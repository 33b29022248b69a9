// Reference Q4_K / Q6_K quantizers, byte-identical with ggml's
// quantize_row_q4_K_ref / quantize_row_q6_K_ref (ggml/src/ggml-quants.c,
// no importance matrix; what llama.cpp's quantize tool uses for these types
// without --imatrix).
//
// Bit-exactness rules followed here:
//  * the same float operations in the same order as ggml (no reassociation;
//    this file must be built without -ffast-math and without FMA contraction,
//    see the pragma below);
//  * the same rounding: nearest_int (round half to even through the
//    1.5*2^23 trick, quants.h) and RNE float->half (fp16.h);
//  * the same comparisons (NaN/inf produced by overflow on huge inputs then
//    take the same branches as in ggml).
// The vector-typed helpers below are internal to this file (and always
// inlined), so GCC's warning about the ABI of returning wide vectors does not
// apply (parameters are passed by reference for the same reason).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/env.h"
#include "common/fp16.h"
#include "quants/quants.h"

// a*b+c must stay two rounded operations, as in ggml's x86-64 build (which has
// no FMA instructions). Compilers contract into FMA whenever the target has it:
// without these pragmas, GCC with -march=haswell and clang for aarch64 were
// measured to give different Q4_K/Q6_K bytes. The baseline x86-64 build of
// this file has no FMA (and the avx2 target below does not enable it).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace mq {

namespace {

void check_k(int64_t k, const char* name) {
    if (k < 0 || k % QK_K != 0)
        throw std::invalid_argument(std::string(name) + ": row length " + std::to_string(k) + " is not a multiple of " +
                                    std::to_string(QK_K));
}

// ggml's GROUP_MAX_EPS: below this a group counts as all zero.
constexpr float kGroupMaxEps = 1e-15f;

// How the searches are made fast without changing a bit:
// ggml runs one search per sub-block, and each search is a chain of
// sequential float sums (sum_l += ..., cur_error += ...) whose order fixes
// the result; a single chain is latency bound and cannot be reordered. But the
// sub-blocks of a super-block are independent, so we run them side by side:
// sub-block j lives in lane j of a vector (GCC/clang vector extensions, which
// compile to SSE/AVX/NEON or plain scalar code). Every lane performs exactly
// ggml's operations in ggml's order; the operations are element-wise IEEE
// (+ - * /, compare), so no result changes. Branches become per-lane selects
// on the same comparisons as ggml's, so NaN/inf (from overflow on huge
// inputs) select the same way. A straight scalar port of ggml's code is in
// this file's git history (commit "Q4_K and Q6_K reference quantizers").
#if !defined(__GNUC__)
#error "quants_k_ref.cpp needs GCC or clang vector extensions"
#endif
// Lane vectors of the machine's width: 4 (baseline SSE2 / NEON) or 8 (AVX2).
// Wider-than-hardware vectors would be lowered element by element (slow).
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
#define MQ_INLINE inline __attribute__((always_inline))

// Per-lane select: m is a comparison result (all ones / all zeros per lane).
template <class F, class I>
MQ_INLINE F select(const I& m, const F& a, const F& b) {
    return reinterpret_cast<F>((m & reinterpret_cast<I>(a)) | (~m & reinterpret_cast<I>(b)));
}
template <class I>
MQ_INLINE I select_i(const I& m, const I& a, const I& b) {
    return (m & a) | (~m & b);
}

// ggml's nearest_int per lane (quants.h), then clamped to [lo, hi], as float.
// The float -> int -> float round trip is exact for the clamped range.
template <class F, class I>
MQ_INLINE F nearest_clamped(const F& v, int lo, int hi) {
    const F t = v + 12582912.0f;  // 1.5 * 2^23
    I i = (reinterpret_cast<I>(t) & 0x007fffff) - 0x00400000;
    i = select_i<I>(i < lo, I{} + lo, i);
    i = select_i<I>(i > hi, I{} + hi, i);
    return __builtin_convertvector(i, F);
}

// ---------------------------------------------------------------- Q4_K search
// W sub-blocks of 32 values (W = vector width), sub-block j in lane j.
// This is ggml's make_qkx2_quants(n=32, nmax=15, rmin=-1, rdelta=0.1,
// nstep=20, use_mad=false) run in each lane: start from the min/max grid,
// then try 21 grid densities ((nmax-1 .. nmax+1) / range) and for each solve
// the weighted least-squares (scale, min) for the rounded quants; keep the
// candidate with the smallest weighted squared error.
//   x, w:  [32] values and weights (lane j: sub-block j)
//   L:     [32] out, quants 0..15 (as floats)
//   scale, the_min: out, per lane; the_min = -min (>= 0)
template <class F, class I>
MQ_INLINE void q4k_search_lanes(const F* x, const F* w, F* L, F& scale_out, F& the_min) {
    constexpr int n = 32, nmax = 15, nstep = 20;
    constexpr float rmin = -1.f, rdelta = 0.1f;
    const F zero = {};
    F min = x[0], max = x[0];
    F sum_w = w[0];
    F sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        min = select(x[i] < min, x[i], min);  // ggml: if (x[i] < min) min = x[i];
        max = select(x[i] > max, x[i], max);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    min = select(min > 0, zero, min);  // the offset only ever shifts down
    const F min0 = min;
    const I flat = max == min;  // ggml returns early: all quants 0, scale 0
    F iscale = nmax / (max - min);
    F scale = 1 / iscale;
    F best_error = zero;
    for (int i = 0; i < n; ++i) {
        L[i] = nearest_clamped<F, I>(iscale * (x[i] - min), 0, nmax);
        const F diff = scale * L[i] + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    F Laux[n];
    for (int is = 0; is <= nstep; ++is) {
        // ggml: iscale = (rmin + rdelta*is + nmax)/(max - min), min being the
        // min of the best candidate so far.
        const float num = rmin + rdelta * is + nmax;
        iscale = num / (max - min);
        F sum_l = zero, sum_l2 = zero, sum_xl = zero;
        for (int i = 0; i < n; ++i) {
            const F l = nearest_clamped<F, I>(iscale * (x[i] - min), 0, nmax);
            Laux[i] = l;
            const F wl = w[i] * l;  // ggml: w*l*l = (w*l)*l, w*l*x = (w*l)*x
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * x[i];
        }
        const F D = sum_w * sum_l2 - sum_l * sum_l;
        F this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        F this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        const I pos = this_min > 0;  // a positive min cannot be stored: fit the scale alone
        this_min = select(pos, zero, this_min);
        this_scale = select(pos, sum_xl / sum_l2, this_scale);
        F cur_error = zero;
        for (int i = 0; i < n; ++i) {
            const F diff = this_scale * Laux[i] + this_min - x[i];
            cur_error += w[i] * (diff * diff);
        }
        // ggml: if (D > 0) { ...; if (cur_error < best_error) take it }
        const I take = (D > 0) & (cur_error < best_error);
        best_error = select(take, cur_error, best_error);
        scale = select(take, this_scale, scale);
        min = select(take, this_min, min);
        for (int i = 0; i < n; ++i) L[i] = select(take, Laux[i], L[i]);
    }
    scale_out = select(flat, zero, scale);
    the_min = -select(flat, min0, min);
    for (int i = 0; i < n; ++i) L[i] = select(flat, zero, L[i]);
}

// ---------------------------------------------------------------- Q6_K search
// W sub-blocks of 16 values (W = vector width), sub-block j in lane j.
// This is ggml's make_qx_quants(n=16, nmax=32, rmse_type=1, no weights) run in
// each lane: weights are x^2; start from the grid that maps the value of
// largest magnitude to -32, then try 18 neighbouring grids
// (-(nmax + 0.1*is)/max, is = -9..9) and keep the one maximising
// sumlx^2/suml2 (least weighted squared error with the fitted scale).
//   x: [16] values (lane j: sub-block j);  L: [16] out, signed quants -32..31
//   (as floats);  scale_out: out, per lane
template <class F, class I>
MQ_INLINE void q6k_search_lanes(const F* x, F* L, F& scale_out) {
    constexpr int n = 16, nmax = 32;
    const F zero = {};
    F max = zero, amax = zero;
    for (int i = 0; i < n; ++i) {
        const F ax = reinterpret_cast<F>(reinterpret_cast<I>(x[i]) & 0x7fffffff);  // fabsf
        const I bigger = ax > amax;  // ggml: if (ax > amax) { amax = ax; max = x[i]; }
        amax = select(bigger, ax, amax);
        max = select(bigger, x[i], max);
    }
    // w = x*x; ggml sums w*x*l = (w*x)*l, so (w*x) is computed once.
    F w[n], wx[n];
    for (int i = 0; i < n; ++i) {
        w[i] = x[i] * x[i];
        wx[i] = w[i] * x[i];
    }
    F iscale = -nmax / max;
    F sumlx = zero, suml2 = zero;
    for (int i = 0; i < n; ++i) {
        L[i] = nearest_clamped<F, I>(iscale * x[i], -nmax, nmax - 1);
        sumlx += wx[i] * L[i];
        suml2 += w[i] * L[i] * L[i];
    }
    F scale = select(suml2 != 0, sumlx / suml2, zero);
    F best = scale * sumlx;
    F Lt[n];
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = zero;
        for (int i = 0; i < n; ++i) {
            Lt[i] = nearest_clamped<F, I>(iscale * x[i], -nmax, nmax - 1);
            sumlx += wx[i] * Lt[i];
            suml2 += w[i] * Lt[i] * Lt[i];
        }
        const I take = (suml2 > 0) & (sumlx * sumlx > best * suml2);
        const F s = sumlx / suml2;
        scale = select(take, s, scale);
        best = select(take, s * sumlx, best);
        for (int i = 0; i < n; ++i) L[i] = select(take, Lt[i], L[i]);
    }
    // ggml returns early when amax < GROUP_MAX_EPS: scale 0, stored quants 0
    // (signed -32).
    const I tiny = amax < kGroupMaxEps;
    scale_out = select(tiny, zero, scale);
    for (int i = 0; i < n; ++i) L[i] = select(tiny, zero - nmax, L[i]);
}

// ---------------------------------------------------------------- Q4_K block
// Search step of one super-block, W sub-blocks at a time (W = lanes of F).
//   x: [256] values;  scales, mins: [8] out (mins = -min >= 0);  L: [256] out, 0..15
template <class F, class I>
MQ_INLINE void q4k_search_block(const float* x, float* scales, float* mins, uint8_t* L) {
    constexpr int W = sizeof(F) / sizeof(float);
    static_assert(8 % W == 0, "lanes must divide the 8 sub-blocks");
    for (int g = 0; g < 8; g += W) {
        F xt[32], wt[32], Lt[32];  // lane j of xt[l] = x[32*(g+j) + l]
        for (int j = 0; j < W; ++j)
            for (int l = 0; l < 32; ++l) xt[l][j] = x[32 * (g + j) + l];
        // weight = rms of the sub-block + |x| (ggml: av_x + fabsf(x)): favours large values
        F sum_x2 = {};
        for (int l = 0; l < 32; ++l) sum_x2 += xt[l] * xt[l];
        F av_x;
        for (int j = 0; j < W; ++j) av_x[j] = std::sqrt(sum_x2[j] / 32);
        for (int l = 0; l < 32; ++l) wt[l] = av_x + reinterpret_cast<F>(reinterpret_cast<I>(xt[l]) & 0x7fffffff);
        F sc, mn;
        q4k_search_lanes<F, I>(xt, wt, Lt, sc, mn);
        for (int j = 0; j < W; ++j) {
            scales[g + j] = sc[j];
            mins[g + j] = mn[j];
            for (int l = 0; l < 32; ++l) L[32 * (g + j) + l] = static_cast<uint8_t>(Lt[l][j]);
        }
    }
}

// Rest of one super-block (scalar, cheap): 6-bit scales/mins, fp16 d/dmin,
// final quants, packing.  x: [256];  scales, mins: [8];  L: [256] in/out
void q4k_finish_block(const float* x, const float* scales, const float* mins, uint8_t* L, block_q4_K* y) {
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    // Quantize the 8 scales and 8 mins to 6 bits against their maxima.
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t* sc = y->scales;
    for (int j = 0; j < 8; ++j) {
        // ggml stores nearest_int's result in a uint8_t before clamping
        // (a negative value wraps, then clamps to 63): keep that.
        uint8_t ls = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
        uint8_t lm = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
        ls = ls < 63 ? ls : 63;
        lm = lm < 63 ? lm : 63;
        // 6-bit packing read back by get_scale_min_k4: sub-blocks 0-3 use the
        // low 6 bits of bytes 0-3 (scale) and 4-7 (min); sub-blocks 4-7 put
        // their low 4 bits in bytes 8-11 and their top 2 bits in the spare
        // top bits of bytes 0-7.
        if (j < 4) {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
            sc[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
            sc[j - 0] |= static_cast<uint8_t>((lm >> 4) << 6);
        }
    }
    y->d = fp32_to_fp16(max_scale / 63.f);
    y->dmin = fp32_to_fp16(max_min / 63.f);

    // Re-quantize every value against the scales as stored (fp16 d times
    // 6-bit sc), so the quants fit what the dequantizer will compute. A
    // sub-block whose stored scale is 0 keeps the quants of the search.
    const float d_all = fp16_to_fp32(y->d), dmin_all = fp16_to_fp32(y->dmin);
    for (int j = 0; j < 8; ++j) {
        uint8_t s, m;
        get_scale_min_k4(j, sc, &s, &m);
        const float d = d_all * s;
        if (!d) continue;
        const float dm = dmin_all * m;
        for (int ii = 0; ii < 32; ++ii) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            l = l < 0 ? 0 : l > 15 ? 15 : l;
            L[32 * j + ii] = static_cast<uint8_t>(l);
        }
    }
    // qs byte l of 32-byte group g: value l of sub-block 2g (low nibble)
    // and value l of sub-block 2g+1 (high nibble).
    uint8_t* q = y->qs;
    for (int j = 0; j < QK_K; j += 64, q += 32)
        for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
}

template <class F, class I>
MQ_INLINE void q4k_rows(const float* x, block_q4_K* y, int64_t nb) {
    float scales[8], mins[8];
    uint8_t L[QK_K];
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        q4k_search_block<F, I>(x, scales, mins, L);
        q4k_finish_block(x, scales, mins, L, y + i);
    }
}

// ---------------------------------------------------------------- Q6_K block
// Search step of one super-block, W sub-blocks at a time.
//   x: [256] values;  scales: [16] out;  L: [256] out, quants + 32 (0..63)
template <class F, class I>
MQ_INLINE void q6k_search_block(const float* x, float* scales, int8_t* L) {
    constexpr int W = sizeof(F) / sizeof(float);
    static_assert(16 % W == 0, "lanes must divide the 16 sub-blocks");
    for (int g = 0; g < 16; g += W) {
        F xt[16], Lt[16];  // lane j of xt[l] = x[16*(g+j) + l]
        for (int j = 0; j < W; ++j)
            for (int l = 0; l < 16; ++l) xt[l][j] = x[16 * (g + j) + l];
        F sc;
        q6k_search_lanes<F, I>(xt, Lt, sc);
        for (int j = 0; j < W; ++j) {
            scales[g + j] = sc[j];
            for (int l = 0; l < 16; ++l) L[16 * (g + j) + l] = static_cast<int8_t>(Lt[l][j] + 32);
        }
    }
}

// Rest of one super-block: 8-bit scales, fp16 d, final quants, packing.
//   x: [256];  scales: [16];  L: [256] in/out (quants + 32)
void q6k_finish_block(const float* x, const float* scales, int8_t* L, block_q6_K* y) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
        const float abs_scale = std::fabs(scales[ib]);
        if (abs_scale > max_abs_scale) {
            max_abs_scale = abs_scale;
            max_scale = scales[ib];
        }
    }
    if (max_abs_scale < kGroupMaxEps) {  // all (near) zero: an all-zero block
        std::memset(y, 0, sizeof(block_q6_K));
        return;
    }
    // 8-bit signed sub-block scales; the largest-magnitude one maps to -128
    // (then clamped to 127 on the positive side).
    const float iscale = -128.f / max_scale;
    y->d = fp32_to_fp16(1 / iscale);
    for (int ib = 0; ib < 16; ++ib) {
        const int v = nearest_int(iscale * scales[ib]);
        y->scales[ib] = static_cast<int8_t>(v < 127 ? v : 127);
    }
    // Re-quantize against the stored scales (zero scale: keep search quants).
    const float d_all = fp16_to_fp32(y->d);
    for (int j = 0; j < 16; ++j) {
        const float d = d_all * y->scales[j];
        if (!d) continue;
        for (int ii = 0; ii < 16; ++ii) {
            int l = nearest_int(x[16 * j + ii] / d);
            l = l < -32 ? -32 : l > 31 ? 31 : l;
            L[16 * j + ii] = static_cast<int8_t>(l + 32);
        }
    }
    // Each 128-value half: ql byte l holds the low nibbles of values l
    // (low) and l+64 (high); ql byte l+32 those of l+32 and l+96; qh byte l
    // the top 2 bits of values l, l+32, l+64, l+96 (bits 0-1, 2-3, 4-5, 6-7).
    uint8_t* ql = y->ql;
    uint8_t* qh = y->qh;
    for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
        for (int l = 0; l < 32; ++l) {
            const uint8_t* Lu = reinterpret_cast<const uint8_t*>(L) + j + l;
            ql[l + 0] = static_cast<uint8_t>((Lu[0] & 0xF) | ((Lu[64] & 0xF) << 4));
            ql[l + 32] = static_cast<uint8_t>((Lu[32] & 0xF) | ((Lu[96] & 0xF) << 4));
            qh[l] =
                static_cast<uint8_t>((Lu[0] >> 4) | ((Lu[32] >> 4) << 2) | ((Lu[64] >> 4) << 4) | ((Lu[96] >> 4) << 6));
        }
    }
}

template <class F, class I>
MQ_INLINE void q6k_rows(const float* x, block_q6_K* y, int64_t nb) {
    float scales[16];
    int8_t L[QK_K];
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        q6k_search_block<F, I>(x, scales, L);
        q6k_finish_block(x, scales, L, y + i);
    }
}

// ---------------------------------------------------------------- ISA dispatch
// The same source compiled for 4 or 8 lanes; every width gives the same
// bytes (tests check each one against ggml). None of the targets enables FMA.
void q4k_rows_scalar(const float* x, block_q4_K* y, int64_t nb) { q4k_rows<f32x4, i32x4>(x, y, nb); }
void q6k_rows_scalar(const float* x, block_q6_K* y, int64_t nb) { q6k_rows<f32x4, i32x4>(x, y, nb); }
#if defined(__x86_64__) || defined(__i386__)
#define MQ_QUANT_X86 1
__attribute__((target("avx2"))) void q4k_rows_avx2(const float* x, block_q4_K* y, int64_t nb) {
    q4k_rows<f32x8, i32x8>(x, y, nb);
}
__attribute__((target("avx2"))) void q6k_rows_avx2(const float* x, block_q6_K* y, int64_t nb) {
    q6k_rows<f32x8, i32x8>(x, y, nb);
}
// No separate AVX-512 code: 16-lane Q6_K measured slower than 8-lane AVX2
// (AMD EPYC, GCC 12), and Q4_K has only 8 sub-blocks per super-block.
#endif

enum Isa : int { kScalar = 0, kAVX2 = 1 };

bool isa_supported(int isa) {
#ifdef MQ_QUANT_X86
    __builtin_cpu_init();  // may run before the runtime's own initialiser (static init)
    if (isa == kAVX2) return __builtin_cpu_supports("avx2");
#endif
    return isa == kScalar;
}

int best_isa() { return isa_supported(kAVX2) ? kAVX2 : kScalar; }

// "avxvnni" / "avx512" / "amx" (kernel path names) select the AVX2 quantizer (it has no
// int8 multiply-adds for VNNI or AMX to speed up), on CPUs with AVX2 / AVX-512.
int parse_isa(const std::string& name) {
    if (name.empty() || name == "auto") return best_isa();
    if (name == "scalar") return kScalar;
    bool ok = false;
#ifdef MQ_QUANT_X86
    __builtin_cpu_init();
    if (name == "avx2" || name == "avxvnni") ok = __builtin_cpu_supports("avx2");
    else if (name == "avx512" || name == "amx")
        ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2");
#endif
    if (name != "avx2" && name != "avxvnni" && name != "avx512" && name != "amx")
        throw std::invalid_argument("unknown quantizer path '" + name +
                                    "' (expected auto, scalar, avx2, avxvnni, avx512, amx)");
    if (!ok) throw std::invalid_argument("quantizer path '" + name + "' is not supported by this CPU");
    return kAVX2;
}

// Initial choice: MLLAMA_Q_CPU_PATH (the kernels' variable) when set and usable, else the best.
int initial_isa() {
    const char* env = env::cpu_path();
    try {
        return parse_isa(env ? env : "");
    } catch (const std::invalid_argument&) { return best_isa(); }
}

std::atomic<int>& current_isa() {
    static std::atomic<int> isa{initial_isa()};
    return isa;
}

}  // namespace

const char* quant_path() { return current_isa().load() == kAVX2 ? "avx2" : "scalar"; }

void set_quant_path(const std::string& name) { current_isa().store(parse_isa(name)); }

std::vector<std::string> quant_paths() {
    std::vector<std::string> out{"scalar"};
    if (isa_supported(kAVX2)) out.push_back("avx2");
    return out;
}

// x: [k] floats; y: [k/256] blocks.
void quantize_row_q4_K_ref(const float* x, block_q4_K* y, int64_t k) {
    check_k(k, "q4_K");
    const int isa = current_isa().load(std::memory_order_relaxed);
#ifdef MQ_QUANT_X86
    if (isa == kAVX2) return q4k_rows_avx2(x, y, k / QK_K);
#endif
    (void)isa;
    q4k_rows_scalar(x, y, k / QK_K);
}

// x: [k] floats; y: [k/256] blocks.
void quantize_row_q6_K_ref(const float* x, block_q6_K* y, int64_t k) {
    check_k(k, "q6_K");
    const int isa = current_isa().load(std::memory_order_relaxed);
#ifdef MQ_QUANT_X86
    if (isa == kAVX2) return q6k_rows_avx2(x, y, k / QK_K);
#endif
    (void)isa;
    q6k_rows_scalar(x, y, k / QK_K);
}

}  // namespace mq
