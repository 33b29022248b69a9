// Flash attention for many queries (attention_flash.h): the driver (K/V
// packing per KV group, tasks over query-row blocks) and the portable scalar
// kernel, the reference the AVX2 / AVX-512 kernels are tested against.
#include "cpu/attention_flash.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/profile.h"
#include "quants/quants.h"
#include "cpu/attention_flash_impl.h"
#include "cpu/matmul.h"

namespace mq::cpu {
namespace detail {
namespace {

// One lane: the kernel template becomes plain scalar code.
struct VScalar {
    using T = float;
    static constexpr int W = 1;
    static T load(const float* p) { return *p; }
    static void store(float* p, T x) { *p = x; }
    static T set1(float f) { return f; }
    static T zero() { return 0.0f; }
    static T fma(T a, T b, T c) { return a * b + c; }
    static T mul(T a, T b) { return a * b; }
    static T add(T a, T b) { return a + b; }
    static T sub(T a, T b) { return a - b; }
    static T max(T a, T b) { return a > b ? a : b; }
    static T exp(T x) { return std::exp(x); }    // exp(-inf) = 0
    static float exp1(float x) { return std::exp(x); }
    static float hmax(T x) { return x; }
    static float hsum(T x) { return x; }
};

}  // namespace

FlashKernel flash_kernel_scalar() { return {1, 16, flash_rows<VScalar, 16, 4, 4, 8>}; }

}  // namespace detail

void attention_flash(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                     int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                     int64_t ld_mask, bool causal, int64_t q_offset, ThreadPool& pool) {
    if (n_kv_head <= 0 || n_head % n_kv_head) throw std::invalid_argument("attention_flash: n_head must be a multiple of n_kv_head");
    if (kv_type != DType::F32 && kv_type != DType::F16) throw std::invalid_argument("attention_flash: KV type must be f32 or f16");
    if (hd <= 0) throw std::invalid_argument("attention_flash: head size must be positive");
    if (nq <= 0) return;
    if (nk <= 0) {
        std::fill(out, out + nq * n_head * hd, 0.0f);
        return;
    }
    detail::FlashKernel kern = detail::flash_kernel_scalar();
#ifdef MQ_X86
    if (active_path() == Path::AVX512) kern = detail::flash_kernel_avx512();
    else if (active_path() == Path::AVX2) kern = detail::flash_kernel_avx2();
#endif
    const int W = kern.W, KB = kern.KB;
    const int hdp = (hd + W - 1) / W * W;
    const int64_t nkp = (nk + KB - 1) / KB * KB, n_blocks = nkp / KB;
    const int G = n_head / n_kv_head;
    const int64_t rows = nq * G;
    const int64_t n_tasks = (rows + detail::kFlashRows - 1) / detail::kFlashRows;
    // kp: [n_blocks][hdp][KB] (K transposed per block), vp: [nkp][hdp]; zero padded
    std::vector<float> kp(n_blocks * hdp * KB), vp(nkp * hdp);
    // Profiling (common/profile.h): wall time of the K/V packing and of the row
    // tasks; the latter is split into score / softmax / P·V in proportion to
    // the threads' time in each (prof_ns: [threads][3]).
    const bool prof_on = prof::enabled();
    std::vector<uint64_t> prof_ns(prof_on ? size_t(pool.size()) * 3 : 0, 0);
    uint64_t pack_ns = 0, rows_ns = 0;
    for (int g = 0; g < n_kv_head; g++) {
        uint64_t t0 = prof_on ? prof::now_ns() : 0;
        pool.parallel_for(n_blocks, [&](int64_t b, int) {
            float row[2048];
            std::vector<float> big;
            float* rw = row;
            if (hd > 2048) { big.resize(hd); rw = big.data(); }
            float* kb = &kp[b * hdp * KB];
            std::fill(kb, kb + int64_t(hdp) * KB, 0.0f);
            for (int jj = 0; jj < KB; jj++) {
                const int64_t j = b * KB + jj;
                float* vr = &vp[j * hdp];
                std::fill(vr, vr + hdp, 0.0f);
                if (j >= nk) continue;
                const int64_t off = j * kv_stride + int64_t(g) * hd;
                if (kv_type == DType::F32) {
                    std::memcpy(rw, static_cast<const float*>(k) + off, size_t(hd) * sizeof(float));
                    std::memcpy(vr, static_cast<const float*>(v) + off, size_t(hd) * sizeof(float));
                } else {
                    dequantize_row_f16(static_cast<const uint16_t*>(k) + off, rw, hd);
                    dequantize_row_f16(static_cast<const uint16_t*>(v) + off, vr, hd);
                }
                for (int d = 0; d < hd; d++) kb[int64_t(d) * KB + jj] = rw[d];
            }
        });
        const detail::FlashArgs a{kp.data(), vp.data(), nk, nkp, hd, hdp, KB, scale, q, n_head, G, g,
                                  mask, ld_mask, causal, q_offset, out};
        if (prof_on) {
            const uint64_t t1 = prof::now_ns();
            pack_ns += t1 - t0;
            t0 = t1;
        }
        pool.parallel_for(n_tasks, [&](int64_t t, int thread) {
            const int64_t r0 = t * detail::kFlashRows;
            kern.rows(a, r0, int(std::min<int64_t>(detail::kFlashRows, rows - r0)),
                      prof_on ? &prof_ns[size_t(thread) * 3] : nullptr);
        });
        if (prof_on) rows_ns += prof::now_ns() - t0;
    }
    if (prof_on) {
        double ph[3] = {0, 0, 0}, tot = 0;
        for (size_t i = 0; i < prof_ns.size(); i++) {
            ph[i % 3] += double(prof_ns[i]);
            tot += double(prof_ns[i]);
        }
        const std::string det = "hd=" + std::to_string(hd);
        const double f = tot > 0 ? rows_ns * 1e-9 / tot : 0;
        const double flop = 2.0 * nq * nk * hd * n_head;   // each product
        prof::record_seconds("attention:pack K/V", det, pack_ns * 1e-9, 0, 8.0 * nk * n_kv_head * hd);
        prof::record_seconds("attention:score", det, ph[0] * f, flop);
        prof::record_seconds("attention:softmax", det, ph[1] * f, 0);
        prof::record_seconds("attention:P.V", det, ph[2] * f, flop);
    }
}

}  // namespace mq::cpu
