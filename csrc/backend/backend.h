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
//   * every array an op reads is backend memory, integer index arrays
//     (token ids, positions, destination rows, sampling parameters) included:
//     a decoder step keeps them in one backend-owned block that the model
//     fills with ONE copy per step (csrc/model/step_block.h), so a step's
//     launches take only device pointers (what a CUDA graph needs). Arguments
//     named `*_host` are host memory: the launch shape (segment tables) that
//     the host must know anyway; their device copies sit in the same block;
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
    virtual void* alloc(size_t bytes) = 0;  // throws on out-of-memory
    virtual void free(void* p) = 0;
    virtual void to_device(void* dst, const void* src_host, size_t bytes) = 0;
    virtual void to_host(void* dst_host, const void* src, size_t bytes) = 0;
    virtual void copy(void* dst, const void* src, size_t bytes) = 0;  // backend -> backend
    // Make a host GGUF buffer usable by the kernels. CPU: zero-copy (returns a
    // view of `host`, which must outlive the Weight). CUDA: copied once to VRAM.
    virtual Weight upload(const void* host, DType type, int64_t rows, int64_t cols) = 0;
    virtual void synchronize() = 0;

    // ---- linear algebra -------------------------------------------------
    // y[M, N] = x[M, K] · Wᵀ (+ bias[N] when bias != nullptr), K = w.cols, N = w.rows.
    // ldx / ldy: row strides in floats.
    virtual void matmul(const float* x, int64_t M, int64_t ldx, const Weight& w, const float* bias, float* y,
                        int64_t ldy) = 0;
    // The same product (no bias) for rows of a decoder step that are all decode rows (a
    // generating sequence's next token: decode = true) or all prompt rows. Batch
    // invariance (what prefix reuse and batching rely on, as for attention_segments): on
    // a backend that promises it, each row's result depends only on that row and its
    // class, never on M or on the other rows. The CPU computes decode rows by the per-row
    // tile kernels and prompt rows by the panel GEMM whatever their number (cpu::Route),
    // so a sequence gets the same bits alone (Model.generate) as batched with others (a
    // server's step). CUDA does not promise it yet (its plain matmul).
    virtual void matmul_rows(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                             bool decode) = 0;
    // out[i, :] = row ids[i] of `table`, converted to float32. out: [n, table.cols].
    //   ids: backend int32 [n], each in [0, table.rows) (the caller checks them
    //   before the upload: a device backend cannot). A float32 activation
    //   buffer wrapped as a Weight{data, F32, rows, cols} is a valid table
    //   (gathering the rows whose logits a step needs).
    virtual void get_rows(const Weight& table, const int32_t* ids, int64_t n, float* out) = 0;

    // ---- elementwise and normalisation ------------------------------------
    // y[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w          x, y: [rows, cols]; w: [cols]
    virtual void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t cols, float eps) = 0;
    // y[r, :] = (x - mean) / sqrt(var + eps) * w + b               (biased variance, as torch)
    virtual void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t cols,
                            float eps) = 0;
    virtual void add(float* y, const float* x, int64_t n) = 0;                             // y += x
    virtual void add_scaled(float* y, const float* x, float s, int64_t n) = 0;             // y += s * x
    virtual void silu_mul(const float* gate, const float* up, float* out, int64_t n) = 0;  // out = silu(gate) * up
    virtual void gelu(float* x, int64_t n) = 0;                                            // exact (erf) GELU, in place
    // Rotary embedding in llama.cpp's interleaved-pair layout (the converter
    // permutes HF's rotate-half Q/K rows into it): for each token t, head h and
    // pair i < head_dim/2, rotate (x[2i], x[2i+1]) by angle pos[t] * inv_freq[i].
    //   x: [n_tok, n_head, head_dim] in place; pos: backend int32 [n_tok];
    //   inv_freq: backend f32 [head_dim / 2]
    virtual void rope(float* x, int64_t n_tok, int n_head, int head_dim, const int32_t* pos, const float* inv_freq) = 0;

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
    virtual void attention(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                           int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                           int64_t ld_mask, bool causal, int64_t q_offset) = 0;
    // Several independent attentions in one call (the rows of a batched
    // decoder step, each sequence with its own KV cache or image keys):
    // segment s computes, for its query rows i < n_q (rows q_row + i of q and
    // out, [*, n_head, hd]), attention over its own n_k keys k/v
    // ([n_k, n_kv_head, hd] of kv_type, row stride kv_stride elements), no
    // mask, causal with q_offset as attention() when `causal`.
    // Batch invariance (what prefix reuse and batching rely on): each row's
    // result depends only on that row's query and its visible keys, never on
    // the other rows or segments of the call, nor on n_q or n_k beyond its
    // last visible key, on backends that can promise it (the CPU one does:
    // csrc/cpu/attention.h; CUDA does not yet). Keys are visited in a fixed
    // order of fixed chunks counted from key 0.
    //   segs_host: n_segs entries (host; their K/V pointers are backend memory).
    //   segs:      the same table in backend memory (the step block), for a
    //              kernel that reads it on the device (graph capture); may be
    //              nullptr when the backend does not use it.
    struct AttnSegment {
        int64_t q_row = 0, n_q = 0;
        const void* k = nullptr;
        const void* v = nullptr;
        int64_t n_k = 0;
        int64_t q_offset = 0;
        int32_t causal = 0;
        int32_t pad_ = 0;
    };
    virtual void attention_segments(const float* q, float* out, const AttnSegment* segs_host, const AttnSegment* segs,
                                    int n_segs, DType kv_type, int64_t kv_stride, int n_head, int n_kv_head, int hd,
                                    float scale) = 0;
    // dst[r_j, :] = src[j, :] converted to dst_type (F32 or F16), for writing the KV cache,
    // with r_j = dst_rows[j] (backend int32 [n]; a step's cache rows slot * n_ctx + pos),
    // or r_j = j when dst_rows is nullptr.
    //   src: [n, width] float32; dst: rows of width values of dst_type, row stride dst_stride elements.
    virtual void store_rows(const float* src, void* dst, DType dst_type, int64_t n, int64_t width, int64_t dst_stride,
                            const int32_t* dst_rows) = 0;
    // dst[idx[j]] = src[j] for j < n (int32 scatter: a step's token ids into the
    // per-sequence token histories the sampler reads). All backend memory.
    virtual void scatter_i32(const int32_t* src, int32_t* dst, const int32_t* idx, int64_t n) = 0;

    // ---- sampling ---------------------------------------------------------
    // One token per logits row, with transformers' logits processors in
    // transformers' order (mllama_q/sampling.py is the Python statement of the
    // same rules, tested against transformers): repetition penalty over the
    // row's token history (every distinct id once: s < 0 ? s * p : s / p),
    // then temperature 0 = greedy argmax (the lowest index wins ties), else
    // s / T, top-k (ties with the k-th value kept), top-p (the largest token
    // always kept), min-p, softmax, and the token whose cumulative probability
    // interval holds u * total (the draw `u` comes from the host's seeded RNG,
    // so runs are reproducible). Only out_ids need to go back to the host.
    //   logits: backend f32 [n_rows, vocab] (a backend may apply the penalty in place)
    //   params: backend [n_rows] (the step block)
    //   hist:   backend int32 token histories, row r's at hist[hist_begin .. + hist_len)
    //   out_ids: backend int32 [n_rows]
    struct SampleParams {
        float temperature = 0.0f;         // 0: greedy
        int32_t top_k = 0;                // 0: off
        float top_p = 1.0f;               // 1: off
        float min_p = 0.0f;               // 0: off
        float repetition_penalty = 1.0f;  // 1: off
        double u = 0.0;                   // uniform draw in [0, 1) (numpy's float64 random())
        int32_t hist_begin = 0, hist_len = 0;
    };
    virtual void sample(const float* logits, int64_t n_rows, int64_t vocab, const SampleParams* params,
                        const int32_t* hist, int32_t* out_ids) = 0;
    // Throws std::invalid_argument naming the first bad field of p (callers
    // check on the host before the parameters go to a device).
    static void check(const SampleParams& p);
};

std::unique_ptr<Backend> make_cpu_backend(ThreadPool& pool);
// Throws std::runtime_error when the CUDA backend was not built or no device is usable.
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace mq
