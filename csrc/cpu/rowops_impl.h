// The SIMD row kernels of rowops.h, written once over a vector struct V
// (simd_avx2.h: V256, simd_avx512.h: V512) and included by rowops_avx2.cpp and
// rowops_avx512.cpp, each compiled with its own ISA flags (anonymous namespace:
// one private copy per file). Tails shorter than a vector go through a
// zero-padded vector, so every element of a path is computed the same way.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/rowops.h"

namespace mq::cpu::detail {
namespace {

// GELU: gelu(x) = x Φ(x), Φ(x) = (1 + erf(x / √2)) / 2, z = |x| / √2:
//   z < 0.5:  erf(z) = z P(z²), P of degree 5
//   z >= 0.5: erfc(z) = e^{-z²} Q(t), t = 1 / (1 + z/2), Q of degree 8
//   Φ(x) = 1/2 ± erf(z)/2 (small z) or 1 - erfc(z)/2 / erfc(z)/2 (x >= 0 / x < 0),
// so Φ keeps its relative accuracy in the negative tail. P and Q: weighted
// least-squares fits, iteratively reweighted toward minimax, of erf(z)/z on
// [0, 0.5] and erfc(z) e^{z²} on [0.5, 9.3] against Python's math.erf / erfc,
// coefficients rounded to float32 and checked in float32 (max relative error
// 1.6e-7 for P, 3.0e-7 for Q incl. evaluation). z² is rounded to float32,
// which adds ~x²·6e-8 relative error to e^{-z²} in the tail (5e-6 at x = -8.7,
// where |gelu| ~ 1e-17). Beyond z = 9.3 e^{-z²} underflows: Φ(x) = 0 for
// x < -13.2 (|gelu(x)| < 1e-37 there).
template <class V>
inline typename V::T gelu_vec(typename V::T x) {
    using T = typename V::T;
    const T one = V::set1(1.0f), half = V::set1(0.5f);
    const T z = V::mul(V::abs(x), V::set1(0.707106781f));
    const T w = V::mul(z, z);
    T p = V::set1(-0.000769611506f);
    p = V::fma(p, w, V::set1(0.00520052109f));
    p = V::fma(p, w, V::set1(-0.0268631689f));
    p = V::fma(p, w, V::set1(0.112837739f));
    p = V::fma(p, w, V::set1(-0.376126379f));
    p = V::fma(p, w, V::set1(1.12837923f));
    const T herf = V::mul(half, V::mul(z, p));  // erf(z) / 2
    const T t = V::div(one, V::fma(z, half, one));
    T q = V::set1(0.0359634236f);
    q = V::fma(q, t, V::set1(-0.0337033793f));
    q = V::fma(q, t, V::set1(-0.191916406f));
    q = V::fma(q, t, V::set1(0.277950674f));
    q = V::fma(q, t, V::set1(0.0748571903f));
    q = V::fma(q, t, V::set1(0.277799517f));
    q = V::fma(q, t, V::set1(0.276511222f));
    q = V::fma(q, t, V::set1(0.282645643f));
    q = V::fma(q, t, V::set1(-2.29015168e-05f));
    const T herfc = V::mul(half, V::mul(V::exp(V::sub(V::zero(), w)), q));  // erfc(z) / 2
    const T small = V::set1(0.5f);
    const T phi_pos = V::select_lt(z, small, V::add(half, herf), V::sub(one, herfc));  // Φ(|x|)
    const T phi_neg = V::select_lt(z, small, V::sub(half, herf), herfc);               // Φ(-|x|)
    return V::mul(x, V::select_lt(x, V::zero(), phi_neg, phi_pos));
}

// sigmoid(g) = 1 / (1 + e^-g) from e = e^{-|g|} <= 1 (no overflow):
// g >= 0: 1 / (1 + e);  g < 0: e / (1 + e).
template <class V>
inline typename V::T sigmoid_vec(typename V::T g) {
    using T = typename V::T;
    const T one = V::set1(1.0f);
    const T e = V::exp(V::sub(V::zero(), V::abs(g)));
    return V::div(V::select_lt(g, V::zero(), e, one), V::add(one, e));
}

template <class V>
void gelu_simd(float* x, int64_t n) {
    int64_t i = 0;
    for (; i + V::W <= n; i += V::W) V::store(x + i, gelu_vec<V>(V::load(x + i)));
    if (i < n) {
        float buf[V::W] = {};
        std::memcpy(buf, x + i, size_t(n - i) * sizeof(float));
        V::store(buf, gelu_vec<V>(V::load(buf)));
        std::memcpy(x + i, buf, size_t(n - i) * sizeof(float));
    }
}

template <class V>
void silu_mul_simd(const float* gate, const float* up, float* out, int64_t n) {
    int64_t i = 0;
    for (; i + V::W <= n; i += V::W) {
        const typename V::T g = V::load(gate + i);
        V::store(out + i, V::mul(V::mul(g, sigmoid_vec<V>(g)), V::load(up + i)));
    }
    if (i < n) {
        float g[V::W] = {}, u[V::W] = {};
        std::memcpy(g, gate + i, size_t(n - i) * sizeof(float));
        std::memcpy(u, up + i, size_t(n - i) * sizeof(float));
        const typename V::T gv = V::load(g);
        V::store(g, V::mul(V::mul(gv, sigmoid_vec<V>(gv)), V::load(u)));
        std::memcpy(out + i, g, size_t(n - i) * sizeof(float));
    }
}

// Sum over a row with 4 vector accumulators (then a horizontal sum and the
// tail in double): f(v) is applied to each loaded vector.
template <class V, class F>
inline double row_sum(const float* x, int64_t n, F f, int64_t* done) {
    using T = typename V::T;
    T a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
    int64_t i = 0;
    for (; i + 4 * V::W <= n; i += 4 * V::W) {
        a0 = V::add(a0, f(V::load(x + i)));
        a1 = V::add(a1, f(V::load(x + i + V::W)));
        a2 = V::add(a2, f(V::load(x + i + 2 * V::W)));
        a3 = V::add(a3, f(V::load(x + i + 3 * V::W)));
    }
    for (; i + V::W <= n; i += V::W) a0 = V::add(a0, f(V::load(x + i)));
    *done = i;
    return double(V::hsum(V::add(V::add(a0, a1), V::add(a2, a3))));
}

template <class V>
void layer_norm_simd(const float* x, const float* w, const float* b, float* y, int64_t n, float eps) {
    using T = typename V::T;
    int64_t i;
    double s = row_sum<V>(x, n, [](T v) { return v; }, &i);
    for (int64_t t = i; t < n; t++) s += x[t];
    const float mean = float(s / double(n));
    const T vm = V::set1(mean);
    double ss = row_sum<V>(
        x, n,
        [&](T v) {
            const T d = V::sub(v, vm);
            return V::mul(d, d);
        },
        &i);
    for (int64_t t = i; t < n; t++) ss += double(x[t] - mean) * double(x[t] - mean);
    const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
    const T vi = V::set1(inv);
    int64_t t = 0;
    for (; t + V::W <= n; t += V::W)
        V::store(y + t, V::fma(V::mul(V::sub(V::load(x + t), vm), vi), V::load(w + t), V::load(b + t)));
    for (; t < n; t++) y[t] = (x[t] - mean) * inv * w[t] + b[t];
}

template <class V>
void rms_norm_simd(const float* x, const float* w, float* y, int64_t n, float eps) {
    using T = typename V::T;
    int64_t i;
    double ss = row_sum<V>(x, n, [](T v) { return V::mul(v, v); }, &i);
    for (int64_t t = i; t < n; t++) ss += double(x[t]) * x[t];
    const float inv = 1.0f / std::sqrt(float(ss / double(n)) + eps);
    const T vi = V::set1(inv);
    int64_t t = 0;
    for (; t + V::W <= n; t += V::W) V::store(y + t, V::mul(V::mul(V::load(x + t), vi), V::load(w + t)));
    for (; t < n; t++) y[t] = (x[t] * inv) * w[t];
}

template <class V>
const RowOps& row_ops_for() {
    static const RowOps ops{gelu_simd<V>, silu_mul_simd<V>, layer_norm_simd<V>, rms_norm_simd<V>};
    return ops;
}

}  // namespace
}  // namespace mq::cpu::detail
