// CPU implementation of the Backend interface (backend.h).
//
// Memory is ordinary host memory; weights are zero-copy views of the mapped
// GGUF. Matrix products go through the fused kernels in csrc/cpu (SIMD paths
// chosen at run time); elementwise ops are row- or chunk-parallel on the pool.
// Attention for a few queries (decode) reads the KV cache in place
// (csrc/cpu/attention.h), as does attention_segments() for any number of
// queries (the text decoder: batch-invariant); otherwise by the fused flash kernel
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
#include "common/profile.h"
#include "common/threadpool.h"
#include "cpu/attention.h"
#include "cpu/attention_flash.h"
#include "cpu/matmul.h"
#include "cpu/rowops.h"
#include "cpu/sampling.h"
#include "quants/quants.h"

namespace mq {
namespace {

constexpr int64_t kChunk = 16384;  // elements per task of elementwise ops

// Profiling of one op (common/profile.h): `Timed t; ...; t.done("op", [&] { return detail; }, flop, bytes);`
// reads the clock and builds the detail string only when profiling is on.
struct Timed {
    uint64_t t0 = prof::start();
    template <class F>
    void done(const char* op, F&& detail, double flop, double bytes) const {
        if (t0) prof::record(op, detail(), t0, flop, bytes);
    }
};
std::string str(int64_t v) { return std::to_string(v); }

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
    // Copies of more than a few MiB (the vision tower moves [6432, 1280]
    // activations) are split over the pool; overlapping ranges use one memmove.
    void copy_bytes(void* dst, const void* src, size_t bytes) {
        constexpr size_t kPart = size_t(1) << 20;
        const auto* s = static_cast<const uint8_t*>(src);
        auto* d = static_cast<uint8_t*>(dst);
        if (bytes < 4 * kPart || pool_.size() == 1 || (d < s + bytes && s < d + bytes)) {
            std::memmove(dst, src, bytes);
            return;
        }
        pool_.parallel_for(int64_t((bytes + kPart - 1) / kPart), [&](int64_t t, int) {
            const size_t lo = size_t(t) * kPart;
            std::memcpy(d + lo, s + lo, std::min(kPart, bytes - lo));
        });
    }
    void to_device(void* dst, const void* src, size_t bytes) override {
        Timed t;
        copy_bytes(dst, src, bytes);
        t.done("copy", [] { return std::string("to_device"); }, 0, 2.0 * bytes);
    }
    void to_host(void* dst, const void* src, size_t bytes) override {
        Timed t;
        copy_bytes(dst, src, bytes);
        t.done("copy", [] { return std::string("to_host"); }, 0, 2.0 * bytes);
    }
    void copy(void* dst, const void* src, size_t bytes) override {
        Timed t;
        copy_bytes(dst, src, bytes);
        t.done("copy", [] { return std::string("device"); }, 0, 2.0 * bytes);
    }
    Weight upload(const void* host, DType type, int64_t rows, int64_t cols) override {
        row_size(type, cols);  // validates the row length against the block size
        if (rows < 0) throw std::invalid_argument("upload: negative row count");
        return Weight{host, type, rows, cols};
    }
    void synchronize() override {}

    // ---- linear algebra -------------------------------------------------
    void matmul(const float* x, int64_t M, int64_t ldx, const Weight& w, const float* bias, float* y,
                int64_t ldy) override {
        matmul_route(x, M, ldx, w, bias, y, ldy, cpu::Route::Auto);
    }
    // Decode rows by the per-row tiles, prompt rows by the panel GEMM, for any M (backend.h).
    void matmul_rows(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy,
                     bool decode) override {
        matmul_route(x, M, ldx, w, nullptr, y, ldy, decode ? cpu::Route::Tiles : cpu::Route::Panel);
    }
    void matmul_route(const float* x, int64_t M, int64_t ldx, const Weight& w, const float* bias, float* y, int64_t ldy,
                      cpu::Route route) {
        if (ldx < w.cols || ldy < w.rows) throw std::invalid_argument("matmul: row stride smaller than the row");
        uint64_t t0 = prof::start();
        cpu::matmul(x, M, w.cols, ldx, w.data, w.type, w.rows, y, ldy, pool_, route);
        if (t0)
            prof::record(
                "matmul",
                std::string(type_info(w.type).name) + " " + std::to_string(w.rows) + "x" + std::to_string(w.cols), t0,
                2.0 * double(M) * w.rows * w.cols,
                double(M) * w.cols * 4 + double(w.rows) * row_size(w.type, w.cols) + double(M) * w.rows * 4);
        if (bias) {
            t0 = prof::start();
            pool_.parallel_for(M, [&](int64_t m, int) {
                float* yr = y + m * ldy;
                for (int64_t n = 0; n < w.rows; n++) yr[n] += bias[n];
            });
            if (t0) prof::record("bias", "N=" + std::to_string(w.rows), t0, double(M) * w.rows, 8.0 * M * w.rows);
        }
    }

    void get_rows(const Weight& table, const int32_t* ids, int64_t n, float* out) override {
        const size_t rs = row_size(table.type, table.cols);
        for (int64_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= table.rows)
                throw std::invalid_argument("get_rows: id " + std::to_string(ids[i]) + " out of range [0, " +
                                            std::to_string(table.rows) + ")");
        // Tasks of up to 64K values (whole blocks): a table entry can be one long
        // row (the vision tile position embedding: 8.2M values per aspect ratio).
        const TypeInfo& ti = type_info(table.type);
        const int64_t chunk = std::max<int64_t>(1, 65536 / ti.block_size) * ti.block_size;
        const int64_t per_row = (table.cols + chunk - 1) / chunk;
        Timed t;
        pool_.parallel_for(n * per_row, [&](int64_t task, int) {
            const int64_t i = task / per_row, c0 = (task % per_row) * chunk;
            const int64_t len = std::min(chunk, table.cols - c0);
            dequantize_row(table.type,
                           static_cast<const uint8_t*>(table.data) + ids[i] * rs + c0 / ti.block_size * ti.type_size,
                           out + i * table.cols + c0, len);
        });
        t.done(
            "get_rows", [&] { return std::string(type_info(table.type).name) + " cols=" + str(table.cols); }, 0,
            double(n) * (rs + 4.0 * table.cols));
    }

    // ---- elementwise and normalisation ------------------------------------
    void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t cols, float eps) override {
        // HF MllamaTextRMSNorm: x * rsqrt(mean(x^2) + eps) * weight, in float32.
        Timed t;
        const auto& ops = cpu::row_ops();
        for_rows(rows, cols, [&](int64_t r) { ops.rms_norm(x + r * cols, w, y + r * cols, cols, eps); });
        t.done("rms_norm", [&] { return "cols=" + str(cols); }, 4.0 * rows * cols, 8.0 * rows * cols);
    }

    void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t cols,
                    float eps) override {
        Timed t;
        const auto& ops = cpu::row_ops();
        for_rows(rows, cols, [&](int64_t r) { ops.layer_norm(x + r * cols, w, b, y + r * cols, cols, eps); });
        t.done("layer_norm", [&] { return "cols=" + str(cols); }, 8.0 * rows * cols, 8.0 * rows * cols);
    }

    // f(r) for every row r < rows, in tasks of about kChunk elements.
    template <typename F>
    void for_rows(int64_t rows, int64_t cols, F&& f) {
        const int64_t per = std::max<int64_t>(1, kChunk / std::max<int64_t>(cols, 1));
        pool_.parallel_for((rows + per - 1) / per, [&](int64_t t, int) {
            for (int64_t r = t * per; r < std::min(rows, (t + 1) * per); r++) f(r);
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
        Timed t;
        for_chunks(n, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; i++) y[i] += x[i];
        });
        t.done("add", [] { return std::string(); }, double(n), 12.0 * n);
    }
    void add_scaled(float* y, const float* x, float s, int64_t n) override {
        Timed t;
        for_chunks(n, [&](int64_t lo, int64_t hi) {
            for (int64_t i = lo; i < hi; i++) y[i] += s * x[i];
        });
        t.done("add_scaled", [] { return std::string(); }, 2.0 * n, 12.0 * n);
    }
    void silu_mul(const float* gate, const float* up, float* out, int64_t n) override {
        Timed t;
        const auto& ops = cpu::row_ops();
        for_chunks(n, [&](int64_t lo, int64_t hi) { ops.silu_mul(gate + lo, up + lo, out + lo, hi - lo); });
        t.done("silu_mul", [] { return std::string(); }, 0, 12.0 * n);
    }
    void gelu(float* x, int64_t n) override {
        // torch.nn.functional.gelu default (approximate='none'): 0.5 x (1 + erf(x / sqrt 2))
        Timed t;
        const auto& ops = cpu::row_ops();
        for_chunks(n, [&](int64_t lo, int64_t hi) { ops.gelu(x + lo, hi - lo); });
        t.done("gelu", [] { return std::string(); }, 0, 8.0 * n);
    }

    void rope(float* x, int64_t n_tok, int n_head, int head_dim, const int32_t* pos, const float* inv_freq) override {
        if (head_dim % 2) throw std::invalid_argument("rope: head_dim must be even");
        const int half = head_dim / 2;
        Timed t;
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
        t.done(
            "rope", [&] { return "heads=" + str(n_head) + " hd=" + str(head_dim); }, 0,
            8.0 * n_tok * n_head * head_dim);
    }

    // ---- attention ------------------------------------------------------
    void attention(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                   int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                   int64_t ld_mask, bool causal, int64_t q_offset) override {
        Timed t;
        attention_impl(q, k, v, kv_type, kv_stride, out, nq, nk, n_head, n_kv_head, hd, scale, mask, ld_mask, causal,
                       q_offset);
        // FLOP of the two products (q·k, p·v) over all nq x nk pairs (causal masking not subtracted)
        t.done(
            "attention",
            [&] {
                return "heads=" + str(n_head) + "/" + str(n_kv_head) + " hd=" + str(hd) + (mask ? " masked" : "") +
                       (causal ? " causal" : "");
            },
            4.0 * nq * nk * hd * n_head, 4.0 * (2.0 * nq * n_head * hd + 2.0 * nk * n_kv_head * hd));
    }

    void attention_impl(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                        int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                        int64_t ld_mask, bool causal, int64_t q_offset) {
        if (n_kv_head <= 0 || n_head % n_kv_head)
            throw std::invalid_argument("attention: n_head must be a multiple of n_kv_head");
        if (kv_type != DType::F32 && kv_type != DType::F16)
            throw std::invalid_argument("attention: KV type must be f32 or f16");
        if (nq <= 0) return;
        // Decode (a few queries): read the KV cache in place, no conversion
        // buffers (csrc/cpu/attention.h). MLLAMA_Q_ATTN_DIRECT=0 forces the
        // flash kernel below (for benchmarks comparing the two).
        if (cpu::attention_direct_supported(nq, n_head, n_kv_head, hd) && direct_enabled()) {
            cpu::attention_direct(q, k, v, kv_type, kv_stride, out, nq, nk, n_head, n_kv_head, hd, scale, mask, ld_mask,
                                  causal, q_offset, pool_);
            return;
        }
        // Many queries: the fused flash kernel (csrc/cpu/attention_flash.h).
        cpu::attention_flash(q, k, v, kv_type, kv_stride, out, nq, nk, n_head, n_kv_head, hd, scale, mask, ld_mask,
                             causal, q_offset, pool_);
    }

    static bool direct_enabled() { return env::cpu_attn_direct(); }  // read at every call (benchmarks flip it)

    void store_rows(const float* src, void* dst, DType dst_type, int64_t n, int64_t width, int64_t dst_stride,
                    const int32_t* dst_rows) override {
        if (dst_type != DType::F32 && dst_type != DType::F16)
            throw std::invalid_argument("store_rows: destination type must be f32 or f16");
        if (dst_stride < width) throw std::invalid_argument("store_rows: row stride smaller than the row");
        if (dst_rows)
            for (int64_t j = 0; j < n; j++)
                if (dst_rows[j] < 0) throw std::invalid_argument("store_rows: negative destination row");
        Timed t;
        pool_.parallel_for(n, [&](int64_t j, int) {
            const int64_t r = dst_rows ? dst_rows[j] : j;
            if (dst_type == DType::F32)
                std::memcpy(static_cast<float*>(dst) + r * dst_stride, src + j * width, width * sizeof(float));
            else quantize_row_f16(src + j * width, static_cast<uint16_t*>(dst) + r * dst_stride, width);
        });
        t.done(
            "store_rows", [&] { return std::string(type_info(dst_type).name); }, 0,
            double(n) * width * (4 + type_info(dst_type).type_size));
    }

    void scatter_i32(const int32_t* src, int32_t* dst, const int32_t* idx, int64_t n) override {
        for (int64_t j = 0; j < n; j++) {
            if (idx[j] < 0) throw std::invalid_argument("scatter_i32: negative index");
            dst[idx[j]] = src[j];
        }
    }

    void attention_segments(const float* q, float* out, const AttnSegment* segs_host, const AttnSegment*, int n_segs,
                            DType kv_type, int64_t kv_stride, int n_head, int n_kv_head, int hd, float scale) override {
        // Always the direct kernel: its result per row does not depend on the
        // call's shape (csrc/cpu/attention.h), which the flash kernel's does.
        Timed t;
        double flop = 0;  // the two products over every (query, key) pair (causal not subtracted)
        for (int s = 0; s < n_segs; s++) {
            const AttnSegment& g = segs_host[s];
            if (g.n_q <= 0) continue;
            if (g.n_k < 0 || g.q_row < 0) throw std::invalid_argument("attention_segments: negative extent");
            const int64_t off = g.q_row * n_head * hd;
            cpu::attention_direct(q + off, g.k, g.v, kv_type, kv_stride, out + off, g.n_q, g.n_k, n_head, n_kv_head, hd,
                                  scale, nullptr, 0, g.causal != 0, g.q_offset, pool_);
            flop += 4.0 * g.n_q * g.n_k * hd * n_head;
        }
        t.done(
            "attention_segments", [&] { return "heads=" + str(n_head) + "/" + str(n_kv_head) + " hd=" + str(hd); },
            flop, 0);
    }

    // ---- sampling ---------------------------------------------------------
    void sample(const float* logits, int64_t n_rows, int64_t vocab, const SampleParams* params, const int32_t* hist,
                int32_t* out_ids) override {
        if (n_rows <= 0) return;
        if (vocab <= 0) throw std::invalid_argument("sample: empty vocabulary");
        for (int64_t r = 0; r < n_rows; r++) cpu::check_sample_params(params[r]);
        if (int64_t(scratch_.size()) < pool_.size()) scratch_.resize(size_t(pool_.size()));
        pool_.parallel_for(n_rows, [&](int64_t r, int thread) {
            out_ids[r] = cpu::sample_row(logits + r * vocab, vocab, params[r], hist, scratch_[size_t(thread)]);
        });
    }

private:
    ThreadPool& pool_;
    std::vector<cpu::SampleScratch> scratch_;  // one per pool thread
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(ThreadPool& pool) { return std::make_unique<CpuBackend>(pool); }

}  // namespace mq
