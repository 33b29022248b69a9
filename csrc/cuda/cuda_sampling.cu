// GPU sampling: repetition penalty, argmax and top-k / top-p / min-p (see cuda_sampling.h).
//
// One block of 1024 threads per logits row (128256 floats for Llama 3 =
// 512 KiB, L2-resident after the lm_head writes it).
// top-k: the k-th largest value is found by a bitwise search over the
// order-preserving uint32 keys of the floats (32 counting passes), the k
// candidates are gathered in index order (deterministic), sorted in shared
// memory (bitonic), and softmax / nucleus / the pick use block-wide scans.
// Follow-up if it ever shows in profiles: a 4-pass 8-bit radix select instead
// of 32 counting passes.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_sampling.h"

namespace mq::cuda {

namespace {

constexpr int kThreads = 1024;

// Order-preserving map float -> uint32 (larger float, larger key); NaN -> 0 (below -inf).
__device__ __forceinline__ uint32_t order_key(float v) {
    if (v != v) return 0u;
    const uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_to_float(uint32_t k) {
    if (k == 0u) return -INFINITY;
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

template <typename T>
__device__ __forceinline__ T warp_incl_scan(T v) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    return v;
}
// Exclusive prefix sum over the block (blockDim.x == kThreads); `total` gets the sum.
template <typename T>
__device__ T block_excl_scan(T v, T* sh, T& total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T inc = warp_incl_scan(v);
    __syncthreads();
    if (lane == 31) sh[warp] = inc;
    __syncthreads();
    if (warp == 0) sh[lane] = warp_incl_scan(sh[lane]);
    __syncthreads();
    total = sh[31];
    return (warp > 0 ? sh[warp - 1] : T(0)) + inc - v;
}
__device__ int block_sum_int(int v, int* sh) {
    int total;
    block_excl_scan(v, sh, total);
    return total;
}
__device__ int block_min_int(int v, int* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = sh[lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// (key << 32) | (~index): the max is the largest value, then the lowest index.
// Every thread of the block calls it; thread 0 writes out[0].
__device__ void block_argmax(const float* __restrict__ x, int64_t n, int32_t* out) {
    __shared__ unsigned long long sh[32];
    unsigned long long best = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const unsigned long long c =
            (static_cast<unsigned long long>(order_key(x[i])) << 32) | (0xffffffffu - static_cast<uint32_t>(i));
        best = c > best ? c : best;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long t = __shfl_xor_sync(0xffffffffu, best, o);
        best = t > best ? t : best;
    }
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = best;
    __syncthreads();
    if (threadIdx.x < 32) {
        best = sh[threadIdx.x];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const unsigned long long t = __shfl_xor_sync(0xffffffffu, best, o);
            best = t > best ? t : best;
        }
        if (threadIdx.x == 0) out[0] = static_cast<int32_t>(0xffffffffu - static_cast<uint32_t>(best & 0xffffffffu));
    }
}

__global__ void penalty_kernel(const float* __restrict__ src, float* __restrict__ dst, int64_t vocab,
                               const Backend::SampleParams* __restrict__ params, const int32_t* __restrict__ hist) {
    const Backend::SampleParams p = params[blockIdx.y];
    if (p.repetition_penalty == 1.0f) return;
    const int32_t* h = hist + p.hist_begin;
    const float* s = src + int64_t(blockIdx.y) * vocab;
    float* d = dst + int64_t(blockIdx.y) * vocab;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < p.hist_len; i += gridDim.x * blockDim.x) {
        const int32_t id = h[i];
        if (id < 0 || id >= vocab) continue;  // the <|image|> token has no score
        const float x = s[id];
        d[id] = x < 0.0f ? x * p.repetition_penalty : x / p.repetition_penalty;
    }
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* __restrict__ logits, int n, const Backend::SampleParams* __restrict__ params,
                  int32_t* out_ids) {
    __shared__ uint32_t s_key[kMaxTopK];
    __shared__ int32_t s_idx[kMaxTopK];
    __shared__ float s_p[kMaxTopK];
    __shared__ int sh_i[32];
    __shared__ float sh_f[32];
    const int tid = threadIdx.x;
    const Backend::SampleParams prm = params[blockIdx.x];
    const float* x = logits + int64_t(blockIdx.x) * n;
    int32_t* out = out_ids + blockIdx.x;
    if (prm.temperature <= 0.0f || prm.top_k == 1) {
        block_argmax(x, n, out);
        return;
    }
    int k = prm.top_k <= 0 || prm.top_k > kMaxTopK ? kMaxTopK : prm.top_k;
    if (k > n) k = n;
    const float inv_temp = 1.0f / prm.temperature, top_p = prm.top_p, min_p = prm.min_p;
    const float u = static_cast<float>(prm.u);

    // 1. T = the k-th largest key: the largest T with count(key >= T) >= k, built bit by bit.
    uint32_t T = 0;
    for (int bit = 31; bit >= 0; --bit) {
        const uint32_t cand = T | (1u << bit);
        int c = 0;
        for (int i = tid; i < n; i += kThreads) c += order_key(x[i]) >= cand;
        if (block_sum_int(c, sh_i) >= k) T = cand;
    }

    // 2. Gather the keys > T, then keys == T in index order until k are taken.
    //    Thread t scans the contiguous range [t * per, (t + 1) * per).
    const int per = (n + kThreads - 1) / kThreads;
    const int lo = min(n, tid * per), hi = min(n, lo + per);
    int gt = 0, eq = 0;
    for (int i = lo; i < hi; ++i) {
        const uint32_t kk = order_key(x[i]);
        gt += kk > T;
        eq += kk == T;
    }
    int n_gt, n_eq;
    int pos_gt = block_excl_scan(gt, sh_i, n_gt);
    int pos_eq = n_gt + block_excl_scan(eq, sh_i, n_eq);
    for (int i = lo; i < hi; ++i) {
        const uint32_t kk = order_key(x[i]);
        if (kk > T) {
            s_key[pos_gt] = kk;
            s_idx[pos_gt] = i;
            ++pos_gt;  // n_gt < k <= kMaxTopK
        } else if (kk == T) {
            if (pos_eq < k) {
                s_key[pos_eq] = kk;
                s_idx[pos_eq] = i;
            }
            ++pos_eq;
        }
    }
    for (int i = k + tid; i < kMaxTopK; i += kThreads) {
        s_key[i] = 0u;
        s_idx[i] = 0x7fffffff;
    }
    __syncthreads();

    // 3. Bitonic sort of kMaxTopK entries: larger key first, then lower index.
    for (int size = 2; size <= kMaxTopK; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            const int i = tid, j = tid ^ stride;
            if (i < kMaxTopK && j > i) {
                const bool j_first = s_key[j] > s_key[i] || (s_key[j] == s_key[i] && s_idx[j] < s_idx[i]);
                const bool ascending = (i & size) == 0;  // "ascending" = in the final (best-first) order
                if (j_first == ascending) {
                    const uint32_t tk = s_key[i];
                    s_key[i] = s_key[j];
                    s_key[j] = tk;
                    const int32_t ti = s_idx[i];
                    s_idx[i] = s_idx[j];
                    s_idx[j] = ti;
                }
            }
            __syncthreads();
        }
    }

    // 4. Softmax over the k candidates (relative to the largest), nucleus cut, pick.
    const float v0 = key_to_float(s_key[0]);
    if (v0 == -INFINITY) {  // every logit is -inf or NaN: nothing to weigh
        if (tid == 0) out[0] = s_idx[0];
        return;
    }
    const float p = tid < k ? __expf((key_to_float(s_key[tid]) - v0) * inv_temp) : 0.0f;
    float total;
    const float cum_incl = block_excl_scan(p, sh_f, total) + p;
    // smallest prefix whose mass reaches top_p of the total (top_p >= 1: all k); min_p:
    // p_i >= min_p * p_0 (p is relative to the largest, p_0 = 1), a prefix of the sorted order
    const bool p_cut = tid < k && top_p < 1.0f && cum_incl >= top_p * total;
    const bool m_cut = tid < k && tid > 0 && min_p > 0.0f && p < min_p;
    const int cut = min(block_min_int(p_cut ? tid : k - 1, sh_i), block_min_int(m_cut ? tid - 1 : k - 1, sh_i));
    s_p[tid < kMaxTopK ? tid : 0] = cum_incl;
    __syncthreads();
    const float mass = s_p[cut];
    const float target = u * mass;
    const int pick = block_min_int(tid <= cut && cum_incl > target ? tid : cut, sh_i);
    if (tid == 0) out[0] = s_idx[pick];
}

}  // namespace

void repetition_penalty(const float* src, float* dst, int64_t n_rows, int64_t vocab,
                        const Backend::SampleParams* params, const int32_t* hist, cudaStream_t stream) {
    if (n_rows <= 0) return;
    if (n_rows > 65535) throw std::invalid_argument("repetition_penalty: at most 65535 rows");
    // 8 blocks per row stride over the history (its length is read on the device)
    penalty_kernel<<<dim3(8, static_cast<unsigned>(n_rows)), 256, 0, stream>>>(src, dst, vocab, params, hist);
    MQ_CUDA_CHECK_LAUNCH();
}

void sample_rows(const float* logits, int64_t n_rows, int64_t vocab, const Backend::SampleParams* params, int32_t* out,
                 cudaStream_t stream) {
    if (n_rows <= 0) return;
    if (vocab <= 0 || vocab > 0x7fffffff) throw std::invalid_argument("sample_rows: vocab must be in 1 .. 2^31-1");
    sample_kernel<<<static_cast<unsigned>(n_rows), kThreads, 0, stream>>>(logits, static_cast<int>(vocab), params, out);
    MQ_CUDA_CHECK_LAUNCH();
}

}  // namespace mq::cuda
