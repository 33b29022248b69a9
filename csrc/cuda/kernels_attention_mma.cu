// Tensor-core flash attention for many queries (prefill, the vision tower:
// nq = nk = 4 x 1608 with a padding mask). Same contract as the SIMT kernel in
// kernels_attention.cu, which remains the path for decode (few queries), for
// head dims other than 64 / 80 / 128 and for unaligned K/V.
//
// FlashAttention-2 scheme (Dao 2023), written afresh:
//   * a block of 4 warps owns 64 query rows of one head (16 rows per warp);
//     Q is scaled by scale * log2(e), rounded to f16 and kept in registers as
//     mma A fragments for the whole key loop;
//   * key tiles of 64: K and V rows are converted to f16 into shared memory;
//     S = Q Kᵀ with mma.sync m16n8k16 (f32 accumulators), the additive mask
//     (times log2 e), bounds and causal limits are applied to S in registers;
//   * online softmax in base 2 (exp2): running max m and partial sums l per row,
//     the O accumulators rescaled by exp2(m_old - m_new);
//   * P (f32 accumulators of S) is repacked in registers as f16 A fragments
//     (the m16n8 C layout of two n-tiles is the m16k16 A layout) and O += P V
//     with V fragments from ldmatrix.trans;
//   * out = O / l; rows with every key masked (m = -inf) give zeros.
// Precision: q, k, v and p rounded to f16, products and sums in f32 (error
// ~1e-3 relative, like any f16 flash attention; the SIMT path is f32).
#include <cfloat>
#include <cstdlib>
#include <string>

#include "common/env.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_kernels.h"
#include "cuda/mma.cuh"

namespace mq::cuda {

namespace {

constexpr int BQ = 64;   // query rows per block (16 per warp)
constexpr int BKV = 64;  // keys per tile
constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;

// 8 consecutive K/V elements as 8 halves (16 bytes).
__device__ __forceinline__ uint4 load8_h(const __half* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint4 load8_h(const float* p) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    return make_uint4(pack_half2(a.x, a.y), pack_half2(a.z, a.w), pack_half2(b.x, b.y), pack_half2(b.z, b.w));
}

// Template parameters:
//   HD  head dim (64, 80 or 128: a multiple of 16 for the mma k and n steps)
//   KT  K/V element type in memory (__half or float)
// Shared memory: K and V tiles [BKV][HD + 8] halves (the 8-half pad makes the
// 8 row addresses of each ldmatrix hit distinct banks); Q is staged once
// through the K buffer.
template <int HD, typename KT>
__global__ void __launch_bounds__(kThreads) flash_attn_mma_kernel(const AttnArgs a) {
    constexpr int LD = HD + 8;
    constexpr int KS = HD / 16;  // k-steps of q·k, and pairs of 8-wide d tiles of p·v
    constexpr int NT = BKV / 8;  // n-tiles of S per warp
    constexpr int CH = HD / 8;   // 16-byte chunks per row
    __shared__ __align__(16) __half Ks[BKV][LD];
    __shared__ __align__(16) __half Vs[BKV][LD];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int h = blockIdx.y;
    const int g = h / (a.n_head / a.n_kv_head);
    const int64_t q0 = static_cast<int64_t>(blockIdx.x) * BQ;
    const KT* kbase = static_cast<const KT*>(a.k) + static_cast<int64_t>(g) * HD;
    const KT* vbase = static_cast<const KT*>(a.v) + static_cast<int64_t>(g) * HD;
    const float qscale = a.scale * kLog2e;

    // ---- Q tile -> f16 (scaled) -> A fragments in registers --------------------------
    for (int c = tid; c < BQ * CH; c += kThreads) {
        const int r = c / CH, cc = (c % CH) * 8;
        const int64_t i = q0 + r;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (i < a.nq) {
            const float* qp = a.q + (i * a.n_head + h) * HD + cc;
            const float4 x = __ldg(reinterpret_cast<const float4*>(qp)),
                         y = __ldg(reinterpret_cast<const float4*>(qp) + 1);
            v = make_uint4(pack_half2(x.x * qscale, x.y * qscale), pack_half2(x.z * qscale, x.w * qscale),
                           pack_half2(y.x * qscale, y.y * qscale), pack_half2(y.z * qscale, y.w * qscale));
        }
        *reinterpret_cast<uint4*>(&Ks[r][cc]) = v;
    }
    __syncthreads();
    uint32_t qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) ldmatrix_x4(qf[ks], &Ks[warp * 16 + (lane & 15)][16 * ks + (lane >> 4) * 8]);
    __syncthreads();

    // This thread's two query rows (m16n8 accumulator layout: lane/4 and lane/4 + 8).
    const int64_t ia = q0 + warp * 16 + (lane >> 2), ib = ia + 8;
    float o[2 * KS][4];
#pragma unroll
    for (int t = 0; t < 2 * KS; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;
    float ma = -INFINITY, mb = -INFINITY, la = 0.0f, lb = 0.0f;

    int64_t kend = a.nk;
    if (a.causal) {
        const int64_t last_q = (q0 + BQ - 1 < a.nq - 1 ? q0 + BQ - 1 : a.nq - 1);
        const int64_t lim = last_q + a.q_offset + 1;
        kend = lim < kend ? lim : kend;
    }

    for (int64_t j0 = 0; j0 < kend; j0 += BKV) {
        // ---- K, V tile -> f16 shared (rows past nk are zeros: their scores are -inf) ----
        for (int c = tid; c < BKV * CH; c += kThreads) {
            const int r = c / CH, cc = (c % CH) * 8;
            const int64_t j = j0 + r;
            uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
            if (j < a.nk) {
                kv = load8_h(kbase + j * a.kv_stride + cc);
                vv = load8_h(vbase + j * a.kv_stride + cc);
            }
            *reinterpret_cast<uint4*>(&Ks[r][cc]) = kv;
            *reinterpret_cast<uint4*>(&Vs[r][cc]) = vv;
        }
        __syncthreads();

        // ---- S = Q Kᵀ (already in log2 units) -----------------------------------------------
        float s[NT][4];
#pragma unroll
        for (int t = 0; t < NT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
#pragma unroll
            for (int p = 0; p < NT / 2; ++p) {
                const int mat = lane >> 3;
                uint32_t r[4];
                ldmatrix_x4(r, &Ks[16 * p + (mat >> 1) * 8 + (lane & 7)][16 * ks + (mat & 1) * 8]);
                mma_m16n8k16(s[2 * p], qf[ks], r[0], r[1]);
                mma_m16n8k16(s[2 * p + 1], qf[ks], r[2], r[3]);
            }

        // ---- mask, bounds, causal; online softmax ----------------------------------------------
        float mxa = -INFINITY, mxb = -INFINITY;
#pragma unroll
        for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int64_t i = e < 2 ? ia : ib;
                const int64_t j = j0 + 8 * t + 2 * (lane & 3) + (e & 1);
                float v = s[t][e];
                if (j >= a.nk || i >= a.nq || (a.causal && j > i + a.q_offset)) v = -INFINITY;
                else if (a.mask) {
                    // -inf stays -inf (fully masked rows -> zeros); finite masks such as
                    // finfo(float32).min are clamped so that mask * log2(e) cannot overflow
                    // to -inf (a row masked only by them averages, as torch does).
                    const float mv = a.mask[i * a.ld_mask + j];
                    v = mv == -INFINITY ? -INFINITY : v + fmaxf(mv * kLog2e, -FLT_MAX);
                }
                s[t][e] = v;
                if (e < 2) mxa = fmaxf(mxa, v);
                else mxb = fmaxf(mxb, v);
            }
        // the 4 lanes of a quad hold the same two rows
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 1));
        mxa = fmaxf(mxa, __shfl_xor_sync(0xffffffffu, mxa, 2));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 1));
        mxb = fmaxf(mxb, __shfl_xor_sync(0xffffffffu, mxb, 2));
        const float mna = fmaxf(ma, mxa), mnb = fmaxf(mb, mxb);
        const float aa = mna == -INFINITY ? 1.0f : exp2f(ma - mna);
        const float ab = mnb == -INFINITY ? 1.0f : exp2f(mb - mnb);
        ma = mna;
        mb = mnb;
        la *= aa;
        lb *= ab;
#pragma unroll
        for (int t = 0; t < 2 * KS; ++t) {
            o[t][0] *= aa;
            o[t][1] *= aa;
            o[t][2] *= ab;
            o[t][3] *= ab;
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            s[t][0] = mna == -INFINITY ? 0.0f : exp2f(s[t][0] - mna);
            s[t][1] = mna == -INFINITY ? 0.0f : exp2f(s[t][1] - mna);
            s[t][2] = mnb == -INFINITY ? 0.0f : exp2f(s[t][2] - mnb);
            s[t][3] = mnb == -INFINITY ? 0.0f : exp2f(s[t][3] - mnb);
            la += s[t][0] + s[t][1];
            lb += s[t][2] + s[t][3];
        }

        // ---- O += P V ----------------------------------------------------------------------------
#pragma unroll
        for (int kk = 0; kk < BKV / 16; ++kk) {
            uint32_t pa[4];
            pa[0] = pack_half2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_half2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < KS; ++dp) {
                // matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 8-15),
                // transposed: b0, b1 of d-tile 2dp, then of d-tile 2dp+1.
                const int mat = lane >> 3;
                uint32_t r[4];
                ldmatrix_x4_trans(r, &Vs[16 * kk + (mat & 1) * 8 + (lane & 7)][16 * dp + (mat >> 1) * 8]);
                mma_m16n8k16(o[2 * dp], pa, r[0], r[1]);
                mma_m16n8k16(o[2 * dp + 1], pa, r[2], r[3]);
            }
        }
        __syncthreads();  // Ks / Vs are overwritten by the next tile
    }

    // ---- out = O / l ----------------------------------------------------------------------------
    la += __shfl_xor_sync(0xffffffffu, la, 1);
    la += __shfl_xor_sync(0xffffffffu, la, 2);
    lb += __shfl_xor_sync(0xffffffffu, lb, 1);
    lb += __shfl_xor_sync(0xffffffffu, lb, 2);
    const float inva = la > 0.0f ? 1.0f / la : 0.0f, invb = lb > 0.0f ? 1.0f / lb : 0.0f;
#pragma unroll
    for (int t = 0; t < 2 * KS; ++t) {
        const int d = 8 * t + 2 * (lane & 3);
        if (ia < a.nq)
            *reinterpret_cast<float2*>(a.out + (ia * a.n_head + h) * HD + d) =
                make_float2(o[t][0] * inva, o[t][1] * inva);
        if (ib < a.nq)
            *reinterpret_cast<float2*>(a.out + (ib * a.n_head + h) * HD + d) =
                make_float2(o[t][2] * invb, o[t][3] * invb);
    }
}

template <int HD>
void launch_hd(const AttnArgs& a, cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>(ceil_div(a.nq, BQ)), static_cast<unsigned>(a.n_head));
    if (a.kv_type == DType::F16) flash_attn_mma_kernel<HD, __half><<<grid, kThreads, 0, stream>>>(a);
    else flash_attn_mma_kernel<HD, float><<<grid, kThreads, 0, stream>>>(a);
    MQ_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool attention_mma_supported(const AttnArgs& a) {
    static const bool force_simt = env::cuda_attn_simt();
    if (force_simt || a.nq < 64 || a.n_head > 65535) return false;
    if (a.hd != 64 && a.hd != 80 && a.hd != 128) return false;
    const size_t elt = a.kv_type == DType::F16 ? 2 : 4;
    // 16-byte loads of q rows, and of K/V rows (8 elements)
    return a.kv_stride % 8 == 0 && reinterpret_cast<uintptr_t>(a.k) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(a.v) % 16 == 0 && reinterpret_cast<uintptr_t>(a.q) % 16 == 0 &&
           reinterpret_cast<uintptr_t>(a.out) % 8 == 0 && elt * 8 % 16 == 0;
}

void attention_mma(const AttnArgs& a, cudaStream_t stream) {
    switch (a.hd) {
        case 64: launch_hd<64>(a, stream); break;
        case 80: launch_hd<80>(a, stream); break;
        case 128: launch_hd<128>(a, stream); break;
        default: throw std::invalid_argument("attention_mma: unsupported head_dim");
    }
}

}  // namespace mq::cuda
