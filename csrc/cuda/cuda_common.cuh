// Shared device helpers of the CUDA backend: error checks, warp reductions,
// aligned loads of GGUF blocks, and the per-type traits of the kernels:
// Dequant8<T> ("dequantize 8 consecutive values", used by the GEMM tile loader,
// get_rows and the float matvec) and MmvDot<T> (the quantized matvec's block
// dot product). Adding a weight type to the CUDA backend = one specialisation
// of each (csrc/README.md).
//
// GGUF rows are stored exactly as in the file (csrc/common/formats.h, ggml's
// ggml-common.h). Their alignment in VRAM, with every tensor starting on a
// 256-byte boundary (cudaMalloc):
//   Q4_K  144-byte blocks  -> every block 16-byte aligned (144 = 9 * 16)
//   Q6_K  210-byte blocks  -> only 2-byte aligned
//   Q8_0   34-byte blocks  -> only 2-byte aligned
//   F16/BF16 rows of K values -> 16-byte aligned when K % 8 == 0
//   F32 rows                  -> 16-byte aligned when K % 4 == 0
// so Q6_K and Q8_0 are read with 16-bit loads (as ggml's get_int_b2 does),
// Q4_K and the float types with 16-byte loads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/formats.h"

namespace mq::cuda {

// ---- errors ------------------------------------------------------------------
// Every CUDA runtime call goes through MQ_CUDA_CHECK; every launch is followed by
// MQ_CUDA_CHECK_LAUNCH() (catches bad launch configurations immediately; faults
// inside a kernel surface at the next synchronising call, which is checked too).
[[noreturn]] void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line);

#define MQ_CUDA_CHECK(call)                                                                           \
    do {                                                                                              \
        cudaError_t mq_err_ = (call);                                                                 \
        if (mq_err_ != cudaSuccess) ::mq::cuda::throw_cuda_error(mq_err_, #call, __FILE__, __LINE__); \
    } while (0)
#define MQ_CUDA_CHECK_LAUNCH() MQ_CUDA_CHECK(cudaGetLastError())

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- warp reductions ----------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block-wide sum for blockDim.x a multiple of 32 (<= 1024). `red` is shared
// scratch of 32 floats. Every thread gets the total. Contains __syncthreads().
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `red` may still be read from a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nwarps ? red[lane] : 0.0f;
    return warp_sum(v);
}

// ---- loads --------------------------------------------------------------------
__device__ __forceinline__ float half_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf16_to_float(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }

// 4 bytes from a 2-byte-aligned address (Q6_K / Q8_0 blocks), read-only path.
__device__ __forceinline__ uint32_t load_u32_a2(const uint8_t* p) {
    const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
    return static_cast<uint32_t>(__ldg(q)) | (static_cast<uint32_t>(__ldg(q + 1)) << 16);
}
__device__ __forceinline__ uint16_t load_u16(const uint8_t* p) { return __ldg(reinterpret_cast<const uint16_t*>(p)); }

// Byte i (0..11) of the 12 packed Q4_K scale bytes held in three words
// (selects instead of indexing a register array, which would spill to local memory).
__device__ __forceinline__ uint32_t scale_byte(uint32_t w0, uint32_t w1, uint32_t w2, int i) {
    const uint32_t w = i < 4 ? w0 : (i < 8 ? w1 : w2);
    return (w >> (8 * (i & 3))) & 0xffu;
}
// get_scale_min_k4 (ggml-quants.c) on the three words: 6-bit scale and min of sub-block j.
__device__ __forceinline__ void q4k_scale_min(uint32_t w0, uint32_t w1, uint32_t w2, int j, int& sc, int& m) {
    if (j < 4) {
        sc = scale_byte(w0, w1, w2, j) & 63;
        m = scale_byte(w0, w1, w2, j + 4) & 63;
    } else {
        sc = (scale_byte(w0, w1, w2, j + 4) & 0xF) | ((scale_byte(w0, w1, w2, j - 4) >> 6) << 4);
        m = (scale_byte(w0, w1, w2, j + 4) >> 4) | ((scale_byte(w0, w1, w2, j) >> 6) << 4);
    }
}

// ---- dequantize 8 consecutive values ------------------------------------------
// Dequant8<T>::run(row, k, out): out[i] = value (k + i) of a row in GGUF type T,
// k a multiple of 8 (and the row long enough). Matches gguf-py's dequantize.
// kAlign: the alignment (bytes) the loads need at the start of a row.
// It is split in two so that a pipelined loader can issue the global loads of
// the next tile (fetch -> Raw, registers) and do the arithmetic later (decode):
//   run(row, k, out) == decode(fetch(row, k), k, out).
template <DType T>
struct Dequant8;

template <>
struct Dequant8<DType::F32> {
    static constexpr int kAlign = 4;  // bytes of alignment a row start needs (see the top of the file)
    struct Raw {
        float4 a, b;
    };
    __device__ __forceinline__ static Raw fetch(const uint8_t* row, int64_t k) {
        const float4* p = reinterpret_cast<const float4*>(row + k * 4);
        return Raw{__ldg(p), __ldg(p + 1)};
    }
    __device__ __forceinline__ static void decode(const Raw& r, int64_t, float* out) {
        out[0] = r.a.x;
        out[1] = r.a.y;
        out[2] = r.a.z;
        out[3] = r.a.w;
        out[4] = r.b.x;
        out[5] = r.b.y;
        out[6] = r.b.z;
        out[7] = r.b.w;
    }
    __device__ __forceinline__ static void run(const uint8_t* row, int64_t k, float* out) {
        decode(fetch(row, k), k, out);
    }
};
template <>
struct Dequant8<DType::F16> {
    static constexpr int kAlign = 2;
    struct Raw {
        uint4 u;
    };
    __device__ __forceinline__ static Raw fetch(const uint8_t* row, int64_t k) {
        return Raw{__ldg(reinterpret_cast<const uint4*>(row + k * 2))};
    }
    __device__ __forceinline__ static void decode(const Raw& r, int64_t, float* out) {
        const uint32_t w[4] = {r.u.x, r.u.y, r.u.z, r.u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            out[2 * i] = half_to_float(static_cast<uint16_t>(w[i] & 0xffff));
            out[2 * i + 1] = half_to_float(static_cast<uint16_t>(w[i] >> 16));
        }
    }
    __device__ __forceinline__ static void run(const uint8_t* row, int64_t k, float* out) {
        decode(fetch(row, k), k, out);
    }
};
template <>
struct Dequant8<DType::BF16> {
    static constexpr int kAlign = 2;
    struct Raw {
        uint4 u;
    };
    __device__ __forceinline__ static Raw fetch(const uint8_t* row, int64_t k) {
        return Raw{__ldg(reinterpret_cast<const uint4*>(row + k * 2))};
    }
    __device__ __forceinline__ static void decode(const Raw& r, int64_t, float* out) {
        const uint32_t w[4] = {r.u.x, r.u.y, r.u.z, r.u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            out[2 * i] = __uint_as_float(w[i] << 16);
            out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
    __device__ __forceinline__ static void run(const uint8_t* row, int64_t k, float* out) {
        decode(fetch(row, k), k, out);
    }
};
template <>
struct Dequant8<DType::Q8_0> {
    static constexpr int kAlign = 2;
    struct Raw {
        uint32_t d, q0, q1;
    };
    __device__ __forceinline__ static Raw fetch(const uint8_t* row, int64_t k) {
        const uint8_t* blk = row + (k / QK8_0) * sizeof(block_q8_0);
        const int l = static_cast<int>(k % QK8_0);  // 0, 8, 16, 24
        return Raw{load_u16(blk), load_u32_a2(blk + 2 + l), load_u32_a2(blk + 2 + l + 4)};
    }
    __device__ __forceinline__ static void decode(const Raw& r, int64_t, float* out) {
        const float d = half_to_float(static_cast<uint16_t>(r.d));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            out[i] = d * static_cast<float>(static_cast<int8_t>(r.q0 >> (8 * i)));
            out[4 + i] = d * static_cast<float>(static_cast<int8_t>(r.q1 >> (8 * i)));
        }
    }
    __device__ __forceinline__ static void run(const uint8_t* row, int64_t k, float* out) {
        decode(fetch(row, k), k, out);
    }
};
template <>
struct Dequant8<DType::Q4_K> {
    static constexpr int kAlign = 16;
    // value = d * sc[j] * q - dmin * m[j], sub-block j = (k % 256) / 32; the
    // 32 bytes qs[32g .. 32g+31] (g = j / 2) hold sub-block 2g in the low
    // nibbles and 2g+1 in the high nibbles (dequantize_row_q4_K, ggml-quants.c).
    struct Raw {
        uint4 hdr;
        uint2 q;
    };  // d, dmin, scales[12]; 8 bytes of qs
    __device__ __forceinline__ static Raw fetch(const uint8_t* row, int64_t k) {
        const uint8_t* blk = row + (k / QK_K) * sizeof(block_q4_K);
        const int jj = static_cast<int>(k % QK_K);
        const int j = jj / 32, l = jj % 32;
        return Raw{__ldg(reinterpret_cast<const uint4*>(blk)),
                   __ldg(reinterpret_cast<const uint2*>(blk + 16 + 32 * (j / 2) + l))};
    }
    __device__ __forceinline__ static void decode(const Raw& r, int64_t k, float* out) {
        const int j = static_cast<int>(k % QK_K) / 32;
        const float d = half_to_float(static_cast<uint16_t>(r.hdr.x & 0xffff));
        const float dmin = half_to_float(static_cast<uint16_t>(r.hdr.x >> 16));
        int sc, m;
        q4k_scale_min(r.hdr.y, r.hdr.z, r.hdr.w, j, sc, m);
        const float d1 = d * sc, m1 = dmin * m;
        const int shift = (j & 1) * 4;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            out[i] = d1 * static_cast<float>((r.q.x >> (8 * i + shift)) & 0xF) - m1;
            out[4 + i] = d1 * static_cast<float>((r.q.y >> (8 * i + shift)) & 0xF) - m1;
        }
    }
    __device__ __forceinline__ static void run(const uint8_t* row, int64_t k, float* out) {
        decode(fetch(row, k), k, out);
    }
};
template <>
struct Dequant8<DType::Q6_K> {
    static constexpr int kAlign = 2;
    // Value index jj = 128h + 32q + l (q = quarter 0..3, l < 32): low 4 bits in
    // ql[64h + l + 32*(q&1)] (low nibble for q < 2, high nibble for q >= 2),
    // high 2 bits at bit 2q of qh[32h + l]; scale scales[8h + l/16 + 2q]
    // (dequantize_row_q6_K, ggml-quants.c).
    struct Raw {
        uint32_t lo0, lo1, hi0, hi1, d;
        int sc;
    };
    __device__ __forceinline__ static Raw fetch(const uint8_t* row, int64_t k) {
        const uint8_t* blk = row + (k / QK_K) * sizeof(block_q6_K);
        const int jj = static_cast<int>(k % QK_K);
        const int h = jj / 128, q = (jj % 128) / 32, l = jj % 32;
        const uint8_t* ql = blk + 64 * h + l + 32 * (q & 1);
        const uint8_t* qh = blk + QK_K / 2 + 32 * h + l;
        return Raw{load_u32_a2(ql),     load_u32_a2(ql + 4),
                   load_u32_a2(qh),     load_u32_a2(qh + 4),
                   load_u16(blk + 208), static_cast<int8_t>(__ldg(blk + QK_K / 2 + QK_K / 4 + 8 * h + l / 16 + 2 * q))};
    }
    __device__ __forceinline__ static void decode(const Raw& r, int64_t k, float* out) {
        const int q = static_cast<int>(k % 128) / 32;
        const float d = half_to_float(static_cast<uint16_t>(r.d)) * r.sc;
        const int lshift = (q >> 1) * 4, hshift = 2 * q;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int v0 =
                static_cast<int>(((r.lo0 >> (8 * i + lshift)) & 0xF) | (((r.hi0 >> (8 * i + hshift)) & 3) << 4)) - 32;
            const int v1 =
                static_cast<int>(((r.lo1 >> (8 * i + lshift)) & 0xF) | (((r.hi1 >> (8 * i + hshift)) & 3) << 4)) - 32;
            out[i] = d * static_cast<float>(v0);
            out[4 + i] = d * static_cast<float>(v1);
        }
    }
    __device__ __forceinline__ static void run(const uint8_t* row, int64_t k, float* out) {
        decode(fetch(row, k), k, out);
    }
};

// ---- quantized dot products of the matrix-vector kernel ------------------------
// MmvDot<T> (T quantized): one lane's share of one weight block times the 8-bit
// activations of quantize_act_q8 (cuda_kernels.h: xq int8 [Kp], xds float2
// [Kp / 32] = (d, d * sum of the 32 quants)). The kernel (kernels_mmv.cu) gives
// each weight row one warp, whose lanes split the row's blocks kLanes per block
// (32 / kLanes blocks per warp iteration, block loop unrolled kUnroll times):
//   kLanes = 1 << kLaneShift
//   lane(t)                  what lane t (0 .. kLanes-1) of a block precomputes, once
//   dot(ln, blk, b, xq, xds) its part of sum_i w_i x_i over block b (bytes at blk)
// Integer products with dp4a (4 int8 MACs per instruction), scales in float.
template <DType T>
struct MmvDot;

template <>
struct MmvDot<DType::Q4_K> {
    // 4 lanes per 256-value super-block: lane g owns the 32-byte nibble group g,
    // i.e. sub-blocks 2g (low nibbles of qs[32g .. 32g+31]) and 2g+1 (high
    // nibbles); 16-byte loads of qs, header and activations. Over a sub-block j
    //   sum_i w_i x_i = d*sc_j * d_x * sum(q * xq) - dmin*m_j * sum(x)   with sum(x) = xds.y.
    static constexpr int kLaneShift = 2, kLanes = 1 << kLaneShift, kUnroll = 2;
    struct Lane {
        int g;
    };
    __device__ __forceinline__ static Lane lane(int t) { return Lane{t}; }
    __device__ __forceinline__ static float dot(const Lane& ln, const uint8_t* blk, int b, const int8_t* xq,
                                                const float2* xds) {
        const int g = ln.g;
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
        return d * (static_cast<float>(sc0) * ds0.x * static_cast<float>(slo) +
                    static_cast<float>(sc1) * ds1.x * static_cast<float>(shi)) -
               dmin * (static_cast<float>(m0) * ds0.y + static_cast<float>(m1) * ds1.y);
    }
};

template <>
struct MmvDot<DType::Q6_K> {
    // 8 lanes per super-block: lane t has half h = t / 4 and positions l0 .. l0+7
    // with l0 = 8 * (t % 4); it covers value indices 128h + 32q + l0 + i for the
    // four quarters q (layout: Dequant8<Q6_K> above). 6-bit q - 32 is formed per
    // byte (__vsub4) and multiplied with dp4a; 16-bit loads (210-byte blocks are
    // only 2-byte aligned).
    static constexpr int kLaneShift = 3, kLanes = 1 << kLaneShift, kUnroll = 2;
    struct Lane {
        int h, l0;
    };
    __device__ __forceinline__ static Lane lane(int t) { return Lane{t >> 2, (t & 3) * 8}; }
    __device__ __forceinline__ static float dot(const Lane& ln, const uint8_t* blk, int b, const int8_t* xq,
                                                const float2* xds) {
        const int h = ln.h, l0 = ln.l0;
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
        return d * sacc;
    }
};

template <>
struct MmvDot<DType::Q8_0> {
    // 4 lanes per 32-value block (8 quants each); 16-bit loads (34-byte blocks).
    static constexpr int kLaneShift = 2, kLanes = 1 << kLaneShift, kUnroll = 4;
    struct Lane {
        int l0;
    };
    __device__ __forceinline__ static Lane lane(int t) { return Lane{t * 8}; }
    __device__ __forceinline__ static float dot(const Lane& ln, const uint8_t* blk, int b, const int8_t* xq,
                                                const float2* xds) {
        const int l0 = ln.l0;
        const float d = half_to_float(load_u16(blk));
        const uint32_t q0 = load_u32_a2(blk + 2 + l0), q1 = load_u32_a2(blk + 6 + l0);
        const int2 xv = __ldg(reinterpret_cast<const int2*>(xq + static_cast<int64_t>(b) * QK8_0 + l0));
        const int s = __dp4a(static_cast<int>(q0), xv.x, __dp4a(static_cast<int>(q1), xv.y, 0));
        return d * __ldg(xds + b).x * static_cast<float>(s);
    }
};

// One value (float types only; used when K is not a multiple of 8).
__device__ __forceinline__ float load_float_elem(const uint8_t* row, int64_t k, DType t) {
    switch (t) {
        case DType::F16: return half_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
        case DType::BF16: return bf16_to_float(reinterpret_cast<const uint16_t*>(row)[k]);
        default: return reinterpret_cast<const float*>(row)[k];
    }
}

}  // namespace mq::cuda
