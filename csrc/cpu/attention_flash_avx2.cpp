// AVX2 + FMA kernel of the flash attention (attention_flash.h): 8 lanes, row
// groups of 3 vectors (24 query rows), 2 groups per task, key blocks of 128.
// Score tiles 4 keys x 3 vectors and P·V tiles 4 head dims x 3 vectors: 12
// accumulators + 3 operand vectors + 1 broadcast = the 16 ymm registers.
#include "cpu/attention_flash_impl.h"
#include "cpu/simd_avx2.h"

namespace mq::cpu::detail {

// Measured (one thread, CPU time, nq = 2048, nk = 6432, 16 heads of 80, Zen 5
// forced to this path): 105-109 GFLOP/s = 93-96% of the 113 GFLOP/s ymm FMA
// peak measured in the same run; key blocks of 32 / 64 / 128 / 256 and 1 / 2 /
// 4 row groups per task are within 5% of each other, 128 keys and 2 groups
// (48 rows) were among the best. (The previous kernel, rows x keys with K
// transposed and read through the 5 KiB head stride: 62 GFLOP/s.)
FlashKernel flash_kernel_avx2() { return {48, flash_rows<V256, 3, 2, 128, 4, 4>}; }

}  // namespace mq::cpu::detail
