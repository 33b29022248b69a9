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
// Lane -> data mapping per type (one warp iteration covers):
//   Q4_K: 4 lanes per 256-value super-block (lane owns the 32-byte nibble group
//         g = lane % 4, i.e. sub-blocks 2g and 2g+1), 8 super-blocks per
//         iteration; 16-byte loads of qs, header and activations.
//   Q6_K: 8 lanes per super-block (lane owns 8 positions l in one 128-value half,
//         all four quarters), 4 super-blocks per iteration; 16-bit loads
//         (210-byte blocks are only 2-byte aligned).
//   Q8_0: 4 lanes per 32-value block (8 quants each), 8 blocks per iteration;
//         16-bit loads (34-byte blocks).
//   F16/BF16/F32: lane owns 8 consecutive values (one 16-byte load for 16-bit
//         types), 256 values per iteration; x stays float32.
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_kernels.h"

namespace mq::cuda {

namespace {

constexpr int kRowsPerBlock = 4;   // one warp per row
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

// ---- Q4_K ---------------------------------------------------------------------------
// Super-block b, lane group g: sub-block 2g = low nibbles of qs[32g .. 32g+31],
// sub-block 2g+1 = high nibbles. sum_i w_i x_i over a sub-block j
//   = d*sc_j * d_x * sum(q * xq) - dmin*m_j * sum(x)   with sum(x) = xds.y.
__global__ void __launch_bounds__(kMmvThreads) mmv_q4_k_kernel(const uint8_t* __restrict__ w, size_t row_bytes,
                                                               int64_t N, int nb, const int8_t* __restrict__ xq,
                                                               const float2* __restrict__ xds,
                                                               const float* __restrict__ bias, float* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;
    const uint8_t* row = w + n * row_bytes;
    const int g = lane & 3;
    float acc = 0.0f;
#pragma unroll 2
    for (int b = lane >> 2; b < nb; b += 8) {
        const uint8_t* blk = row + static_cast<size_t>(b) * sizeof(block_q4_K);
        const uint4 hdr = __ldg(reinterpret_cast<const uint4*>(blk));
        const uint4 q0 = __ldg(reinterpret_cast<const uint4*>(blk + 16 + 32 * g));
        const uint4 q1 = __ldg(reinterpret_cast<const uint4*>(blk + 32 + 32 * g));
        const int4* xb = reinterpret_cast<const int4*>(xq + static_cast<int64_t>(b) * QK_K + 64 * g);
        const int4 x0 = __ldg(xb), x1 = __ldg(xb + 1), x2 = __ldg(xb + 2), x3 = __ldg(xb + 3);
        const float2 ds0 = __ldg(xds + b * 8 + 2 * g), ds1 = __ldg(xds + b * 8 + 2 * g + 1);
        constexpr uint32_t lo = 0x0F0F0F0Fu;
        int slo = 0, shi = 0;
        slo = __dp4a(static_cast<int>(q0.x & lo), x0.x, slo);
        slo = __dp4a(static_cast<int>(q0.y & lo), x0.y, slo);
        slo = __dp4a(static_cast<int>(q0.z & lo), x0.z, slo);
        slo = __dp4a(static_cast<int>(q0.w & lo), x0.w, slo);
        slo = __dp4a(static_cast<int>(q1.x & lo), x1.x, slo);
        slo = __dp4a(static_cast<int>(q1.y & lo), x1.y, slo);
        slo = __dp4a(static_cast<int>(q1.z & lo), x1.z, slo);
        slo = __dp4a(static_cast<int>(q1.w & lo), x1.w, slo);
        shi = __dp4a(static_cast<int>((q0.x >> 4) & lo), x2.x, shi);
        shi = __dp4a(static_cast<int>((q0.y >> 4) & lo), x2.y, shi);
        shi = __dp4a(static_cast<int>((q0.z >> 4) & lo), x2.z, shi);
        shi = __dp4a(static_cast<int>((q0.w >> 4) & lo), x2.w, shi);
        shi = __dp4a(static_cast<int>((q1.x >> 4) & lo), x3.x, shi);
        shi = __dp4a(static_cast<int>((q1.y >> 4) & lo), x3.y, shi);
        shi = __dp4a(static_cast<int>((q1.z >> 4) & lo), x3.z, shi);
        shi = __dp4a(static_cast<int>((q1.w >> 4) & lo), x3.w, shi);
        int sc0, m0, sc1, m1;
        q4k_scale_min(hdr.y, hdr.z, hdr.w, 2 * g, sc0, m0);
        q4k_scale_min(hdr.y, hdr.z, hdr.w, 2 * g + 1, sc1, m1);
        const float d = half_to_float(static_cast<uint16_t>(hdr.x & 0xffff));
        const float dmin = half_to_float(static_cast<uint16_t>(hdr.x >> 16));
        acc += d * (static_cast<float>(sc0) * ds0.x * static_cast<float>(slo) +
                    static_cast<float>(sc1) * ds1.x * static_cast<float>(shi)) -
               dmin * (static_cast<float>(m0) * ds0.y + static_cast<float>(m1) * ds1.y);
    }
    store_row_result(acc, bias, y, n);
}

// ---- Q6_K ---------------------------------------------------------------------------
// Lane t = lane % 8 of a super-block: half h = t / 4, positions l0 .. l0+7 with
// l0 = 8 * (t % 4); it covers value indices 128h + 32q + l0 + i for the four
// quarters q (layout: Dequant8<Q6_K> in cuda_common.cuh). 6-bit q - 32 is
// formed per byte (__vsub4) and multiplied with dp4a.
__global__ void __launch_bounds__(kMmvThreads) mmv_q6_k_kernel(const uint8_t* __restrict__ w, size_t row_bytes,
                                                               int64_t N, int nb, const int8_t* __restrict__ xq,
                                                               const float2* __restrict__ xds,
                                                               const float* __restrict__ bias, float* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;
    const uint8_t* row = w + n * row_bytes;
    const int t = lane & 7, h = t >> 2, l0 = (t & 3) * 8;
    float acc = 0.0f;
#pragma unroll 2
    for (int b = lane >> 3; b < nb; b += 4) {
        const uint8_t* blk = row + static_cast<size_t>(b) * sizeof(block_q6_K);
        const uint8_t* ql = blk + 64 * h + l0;
        const uint8_t* qh = blk + QK_K / 2 + 32 * h + l0;
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + QK_K / 2 + QK_K / 4 + 8 * h + l0 / 16);
        const uint32_t qa0 = load_u32_a2(ql), qa1 = load_u32_a2(ql + 4);
        const uint32_t qb0 = load_u32_a2(ql + 32), qb1 = load_u32_a2(ql + 36);
        const uint32_t h0 = load_u32_a2(qh), h1 = load_u32_a2(qh + 4);
        const float d = half_to_float(load_u16(blk + 208));
        const int8_t* xb = xq + static_cast<int64_t>(b) * QK_K + 128 * h + l0;
        float sacc = 0.0f;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const uint32_t la = (q & 1) ? qb0 : qa0, lb = (q & 1) ? qb1 : qa1;
            const int ls = (q >> 1) * 4, hs = 2 * q;
            const uint32_t v0 = ((la >> ls) & 0x0F0F0F0Fu) | (((h0 >> hs) & 0x03030303u) << 4);
            const uint32_t v1 = ((lb >> ls) & 0x0F0F0F0Fu) | (((h1 >> hs) & 0x03030303u) << 4);
            const int2 xv = __ldg(reinterpret_cast<const int2*>(xb + 32 * q));
            int s = __dp4a(static_cast<int>(__vsub4(v0, 0x20202020u)), xv.x, 0);
            s = __dp4a(static_cast<int>(__vsub4(v1, 0x20202020u)), xv.y, s);
            const float dx = __ldg(xds + b * 8 + 4 * h + q).x;
            sacc += static_cast<float>(__ldg(sc + 2 * q)) * dx * static_cast<float>(s);
        }
        acc += d * sacc;
    }
    store_row_result(acc, bias, y, n);
}

// ---- Q8_0 ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kMmvThreads) mmv_q8_0_kernel(const uint8_t* __restrict__ w, size_t row_bytes,
                                                               int64_t N, int nb, const int8_t* __restrict__ xq,
                                                               const float2* __restrict__ xds,
                                                               const float* __restrict__ bias, float* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;
    const uint8_t* row = w + n * row_bytes;
    const int l0 = (lane & 3) * 8;
    float acc = 0.0f;
#pragma unroll 4
    for (int b = lane >> 2; b < nb; b += 8) {
        const uint8_t* blk = row + static_cast<size_t>(b) * sizeof(block_q8_0);
        const float d = half_to_float(load_u16(blk));
        const uint32_t q0 = load_u32_a2(blk + 2 + l0), q1 = load_u32_a2(blk + 6 + l0);
        const int2 xv = __ldg(reinterpret_cast<const int2*>(xq + static_cast<int64_t>(b) * QK8_0 + l0));
        const int s = __dp4a(static_cast<int>(q0), xv.x, __dp4a(static_cast<int>(q1), xv.y, 0));
        acc += d * __ldg(xds + b).x * static_cast<float>(s);
    }
    store_row_result(acc, bias, y, n);
}

// ---- float weights (F16, BF16, F32) ----------------------------------------------------
// Requires K % 8 == 0 and 16-byte aligned rows and x.
template <DType T>
__global__ void __launch_bounds__(kMmvThreads) mmv_float_kernel(const uint8_t* __restrict__ w, size_t row_bytes,
                                                                int64_t N, int64_t K, const float* __restrict__ x,
                                                                const float* __restrict__ bias,
                                                                float* __restrict__ y) {
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
__global__ void __launch_bounds__(kMmvThreads) mmv_float_scalar_kernel(const uint8_t* __restrict__ w,
                                                                       size_t row_bytes, int64_t N, int64_t K,
                                                                       DType t, const float* __restrict__ x,
                                                                       const float* __restrict__ bias,
                                                                       float* __restrict__ y) {
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;
    const uint8_t* row = w + n * row_bytes;
    float acc = 0.0f;
    for (int64_t k = lane; k < K; k += 32) acc += load_float_elem(row, k, t) * x[k];
    store_row_result(acc, bias, y, n);
}

}  // namespace

bool matvec_uses_q8(DType t) { return t == DType::Q4_K || t == DType::Q6_K || t == DType::Q8_0; }

void quantize_act_q8(const float* x, int64_t M, int64_t K, int64_t ldx, int8_t* xq, float2* xds, int64_t Kp,
                     cudaStream_t stream) {
    const int64_t blocks32 = M * (Kp / 32);
    if (blocks32 == 0) return;
    constexpr int threads = 256;   // 8 warps = 8 blocks of 32 values
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
    switch (wtype) {
        case DType::Q4_K:
            mmv_q4_k_kernel<<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, static_cast<int>(K / QK_K), xq, xds, bias, y);
            break;
        case DType::Q6_K:
            mmv_q6_k_kernel<<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, static_cast<int>(K / QK_K), xq, xds, bias, y);
            break;
        case DType::Q8_0:
            mmv_q8_0_kernel<<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, static_cast<int>(K / QK8_0), xq, xds, bias, y);
            break;
        case DType::F16:
        case DType::BF16:
        case DType::F32: {
            const bool vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                             reinterpret_cast<uintptr_t>(x) % 16 == 0;
            if (!vec)
                mmv_float_scalar_kernel<<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, K, wtype, x, bias, y);
            else if (wtype == DType::F16)
                mmv_float_kernel<DType::F16><<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, K, x, bias, y);
            else if (wtype == DType::BF16)
                mmv_float_kernel<DType::BF16><<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, K, x, bias, y);
            else
                mmv_float_kernel<DType::F32><<<grid, kMmvThreads, 0, stream>>>(wb, rb, N, K, x, bias, y);
            break;
        }
        default:
            throw std::invalid_argument(std::string("cuda matmul: unsupported weight type ") + type_info(wtype).name);
    }
    MQ_CUDA_CHECK_LAUNCH();
}

}  // namespace mq::cuda
