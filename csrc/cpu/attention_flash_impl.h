// The flash-attention task kernel (attention_flash.h), written once over a
// small vector-ops struct V and included by attention_flash.cpp (scalar,
// V::W = 1), attention_flash_avx2.cpp (8 lanes) and attention_flash_avx512.cpp
// (16 lanes), each compiled with its own ISA flags. Everything here is in an
// anonymous namespace so each file gets its own copy (no ODR mixing of ISAs).
//
// V provides: type T, lane count W, load(p), store(p, x), set1(f), zero(),
// fma(a, b, c) = a*b + c, mul, add, sub, max, exp (for x <= 0; x < -87.3,
// -inf included, gives 0).
//
// Layout of one task (RT = NG * RG rows, RG = QV * W rows per row group):
//   qt [hd][RT]   Qᵀ · scale (pad rows zero)
//   ot [hd][RT]   Oᵀ accumulators
//   m, l [RT]     running max and sum per row
//   s  [KB][RG]   scores, then probabilities, of one row group and key block
// Per key block, per row group: score micro-tiles of MK keys x QV vectors
// (MK*QV accumulators; per d: QV loads of Qᵀ, MK broadcasts of K), the
// softmax update (vertical), then P·V micro-tiles of MD head dims x QV vectors
// (per key: QV loads of Pᵀ, MD broadcasts of V). MK*QV and MD*QV accumulators
// plus QV + 1 operands must fit the register file.
#pragma once
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common/profile.h"
#include "cpu/attention_flash.h"

namespace mq::cpu::detail {
namespace {

// s[t][0 .. QV*W) = Σ_d K[t][d] qt[d][0 .. QV*W) for the MK keys t of the tile.
//   qt: row stride ldq;  k: key t at k + t * ks;  s: row stride lds
template <class V, int QV, int MK>
inline void flash_score_tile(const float* qt, int ldq, int hd, const float* k, int64_t ks, float* s, int lds) {
    using T = typename V::T;
    T acc[MK][QV];
    for (int t = 0; t < MK; t++)
        for (int u = 0; u < QV; u++) acc[t][u] = V::zero();
    for (int d = 0; d < hd; d++) {
        T qv[QV];
        for (int u = 0; u < QV; u++) qv[u] = V::load(qt + size_t(d) * ldq + u * V::W);
        for (int t = 0; t < MK; t++) {
            const T kb = V::set1(k[t * ks + d]);
            for (int u = 0; u < QV; u++) acc[t][u] = V::fma(kb, qv[u], acc[t][u]);
        }
    }
    for (int t = 0; t < MK; t++)
        for (int u = 0; u < QV; u++) V::store(s + t * lds + u * V::W, acc[t][u]);
}

// Scores of nkb (<= KB) keys: tiles of MK keys, the rest in tiles of MK/2 and 1
// (all compile-time sizes, so the accumulators stay in registers).
template <class V, int QV, int MK>
inline void flash_scores(const float* qt, int ldq, int hd, const float* k, int64_t ks, int nkb, float* s, int lds) {
    int j = 0;
    for (; j + MK <= nkb; j += MK) flash_score_tile<V, QV, MK>(qt, ldq, hd, k + j * ks, ks, s + j * lds, lds);
    if constexpr (MK >= 4) {
        for (; j + MK / 2 <= nkb; j += MK / 2)
            flash_score_tile<V, QV, MK / 2>(qt, ldq, hd, k + j * ks, ks, s + j * lds, lds);
    }
    for (; j < nkb; j++) flash_score_tile<V, QV, 1>(qt, ldq, hd, k + j * ks, ks, s + j * lds, lds);
}

// ot[t][0 .. QV*W) = alpha * ot[t][..] + Σ_j V[j][t] p[j][..] for the MD head dims t of the tile.
//   ot: row stride ldo;  p: nkb rows of stride ldp;  v: key j at v + j * vs (column 0 = dim t = 0)
template <class V, int QV, int MD>
inline void flash_pv_tile(float* ot, int ldo, const float* p, int ldp, int nkb, const float* v, int64_t vs,
                          const typename V::T* alpha) {
    using T = typename V::T;
    T acc[MD][QV];
    for (int t = 0; t < MD; t++)
        for (int u = 0; u < QV; u++) acc[t][u] = V::mul(alpha[u], V::load(ot + size_t(t) * ldo + u * V::W));
    for (int j = 0; j < nkb; j++) {
        T pv[QV];
        for (int u = 0; u < QV; u++) pv[u] = V::load(p + size_t(j) * ldp + u * V::W);
        for (int t = 0; t < MD; t++) {
            const T vb = V::set1(v[j * vs + t]);
            for (int u = 0; u < QV; u++) acc[t][u] = V::fma(vb, pv[u], acc[t][u]);
        }
    }
    for (int t = 0; t < MD; t++)
        for (int u = 0; u < QV; u++) V::store(ot + size_t(t) * ldo + u * V::W, acc[t][u]);
}

template <class V, int QV, int MD>
inline void flash_pv(float* ot, int ldo, const float* p, int ldp, int nkb, const float* v, int64_t vs, int hd,
                     const typename V::T* alpha) {
    int d = 0;
    for (; d + MD <= hd; d += MD) flash_pv_tile<V, QV, MD>(ot + size_t(d) * ldo, ldo, p, ldp, nkb, v + d, vs, alpha);
    if constexpr (MD >= 2) {
        for (; d + MD / 2 <= hd; d += MD / 2)
            flash_pv_tile<V, QV, MD / 2>(ot + size_t(d) * ldo, ldo, p, ldp, nkb, v + d, vs, alpha);
    }
    for (; d < hd; d++) flash_pv_tile<V, QV, 1>(ot + size_t(d) * ldo, ldo, p, ldp, nkb, v + d, vs, alpha);
}

// Task kernel: NG row groups of QV vectors, key blocks of KB keys, score tiles
// of MK keys, P·V tiles of MD head dims.
template <class V, int QV, int NG, int KB, int MK, int MD>
void flash_rows(const FlashArgs& a, int64_t r0, int nr, uint64_t* prof) {
    using T = typename V::T;
    constexpr int RG = QV * V::W, RT = NG * RG;
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    const int hd = a.hd;
    const int64_t ks = a.kv_stride;
    // Scratch (see the header comment), reused across tasks of this thread.
    thread_local std::vector<float> buf;
    const size_t need = size_t(hd) * RT * 2 + size_t(KB) * RG + 2 * RT;
    if (buf.size() < need) buf.resize(need);
    float* qt = buf.data();
    float* ot = qt + size_t(hd) * RT;
    float* s = ot + size_t(hd) * RT;
    float* m = s + size_t(KB) * RG;
    float* l = m + RT;
    int64_t qi[RT], last[RT];
    int64_t max_last = -1, min_last = a.nk;
    std::fill(qt, qt + size_t(hd) * RT * 2, 0.0f);  // qt (pad rows stay 0) and ot
    for (int r = 0; r < RT; r++) {
        m[r] = ninf;
        l[r] = 0.0f;
        if (r >= nr) continue;
        const int64_t i = (r0 + r) / a.G, h = int64_t(a.g) * a.G + (r0 + r) % a.G;
        qi[r] = i;
        const float* src = a.q + (i * a.n_head + h) * hd;
        for (int d = 0; d < hd; d++) qt[size_t(d) * RT + r] = src[d] * a.scale;
        last[r] = a.causal ? std::min(i + a.q_offset, a.nk - 1) : a.nk - 1;
        max_last = std::max(max_last, last[r]);
        min_last = std::min(min_last, last[r]);
    }
    const int n_groups = (nr + RG - 1) / RG;
    const int64_t n_blocks = max_last < 0 ? 0 : max_last / KB + 1;  // later blocks are invisible to every row
    uint64_t tp = prof ? prof::now_ns() : 0;
    auto lap = [&](int phase) {  // profiling: time since the last lap -> counter `phase`
        if (!prof) return;
        const uint64_t t = prof::now_ns();
        prof[phase] += t - tp;
        tp = t;
    };
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t j0 = b * KB;
        const int nkb = int(std::min<int64_t>(KB, a.nk - j0));
        const float* kb = a.k + j0 * ks;
        const float* vb = a.v + j0 * ks;
        // Masking needed in this block: an additive mask, or causal limits inside it.
        const bool fix = a.mask || (a.causal && min_last < j0 + nkb - 1);
        for (int gi = 0; gi < n_groups; gi++) {
            const int c0 = gi * RG;
            // 1. raw scores Sᵀ [nkb][RG]
            flash_scores<V, QV, MK>(qt + c0, RT, hd, kb, ks, nkb, s, RG);
            lap(0);
            // 2. masking, then the online softmax update per row vector
            if (fix) {
                for (int lane = 0; lane < RG && c0 + lane < nr; lane++) {
                    const int r = c0 + lane;
                    const float* mr = a.mask ? a.mask + qi[r] * a.ld_mask + j0 : nullptr;
                    const int64_t vis = std::max<int64_t>(0, std::min<int64_t>(nkb, last[r] - j0 + 1));
                    for (int j = 0; j < nkb; j++) {
                        float& x = s[size_t(j) * RG + lane];
                        x = j < vis ? x + (mr ? mr[j] : 0.0f) : ninf;
                    }
                }
            }
            T alpha[QV];
            for (int u = 0; u < QV; u++) {
                float* su = s + u * V::W;
                T mx = V::set1(ninf);
                for (int j = 0; j < nkb; j++) mx = V::max(mx, V::load(su + size_t(j) * RG));
                const T mold = V::load(m + c0 + u * V::W);
                const T mnew = V::max(mold, mx);
                // Subtract max(m', lowest): a row with nothing visible yet (m' = -inf)
                // then gets e^{-inf} = 0 everywhere instead of NaN; rows masked with
                // finfo.min everywhere get e^0 = 1 (uniform), as softmax does.
                const T msub = V::max(mnew, V::set1(std::numeric_limits<float>::lowest()));
                alpha[u] = V::exp(V::sub(mold, msub));
                T sum = V::zero();
                for (int j = 0; j < nkb; j++) {
                    const T pj = V::exp(V::sub(V::load(su + size_t(j) * RG), msub));
                    V::store(su + size_t(j) * RG, pj);
                    sum = V::add(sum, pj);
                }
                V::store(l + c0 + u * V::W, V::fma(alpha[u], V::load(l + c0 + u * V::W), sum));
                V::store(m + c0 + u * V::W, mnew);
            }
            lap(1);
            // 3. Oᵀ = α Oᵀ + V_blockᵀ Pᵀ
            flash_pv<V, QV, MD>(ot + c0, RT, s, RG, nkb, vb, ks, hd, alpha);
            lap(2);
        }
    }
    // 4. out = O / l; nothing visible (l = 0) -> zeros
    for (int r = 0; r < nr; r++) {
        const int64_t i = qi[r], h = int64_t(a.g) * a.G + (r0 + r) % a.G;
        float* dst = a.out + (i * a.n_head + h) * hd;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int d = 0; d < hd; d++) dst[d] = ot[size_t(d) * RT + r] * inv;
    }
}

}  // namespace
}  // namespace mq::cpu::detail
