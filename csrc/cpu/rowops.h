// Elementwise and row-normalisation kernels of the CPU backend
// (cpu_backend.cpp: gelu, silu_mul, layer_norm, rms_norm), one set per CPU path
// as the matmul kernels: the portable scalar reference (rowops.cpp: std::erf,
// std::exp, double sums) and the AVX2 / AVX-512 versions written once over a
// vector struct (rowops_impl.h), which are tested against float64 references
// on every path (tests/test_backend_ops.py). Each call works on one range or
// row on the calling thread; the backend spreads them over its pool.
#pragma once
#include <cstdint>

namespace mq::cpu {

struct RowOps {
    // x[i] = x[i] Φ(x[i]) in place, i < n: the exact (erf) GELU,
    // torch.nn.functional.gelu(approximate='none').
    void (*gelu)(float* x, int64_t n);
    // out[i] = silu(gate[i]) * up[i] = gate[i] / (1 + e^-gate[i]) * up[i], i < n.
    void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
    // One row of n: y = (x - mean) / sqrt(var + eps) * w + b (biased variance, torch's LayerNorm).
    void (*layer_norm)(const float* x, const float* w, const float* b, float* y, int64_t n, float eps);
    // One row of n: y = x / sqrt(mean(x^2) + eps) * w (HF MllamaTextRMSNorm).
    void (*rms_norm)(const float* x, const float* w, float* y, int64_t n, float eps);
};

const RowOps& row_ops();  // the kernels of active_path()

namespace detail {
const RowOps& row_ops_scalar();
const RowOps& row_ops_avx2();
const RowOps& row_ops_avx512();
}  // namespace detail

}  // namespace mq::cpu
