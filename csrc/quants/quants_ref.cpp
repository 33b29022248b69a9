// Reference quantizers / dequantizers. See quants.h for the contract.
#include "quants/quants.h"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/fp16.h"

// Dequantizers must compute d*q - m as two rounded operations, as gguf-py's
// numpy code does: no FMA contraction (GCC contracts only when the target has
// FMA, i.e. never for the baseline x86-64 build, but it would on aarch64).
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace mq {

static void check_k(int64_t k, int64_t block, const char* name) {
    if (k < 0 || k % block != 0)
        throw std::invalid_argument(std::string(name) + ": row length " + std::to_string(k) + " is not a multiple of " +
                                    std::to_string(block));
}

// ---------------------------------------------------------------- Q8_0
// ggml stores (int8_t)roundf(v): round half away from zero, then x86's
// float->int conversion (cvttss2si: +-inf, NaN and |v| >= 2^31 give
// 0x80000000, whose low byte is 0), then truncation to 8 bits. Spelled out
// here without undefined behaviour and without a libm call, so the loop
// vectorizes. v - t is exact (t = trunc(v) has v's sign and |v| - |t| < 1).
// The inf/NaN case is real: when amax < ~3.7e-37, id = 1/d overflows to inf.
static inline int8_t round_to_int8_like_ggml(float v) {
    const bool in_range = std::fabs(v) < 2147483648.0f;  // false for inf and NaN
    const float vv = in_range ? v : 0.0f;
    const int t = static_cast<int>(vv);  // truncation toward zero
    const float f = vv - static_cast<float>(t);
    const int r = t + (f >= 0.5f) - (f <= -0.5f);
    return static_cast<int8_t>(static_cast<uint8_t>(in_range ? r : 0));
}

void quantize_row_q8_0_ref(const float* x, block_q8_0* y, int64_t k) {
    check_k(k, QK8_0, "q8_0");
    const int64_t nb = k / QK8_0;
    for (int64_t i = 0; i < nb; i++) {
        // ggml's MAX(a, b) is (a > b ? a : b); written the same way so a NaN
        // input propagates exactly as there (std::fmax would drop it).
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++) {
            const float ax = std::fabs(x[i * QK8_0 + j]);
            amax = amax > ax ? amax : ax;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++) y[i].qs[j] = round_to_int8_like_ggml(x[i * QK8_0 + j] * id);
    }
}

void dequantize_row_q8_0(const block_q8_0* x, float* y, int64_t k) {
    check_k(k, QK8_0, "q8_0");
    for (int64_t i = 0; i < k / QK8_0; i++) {
        const float d = fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK8_0; j++) y[i * QK8_0 + j] = x[i].qs[j] * d;
    }
}

// ---------------------------------------------------------------- Q8_K
// Scale chosen from the signed value of largest magnitude so that it maps to
// -127 exactly (ggml's choice; keeps every quant in [-127, 127]).
void quantize_row_q8_K_ref(const float* x, block_q8_K* y, int64_t k) {
    check_k(k, QK_K, "q8_K");
    for (int64_t i = 0; i < k / QK_K; i++, x += QK_K) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = std::fabs(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (amax == 0.0f) {
            y[i].d = 0.0f;
            std::memset(y[i].qs, 0, sizeof(y[i].qs));
            std::memset(y[i].bsums, 0, sizeof(y[i].bsums));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = nearest_int(iscale * x[j]);
            y[i].qs[j] = static_cast<int8_t>(v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[i].qs[j * 16 + l];
            y[i].bsums[j] = static_cast<int16_t>(sum);
        }
        y[i].d = 1.0f / iscale;
    }
}

void dequantize_row_q8_K(const block_q8_K* x, float* y, int64_t k) {
    check_k(k, QK_K, "q8_K");
    for (int64_t i = 0; i < k / QK_K; i++)
        for (int j = 0; j < QK_K; j++) y[i * QK_K + j] = x[i].d * x[i].qs[j];
}

// ---------------------------------------------------------------- Q4_K
void dequantize_row_q4_K(const block_q4_K* x, float* y, int64_t k) {
    check_k(k, QK_K, "q4_K");
    for (int64_t i = 0; i < k / QK_K; i++) {
        const float d = fp16_to_fp32(x[i].d);
        const float dmin = fp16_to_fp32(x[i].dmin);
        const uint8_t* q = x[i].qs;
        for (int g = 0; g < 4; g++, q += 32) {  // 4 groups of 64 = 2 sub-blocks of 32
            uint8_t sc, m;
            get_scale_min_k4(2 * g, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = dmin * m;
            get_scale_min_k4(2 * g + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = dmin * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
        }
    }
}

// ---------------------------------------------------------------- Q6_K
void dequantize_row_q6_K(const block_q6_K* x, float* y, int64_t k) {
    check_k(k, QK_K, "q6_K");
    for (int64_t i = 0; i < k / QK_K; i++) {
        const float d = fp16_to_fp32(x[i].d);
        const uint8_t* ql = x[i].ql;
        const uint8_t* qh = x[i].qh;
        const int8_t* sc = x[i].scales;
        // Two halves of 128 values; each uses 64 bytes of ql, 32 of qh, 8 scales.
        for (int n = 0; n < QK_K; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = static_cast<int>((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = static_cast<int>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
        }
    }
}

// ---------------------------------------------------------------- F16 / BF16
void quantize_row_f16(const float* x, uint16_t* y, int64_t k) {
    for (int64_t i = 0; i < k; i++) y[i] = fp32_to_fp16(x[i]);
}
void quantize_row_bf16(const float* x, uint16_t* y, int64_t k) {
    for (int64_t i = 0; i < k; i++) y[i] = fp32_to_bf16(x[i]);
}
void dequantize_row_f16(const uint16_t* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k; i++) y[i] = fp16_to_fp32(x[i]);
}
void dequantize_row_bf16(const uint16_t* x, float* y, int64_t k) {
    for (int64_t i = 0; i < k; i++) y[i] = bf16_to_fp32(x[i]);
}

// ---------------------------------------------------------------- dispatch
namespace {
using QuantFn = void (*)(const float*, void*, int64_t);
using DequantFn = void (*)(const void*, float*, int64_t);

void q_f32(const float* x, void* y, int64_t k) { std::memcpy(y, x, k * sizeof(float)); }
void dq_f32(const void* x, float* y, int64_t k) { std::memcpy(y, x, k * sizeof(float)); }

template <typename Block, void (*F)(const float*, Block*, int64_t)>
void q_adapt(const float* x, void* y, int64_t k) {
    F(x, static_cast<Block*>(y), k);
}
template <typename Block, void (*F)(const Block*, float*, int64_t)>
void dq_adapt(const void* x, float* y, int64_t k) {
    F(static_cast<const Block*>(x), y, k);
}

// The reference quantizer of every type (what adding a type must supply; csrc/README.md).
struct QuantEntry {
    QuantFn quant;
    DequantFn dequant;
};
const TypeTable<QuantEntry>& quant_table() {
    static const TypeTable<QuantEntry> t = {
        {DType::F32, {q_f32, dq_f32}},
        {DType::F16, {q_adapt<uint16_t, quantize_row_f16>, dq_adapt<uint16_t, dequantize_row_f16>}},
        {DType::BF16, {q_adapt<uint16_t, quantize_row_bf16>, dq_adapt<uint16_t, dequantize_row_bf16>}},
        {DType::Q8_0, {q_adapt<block_q8_0, quantize_row_q8_0_ref>, dq_adapt<block_q8_0, dequantize_row_q8_0>}},
        {DType::Q4_K, {q_adapt<block_q4_K, quantize_row_q4_K_ref>, dq_adapt<block_q4_K, dequantize_row_q4_K>}},
        {DType::Q6_K, {q_adapt<block_q6_K, quantize_row_q6_K_ref>, dq_adapt<block_q6_K, dequantize_row_q6_K>}},
        {DType::Q8_K, {q_adapt<block_q8_K, quantize_row_q8_K_ref>, dq_adapt<block_q8_K, dequantize_row_q8_K>}},
    };
    return t;
}

const QuantEntry& entry(DType t) {
    if (const QuantEntry* e = quant_table().find(t)) return *e;
    throw std::invalid_argument("no quantizer for type id " + std::to_string(static_cast<int>(t)));
}
}  // namespace

void quantize_row(DType t, const float* x, void* y, int64_t k) {
    row_size(t, k);  // validates k
    entry(t).quant(x, y, k);
}
void dequantize_row(DType t, const void* x, float* y, int64_t k) {
    row_size(t, k);
    entry(t).dequant(x, y, k);
}

}  // namespace mq
