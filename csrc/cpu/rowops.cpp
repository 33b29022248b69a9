// Row kernels (rowops.h): the portable scalar reference and the dispatch by CPU path.
#include "cpu/rowops.h"

#include <cmath>

#include "cpu/matmul.h"

namespace mq::cpu {
namespace detail {
namespace {

// The reference formulas: std::erfc / std::exp per element, sums in double.
// GELU as 0.5 x erfc(-x / √2) = 0.5 x (1 + erf(x / √2)): the erfc form keeps
// its relative accuracy in the negative tail, where 1 + erf cancels (at x = -5
// the erf form in float32 is 4% off, at x = -8.7 it gives 0).
void gelu_ref(float* x, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = 0.5f * x[i] * std::erfc(x[i] * -0.70710678118654752f);
}
void silu_mul_ref(const float* gate, const float* up, float* out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}
void layer_norm_ref(const float* x, const float* w, const float* b, float* y, int64_t n, float eps) {
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += x[i];
    const double mean = s / n;
    double v = 0.0;
    for (int64_t i = 0; i < n; i++) v += (x[i] - mean) * (x[i] - mean);
    const float inv = float(1.0 / std::sqrt(v / n + eps));
    const float fm = float(mean);
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] - fm) * inv * w[i] + b[i];
}
void rms_norm_ref(const float* x, const float* w, float* y, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += double(x[i]) * x[i];
    const float inv = 1.0f / std::sqrt(float(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] * inv) * w[i];
}

}  // namespace

const RowOps& row_ops_scalar() {
    static const RowOps ops{gelu_ref, silu_mul_ref, layer_norm_ref, rms_norm_ref};
    return ops;
}

}  // namespace detail

const RowOps& row_ops() {
#if defined(MQ_X86)
    const Path p = float_path(active_path());
    if (p == Path::AVX512) return detail::row_ops_avx512();
    if (p == Path::AVX2) return detail::row_ops_avx2();
#endif
    return detail::row_ops_scalar();
}

}  // namespace mq::cpu
