// Flash-style attention (online softmax, one pass over K/V, no nq x nk score
// matrix in memory) with grouped-query attention, an additive mask with a row
// stride, causal masking with a query offset, and F16 or F32 K/V.
//
// Maths: HF modeling_mllama.py, MllamaTextSelfAttention / MllamaVisionAttention
// (eager path): softmax(q k^T * scale + mask) v. Online softmax as in
// FlashAttention (Dao et al. 2022): per query keep the running max m, the
// running sum l = sum exp(s - m) and o = sum exp(s - m) v; rescale by
// exp(m_old - m_new) when the max grows; out = o / l. A row whose keys are all
// -inf keeps m = -inf and l = 0 and is written as zeros.
//
// Work split: an "item" is one (query i, head h) pair; items of one KV head g
// (the n_head / n_kv_head heads that share it, for every query) are numbered
// it = i * group + (h - g * group). A warp owns R = 4 consecutive items, so
// every K/V row it reads serves 4 queries/heads (decode: the 4 query heads of a
// GQA group). Keys go 32 at a time, one key per lane for q·k (q is broadcast
// from shared memory), then the lanes switch to owning head-dim elements for
// p·v (coalesced V reads).
//   * many items (prefill, vision tower): 4 warps per block on different items,
//     each over all keys, results written directly;
//   * few items (decode: nq = 1): the keys are split across the 4 warps of a
//     block and across gridDim.z blocks (flash-decoding); each split writes its
//     unnormalised (o, m, l) to scratch and attn_combine_kernel merges them.
//
// This is a SIMT kernel (CUDA cores, f32 throughout): the path for decode and
// the general fallback. Many queries (nq >= 64: prefill, the vision tower) with
// head_dim 64/80/128 go to the tensor-core kernel in kernels_attention_mma.cu.
#include <algorithm>
#include <cfloat>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_kernels.h"

namespace mq::cuda {

namespace {

constexpr int R = 4;   // items per warp
constexpr int AW = 4;  // warps per block
constexpr int kAttnThreads = 32 * AW;

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename KT>
struct KV;
template <>
struct KV<float> {
    __device__ __forceinline__ static void load8(const float* p, float* o) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
        o[0] = a.x;
        o[1] = a.y;
        o[2] = a.z;
        o[3] = a.w;
        o[4] = b.x;
        o[5] = b.y;
        o[6] = b.z;
        o[7] = b.w;
    }
    __device__ __forceinline__ static float load1(const float* p) { return __ldg(p); }
};
template <>
struct KV<__half> {
    __device__ __forceinline__ static void load8(const __half* p, float* o) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[2 * i] = half_to_float(static_cast<uint16_t>(w[i] & 0xffff));
            o[2 * i + 1] = half_to_float(static_cast<uint16_t>(w[i] >> 16));
        }
    }
    __device__ __forceinline__ static float load1(const __half* p) { return __half2float(p[0]); }
};

struct Launch {
    int ws;                  // warps of a block sharing the same items (1 or AW)
    int splits;              // total key splits S = gridDim.z * ws
    int64_t keys_per_split;  // multiple of 32
};

// Template parameters:
//   DC  head-dim chunks of 32: lane owns elements d = lane + 32c, c < DC
//       (hd <= 32 * DC; instantiated for 2, 3, 4, 8 = hd up to 64, 96, 128, 256)
//   KT  K/V element type (float or __half)
template <int DC, typename KT>
__global__ void __launch_bounds__(kAttnThreads)
    attn_kernel(const AttnArgs a, const Launch L, bool kv_vec, float* __restrict__ part) {
    __shared__ __align__(16) float qs[AW][R][DC * 32];  // scaled q of the warp's items
    __shared__ float ps[AW][R][32];                     // softmax numerators of the current 32 keys

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int hd = a.hd;
    const int group = a.n_head / a.n_kv_head;
    const int g = blockIdx.y;
    const int64_t items = a.nq * group;
    const int64_t it0 = (static_cast<int64_t>(blockIdx.x) * (AW / L.ws) + warp / L.ws) * R;
    const int split = blockIdx.z * L.ws + warp % L.ws;

    // 32-bit query indices (nq < 2^31, checked by the launcher) keep registers low.
    int qi[R], hh[R];
    bool valid[R];
    int64_t imax = -1;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int64_t it = it0 + r;
        valid[r] = it < items;
        qi[r] = valid[r] ? static_cast<int>(it / group) : 0;
        hh[r] = g * group + static_cast<int>(valid[r] ? it % group : 0);
        if (valid[r]) imax = qi[r] > imax ? qi[r] : imax;
    }
    if (imax < 0) return;  // whole warp past the end (uniform per warp; no block barriers below)

#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < DC; ++c) {
            const int d = lane + 32 * c;
            qs[warp][r][d] =
                (valid[r] && d < hd) ? a.q[(static_cast<int64_t>(qi[r]) * a.n_head + hh[r]) * hd + d] * a.scale : 0.0f;
        }
    __syncwarp();

    int64_t j_begin = static_cast<int64_t>(split) * L.keys_per_split;
    int64_t j_end = min64(a.nk, j_begin + L.keys_per_split);
    if (a.causal) j_end = min64(j_end, imax + a.q_offset + 1);

    const KT* kb = static_cast<const KT*>(a.k) + static_cast<int64_t>(g) * hd;
    const KT* vb = static_cast<const KT*>(a.v) + static_cast<int64_t>(g) * hd;

    float o[R][DC], m[R], l[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < DC; ++c) o[r][c] = 0.0f;
    }

    for (int64_t j0 = j_begin; j0 < j_end; j0 += 32) {
        const int64_t j = j0 + lane;
        float s[R];
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] = 0.0f;
        if (j < j_end) {
            const KT* kr = kb + j * a.kv_stride;
            for (int d = 0; d < hd; d += 8) {
                float kv[8];
                if (kv_vec) {
                    KV<KT>::load8(kr + d, kv);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) kv[e] = d + e < hd ? KV<KT>::load1(kr + d + e) : 0.0f;
                }
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float4 qa = *reinterpret_cast<const float4*>(&qs[warp][r][d]);
                    const float4 qb = *reinterpret_cast<const float4*>(&qs[warp][r][d + 4]);
                    s[r] += qa.x * kv[0] + qa.y * kv[1] + qa.z * kv[2] + qa.w * kv[3] + qb.x * kv[4] + qb.y * kv[5] +
                            qb.z * kv[6] + qb.w * kv[7];
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
                if (!valid[r]) {
                    s[r] = -INFINITY;
                    continue;
                }
                if (a.mask) s[r] += a.mask[static_cast<int64_t>(qi[r]) * a.ld_mask + j];
                if (a.causal && j > qi[r] + a.q_offset) s[r] = -INFINITY;
            }
        } else {
#pragma unroll
            for (int r = 0; r < R; ++r) s[r] = -INFINITY;
        }

#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float m_new = fmaxf(m[r], warp_max(s[r]));
            // m_new == -inf: every key so far is masked; keep o = l = 0.
            const float p = m_new == -INFINITY ? 0.0f : __expf(s[r] - m_new);
            const float alpha = m_new == -INFINITY ? 1.0f : __expf(m[r] - m_new);
            l[r] = l[r] * alpha + warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int c = 0; c < DC; ++c) o[r][c] *= alpha;
            ps[warp][r][lane] = p;
        }
        __syncwarp();
        const int cnt = static_cast<int>(min64(32, j_end - j0));
        for (int jj = 0; jj < cnt; ++jj) {
            const KT* vr = vb + (j0 + jj) * a.kv_stride;
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) {
                    const float vv = KV<KT>::load1(vr + d);
#pragma unroll
                    for (int r = 0; r < R; ++r) o[r][c] += ps[warp][r][jj] * vv;
                }
            }
        }
        __syncwarp();  // ps is rewritten by the next chunk
    }

    const int64_t rows = a.nq * a.n_head;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (!valid[r]) continue;
        const int64_t row = static_cast<int64_t>(qi[r]) * a.n_head + hh[r];
        if (L.splits == 1) {
            const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) a.out[row * hd + d] = o[r][c] * inv;
            }
        } else {
            float* po = part + (static_cast<int64_t>(split) * rows + row) * hd;
#pragma unroll
            for (int c = 0; c < DC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) po[d] = o[r][c];
            }
            float2* ml = reinterpret_cast<float2*>(part + static_cast<int64_t>(L.splits) * rows * hd);
            if (lane == 0) ml[static_cast<int64_t>(split) * rows + row] = make_float2(m[r], l[r]);
        }
    }
}

// Merge S partial results per (query, head) row: one warp per row.
//   part: o [S, rows, hd] then (m, l) [S, rows] as float2 (hd even, see scratch size)
__global__ void attn_combine_kernel(const float* __restrict__ part, int S, int64_t rows, int hd,
                                    float* __restrict__ out) {
    const int lane = threadIdx.x & 31;
    const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const float2* ml = reinterpret_cast<const float2*>(part + static_cast<int64_t>(S) * rows * hd);
    float M = -INFINITY;
    for (int s = 0; s < S; ++s) M = fmaxf(M, ml[static_cast<int64_t>(s) * rows + row].x);
    float* o = out + row * hd;
    if (M == -INFINITY) {
        for (int d = lane; d < hd; d += 32) o[d] = 0.0f;
        return;
    }
    float Lsum = 0.0f;
    for (int s = 0; s < S; ++s) {
        const float2 v = ml[static_cast<int64_t>(s) * rows + row];
        Lsum += v.y * __expf(v.x - M);  // v.x = -inf -> weight 0
    }
    const float inv = Lsum > 0.0f ? 1.0f / Lsum : 0.0f;
    for (int d = lane; d < hd; d += 32) {
        float acc = 0.0f;
        for (int s = 0; s < S; ++s) {
            const float wgt = __expf(ml[static_cast<int64_t>(s) * rows + row].x - M);
            acc += wgt * part[(static_cast<int64_t>(s) * rows + row) * hd + d];
        }
        o[d] = acc * inv;
    }
}

int head_chunks(int hd) {
    if (hd <= 64) return 2;
    if (hd <= 96) return 3;
    if (hd <= 128) return 4;
    if (hd <= 256) return 8;
    throw std::invalid_argument("cuda attention: head_dim " + std::to_string(hd) + " > 256 is not supported");
}

// Choose the work split (see the header comment). num_sms from the device.
void plan(const AttnArgs& a, int num_sms, Launch& L, dim3& grid) {
    const int group = a.n_head / a.n_kv_head;
    const int64_t item_groups = ceil_div(a.nq * group, R);  // warps needed per KV head without key split
    const int64_t warps_no_split = item_groups * a.n_kv_head;
    if (warps_no_split >= 4LL * num_sms || a.nk <= 64) {
        L.ws = 1;
        L.splits = 1;
        L.keys_per_split = ceil_div(std::max<int64_t>(a.nk, 1), 32) * 32;
        grid = dim3(static_cast<unsigned>(ceil_div(item_groups, AW)), a.n_kv_head, 1);
        return;
    }
    // Flash-decoding: AW warps per item group split the keys, and gridDim.z blocks more,
    // aiming at ~8 warps per SM and at least 64 keys per split.
    L.ws = AW;
    const int64_t warps_per_z = item_groups * a.n_kv_head * AW;
    int64_t z = ceil_div(8LL * num_sms, warps_per_z);
    z = std::max<int64_t>(1, std::min<int64_t>(z, a.nk / (64 * AW)));
    z = std::min<int64_t>(z, 65535);
    L.splits = static_cast<int>(z) * AW;
    L.keys_per_split = ceil_div(ceil_div(a.nk, L.splits), 32) * 32;
    grid = dim3(static_cast<unsigned>(item_groups), a.n_kv_head, static_cast<unsigned>(z));
}

template <int DC>
void launch_dc(const AttnArgs& a, const Launch& L, dim3 grid, bool kv_vec, float* part, cudaStream_t stream) {
    if (a.kv_type == DType::F16) attn_kernel<DC, __half><<<grid, kAttnThreads, 0, stream>>>(a, L, kv_vec, part);
    else attn_kernel<DC, float><<<grid, kAttnThreads, 0, stream>>>(a, L, kv_vec, part);
    MQ_CUDA_CHECK_LAUNCH();
}

}  // namespace

size_t attention_scratch_floats(const AttnArgs& a, int num_sms) {
    if (attention_mma_supported(a)) return 0;
    Launch L;
    dim3 grid;
    plan(a, num_sms, L, grid);
    if (L.splits == 1) return 0;
    const int64_t rows = a.nq * a.n_head;
    return static_cast<size_t>(L.splits) * rows * (a.hd + 2) + 2;
}

void attention(const AttnArgs& a, float* scratch, int num_sms, cudaStream_t stream) {
    if (a.nq == 0) return;
    if (a.nq > 0x7fffffff) throw std::invalid_argument("cuda attention: nq >= 2^31");
    if (attention_mma_supported(a)) {
        attention_mma(a, stream);
        return;
    }
    Launch L;
    dim3 grid;
    plan(a, num_sms, L, grid);
    const size_t elt = a.kv_type == DType::F16 ? 2 : 4;
    const bool kv_vec =
        a.hd % 8 == 0 && a.kv_stride % 8 == 0 && reinterpret_cast<uintptr_t>(a.k) % 16 == 0 && elt * 8 % 16 == 0;
    // the (m, l) float2 array starts at S * rows * hd floats: keep it 8-byte aligned
    if (L.splits > 1 && (static_cast<int64_t>(L.splits) * a.nq * a.n_head * a.hd) % 2 != 0)
        throw std::logic_error("attention scratch misaligned");  // cannot happen: S is a multiple of AW = 4
    switch (head_chunks(a.hd)) {
        case 2: launch_dc<2>(a, L, grid, kv_vec, scratch, stream); break;
        case 3: launch_dc<3>(a, L, grid, kv_vec, scratch, stream); break;
        case 4: launch_dc<4>(a, L, grid, kv_vec, scratch, stream); break;
        default: launch_dc<8>(a, L, grid, kv_vec, scratch, stream); break;
    }
    if (L.splits > 1) {
        const int64_t rows = a.nq * a.n_head;
        attn_combine_kernel<<<static_cast<unsigned>(ceil_div(rows, 4)), 128, 0, stream>>>(scratch, L.splits, rows, a.hd,
                                                                                          a.out);
        MQ_CUDA_CHECK_LAUNCH();
    }
}

}  // namespace mq::cuda
