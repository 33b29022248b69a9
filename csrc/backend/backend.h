// The one interface the model code (csrc/model/) computes through.
//
// CPU (csrc/backend/cpu_backend.cpp) and CUDA (csrc/cuda/) implement it. Model
// code allocates activations from the backend, uploads weights through it and
// calls these ops; it never sees SIMD intrinsics, threads or CUDA.
//
// Conventions for every op:
//   * activations are float32, row-major, contiguous unless a stride is given;
//     pointers are backend memory (host for CPU, device for CUDA);
//   * shapes are written [outer, ..., inner];
//   * `*_host` pointers are ordinary host memory on every backend;
//   * ops are asynchronous on CUDA (ordered on one stream); synchronize()
//     before reading results on the host with to_host().
//   * invalid arguments throw std::invalid_argument / std::runtime_error.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/formats.h"

namespace mq {

class ThreadPool;

// A weight tensor resident on a backend: `rows` rows of `cols` values in a
// GGUF type (quantized rows are row_size(type, cols) bytes each). 1-D tensors
// have rows == 1. On CPU `data` points straight into the memory-mapped GGUF.
struct Weight {
    const void* data = nullptr;
    DType type = DType::F32;
    int64_t rows = 0;
    int64_t cols = 0;
};

class Backend {
public:
    virtual ~Backend() = default;
    virtual std::string name() const = 0;

    // ---- memory ---------------------------------------------------------
    virtual void* alloc(size_t bytes) = 0;                 // throws on out-of-memory
    virtual void free(void* p) = 0;
    virtual void to_device(void* dst, const void* src_host, size_t bytes) = 0;
    virtual void to_host(void* dst_host, const void* src, size_t bytes) = 0;
    virtual void copy(void* dst, const void* src, size_t bytes) = 0;   // backend -> backend
    // Make a host GGUF buffer usable by the kernels. CPU: zero-copy (returns a
    // view of `host`, which must outlive the Weight). CUDA: copied once to VRAM.
    virtual Weight upload(const void* host, DType type, int64_t rows, int64_t cols) = 0;
    virtual void synchronize() = 0;

    // ---- linear algebra -------------------------------------------------
    // y[M, N] = x[M, K] · Wᵀ (+ bias[N] when bias != nullptr), K = w.cols, N = w.rows.
    // ldx / ldy: row strides in floats.
    virtual void matmul(const float* x, int64_t M, int64_t ldx, const Weight& w, const float* bias,
                        float* y, int64_t ldy) = 0;
    // out[i, :] = row ids_host[i] of `table`, converted to float32. out: [n, table.cols].
    virtual void get_rows(const Weight& table, const int32_t* ids_host, int64_t n, float* out) = 0;

    // ---- elementwise and normalisation ------------------------------------
    // y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w          x, y: [rows, cols]; w: [cols]
    virtual void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t cols, float eps) = 0;
    // y[r, :] = (x - mean) / sqrt(var + eps) * w + b               (biased variance, as torch)
    virtual void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows,
                            int64_t cols, float eps) = 0;
    virtual void add(float* y, const float* x, int64_t n) = 0;                 // y += x
    virtual void add_scaled(float* y, const float* x, float s, int64_t n) = 0;  // y += s * x
    virtual void silu_mul(const float* gate, const float* up, float* out, int64_t n) = 0;  // out = silu(gate) * up
    virtual void gelu(float* x, int64_t n) = 0;                                // exact (erf) GELU, in place
    // Rotary embedding in llama.cpp's interleaved-pair layout (the converter
    // permutes HF's rotate-half Q/K rows into it): for each token t, head h and
    // pair i < head_dim/2, rotate (x[2i], x[2i+1]) by angle pos_host[t] * inv_freq[i].
    //   x: [n_tok, n_head, head_dim] in place; inv_freq_host: [head_dim / 2]
    virtual void rope(float* x, int64_t n_tok, int n_head, int head_dim, const int32_t* pos_host,
                      const float* inv_freq_host) = 0;

    // ---- attention ------------------------------------------------------
    // out[i, h, :] = softmax_j(scale * q[i, h, :] · k[j, g, :] + mask[i, j]) · v[j, g, :]
    // with g = h / (n_head / n_kv_head) (grouped-query attention).
    //   q:    [nq, n_head, hd] float32
    //   k, v: [nk, n_kv_head, hd], element type kv_type (F32 or F16), row stride
    //         kv_stride elements between consecutive j
    //   mask: additive [nq, nk] float32 with row stride ld_mask, or nullptr
    //   causal: key j is visible to query i only when j <= i + q_offset
    //   out:  [nq, n_head, hd] float32
    // A row whose keys are all masked (-inf) yields zeros, never NaN.
    virtual void attention(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride,
                           float* out, int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale,
                           const float* mask, int64_t ld_mask, bool causal, int64_t q_offset) = 0;
    // dst[j, :] = src[j, :] converted to dst_type (F32 or F16), for writing the KV cache.
    //   src: [n, width] float32; dst: [n, width] of dst_type, row stride dst_stride elements.
    virtual void store_rows(const float* src, void* dst, DType dst_type, int64_t n, int64_t width,
                            int64_t dst_stride) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(ThreadPool& pool);
// Throws std::runtime_error when the CUDA backend was not built or no device is usable.
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace mq
