// CPU implementation of the Backend interface (backend.h).
//
// Memory is ordinary host memory; weights are zero-copy views of the mapped
// GGUF. Matrix products go through the fused kernels in csrc/cpu (SIMD paths
// chosen at run time); elementwise ops are row- or chunk-parallel on the pool.
// Attention for a few queries (decode) reads the KV cache in place
// (csrc/cpu/attention.h); otherwise by the fused flash kernel
// (csrc/cpu/attention_flash.h: online softmax over key blocks, scores never
// leave L1; a 4-tile image has 6432 queries and keys). Both have scalar
// reference kernels (the scalar CPU path) beside the SIMD ones.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "common/env.h"
#include "common/fp16.h"
#include "common/threadpool.h"
#include "cpu/attention.h"
#include "cpu/attention_flash.h"
#include "cpu/matmul.h"
#include "quants/quants.h"

namespace mq {
namespace {

constexpr int64_t kChunk = 16384;  // elements per task of elementwise ops

class CpuBackend final : public Backend {
public:
    explicit CpuBackend(ThreadPool& pool) : pool_(pool) {}
    std::string name() const override { return "cpu"; }

    // ---- memory ---------------------------------------------------------
    void* alloc(size_t bytes) override {
        const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
        void* p = std::aligned_alloc(64, rounded);
        if (!p) throw std::runtime_error("cpu backend: out of memory allocating " + std::to_string(bytes) + " bytes");
        return p;
    }
    void free(void* p) override { std::free(p); }
    void to_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void to_host(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void copy(void* dst, const void* src, size_t bytes) override { std::memmove(dst, src, bytes); }
    Weight upload(const void* host, DType type, int64_t rows, int64_t cols) override {
        row_size(type, cols);  // validates the row length against the block size
        if (rows < 0) throw std::invalid_argument("upload: negative row count");
        return Weight{host, type, rows, cols};
    }
    void synchronize() override {}

    // ---- linear algebra -------------------------------------------------
    void matmul(const float* x, int64_t M, int64_t ldx, const Weight& w, const float* bias, float* y,
                int64_t ldy) override {
        if (ldx < w.cols || ldy < w.rows) throw std::invalid_argument("matmul: row stride smaller than the row");
        cpu::matmul(x, M, w.cols, ldx, w.data, w.type, w.rows, y, ldy, pool_);
        if (bias) {
            pool_.parallel_for(M, [&](int64_t m, int) {
                float* yr = y + m * ldy;
                for (int64_t n = 0; n < w.rows; n++) yr[n] += bias[n];
            });
        }
    }

    void get_rows(const Weight& table, const int32_t* ids, int64_t n, float* out) override {
        const size_t rs = row_size(table.type, table.cols);
        for (int64_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= table.rows)
                throw std::invalid_argument("get_rows: id " + std::to_string(ids[i]) + " out of range [0, " +
                                            std::to_string(table.rows) + ")");
        pool_.parallel_for(n, [&](int64_t i, int) {
            dequantize_row(table.type, static_cast<const uint8_t*>(table.data) + ids[i] * rs, out + i * table.cols,
                           table.cols);
        });
    }

    // ---- elementwise and normalisation ------------------------------------
    void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t cols, float eps) override {
        // HF MllamaTextRMSNorm: x * rsqrt(mean(x^2) + eps) * weight, in float32.
        pool_.parallel_for(rows, [&](int64_t r, int) {
            const float* xr = x + r * cols;
            float* yr = y + r * cols;
            double ss = 0.0;
            for (int64_t i = 0; i < cols; i++) ss += double(xr[i]) * xr[i];
            const float inv = 1.0f / std::sqrt(float(ss / cols) + eps);
            for (int64_t i = 0; i < cols; i++) yr[i] = (xr[i] * inv) * w[i];
        });
    }

    void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t cols,
                    float eps) override {
        pool_.parallel_for(rows, [&](int64_t r, int) {
            const float* xr = x + r * cols;
            float* yr = y + r * cols;
            double s = 0.0;
            for (int64_t i = 0; i < cols; i++) s += xr[i];
            const double mean = s / cols;
            double v = 0.0;
            for (int64_t i = 0; i < cols; i++) v += (xr[i] - mean) * (xr[i] - mean);
            const float inv = float(1.0 / std::sqrt(v / cols + eps));
            const float fm = float(mean);
            for (int64_t i = 0; i < cols; i++) yr[i] = (xr[i] - fm) * inv * w[i] + b[i];
        });
    }

    template <typename F>
    void for_chunks(int64_t n, F&& f) {
        pool_.parallel_for((n + kChunk - 1) / kChunk, [&](int64_t t, int) {
            const int64_t lo = t * kChunk, hi = std::min(n, lo + kChunk);
            f(lo, hi);
        });
    }

    void add(float* y, const float* x, int64_t n) override {
        for_chunks(n, [&](int64_t lo, int64_t hi) { for (int64_t i = lo; i < hi; i++) y[i] += x[i]; });
    }
    void add_scaled(float* y, const float* x, float s, int64_t n) override {
        for_chunks(n, [&](int64_t lo, int64_t hi) { for (int64_t i = lo; i < hi; i++) y[i] += s * x[i]; });
    }
    void silu_mul(const float* gate, const float* up, float* out, int64_t n) override {
        for_chunks(n, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; i++) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
        });
    }
    void gelu(float* x, int64_t n) override {
        // torch.nn.functional.gelu default (approximate='none'): 0.5 x (1 + erf(x / sqrt 2))
        for_chunks(n, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; i++) x[i] = 0.5f * x[i] * (1.0f + std::erf(x[i] * 0.70710678118654752f));
        });
    }

    void rope(float* x, int64_t n_tok, int n_head, int head_dim, const int32_t* pos,
              const float* inv_freq) override {
        if (head_dim % 2) throw std::invalid_argument("rope: head_dim must be even");
        const int half = head_dim / 2;
        pool_.parallel_for(n_tok, [&](int64_t t, int) {
            // Angles in float32 like HF (inv_freq float32 times float position),
            // cos/sin evaluated in double and rounded once.
            std::vector<float> c(half), s(half);
            for (int i = 0; i < half; i++) {
                const float a = float(pos[t]) * inv_freq[i];
                c[i] = float(std::cos(double(a)));
                s[i] = float(std::sin(double(a)));
            }
            for (int h = 0; h < n_head; h++) {
                float* v = x + (t * n_head + h) * head_dim;
                for (int i = 0; i < half; i++) {
                    const float a = v[2 * i], b = v[2 * i + 1];
                    v[2 * i] = a * c[i] - b * s[i];
                    v[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
        });
    }

    // ---- attention ------------------------------------------------------
    void attention(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                   int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                   int64_t ld_mask, bool causal, int64_t q_offset) override {
        if (n_kv_head <= 0 || n_head % n_kv_head) throw std::invalid_argument("attention: n_head must be a multiple of n_kv_head");
        if (kv_type != DType::F32 && kv_type != DType::F16) throw std::invalid_argument("attention: KV type must be f32 or f16");
        if (nq <= 0) return;
        // Decode (a few queries): read the KV cache in place, no conversion
        // buffers (csrc/cpu/attention.h). MLLAMA_Q_ATTN_DIRECT=0 forces the
        // flash kernel below (for benchmarks comparing the two).
        if (cpu::attention_direct_supported(nq, n_head, n_kv_head, hd) && direct_enabled()) {
            cpu::attention_direct(q, k, v, kv_type, kv_stride, out, nq, nk, n_head, n_kv_head, hd, scale, mask,
                                  ld_mask, causal, q_offset, pool_);
            return;
        }
        // Many queries: the fused flash kernel (csrc/cpu/attention_flash.h).
        cpu::attention_flash(q, k, v, kv_type, kv_stride, out, nq, nk, n_head, n_kv_head, hd, scale, mask, ld_mask,
                             causal, q_offset, pool_);
    }

    static bool direct_enabled() { return env::cpu_attn_direct(); }   // read at every call (benchmarks flip it)

    void store_rows(const float* src, void* dst, DType dst_type, int64_t n, int64_t width,
                    int64_t dst_stride) override {
        if (dst_type != DType::F32 && dst_type != DType::F16)
            throw std::invalid_argument("store_rows: destination type must be f32 or f16");
        pool_.parallel_for(n, [&](int64_t j, int) {
            if (dst_type == DType::F32)
                std::memcpy(static_cast<float*>(dst) + j * dst_stride, src + j * width, width * sizeof(float));
            else
                quantize_row_f16(src + j * width, static_cast<uint16_t*>(dst) + j * dst_stride, width);
        });
    }

private:
    ThreadPool& pool_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(ThreadPool& pool) { return std::make_unique<CpuBackend>(pool); }

}  // namespace mq
