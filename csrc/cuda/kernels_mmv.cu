// Decode matrix-vector kernels: y[N] = W[N, K] · x[K] (+ bias), W in GGUF
// layout, read once from VRAM. These are memory-bound: the goal is weight
// bytes / time near the device-to-device bandwidth.
//
// Scheme (the same idea as ggml's mul_mat_vec_q, ggml-cuda/mmvq.cu, written
// afresh): x is first quantized to 8-bit blocks of 32 (quantize_act_q8), then
// each warp owns one weight row, lanes split the row's blocks, integer dot
// products use dp4a (4 int8 products per instruction), the per-block scales are
// applied in float, and a warp shuffle reduces. 4 warps (4 rows) per block of
// 128 threads; grid = ceil(N / 4) blocks, so an 11B layer's 4096-row matrices
// give 1024 blocks, several per SM.
//
// The quantized types share one kernel (mmv_q_kernel<T>); the lane -> data
// mapping and the block dot product of each type are its MmvDot<T> trait, beside
// Dequant8<T> in cuda_common.cuh:
//   Q4_K: 4 lanes per 256-value super-block, 8 super-blocks per warp iteration;
//   Q6_K: 8 lanes per super-block, 4 super-blocks per iteration;
//   Q8_0: 4 lanes per 32-value block, 8 blocks per iteration.
//   F16/BF16/F32 (mmv_float_kernel<T>, Dequant8<T>): lane owns 8 consecutive
//         values (one 16-byte load for 16-bit types), 256 values per iteration;
//         x stays float32.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_kernels.h"

namespace mq::cuda {

namespace {

constexpr int kRowsPerBlock = 4;  // one warp per row
constexpr int kMmvThreads = 32 * kRowsPerBlock;

// ---- activation quantization ------------------------------------------------------
// One warp per 32-value block: d = max|x| / 127, q = round(x / d) (ggml's
// quantize_q8_1); xds = (d, d * sum q). Values past K (padding to Kp) are 0.
__global__ void quantize_act_q8_kernel(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* xq, float2* xds,
                                       int64_t Kp) {
    const int64_t nb = Kp / 32;
    const int64_t blk = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
    if (blk >= M * nb) return;  // uniform per warp
    const int lane = threadIdx.x & 31;
    const int64_t m = blk / nb, b = blk % nb;
    const int64_t k = b * 32 + lane;
    const float v = k < K ? x[m * ldx + k] : 0.0f;
    const float amax = warp_max(fabsf(v));
    const float d = amax / 127.0f;
    const int q = amax == 0.0f ? 0 : __float2int_rn(v / d);
    xq[m * Kp + k] = static_cast<int8_t>(q);
    const int s = warp_sum_int(q);
    if (lane == 0) xds[m * nb + b] = make_float2(d, d * static_cast<float>(s));
}

__device__ __forceinline__ void store_row_result(float acc, const float* bias, float* y, int64_t n) {
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) y[n] = acc + (bias ? bias[n] : 0.0f);
}

// ---- quantized weights (Q4_K, Q6_K, Q8_0, ...) --------------------------------------
// One warp per weight row of nb blocks; lane `lane` takes part lane % kLanes of
// blocks lane / kLanes, lane / kLanes + 32 / kLanes, ... (MmvDot<T>). Index
// arithmetic as the former per-type kernels had it (same SASS).
template <DType T>
__global__ void __launch_bounds__(kMmvThreads)
    mmv_q_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t N, int nb, const int8_t* __restrict__ xq,
                 const float2* __restrict__ xds, const float* __restrict__ bias, float* __restrict__ y) {
    using D = MmvDot<T>;
    static_assert(32 % D::kLanes == 0, "lanes per block must divide the warp");
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;
    const uint8_t* row = w + n * row_bytes;
    const typename D::Lane ln = D::lane(lane & (D::kLanes - 1));
    float acc = 0.0f;
#pragma unroll(D::kUnroll)
    for (int b = lane >> D::kLaneShift; b < nb; b += 32 / D::kLanes)
        acc += D::dot(ln, row + static_cast<size_t>(b) * TypeTraits<T>::type_size, b, xq, xds);
    store_row_result(acc, bias, y, n);
}

// ---- float weights (F16, BF16, F32) ----------------------------------------------------
// Requires K % 8 == 0 and 16-byte aligned rows and x.
template <DType T>
__global__ void __launch_bounds__(kMmvThreads)
    mmv_float_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t N, int64_t K, const float* __restrict__ x,
                     const float* __restrict__ bias, float* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;
    const uint8_t* row = w + n * row_bytes;
    float acc = 0.0f;
#pragma unroll 4
    for (int64_t k = 8 * lane; k < K; k += 256) {
        float v[8];
        Dequant8<T>::run(row, k, v);
        const float4 xa = __ldg(reinterpret_cast<const float4*>(x + k));
        const float4 xb = __ldg(reinterpret_cast<const float4*>(x + k + 4));
        acc += v[0] * xa.x + v[1] * xa.y + v[2] * xa.z + v[3] * xa.w + v[4] * xb.x + v[5] * xb.y + v[6] * xb.z +
               v[7] * xb.w;
    }
    store_row_result(acc, bias, y, n);
}

// Any float type, any K and alignment (slow path, rarely used).
__global__ void __launch_bounds__(kMmvThreads)
    mmv_float_scalar_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t N, int64_t K, DType t,
                            const float* __restrict__ x, const float* __restrict__ bias, float* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;
    const uint8_t* row = w + n * row_bytes;
    float acc = 0.0f;
    for (int64_t k = lane; k < K; k += 32) acc += load_float_elem(row, k, t) * x[k];
    store_row_result(acc, bias, y, n);
}

}  // namespace

bool matvec_uses_q8(DType t) {
    const int i = type_index(t);
    if (i < 0) return false;
    const TypeInfo& ti = type_info(t);
    return ti.weight && ti.block_size > 1;  // the quantized weight types (mmv_q_kernel)
}

void quantize_act_q8(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* xq, float2* xds, int64_t Kp,
                     cudaStream_t stream) {
    const int64_t blocks32 = M * (Kp / 32);
    if (blocks32 == 0) return;
    constexpr int threads = 256;  // 8 warps = 8 blocks of 32 values
    quantize_act_q8_kernel<<<static_cast<unsigned>(ceil_div(blocks32, threads / 32)), threads, 0, stream>>>(
        x, M, K, ldx, xq, xds, Kp);
    MQ_CUDA_CHECK_LAUNCH();
}

void matvec(DType wtype, const void* w, int64_t N, int64_t K, const float* x, const int8_t* xq, const float2* xds,
            const float* bias, float* y, cudaStream_t stream) {
    if (N == 0) return;
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    const size_t rb = row_size(wtype, K);
    const unsigned grid = static_cast<unsigned>(ceil_div(N, kRowsPerBlock));
    dispatch_weight_type(wtype, "cuda matmul: unsupported weight type ", [&](auto type) {
        constexpr DType T = decltype(type)::value;
        if constexpr (TypeTraits<T>::quantized) {
            mmv_q_kernel<T><<<grid, kMmvThreads, 0, stream>>>(
                wb, rb, N, static_cast<int>(K / TypeTraits<T>::block_size), xq, xds, bias, y);
        } else {
            const bool vec =
                K % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
            if (vec) mmv_float_kernel<T><<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, K, x, bias, y);
            else mmv_float_scalar_kernel<<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, K, wtype, x, bias, y);
        }
    });
    MQ_CUDA_CHECK_LAUNCH();
}

}  // namespace mq::cuda
