// Flash attention for many queries (attention_flash.h): the driver (K/V
// packing per KV group, tasks over query-row blocks) and the portable scalar
// kernel, the reference the AVX2 / AVX-512 kernels are tested against.
#include "cpu/attention_flash.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

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
    for (int g = 0; g < n_kv_head; g++) {
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
        pool.parallel_for(n_tasks, [&](int64_t t, int) {
            const int64_t r0 = t * detail::kFlashRows;
            kern.rows(a, r0, int(std::min<int64_t>(detail::kFlashRows, rows - r0)));
        });
    }
}

}  // namespace mq::cpu
