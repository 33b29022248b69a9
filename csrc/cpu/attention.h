// Direct ("flash-decoding") attention reading the K/V cache in place, for any
// number of queries, with a batch-invariant result.
//
// Decode evaluates attention for one query (or a few) against the whole KV
// cache; converting every K row to float32 and transposing V for two matrix
// products would cost more than the products. Here each KV head group's keys
// are split into chunks of kAttnChunk keys counted from key 0, and the query
// rows of the group (r = query i * G + head-in-group, G = n_head / n_kv_head)
// into blocks of at most kAttnDirectMaxRows rows. One task per (group, row
// block, chunk) reads each K and V row once (F16 -> F32 on the fly) and uses it
// for all rows of the block, keeping per row a max m, sum l and unnormalised
// accumulator acc. The chunks are then merged per row in chunk order (as
// FlashAttention-2 / flash-decoding do):
//   M = max_c m_c,  out = sum_c e^{m_c - M} acc_c / sum_c e^{m_c - M} l_c.
// The function is the backend's attention() (backend.h): the same shapes,
// masking and causal rule, a fully masked row (-inf everywhere) gives zeros,
// rows masked with finfo.min everywhere give the uniform average of V as
// softmax does.
//
// Batch invariance: a row's chunk partials depend only on its query, its mask
// row and the keys of the chunk it can see (keys it cannot see score -inf and
// add exact zeros), and the merge visits the chunks in a fixed order, so the
// result of a row is bit-identical whatever the number of queries in the call,
// the other rows of its block, the call's nk beyond the row's last visible key
// or how the work was split over tasks. The text decoder relies on this
// (Backend::attention_segments): a token's attention is the same computed in a
// 512-token prefill chunk, alone in a decode step or in a batch with other
// sequences, so cached K/V equal recomputed ones exactly.
#pragma once
#include <cstdint>

#include "common/formats.h"
#include "common/threadpool.h"

namespace mq::cpu {

constexpr int64_t kAttnDirectMaxRows = 16;  // query rows per block (per task)
constexpr int kAttnDirectMaxHd = 256;       // head size at most
constexpr int64_t kAttnChunk = 256;         // keys per task

// True when the rows of this shape fit one block: the backend's attention()
// takes the direct route for such small (decode) shapes and the flash kernel
// for larger ones; attention_direct() itself takes any nq.
inline bool attention_direct_supported(int64_t nq, int n_head, int n_kv_head, int hd) {
    return n_kv_head > 0 && n_head % n_kv_head == 0 && nq * (n_head / n_kv_head) <= kAttnDirectMaxRows && hd > 0 &&
           hd <= kAttnDirectMaxHd;
}

//   q:    [nq, n_head, hd] float32
//   k, v: [nk, n_kv_head, hd] of kv_type (F32 or F16), kv_stride elements between
//         consecutive keys j (k + j * kv_stride + g * hd is key j of group g)
//   mask: additive [nq, nk] float32, row stride ld_mask, or nullptr
//   causal: key j visible to query i only when j <= i + q_offset
//   out:  [nq, n_head, hd] float32
// Uses the SIMD path of active_path() (scalar reference, or AVX2 for the
// avx2 and avx512 paths). Throws std::invalid_argument for unsupported shapes
// (hd > kAttnDirectMaxHd, n_head not a multiple of n_kv_head).
void attention_direct(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                      int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                      int64_t ld_mask, bool causal, int64_t q_offset, ThreadPool& pool);

namespace detail {

// One (group, chunk) task: keys [0, n) of one group for R query rows.
//   qrows[r]:  hd floats of query row r
//   mrows[r]:  n mask values for row r (already offset to the chunk), or nullptr
//   last[r]:   last visible key of row r, relative to the chunk (< 0: none)
//   k, v:      key 0 of the chunk for this group; key j at + j * kv_stride elements
//   s:         scratch, R * n floats
// Outputs: m[r] (max score, -inf if nothing visible), l[r] = sum_j e^{s_j - m},
// acc[r * hd + d] = sum_j e^{s_j - m} v[j, d] (zeros when nothing visible).
struct AttnChunk {
    const float* const* qrows;
    const float* const* mrows;
    const int64_t* last;
    int R;
    const void* k;
    const void* v;
    bool f16;
    int64_t kv_stride;
    int64_t n;
    int hd;
    float scale;
};
using AttnChunkFn = void (*)(const AttnChunk& a, float* s, float* m, float* l, float* acc);
void attn_chunk_scalar(const AttnChunk& a, float* s, float* m, float* l, float* acc);
void attn_chunk_avx2(const AttnChunk& a, float* s, float* m, float* l, float* acc);

}  // namespace detail
}  // namespace mq::cpu
