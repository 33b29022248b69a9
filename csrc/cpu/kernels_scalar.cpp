// Portable scalar kernels: the reference the SIMD paths are tested against.
//
// Quantized weights follow ggml's route (ggml-cpu/quants.c, the *_generic
// vec_dot functions): X rows are quantized once (Q8_K for Q4_K/Q6_K, Q8_0 for
// Q8_0), each block's dot product is an exact int32 sum of products of the
// integer quants with the integer sub-block scales, and only then multiplied
// by the float block scales:
//   Q8_0: sum_b  dw_b*dx_b * sum_l qw_l*qx_l
//   Q4_K: sum_b  dw_b*dx_b * sum_j sc_j * sum_{l in j} q_l*qx_l
//              - dminw_b*dx_b * sum_j m_j * (bsum_{2j} + bsum_{2j+1})
//   Q6_K: sum_b  dw_b*dx_b * sum_j sc_j * sum_{l in j} (q_l - 32)*qx_l
// Float weights: a float32 multiply-add per element (F16/BF16 widened exactly).
#include <cstring>

#include "common/fp16.h"
#include "cpu/kernels.h"
#include "quants/quants.h"

namespace mq::cpu::detail {
namespace {

// One dot product per output: y[i * ldy + j] = Dot(W row j, X row i, K).
template <float (*Dot)(const uint8_t* w, const uint8_t* x, int64_t K)>
void tile(const void* w, size_t ws, int nw, const void* x, size_t xs, int nx, int64_t K, float* y, int64_t ldy) {
    for (int i = 0; i < nx; i++)
        for (int j = 0; j < nw; j++)
            y[i * ldy + j] = Dot(static_cast<const uint8_t*>(w) + j * ws, static_cast<const uint8_t*>(x) + i * xs, K);
}

// ---------------------------------------------------------------- float weights
float dot_f32(const uint8_t* w, const uint8_t* x, int64_t K) {
    const float* a = reinterpret_cast<const float*>(w);
    const float* b = reinterpret_cast<const float*>(x);
    float s = 0;
    for (int64_t k = 0; k < K; k++) s += a[k] * b[k];
    return s;
}
float dot_f16(const uint8_t* w, const uint8_t* x, int64_t K) {
    const uint16_t* a = reinterpret_cast<const uint16_t*>(w);
    const float* b = reinterpret_cast<const float*>(x);
    float s = 0;
    for (int64_t k = 0; k < K; k++) s += fp16_to_fp32(a[k]) * b[k];
    return s;
}
float dot_bf16(const uint8_t* w, const uint8_t* x, int64_t K) {
    const uint16_t* a = reinterpret_cast<const uint16_t*>(w);
    const float* b = reinterpret_cast<const float*>(x);
    float s = 0;
    for (int64_t k = 0; k < K; k++) s += bf16_to_fp32(a[k]) * b[k];
    return s;
}

// ---------------------------------------------------------------- Q8_0 x Q8_0
float dot_q8_0(const uint8_t* w, const uint8_t* x, int64_t K) {
    const block_q8_0* a = reinterpret_cast<const block_q8_0*>(w);
    const block_q8_0* b = reinterpret_cast<const block_q8_0*>(x);
    float s = 0;
    for (int64_t i = 0; i < K / QK8_0; i++) {
        int sumi = 0;
        for (int l = 0; l < QK8_0; l++) sumi += int(a[i].qs[l]) * int(b[i].qs[l]);
        s += fp16_to_fp32(a[i].d) * fp16_to_fp32(b[i].d) * float(sumi);
    }
    return s;
}

// ---------------------------------------------------------------- Q4_K x Q8_K
float dot_q4_K(const uint8_t* w, const uint8_t* x, int64_t K) {
    const block_q4_K* a = reinterpret_cast<const block_q4_K*>(w);
    const block_q8_K* b = reinterpret_cast<const block_q8_K*>(x);
    float s = 0;
    for (int64_t i = 0; i < K / QK_K; i++) {
        uint64_t sc8, m8;
        unpack_q4_K_scales(a[i].scales, &sc8, &m8);
        int32_t sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++) {
            const int sc = int((sc8 >> (8 * j)) & 0xff), m = int((m8 >> (8 * j)) & 0xff);
            // sub-block j: 32 nibbles, low nibbles of qs[32*(j/2) ..] for even j, high for odd j
            const uint8_t* q = a[i].qs + 32 * (j / 2);
            const int shift = 4 * (j & 1);
            const int8_t* q8 = b[i].qs + 32 * j;
            int dot = 0;
            for (int l = 0; l < 32; l++) dot += int((q[l] >> shift) & 0xF) * int(q8[l]);
            sumi += sc * dot;
            summ += m * (int(b[i].bsums[2 * j]) + int(b[i].bsums[2 * j + 1]));
        }
        s += b[i].d * (fp16_to_fp32(a[i].d) * float(sumi) - fp16_to_fp32(a[i].dmin) * float(summ));
    }
    return s;
}

// ---------------------------------------------------------------- Q6_K x Q8_K
float dot_q6_K(const uint8_t* w, const uint8_t* x, int64_t K) {
    const block_q6_K* a = reinterpret_cast<const block_q6_K*>(w);
    const block_q8_K* b = reinterpret_cast<const block_q8_K*>(x);
    float s = 0;
    for (int64_t i = 0; i < K / QK_K; i++) {
        // Unpack the 256 six-bit quants in value order (layout as in ggml's
        // dequantize_row_q6_K: two halves of 128, four groups of 32 each).
        int8_t q[QK_K];
        for (int h = 0; h < 2; h++) {
            const uint8_t* ql = a[i].ql + 64 * h;
            const uint8_t* qh = a[i].qh + 32 * h;
            int8_t* o = q + 128 * h;
            for (int l = 0; l < 32; l++) {
                o[l + 0] = int8_t((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                o[l + 32] = int8_t((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                o[l + 64] = int8_t((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                o[l + 96] = int8_t((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            }
        }
        int32_t sumi = 0;
        for (int j = 0; j < 16; j++) {
            int dot = 0;
            for (int l = 0; l < 16; l++) dot += int(q[16 * j + l]) * int(b[i].qs[16 * j + l]);
            sumi += int(a[i].scales[j]) * dot;
        }
        s += b[i].d * fp16_to_fp32(a[i].d) * float(sumi);
    }
    return s;
}

}  // namespace

const KernelTable& scalar_kernels() {
    static const KernelTable k = {
        {DType::F32, {nullptr, nullptr, tile<dot_f32>}},
        {DType::F16, {nullptr, nullptr, tile<dot_f16>}},
        {DType::BF16, {nullptr, nullptr, tile<dot_bf16>}},
        {DType::Q8_0, {prep_q8_0_ref, bytes_q8_0, tile<dot_q8_0>}},
        {DType::Q4_K, {prep_q8_K_ref, bytes_q8_K, tile<dot_q4_K>}},
        {DType::Q6_K, {prep_q8_K_ref, bytes_q8_K, tile<dot_q6_K>}},
    };
    return k;
}

}  // namespace mq::cpu::detail
