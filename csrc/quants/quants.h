// Reference (scalar) quantizers and dequantizers for the GGUF block formats.
//
// quantize_row_*_ref produce the same bytes as ggml's quantize_row_*_ref
// (ggml/src/ggml-quants.c, no importance matrix) for the same float32 input.
// dequantize_row_* produce the same floats as gguf-py's gguf.quants.dequantize.
// `k` is the number of values and must be a multiple of the block size.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common/formats.h"

namespace mq {

void quantize_row_q8_0_ref(const float* x, block_q8_0* y, int64_t k);
void quantize_row_q4_K_ref(const float* x, block_q4_K* y, int64_t k);
void quantize_row_q6_K_ref(const float* x, block_q6_K* y, int64_t k);
void quantize_row_q8_K_ref(const float* x, block_q8_K* y, int64_t k);
void quantize_row_f16(const float* x, uint16_t* y, int64_t k);
void quantize_row_bf16(const float* x, uint16_t* y, int64_t k);

void dequantize_row_q8_0(const block_q8_0* x, float* y, int64_t k);
void dequantize_row_q4_K(const block_q4_K* x, float* y, int64_t k);
void dequantize_row_q6_K(const block_q6_K* x, float* y, int64_t k);
void dequantize_row_q8_K(const block_q8_K* x, float* y, int64_t k);
void dequantize_row_f16(const uint16_t* x, float* y, int64_t k);
void dequantize_row_bf16(const uint16_t* x, float* y, int64_t k);

// Type-erased entry points (table dispatch on DType). Throw std::invalid_argument
// for an unsupported type or a k that is not a multiple of the block size.
void quantize_row(DType t, const float* x, void* y, int64_t k);
void dequantize_row(DType t, const void* x, float* y, int64_t k);

// Instruction set used by the Q4_K / Q6_K searches: "scalar" (baseline vector
// code, 4 lanes) or "avx2" (8 lanes; also what "avxvnni", "avx512" and "amx" select). Every
// path gives the same bytes. Starts as MLLAMA_Q_CPU_PATH (scalar|avx2|avxvnni|avx512|amx) when
// set and supported, else the best the CPU has. set_quant_path("auto") picks
// the best; an unknown or unsupported name throws std::invalid_argument.
const char* quant_path();
void set_quant_path(const std::string& name);
std::vector<std::string> quant_paths();  // paths this CPU can run

// Q4_K packs 8 six-bit scales and 8 six-bit mins into 12 bytes; j in [0, 8).
inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
    if (j < 4) {
        *d = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

// Round to nearest, ties to even (what ggml's nearest_int does with its
// 1.5*2^23 trick). Valid for |x| < 2^22.
inline int nearest_int(float x) {
    const float v = x + 12582912.0f;  // 1.5 * 2^23: pushes the integer part into the mantissa
    uint32_t i;
    std::memcpy(&i, &v, 4);
    return static_cast<int>(i & 0x007fffff) - 0x00400000;
}

}  // namespace mq
