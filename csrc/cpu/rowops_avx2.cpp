// AVX2 + FMA row kernels (rowops.h, written in rowops_impl.h).
#include "cpu/rowops_impl.h"
#include "cpu/simd_avx2.h"

namespace mq::cpu::detail {
const RowOps& row_ops_avx2() { return row_ops_for<V256>(); }
}  // namespace mq::cpu::detail
