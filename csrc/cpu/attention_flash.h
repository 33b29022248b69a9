// Fused ("flash") attention for many queries: the backend's large-query path.
//
// The vision tower attends 6432 queries to 6432 keys per head (4-tile image,
// hd = 80), ~45% of its FLOPs. The kernel works with the query rows as the
// vector lanes ("transposed" layout): one task takes up to kFlashRows query
// rows (query, head) of a KV group, holds Qᵀ [hd][rows] (pre-multiplied by the
// scale) and Oᵀ [hd][rows], and sweeps the keys in blocks of KB:
//   Sᵀ[j][r] = Σ_d K[j][d] · Qᵀ[d][r]        (K[j][d] broadcast, Qᵀ rows as vectors)
//   m' = max(m, max_j Sᵀ[j]),  Pᵀ = e^{Sᵀ - m'},  α = e^{m - m'}
//   l  = α l + Σ_j Pᵀ[j],      Oᵀ[d] = α Oᵀ[d] + Σ_j V[j][d] · Pᵀ[j]
// and finally out = O / l (FlashAttention-2's online softmax, Dao 2023,
// arXiv:2307.08691). Lanes = rows make every softmax step a vertical vector
// op (no horizontal max / sum per row, one e^x for α per 8 or 16 rows) and
// let K and V be read row by row as broadcasts: no transposed K copy, only a
// contiguous float32 copy of each KV group's K and V (F16 widened there).
// The function is the backend's attention() (backend.h): -inf scores get
// probability 0, a row with nothing visible gives zeros, rows masked with
// finfo.min everywhere give the uniform average of V as softmax does.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/formats.h"
#include "common/threadpool.h"

namespace mq::cpu {

//   q:    [nq, n_head, hd] float32
//   k, v: [nk, n_kv_head, hd] of kv_type (F32 or F16), kv_stride elements between keys
//   mask: additive [nq, nk] float32, row stride ld_mask, or nullptr
//   causal: key j visible to query i only when j <= i + q_offset
//   out:  [nq, n_head, hd] float32
// Kernel by active_path(): scalar reference, AVX2 (+FMA), AVX-512, or (amx) AMX-BF16.
void attention_flash(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                     int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                     int64_t ld_mask, bool causal, int64_t q_offset, ThreadPool& pool);

// True when the amx path's attention kernel (attention_flash_amx.cpp) runs this head size
// on this CPU and build: AMX-BF16 + AVX512-BF16, hd a multiple of 16 up to 256. The amx
// path then takes it for every flash-attention call; otherwise the AVX-512 kernel.
bool amx_attention_supported(int hd);

namespace detail {

// One task: rows [r0, r0 + nr) of KV group g (row r = query i * G + head-in-group).
struct FlashArgs {
    const float* k;  // key j of the group at k + j * kv_stride (float32, hd values; packed: kv_stride = hd)
    const float* v;  // value j at v + j * kv_stride
    int64_t kv_stride;
    int64_t nk;
    int hd;
    float scale;
    const float* q;  // [nq, n_head, hd]
    int n_head, G, g;
    const float* mask;
    int64_t ld_mask;
    bool causal;
    int64_t q_offset;
    float* out;  // [nq, n_head, hd]
    // The group's K/V in the kernel's own layout (FlashKernel::pack), or null.
    const uint16_t* packed = nullptr;
};
// A kernel: `rows` query rows per task at most (nr <= rows). prof: null, or 3
// nanosecond counters of the calling thread that the kernel adds its score /
// softmax / P·V time to (profiling on, common/profile.h).
struct FlashKernel {
    int rows;
    void (*run)(const FlashArgs& a, int64_t r0, int nr, uint64_t* prof);
    // Kernels with their own K/V layout (amx: bf16 pieces in tile order): its size in
    // 16-bit elements for nk keys of head size hd, and the packing of keys [j0, j1) (j0 a
    // multiple of 256; the range ending at nk also writes the layout's padding) from a
    // group's float32 rows (key j at k + j * ks); null for the float kernels, which read the
    // float32 rows.
    size_t (*packed_elems)(int64_t nk, int hd) = nullptr;
    void (*pack)(const float* k, const float* v, int64_t ks, int64_t nk, int hd, int64_t j0, int64_t j1,
                 uint16_t* dst) = nullptr;
};
FlashKernel flash_kernel_scalar();
FlashKernel flash_kernel_avx2();
FlashKernel flash_kernel_avx512();
// The amx path's kernel (attention_flash_amx.cpp): Q·Kᵀ and P·V on AMX-BF16 tiles with
// float32 operands split into bf16 pieces; needs hd % 16 == 0, hd <= 256.
FlashKernel flash_kernel_amx();

}  // namespace detail
}  // namespace mq::cpu
