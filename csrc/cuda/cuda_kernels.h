// Host-side launchers of the CUDA kernels (one .cu file per family). Every
// launcher enqueues on `stream`, never synchronises, checks the launch, and
// takes only device pointers (host arrays are staged by the backend first), so
// that a sequence of launches can later be captured into a CUDA graph.
//
// Shapes follow csrc/backend/backend.h; all pointers are device memory.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/formats.h"

namespace mq::cuda {

// ---- matmul (kernels_mmv.cu, kernels_gemm.cu) -------------------------------
// 8-bit activations for the quantized matrix-vector kernels ("q8_1 style", but
// stored as two arrays so that 16 quants are one aligned 16-byte load):
//   xq : int8   [M, Kp]       quants, Kp = K rounded up to 256
//   xds: float2 [M, Kp / 32]  per 32 values: (d, d * sum(quants))
// value ~= d * q with d = amax / 127 (ggml's quantize_q8_1).
void quantize_act_q8(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* xq, float2* xds, int64_t Kp,
                     cudaStream_t stream);
inline int64_t act_q8_kp(int64_t K) { return (K + 255) / 256 * 256; }

// y[N] = W[N, K] · x[K] (+ bias). For quantized W, xq/xds must hold x quantized
// by quantize_act_q8 (M = 1); for float W, x is used directly.
void matvec(DType wtype, const void* w, int64_t N, int64_t K, const float* x, const int8_t* xq, const float2* xds,
            const float* bias, float* y, cudaStream_t stream);
bool matvec_uses_q8(DType wtype);

// y[M, N] = x[M, K] · Wᵀ (+ bias) on the tensor cores (mma.sync m16n8k16,
// f16 operands, f32 accumulation), W tiles dequantized into shared memory.
void gemm(DType wtype, const void* w, int64_t N, int64_t K, const float* x, int64_t M, int64_t ldx, const float* bias,
          float* y, int64_t ldy, cudaStream_t stream);
// GEMM variant for A/B measurements (default on; MLLAMA_Q_CUDA_GEMM=simple turns it off):
// dequantize slice k+1 after the mma of slice k instead of before it.
void gemm_set_prefetch(bool on);

// ---- row ops (kernels_ops.cu) -------------------------------------------------
void get_rows(DType type, const void* table, int64_t cols, const int32_t* ids, int64_t n, float* out,
              cudaStream_t stream);
void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t cols, float eps, cudaStream_t stream);
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t cols, float eps,
                cudaStream_t stream);
void add(float* y, const float* x, int64_t n, cudaStream_t stream);
void add_scaled(float* y, const float* x, float s, int64_t n, cudaStream_t stream);
void silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream);
void gelu(float* x, int64_t n, cudaStream_t stream);
void rope(float* x, int64_t n_tok, int n_head, int head_dim, const int32_t* pos, const float* inv_freq,
          cudaStream_t stream);
// dst row rows[j] (j when rows is nullptr) = src row j, converted to dst_type (F32 or F16).
void store_rows(const float* src, void* dst, DType dst_type, int64_t n, int64_t width, int64_t dst_stride,
                const int32_t* rows, cudaStream_t stream);
// dst[idx[j]] = src[j], j < n.
void scatter_i32(const int32_t* src, int32_t* dst, const int32_t* idx, int64_t n, cudaStream_t stream);

// ---- attention (kernels_attention.cu) ----------------------------------------
struct AttnArgs {
    const float* q;  // [nq, n_head, hd]
    const void* k;   // [nk, n_kv_head, hd] (row stride kv_stride elements)
    const void* v;
    DType kv_type;  // F32 or F16
    int64_t kv_stride;
    float* out;  // [nq, n_head, hd]
    int64_t nq, nk;
    int n_head, n_kv_head, hd;
    float scale;
    const float* mask;  // [nq, nk] row stride ld_mask, or nullptr
    int64_t ld_mask;
    bool causal;
    int64_t q_offset;
};
// Scratch (floats) the attention launch needs for split-K partial results;
// the backend provides a buffer at least this large.
size_t attention_scratch_floats(const AttnArgs& a, int num_sms);
void attention(const AttnArgs& a, float* scratch, int num_sms, cudaStream_t stream);
// Tensor-core flash attention (kernels_attention_mma.cu), used by attention()
// when nq >= 64, hd in {64, 80, 128} and q/K/V are 16-byte aligned;
// MLLAMA_Q_CUDA_ATTN=simt forces the SIMT kernel (for A/B checks).
bool attention_mma_supported(const AttnArgs& a);
void attention_mma(const AttnArgs& a, cudaStream_t stream);

}  // namespace mq::cuda
