// AVX-512 kernel of the flash attention (attention_flash.h): 16 lanes, row
// groups of 2 vectors (32 query rows), 2 groups per task, key blocks of 128.
// Score tiles 8 keys x 2 vectors and P·V tiles 8 head dims x 2 vectors (16
// accumulators of the 32 zmm registers).
#include "cpu/attention_flash_impl.h"
#include "cpu/simd_avx512.h"

namespace mq::cpu::detail {

// Measured (one thread, CPU time, nq = 2048, nk = 6432, 16 heads of 80, Zen 5):
// 193-197 GFLOP/s = 83-86% of the 228-238 GFLOP/s zmm FMA peak measured in the
// same run (previous kernel: 139). Key blocks of 64 / 128 and 1 / 2 row groups
// of 2 vectors were best; 3 or 4 vectors per group, or 6 x 4 tiles, 3-10% slower.
FlashKernel flash_kernel_avx512() { return {64, flash_rows<V512, 2, 2, 128, 8, 8>}; }

}  // namespace mq::cpu::detail
