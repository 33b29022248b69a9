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
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/fp16.h"
#include "quants/quants.h"

// a*b+c must stay two rounded operations. GCC only contracts into FMA when the
// target has FMA (never for the baseline x86-64 build of this file, but it would
// on aarch64 or with -march=native); clang honours the standard pragma.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace mq {

namespace {

void check_k(int64_t k, const char* name) {
    if (k < 0 || k % QK_K != 0)
        throw std::invalid_argument(std::string(name) + ": row length " + std::to_string(k) +
                                    " is not a multiple of " + std::to_string(QK_K));
}

// ggml's GROUP_MAX_EPS: below this a group counts as all zero.
constexpr float kGroupMaxEps = 1e-15f;

// ---------------------------------------------------------------- Q4_K
// One sub-block of 32 values -> 4-bit quants L[32] with x ~ scale*L - the_min.
// This is ggml's make_qkx2_quants(n=32, nmax=15, rmin=-1, rdelta=0.1,
// nstep=20, use_mad=false): start from the min/max grid, then try 21 grid
// densities (nmax-1 .. nmax+1 steps) and for each solve the weighted
// least-squares (scale, min) for the rounded quants; keep the best weighted
// squared error. Returns scale; *the_min receives -min (>= 0).
//   x, w: [32] values and weights;  L: [32] out, 0..15
float q4k_search(const float* x, const float* w, uint8_t* L, float* the_min) {
    constexpr int n = 32, nmax = 15, nstep = 20;
    constexpr float rmin = -1.f, rdelta = 0.1f;
    float min = x[0], max = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (min > 0) min = 0;  // the offset only ever shifts down
    if (max == min) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - min));
        L[i] = static_cast<uint8_t>(l < 0 ? 0 : l > nmax ? nmax : l);
        const float diff = scale * L[i] + min - x[i];
        best_error += w[i] * (diff * diff);
    }
    uint8_t Laux[n];
    for (int is = 0; is <= nstep; ++is) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - min));
            l = l < 0 ? 0 : l > nmax ? nmax : l;
            Laux[i] = static_cast<uint8_t>(l);
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; ++i) {
                const float diff = this_scale * Laux[i] + this_min - x[i];
                cur_error += w[i] * (diff * diff);
            }
            if (cur_error < best_error) {
                std::memcpy(L, Laux, n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

// ---------------------------------------------------------------- Q6_K
// One sub-block of 16 values -> signed quants (stored +32, 0..63) with
// x ~ scale*(L-32). This is ggml's make_qx_quants(n=16, nmax=32,
// rmse_type=1, no weights): weights are x^2; start from the grid that maps
// the value of largest magnitude to -32, then try 18 neighbouring grids
// (nmax +- 0.1*is) and keep the one maximising sumlx^2/suml2 (i.e. minimising
// the weighted squared error for the least-squares scale sumlx/suml2).
//   x: [16] values;  L: [16] out, 0..63
float q6k_search(const float* x, int8_t* L) {
    constexpr int n = 16, nmax = 32;
    float max = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        const float ax = std::fabs(x[i]);
        if (ax > amax) { amax = ax; max = x[i]; }
    }
    if (amax < kGroupMaxEps) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
        L[i] = static_cast<int8_t>(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; ++is) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        int8_t Lt[n];
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * x[i]);
            l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
            Lt[i] = static_cast<int8_t>(l + nmax);
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            std::memcpy(L, Lt, n);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

}  // namespace

// x: [k] floats; y: [k/256] blocks.
void quantize_row_q4_K_ref(const float* x, block_q4_K* y, int64_t k) {
    check_k(k, "q4_K");
    const int64_t nb = k / QK_K;
    uint8_t L[QK_K];        // 4-bit quants of the super-block, 0..15
    float weights[32];      // per-value weights of one sub-block
    float mins[QK_K / 32];  // per sub-block: -min (>= 0)
    float scales[QK_K / 32];
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        float max_scale = 0, max_min = 0;
        for (int j = 0; j < QK_K / 32; ++j) {
            const float* xs = x + 32 * j;
            // weight = rms of the sub-block + |x|: favours large values
            float sum_x2 = 0;
            for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
            const float av_x = std::sqrt(sum_x2 / 32);
            for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
            scales[j] = q4k_search(xs, weights, L + 32 * j, &mins[j]);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }
        // Quantize the 8 scales and 8 mins to 6 bits against their maxima.
        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        uint8_t* sc = y[i].scales;
        for (int j = 0; j < QK_K / 32; ++j) {
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
        y[i].d = fp32_to_fp16(max_scale / 63.f);
        y[i].dmin = fp32_to_fp16(max_min / 63.f);

        // Re-quantize every value against the scales as stored (fp16 d times
        // 6-bit sc), so the quants fit what the dequantizer will compute. A
        // sub-block whose stored scale is 0 keeps the quants of the search.
        const float d_all = fp16_to_fp32(y[i].d), dmin_all = fp16_to_fp32(y[i].dmin);
        for (int j = 0; j < QK_K / 32; ++j) {
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
        uint8_t* q = y[i].qs;
        for (int j = 0; j < QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    }
}

// x: [k] floats; y: [k/256] blocks.
void quantize_row_q6_K_ref(const float* x, block_q6_K* y, int64_t k) {
    check_k(k, "q6_K");
    const int64_t nb = k / QK_K;
    int8_t L[QK_K];          // 6-bit quants + 32, 0..63
    float scales[QK_K / 16];  // per sub-block scale (signed)
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < QK_K / 16; ++ib) {
            const float scale = q6k_search(x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            const float abs_scale = std::fabs(scale);
            if (abs_scale > max_abs_scale) {
                max_abs_scale = abs_scale;
                max_scale = scale;
            }
        }
        if (max_abs_scale < kGroupMaxEps) {  // all (near) zero: an all-zero block
            std::memset(&y[i], 0, sizeof(block_q6_K));
            continue;
        }
        // 8-bit signed sub-block scales; the largest-magnitude one maps to -128
        // (then clamped to 127 on the positive side).
        const float iscale = -128.f / max_scale;
        y[i].d = fp32_to_fp16(1 / iscale);
        for (int ib = 0; ib < QK_K / 16; ++ib) {
            const int v = nearest_int(iscale * scales[ib]);
            y[i].scales[ib] = static_cast<int8_t>(v < 127 ? v : 127);
        }
        // Re-quantize against the stored scales (zero scale: keep search quants).
        const float d_all = fp16_to_fp32(y[i].d);
        for (int j = 0; j < QK_K / 16; ++j) {
            const float d = d_all * y[i].scales[j];
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
        uint8_t* ql = y[i].ql;
        uint8_t* qh = y[i].qh;
        for (int j = 0; j < QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; ++l) {
                const uint8_t* Lu = reinterpret_cast<const uint8_t*>(L) + j + l;
                ql[l + 0] = static_cast<uint8_t>((Lu[0] & 0xF) | ((Lu[64] & 0xF) << 4));
                ql[l + 32] = static_cast<uint8_t>((Lu[32] & 0xF) | ((Lu[96] & 0xF) << 4));
                qh[l] = static_cast<uint8_t>((Lu[0] >> 4) | ((Lu[32] >> 4) << 2) | ((Lu[64] >> 4) << 4) |
                                             ((Lu[96] >> 4) << 6));
            }
        }
    }
}

}  // namespace mq
