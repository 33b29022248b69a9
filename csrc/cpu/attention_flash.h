// Fused ("flash") attention for many queries: the backend's large-query path.
//
// The vision tower attends 6432 queries to 6432 keys per head (4-tile image);
// computing S = Q·Kᵀ as a separate matrix product (K = hd = 80, a short dot
// product) and streaming the 13 MB score block through the cache twice is
// slow. Here, per KV head group, K is packed transposed into panels
// [nk/KB][hdp][KB] and V into rows [nkp][hdp] (float32, zero padded, hdp = hd
// rounded up to the vector width). One task handles up to kFlashRows query
// rows of the group and sweeps the key blocks of KB keys:
//   S   = scale * Qb · Kbᵀ + mask       (outer-product micro-kernel, S in L1)
//   m'  = max(m, rowmax S),  P = e^{S - m'},  α = e^{m - m'}
//   l   = α l + rowsum P,    O = α O + P · Vb
// and finally out = O / l (FlashAttention-2's online softmax, Dao 2023).
// The function is the backend's attention() (backend.h): -inf scores get
// probability 0, a row with nothing visible gives zeros, rows masked with
// finfo.min everywhere give the uniform average of V as softmax does.
#pragma once
#include <cstdint>

#include "common/formats.h"
#include "common/threadpool.h"

namespace mq::cpu {

//   q:    [nq, n_head, hd] float32
//   k, v: [nk, n_kv_head, hd] of kv_type (F32 or F16), kv_stride elements between keys
//   mask: additive [nq, nk] float32, row stride ld_mask, or nullptr
//   causal: key j visible to query i only when j <= i + q_offset
//   out:  [nq, n_head, hd] float32
// Kernel by active_path(): scalar reference, AVX2, or AVX-512.
void attention_flash(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                     int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                     int64_t ld_mask, bool causal, int64_t q_offset, ThreadPool& pool);

namespace detail {

constexpr int kFlashRows = 32;   // query rows per task

// One task: rows [r0, r0 + nr) of KV group g (row r = query i * G + head-in-group).
struct FlashArgs {
    const float* kp;   // [nkp / KB][hdp][KB] packed K of the group
    const float* vp;   // [nkp][hdp] packed V of the group
    int64_t nk, nkp;
    int hd, hdp, KB;
    float scale;
    const float* q;    // [nq, n_head, hd]
    int n_head, G, g;
    const float* mask;
    int64_t ld_mask;
    bool causal;
    int64_t q_offset;
    float* out;        // [nq, n_head, hd]
};
// Vector width W and key block KB of a kernel (hdp = hd rounded up to W, nkp to KB).
// prof: null, or 3 nanosecond counters of the calling thread that the kernel
// adds its score / softmax / P·V time to (profiling on, common/profile.h).
struct FlashKernel {
    int W, KB;
    void (*rows)(const FlashArgs& a, int64_t r0, int nr, uint64_t* prof);
};
FlashKernel flash_kernel_scalar();
FlashKernel flash_kernel_avx2();
FlashKernel flash_kernel_avx512();

}  // namespace detail
}  // namespace mq::cpu
