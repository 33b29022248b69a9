// The flash-attention task kernel (attention_flash.h), written once over a
// small vector-ops struct V and included by attention_flash.cpp (scalar,
// V::W = 1), attention_flash_avx2.cpp (8 lanes) and attention_flash_avx512.cpp
// (16 lanes), each compiled with its own ISA flags. Everything here is in an
// anonymous namespace so each file gets its own copy (no ODR mixing of ISAs).
//
// V provides: type T, lane count W, load(p), store(p, x), set1(f), zero(),
// fma(a, b, c) = a*b + c, mul, add, sub, max, exp (for x <= 0, x < -87.3 -> 0),
// exp1 (the same on one float),
// hmax, hsum.
#pragma once
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "common/profile.h"
#include "cpu/attention_flash.h"

namespace mq::cpu::detail {
namespace {

// S[r][0 .. KBV*W) = Q[r] · K panel (hd terms), MR rows at once: the MR x KBV
// accumulators stay in registers; per d one K vector load feeds MR FMAs.
//   q: MR rows, stride hdp;  kp: panel [hdp][KBV*W];  s: MR rows, stride KBV*W
template <class V, int KBV, int MR>
inline void flash_scores(const float* q, int hdp, int hd, const float* kp, float* s) {
    constexpr int KB = KBV * V::W;
    typename V::T acc[MR][KBV];
    for (int r = 0; r < MR; r++)
        for (int t = 0; t < KBV; t++) acc[r][t] = V::zero();
    for (int d = 0; d < hd; d++) {
        typename V::T kv[KBV];
        for (int t = 0; t < KBV; t++) kv[t] = V::load(kp + d * KB + t * V::W);
        for (int r = 0; r < MR; r++) {
            const typename V::T qb = V::set1(q[r * hdp + d]);
            for (int t = 0; t < KBV; t++) acc[r][t] = V::fma(qb, kv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int t = 0; t < KBV; t++) V::store(s + r * KB + t * V::W, acc[r][t]);
}

// O[r][dv .. dv+NV*W) = alpha[r] * O[r][..] + sum_j P[r][j] * Vp[j][dv ..], MR rows.
//   o: rows stride hdp;  p: rows stride KB;  vp: KB rows of stride hdp, at column dv
template <class V, int MR, int NV>
inline void flash_pv(float* o, int hdp, const float* p, int KB, const float* vp, const float* alpha) {
    typename V::T acc[MR][NV];
    for (int r = 0; r < MR; r++) {
        const typename V::T a = V::set1(alpha[r]);
        for (int t = 0; t < NV; t++) acc[r][t] = V::mul(a, V::load(o + r * hdp + t * V::W));
    }
    for (int j = 0; j < KB; j++) {
        typename V::T vv[NV];
        for (int t = 0; t < NV; t++) vv[t] = V::load(vp + int64_t(j) * hdp + t * V::W);
        for (int r = 0; r < MR; r++) {
            const typename V::T pb = V::set1(p[r * KB + j]);
            for (int t = 0; t < NV; t++) acc[r][t] = V::fma(pb, vv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int t = 0; t < NV; t++) V::store(o + r * hdp + t * V::W, acc[r][t]);
}

// Runs flash_pv over all hdp columns in chunks of at most NVMAX vectors.
template <class V, int MR, int NVMAX>
inline void flash_pv_all(float* o, int hdp, const float* p, int KB, const float* vp, const float* alpha) {
    for (int dv = 0; dv < hdp;) {
        const int nv = std::min(NVMAX, (hdp - dv) / V::W);
        switch (nv) {
#define MQ_FLASH_PV_CASE(N) \
    case N: if constexpr (N <= NVMAX) { flash_pv<V, MR, N>(o + dv, hdp, p, KB, vp + dv, alpha); } break;
            MQ_FLASH_PV_CASE(1) MQ_FLASH_PV_CASE(2) MQ_FLASH_PV_CASE(3) MQ_FLASH_PV_CASE(4)
            MQ_FLASH_PV_CASE(5) MQ_FLASH_PV_CASE(6) MQ_FLASH_PV_CASE(7) MQ_FLASH_PV_CASE(8)
#undef MQ_FLASH_PV_CASE
            default: break;
        }
        dv += nv * V::W;
    }
}

// Task kernel: KB = KBV*W keys per block; MRS / MRO rows per score / PV
// micro-kernel call; NVMAX vectors of the head per PV call (MRO*NVMAX
// accumulators must fit the register file).
template <class V, int KBV, int MRS, int MRO, int NVMAX>
void flash_rows(const FlashArgs& a, int64_t r0, int nr, uint64_t* prof) {
    constexpr int KB = KBV * V::W;
    constexpr float ninf = -std::numeric_limits<float>::infinity();
    const int hdp = a.hdp, hd = a.hd;
    // Scratch: Q [nr][hdp] (zero padded), S/P [nr][KB], O [nr][hdp]
    std::vector<float> buf(size_t(nr) * (2 * hdp + KB), 0.0f);
    float* qs = buf.data();
    float* s = qs + size_t(nr) * hdp;
    float* o = s + size_t(nr) * KB;
    float m[kFlashRows], l[kFlashRows], alpha[kFlashRows];
    int64_t last[kFlashRows], qi[kFlashRows];
    int64_t max_last = -1;
    for (int r = 0; r < nr; r++) {
        const int64_t i = (r0 + r) / a.G, h = int64_t(a.g) * a.G + (r0 + r) % a.G;
        qi[r] = i;
        std::memcpy(qs + size_t(r) * hdp, a.q + (i * a.n_head + h) * hd, size_t(hd) * sizeof(float));
        last[r] = a.causal ? std::min(i + a.q_offset, a.nk - 1) : a.nk - 1;
        max_last = std::max(max_last, last[r]);
        m[r] = ninf;
        l[r] = 0.0f;
    }
    const int64_t n_blocks = max_last < 0 ? 0 : max_last / KB + 1;   // later blocks are invisible to every row
    for (int64_t b = 0; b < n_blocks; b++) {
        const int64_t j0 = b * KB;
        const float* kp = a.kp + b * hdp * KB;
        uint64_t tp = prof ? prof::now_ns() : 0;
        auto lap = [&](int phase) {   // profiling: time since the last lap -> counter `phase`
            if (!prof) return;
            const uint64_t t = prof::now_ns();
            prof[phase] += t - tp;
            tp = t;
        };
        // 1. raw scores
        int r = 0;
        for (; r + MRS <= nr; r += MRS) flash_scores<V, KBV, MRS>(qs + size_t(r) * hdp, hdp, hd, kp, s + r * KB);
        for (; r < nr; r++) flash_scores<V, KBV, 1>(qs + size_t(r) * hdp, hdp, hd, kp, s + r * KB);
        lap(0);
        // 2. online softmax per row
        for (r = 0; r < nr; r++) {
            float* sr = s + r * KB;
            const float* mr = a.mask ? a.mask + qi[r] * a.ld_mask + j0 : nullptr;
            const int64_t vis = std::min<int64_t>(KB, last[r] - j0 + 1);   // visible keys of this block
            typename V::T mx = V::set1(ninf);
            if (vis == KB) {
                const typename V::T sc = V::set1(a.scale);
                for (int t = 0; t < KB; t += V::W) {
                    typename V::T x = V::mul(V::load(sr + t), sc);
                    if (mr) x = V::add(x, V::load(mr + t));
                    V::store(sr + t, x);
                    mx = V::max(mx, x);
                }
            } else {
                for (int t = 0; t < KB; t++)
                    sr[t] = t < vis ? sr[t] * a.scale + (mr ? mr[t] : 0.0f) : ninf;
                for (int t = 0; t < KB; t += V::W) mx = V::max(mx, V::load(sr + t));
            }
            const float bm = V::hmax(mx);
            const float mnew = std::max(m[r], bm);
            if (mnew == ninf) {   // nothing visible so far: P = 0, O and l stay 0
                std::fill(sr, sr + KB, 0.0f);
                alpha[r] = 1.0f;
                continue;
            }
            const typename V::T mv = V::set1(mnew);
            typename V::T sum = V::zero();
            for (int t = 0; t < KB; t += V::W) {
                const typename V::T p = V::exp(V::sub(V::load(sr + t), mv));
                V::store(sr + t, p);
                sum = V::add(sum, p);
            }
            alpha[r] = V::exp1(m[r] - mnew);   // m = -inf -> 0
            l[r] = l[r] * alpha[r] + V::hsum(sum);
            m[r] = mnew;
        }
        lap(1);
        // 3. O = alpha O + P · V
        const float* vp = a.vp + j0 * hdp;
        for (r = 0; r + MRO <= nr; r += MRO)
            flash_pv_all<V, MRO, NVMAX>(o + size_t(r) * hdp, hdp, s + r * KB, KB, vp, alpha + r);
        for (; r < nr; r++) flash_pv_all<V, 1, NVMAX>(o + size_t(r) * hdp, hdp, s + r * KB, KB, vp, alpha + r);
        lap(2);
    }
    // 4. out = O / l; nothing visible (l = 0) -> zeros
    for (int r = 0; r < nr; r++) {
        const int64_t i = qi[r], h = int64_t(a.g) * a.G + (r0 + r) % a.G;
        float* dst = a.out + (i * a.n_head + h) * hd;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int d = 0; d < hd; d++) dst[d] = o[size_t(r) * hdp + d] * inv;
    }
}

}  // namespace
}  // namespace mq::cpu::detail
