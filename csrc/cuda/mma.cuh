// Tensor-core building blocks shared by the GEMM (kernels_gemm.cu) and the
// flash attention (kernels_attention_mma.cu): f16 packing, ldmatrix fragment
// loads and mma.sync m16n8k16 with f32 accumulators (sm_80 and newer).
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
// point type" and "ldmatrix" (docs.nvidia.com/cuda/parallel-thread-execution).
#pragma once
#include <cuda_fp16.h>

#include <cstdint>

namespace mq::cuda {

// Two floats rounded to f16 (round to nearest even) in one 32-bit register, a in the low half.
__device__ __forceinline__ uint32_t pack_half2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// Four 8x8 b16 matrices from shared memory: lane l gives the row address of
// row l % 8 of matrix l / 8; r[i] receives this lane's part of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const __half* p) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// The same, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const __half* p) {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d = a (16x16, row) * b (16x8, col) + d: f16 operands (a: 4 registers, b: b0, b1), f32 accumulators d[4].
__device__ __forceinline__ void mma_m16n8k16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace mq::cuda
