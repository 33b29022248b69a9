// Direct attention for a few queries (attention.h): the task driver, the
// chunk merge, and the portable scalar chunk kernel (the reference the AVX2
// kernel in attention_avx2.cpp is tested against, through the same tests).
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "common/fp16.h"
#include "cpu/matmul.h"

namespace mq::cpu {
namespace detail {

static void load_row(const void* base, bool f16, int64_t off, int hd, float* dst) {
    if (f16) {
        const uint16_t* p = static_cast<const uint16_t*>(base) + off;
        for (int d = 0; d < hd; d++) dst[d] = fp16_to_fp32(p[d]);
    } else {
        std::memcpy(dst, static_cast<const float*>(base) + off, size_t(hd) * sizeof(float));
    }
}

void attn_chunk_scalar(const AttnChunk& a, float* s, float* m, float* l, float* acc) {
    const float ninf = -std::numeric_limits<float>::infinity();
    const int64_t n = a.n;
    const int hd = a.hd;
    float row[kAttnDirectMaxHd];
    // s[r, j] = scale * q_r · k_j + mask[r, j], or -inf for keys after last[r]
    for (int64_t j = 0; j < n; j++) {
        load_row(a.k, a.f16, j * a.kv_stride, hd, row);
        for (int r = 0; r < a.R; r++) {
            if (j > a.last[r]) { s[r * n + j] = ninf; continue; }
            float dot = 0.0f;
            for (int d = 0; d < hd; d++) dot += a.qrows[r][d] * row[d];
            s[r * n + j] = dot * a.scale + (a.mrows[r] ? a.mrows[r][j] : 0.0f);
        }
    }
    // p[r, j] = exp(s[r, j] - m_r) in place, l_r = sum_j p[r, j]
    for (int r = 0; r < a.R; r++) {
        float* sr = s + r * n;
        float mx = ninf;
        for (int64_t j = 0; j < n; j++) mx = std::max(mx, sr[j]);
        m[r] = mx;
        double sum = 0.0;
        for (int64_t j = 0; j < n; j++) {
            sr[j] = mx == ninf ? 0.0f : std::exp(sr[j] - mx);
            sum += sr[j];
        }
        l[r] = float(sum);
    }
    // acc[r, :] = sum_j p[r, j] v_j
    std::fill(acc, acc + int64_t(a.R) * hd, 0.0f);
    for (int64_t j = 0; j < n; j++) {
        load_row(a.v, a.f16, j * a.kv_stride, hd, row);
        for (int r = 0; r < a.R; r++) {
            const float p = s[r * n + j];
            if (p == 0.0f) continue;
            for (int d = 0; d < hd; d++) acc[r * hd + d] += p * row[d];
        }
    }
}

}  // namespace detail

void attention_direct(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                      int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                      int64_t ld_mask, bool causal, int64_t q_offset, ThreadPool& pool) {
    if (!attention_direct_supported(nq, n_head, n_kv_head, hd))
        throw std::invalid_argument("attention_direct: more than 16 query rows per KV group or head size > 256");
    if (kv_type != DType::F32 && kv_type != DType::F16)
        throw std::invalid_argument("attention_direct: KV type must be f32 or f16");
    if (nq <= 0) return;
    const int G = n_head / n_kv_head;
    const int R = int(nq * G);   // query rows of one group, ordered r = i * G + (h - g * G)
    if (nk <= 0) {
        std::fill(out, out + nq * n_head * hd, 0.0f);
        return;
    }
    const bool f16 = kv_type == DType::F16;
    const size_t esize = f16 ? 2 : 4;
    // avx2 and avx512 paths use the AVX2 kernel (memory-bound: wider vectors would not help much)
#ifdef MQ_X86
    const detail::AttnChunkFn chunk_fn = (active_path() == Path::Scalar || hd % 8 != 0)
                                             ? detail::attn_chunk_scalar : detail::attn_chunk_avx2;
#else
    const detail::AttnChunkFn chunk_fn = detail::attn_chunk_scalar;
#endif
    const int64_t n_chunks = (nk + kAttnChunk - 1) / kAttnChunk;
    const int64_t n_tasks = int64_t(n_kv_head) * n_chunks;
    // Per task and row: [acc (hd) | m | l]    [n_tasks, R, hd + 2]
    const int64_t per_row = hd + 2;
    std::vector<float> part(n_tasks * R * per_row);

    pool.parallel_for(n_tasks, [&](int64_t t, int) {
        const int g = int(t / n_chunks);
        const int64_t j0 = (t % n_chunks) * kAttnChunk, n = std::min(kAttnChunk, nk - j0);
        const float* qrows[kAttnDirectMaxRows];
        const float* mrows[kAttnDirectMaxRows];
        int64_t last[kAttnDirectMaxRows];
        for (int r = 0; r < R; r++) {
            const int64_t i = r / G;
            qrows[r] = q + (i * n_head + int64_t(g) * G + r % G) * hd;
            mrows[r] = mask ? mask + i * ld_mask + j0 : nullptr;
            last[r] = (causal ? std::min(i + q_offset, nk - 1) : nk - 1) - j0;
        }
        const int64_t off = j0 * kv_stride + int64_t(g) * hd;   // elements
        detail::AttnChunk a{qrows, mrows, last, R,
                            static_cast<const char*>(k) + off * esize, static_cast<const char*>(v) + off * esize,
                            f16, kv_stride, n, hd, scale};
        alignas(64) float s[kAttnDirectMaxRows * kAttnChunk];
        float m[kAttnDirectMaxRows], l[kAttnDirectMaxRows];
        float* base = &part[t * R * per_row];
        alignas(64) float acc[kAttnDirectMaxRows * kAttnDirectMaxHd];
        chunk_fn(a, s, m, l, acc);
        for (int r = 0; r < R; r++) {
            std::memcpy(base + r * per_row, acc + r * hd, size_t(hd) * sizeof(float));
            base[r * per_row + hd] = m[r];
            base[r * per_row + hd + 1] = l[r];
        }
    });

    // Merge the chunks of each (group, row): M = max m_c, w_c = e^{m_c - M},
    // out = sum_c w_c acc_c / sum_c w_c l_c. Nothing visible (M = -inf): zeros.
    pool.parallel_for(n_kv_head, [&](int64_t g, int) {
        const float ninf = -std::numeric_limits<float>::infinity();
        for (int r = 0; r < R; r++) {
            const int64_t i = r / G;
            float* o = out + (i * n_head + g * G + r % G) * hd;
            const float* first = &part[(g * n_chunks) * R * per_row + r * per_row];
            float M = ninf;
            for (int64_t c = 0; c < n_chunks; c++) M = std::max(M, first[c * R * per_row + hd]);
            std::fill(o, o + hd, 0.0f);
            if (M == ninf) continue;
            double L = 0.0;
            for (int64_t c = 0; c < n_chunks; c++) {
                const float* pc = first + c * R * per_row;
                if (pc[hd] == ninf) continue;
                const float w = std::exp(pc[hd] - M);
                L += double(w) * pc[hd + 1];
                for (int d = 0; d < hd; d++) o[d] += w * pc[d];
            }
            const float inv = float(1.0 / L);
            for (int d = 0; d < hd; d++) o[d] *= inv;
        }
    });
}

}  // namespace mq::cpu
