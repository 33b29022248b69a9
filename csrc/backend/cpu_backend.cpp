// CPU implementation of the Backend interface (backend.h).
//
// Memory is ordinary host memory; weights are zero-copy views of the mapped
// GGUF. Matrix products go through the fused kernels in csrc/cpu (SIMD paths
// chosen at run time); elementwise ops are row- or chunk-parallel on the pool.
// Attention for a few queries (decode) reads the KV cache in place
// (csrc/cpu/attention.h); otherwise by the fused flash kernel
// (csrc/cpu/attention_flash.h: online softmax over key blocks, scores never
// leave L1; a 4-tile image has 6432 queries and keys). The older path, per KV
// head group two matrix products (S = Q·Kᵀ, O = softmax(S)·V) in query
// blocks, stays behind MLLAMA_Q_ATTN_FLASH=0 for comparison.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
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

// The softmax of the vision tower evaluates ~26 billion exponentials for one
// 4-tile image, so these loops are written to vectorise: the compiler builds
// AVX-512, AVX2 and baseline clones and the loader picks one for this CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MQ_VEC_CLONES __attribute__((target_clones("avx512f", "arch=x86-64-v3", "default")))
#else
#define MQ_VEC_CLONES
#endif

// exp(x) for x <= 0 (softmax arguments after subtracting the row max), within
// 2 ulp of std::exp: x = n·ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
// polynomial (Taylor coefficients; the truncation error < 2e-8 there), times
// 2^n built in the exponent bits. Arguments below -87.3 (including -inf and
// masked scores near -FLT_MAX) give exactly 0.
static inline float exp_nonpos(float x) {
    const float xc = x < -87.3f ? -87.3f : x;
    const float n = std::nearbyint(xc * 1.44269504088896341f);
    const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 split hi + lo
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &p, 4);
    bits += static_cast<int32_t>(n) << 23;
    float out;
    std::memcpy(&out, &bits, 4);
    return x < -87.3f ? 0.0f : out;
}

// s[j] = s[j]*scale + mask[j] for j < n; returns the max (-inf when n == 0).
MQ_VEC_CLONES static float scale_mask_max(float* s, int64_t n, float scale, const float* mask) {
    float mx[16];
    for (int l = 0; l < 16; l++) mx[l] = -std::numeric_limits<float>::infinity();
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) {
            const float v = s[j + l] * scale + (mask ? mask[j + l] : 0.0f);
            s[j + l] = v;
            mx[l] = v > mx[l] ? v : mx[l];
        }
    for (; j < n; j++) {
        s[j] = s[j] * scale + (mask ? mask[j] : 0.0f);
        mx[0] = s[j] > mx[0] ? s[j] : mx[0];
    }
    float m = mx[0];
    for (int l = 1; l < 16; l++) m = mx[l] > m ? mx[l] : m;
    return m;
}

// s[j] = exp(s[j] - mx) for j < n; returns the sum (16 partial sums, then a
// fixed-order total, so the result does not depend on the clone chosen).
MQ_VEC_CLONES static float exp_sub_sum(float* s, int64_t n, float mx) {
    float acc[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) {
            const float e = exp_nonpos(s[j + l] - mx);
            s[j + l] = e;
            acc[l] += e;
        }
    for (; j < n; j++) {
        s[j] = exp_nonpos(s[j] - mx);
        acc[j % 16] += s[j];
    }
    double total = 0.0;
    for (int l = 0; l < 16; l++) total += acc[l];
    return float(total);
}

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
        if (ldx < w.cols || ldy < w.rows) throw std::invalid_argument("matmul: row stride smaller than the row");
        uint64_t t0 = prof::start();
        cpu::matmul(x, M, w.cols, ldx, w.data, w.type, w.rows, y, ldy, pool_);
        if (t0)
            prof::record("matmul", std::string(type_info(w.type).name) + " " + std::to_string(w.rows) + "x" +
                                       std::to_string(w.cols), t0, 2.0 * double(M) * w.rows * w.cols,
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
        t.done("get_rows", [&] { return std::string(type_info(table.type).name) + " cols=" + str(table.cols); }, 0,
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
        for_chunks(n, [&](int64_t lo, int64_t hi) { for (int64_t i = lo; i < hi; i++) y[i] += x[i]; });
        t.done("add", [] { return std::string(); }, double(n), 12.0 * n);
    }
    void add_scaled(float* y, const float* x, float s, int64_t n) override {
        Timed t;
        for_chunks(n, [&](int64_t lo, int64_t hi) { for (int64_t i = lo; i < hi; i++) y[i] += s * x[i]; });
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

    void rope(float* x, int64_t n_tok, int n_head, int head_dim, const int32_t* pos,
              const float* inv_freq) override {
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
        t.done("rope", [&] { return "heads=" + str(n_head) + " hd=" + str(head_dim); }, 0,
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
        t.done("attention",
               [&] {
                   return "heads=" + str(n_head) + "/" + str(n_kv_head) + " hd=" + str(hd) + (mask ? " masked" : "") +
                          (causal ? " causal" : "");
               },
               4.0 * nq * nk * hd * n_head, 4.0 * (2.0 * nq * n_head * hd + 2.0 * nk * n_kv_head * hd));
    }

    void attention_impl(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                        int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                        int64_t ld_mask, bool causal, int64_t q_offset) {
        if (n_kv_head <= 0 || n_head % n_kv_head) throw std::invalid_argument("attention: n_head must be a multiple of n_kv_head");
        if (kv_type != DType::F32 && kv_type != DType::F16) throw std::invalid_argument("attention: KV type must be f32 or f16");
        if (nq <= 0) return;
        // Decode (a few queries): read the KV cache in place, no conversion
        // buffers (csrc/cpu/attention.h). MLLAMA_Q_ATTN_DIRECT=0 forces the
        // matrix-product path below (for benchmarks comparing the two).
        if (cpu::attention_direct_supported(nq, n_head, n_kv_head, hd) && direct_enabled()) {
            cpu::attention_direct(q, k, v, kv_type, kv_stride, out, nq, nk, n_head, n_kv_head, hd, scale, mask,
                                  ld_mask, causal, q_offset, pool_);
            return;
        }
        // Many queries: the fused flash kernel (csrc/cpu/attention_flash.h).
        // MLLAMA_Q_ATTN_FLASH=0 forces the two-matrix-product path below
        // (kept for benchmarks comparing the two).
        if (flash_enabled()) {
            cpu::attention_flash(q, k, v, kv_type, kv_stride, out, nq, nk, n_head, n_kv_head, hd, scale, mask,
                                 ld_mask, causal, q_offset, pool_);
            return;
        }
        const int G = n_head / n_kv_head;   // query heads per KV head
        const int64_t rows = nq * G;        // query rows of one group, ordered (i, r)
        const int64_t bq = std::max<int64_t>(G, std::min<int64_t>(rows, 512) / G * G);  // block of whole queries
        std::vector<float> qg(rows * hd), kf(std::max<int64_t>(nk, 1) * hd), vt(hd * std::max<int64_t>(nk, 1));
        std::vector<float> s(bq * std::max<int64_t>(nk, 1)), o(bq * hd);
        auto load = [&](const void* base, int64_t j, int g, float* dst) {
            const int64_t off = j * kv_stride + int64_t(g) * hd;
            if (kv_type == DType::F32) std::memcpy(dst, static_cast<const float*>(base) + off, hd * sizeof(float));
            else dequantize_row_f16(static_cast<const uint16_t*>(base) + off, dst, hd);
        };
        for (int g = 0; g < n_kv_head; g++) {
            // Qg[(i, r), :] = q[i, g*G + r, :]            [rows, hd]
            // Kf[j, :]      = k[j, g, :] as float32        [nk, hd]
            // Vt[d, j]      = v[j, g, d] as float32        [hd, nk] (transposed: the PV product reads rows)
            pool_.parallel_for(nq, [&](int64_t i, int) {
                std::memcpy(&qg[i * G * hd], q + (i * n_head + int64_t(g) * G) * hd, size_t(G) * hd * sizeof(float));
            });
            pool_.parallel_for(nk, [&](int64_t j, int) { load(k, j, g, &kf[j * hd]); });
            pool_.parallel_for((nk + 63) / 64, [&](int64_t t, int) {
                std::vector<float> row(hd);
                for (int64_t j = t * 64; j < std::min(nk, t * 64 + 64); j++) {
                    load(v, j, g, row.data());
                    for (int d = 0; d < hd; d++) vt[d * nk + j] = row[d];
                }
            });
            for (int64_t r0 = 0; r0 < rows; r0 += bq) {
                const int64_t nr = std::min(bq, rows - r0);
                if (nk == 0) {
                    for (int64_t r = 0; r < nr; r++) std::fill(&o[r * hd], &o[r * hd] + hd, 0.0f);
                } else {
                    // S[r, j] = Qg[r] · Kf[j]
                    cpu::matmul(&qg[r0 * hd], nr, hd, hd, kf.data(), DType::F32, nk, s.data(), nk, pool_);
                    pool_.parallel_for(nr, [&](int64_t r, int) {
                        const int64_t i = (r0 + r) / G;  // query index
                        softmax_row(&s[r * nk], nk, scale, mask ? mask + i * ld_mask : nullptr,
                                    causal ? i + q_offset : nk - 1);
                    });
                    // O[r, d] = sum_j P[r, j] V[j, d]  =  P · Vtᵀ
                    cpu::matmul(s.data(), nr, nk, nk, vt.data(), DType::F32, hd, o.data(), hd, pool_);
                }
                pool_.parallel_for(nr, [&](int64_t r, int) {
                    const int64_t i = (r0 + r) / G, h = int64_t(g) * G + (r0 + r) % G;
                    std::memcpy(out + (i * n_head + h) * hd, &o[r * hd], size_t(hd) * sizeof(float));
                });
            }
        }
    }

    static bool flash_enabled() { return env::cpu_attn_flash(); }    // read at every call (benchmarks flip it)
    static bool direct_enabled() { return env::cpu_attn_direct(); }

    // Softmax over one row of scores in place: p_j ∝ exp(scale*s_j + mask_j)
    // for j <= last (later keys get p = 0). A row with nothing visible (all
    // -inf) becomes all zeros rather than NaN.
    static void softmax_row(float* s, int64_t nk, float scale, const float* mask, int64_t last) {
        const int64_t n = std::min(nk, last + 1);
        const float mx = scale_mask_max(s, n, scale, mask);
        if (n <= 0 || mx == -std::numeric_limits<float>::infinity()) {
            std::fill(s, s + nk, 0.0f);
            return;
        }
        const float inv = 1.0f / exp_sub_sum(s, n, mx);
        for (int64_t j = 0; j < n; j++) s[j] *= inv;
        for (int64_t j = n; j < nk; j++) s[j] = 0.0f;
    }
    void store_rows(const float* src, void* dst, DType dst_type, int64_t n, int64_t width,
                    int64_t dst_stride) override {
        if (dst_type != DType::F32 && dst_type != DType::F16)
            throw std::invalid_argument("store_rows: destination type must be f32 or f16");
        Timed t;
        pool_.parallel_for(n, [&](int64_t j, int) {
            if (dst_type == DType::F32)
                std::memcpy(static_cast<float*>(dst) + j * dst_stride, src + j * width, width * sizeof(float));
            else
                quantize_row_f16(src + j * width, static_cast<uint16_t*>(dst) + j * dst_stride, width);
        });
        t.done("store_rows", [&] { return std::string(type_info(dst_type).name); }, 0,
               double(n) * width * (4 + type_info(dst_type).type_size));
    }

private:
    ThreadPool& pool_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(ThreadPool& pool) { return std::make_unique<CpuBackend>(pool); }

}  // namespace mq
