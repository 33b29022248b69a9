// AVX-512 row kernels (rowops.h, written in rowops_impl.h).
#include "cpu/rowops_impl.h"
#include "cpu/simd_avx512.h"

namespace mq::cpu::detail {
const RowOps& row_ops_avx512() { return row_ops_for<V512>(); }
}  // namespace mq::cpu::detail
