// AVX2 + FMA kernel of the flash attention (attention_flash.h): 8 lanes, row
// groups of 3 vectors (24 query rows), 2 groups per task, key blocks of 128.
// Score tiles 4 keys x 3 vectors and P·V tiles 4 head dims x 3 vectors: 12
// accumulators + 3 operand vectors + 1 broadcast = the 16 ymm registers.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "cpu/attention_flash_impl.h"
#include "cpu/simd_exp_avx2.h"

namespace mq::cpu::detail {
namespace {

struct V256 {
    using T = __m256;
    static constexpr int W = 8;
    static T load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, T x) { _mm256_storeu_ps(p, x); }
    static T set1(float f) { return _mm256_set1_ps(f); }
    static T zero() { return _mm256_setzero_ps(); }
    static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
    static T mul(T a, T b) { return _mm256_mul_ps(a, b); }
    static T add(T a, T b) { return _mm256_add_ps(a, b); }
    static T sub(T a, T b) { return _mm256_sub_ps(a, b); }
    static T max(T a, T b) { return _mm256_max_ps(a, b); }
    static T exp(T x) { return exp8_nonpos(x); }  // simd_exp_avx2.h
};

}  // namespace

// Measured (one thread, CPU time, nq = 2048, nk = 6432, 16 heads of 80, Zen 5
// forced to this path): 105-109 GFLOP/s = 93-96% of the 113 GFLOP/s ymm FMA
// peak measured in the same run; key blocks of 32 / 64 / 128 / 256 and 1 / 2 /
// 4 row groups per task are within 5% of each other, 128 keys and 2 groups
// (48 rows) were among the best. (The previous kernel, rows x keys with K
// transposed and read through the 5 KiB head stride: 62 GFLOP/s.)
FlashKernel flash_kernel_avx2() { return {48, flash_rows<V256, 3, 2, 128, 4, 4>}; }

}  // namespace mq::cpu::detail
