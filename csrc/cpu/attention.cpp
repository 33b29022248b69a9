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
            if (j > a.last[r]) {
                s[r * n + j] = ninf;
                continue;
            }
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

namespace {

// Merge the chunk partials of one row (chunk order, see attention.h):
//   part: n_chunks entries [acc (hd) | m | l], `stride` floats apart
//   o:    the row's output [hd]
// M = max m_c, w_c = e^{m_c - M}, out = sum_c w_c acc_c / sum_c w_c l_c.
// Nothing visible (M = -inf): zeros. Chunks with m = -inf contribute nothing,
// so chunks past the row's last visible key change nothing.
void merge_row(const float* part, int64_t n_chunks, int64_t stride, int hd, float* o) {
    const float ninf = -std::numeric_limits<float>::infinity();
    float M = ninf;
    for (int64_t c = 0; c < n_chunks; c++) M = std::max(M, part[c * stride + hd]);
    std::fill(o, o + hd, 0.0f);
    if (M == ninf) return;
    double L = 0.0;
    for (int64_t c = 0; c < n_chunks; c++) {
        const float* pc = part + c * stride;
        if (pc[hd] == ninf) continue;
        const float w = std::exp(pc[hd] - M);
        L += double(w) * pc[hd + 1];
        for (int d = 0; d < hd; d++) o[d] += w * pc[d];
    }
    const float inv = float(1.0 / L);
    for (int d = 0; d < hd; d++) o[d] *= inv;
}

}  // namespace

void attention_direct(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                      int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                      int64_t ld_mask, bool causal, int64_t q_offset, ThreadPool& pool) {
    if (n_kv_head <= 0 || n_head % n_kv_head || hd <= 0 || hd > kAttnDirectMaxHd)
        throw std::invalid_argument("attention_direct: n_head must be a multiple of n_kv_head and head size in 1..256");
    if (kv_type != DType::F32 && kv_type != DType::F16)
        throw std::invalid_argument("attention_direct: KV type must be f32 or f16");
    if (nq <= 0) return;
    const int G = n_head / n_kv_head;
    if (nk <= 0) {
        std::fill(out, out + nq * n_head * hd, 0.0f);
        return;
    }
    const bool f16 = kv_type == DType::F16;
    const size_t esize = f16 ? 2 : 4;
    // avx2, avxvnni and avx512 paths use the AVX2 kernel (memory-bound: wider vectors would not help much)
#ifdef MQ_X86
    const detail::AttnChunkFn chunk_fn =
        (active_path() == Path::Scalar || hd % 8 != 0) ? detail::attn_chunk_scalar : detail::attn_chunk_avx2;
#else
    const detail::AttnChunkFn chunk_fn = detail::attn_chunk_scalar;
#endif
    // Rows of one group: r = i * G + (h - g * G), i < nq; blocks of BR rows.
    const int64_t R = nq * G, BR = kAttnDirectMaxRows;
    const int64_t n_rb = (R + BR - 1) / BR;
    const int64_t n_chunks = (nk + kAttnChunk - 1) / kAttnChunk;
    const int64_t per_row = hd + 2;  // [acc (hd) | m | l]
    auto last_of = [&](int64_t r) { return causal ? std::min(r / G + q_offset, nk - 1) : nk - 1; };
    // Chunk c of block (g, b): the chunk kernel on rows [b*BR, b*BR + nr), partials to dst[row][per_row].
    auto run_chunk = [&](int g, int64_t b, int64_t c, float* dst, int64_t dst_row_stride) {
        const int64_t r0 = b * BR, nr = std::min(BR, R - r0);
        const int64_t j0 = c * kAttnChunk, n = std::min(kAttnChunk, nk - j0);
        const float* qrows[kAttnDirectMaxRows];
        const float* mrows[kAttnDirectMaxRows];
        int64_t last[kAttnDirectMaxRows];
        for (int64_t rr = 0; rr < nr; rr++) {
            const int64_t r = r0 + rr, i = r / G;
            qrows[rr] = q + (i * n_head + int64_t(g) * G + r % G) * hd;
            mrows[rr] = mask ? mask + i * ld_mask + j0 : nullptr;
            last[rr] = last_of(r) - j0;
        }
        const int64_t off = j0 * kv_stride + int64_t(g) * hd;  // elements
        detail::AttnChunk a{qrows,
                            mrows,
                            last,
                            int(nr),
                            static_cast<const char*>(k) + off * esize,
                            static_cast<const char*>(v) + off * esize,
                            f16,
                            kv_stride,
                            n,
                            hd,
                            scale};
        alignas(64) float s[kAttnDirectMaxRows * kAttnChunk];
        float m[kAttnDirectMaxRows], l[kAttnDirectMaxRows];
        alignas(64) float acc[kAttnDirectMaxRows * kAttnDirectMaxHd];
        chunk_fn(a, s, m, l, acc);
        for (int64_t rr = 0; rr < nr; rr++) {
            float* d = dst + rr * dst_row_stride;
            std::memcpy(d, acc + rr * hd, size_t(hd) * sizeof(float));
            d[hd] = m[rr];
            d[hd + 1] = l[rr];
        }
    };
    // Chunks past the last key any row of block b can see are not computed (m = -inf).
    auto block_chunks = [&](int64_t b) {
        const int64_t r_last = std::min(R, (b + 1) * BR) - 1;
        return last_of(r_last) / kAttnChunk + 1;  // last_of is non-decreasing in r
    };
    auto out_row = [&](int g, int64_t r) { return out + ((r / G) * n_head + int64_t(g) * G + r % G) * hd; };
    const float ninf = -std::numeric_limits<float>::infinity();

    const int64_t n_blocks = int64_t(n_kv_head) * n_rb;
    if (n_blocks >= 2 * int64_t(pool.size())) {
        // Many row blocks (prefill): one task per (group, row block) walks its
        // chunks in order and merges them itself (the same arithmetic as below).
        pool.parallel_for(n_blocks, [&](int64_t t, int) {
            const int g = int(t / n_rb);
            const int64_t b = t % n_rb, nr = std::min(BR, R - b * BR), nc = block_chunks(b);
            std::vector<float> part(size_t(nc) * BR * per_row);  // [chunk][row][per_row]
            for (int64_t c = 0; c < nc; c++) run_chunk(g, b, c, &part[c * BR * per_row], per_row);
            for (int64_t rr = 0; rr < nr; rr++)
                merge_row(&part[rr * per_row], nc, BR * per_row, hd, out_row(g, b * BR + rr));
        });
        return;
    }
    // Few row blocks (decode): tasks over (group, row block, chunk), then a merge pass.
    const int64_t n_tasks = n_blocks * n_chunks;
    std::vector<float> part(size_t(n_tasks) * BR * per_row);  // [group][block][chunk][row][per_row]
    pool.parallel_for(n_tasks, [&](int64_t t, int) {
        const int64_t gb = t / n_chunks, c = t % n_chunks;
        const int g = int(gb / n_rb);
        const int64_t b = gb % n_rb;
        float* dst = &part[t * BR * per_row];
        if (c >= block_chunks(b)) {
            for (int64_t rr = 0; rr < BR; rr++) dst[rr * per_row + hd] = ninf;
            return;
        }
        run_chunk(g, b, c, dst, per_row);
    });
    pool.parallel_for(n_blocks, [&](int64_t gb, int) {
        const int g = int(gb / n_rb);
        const int64_t b = gb % n_rb, nr = std::min(BR, R - b * BR);
        const float* first = &part[gb * n_chunks * BR * per_row];
        for (int64_t rr = 0; rr < nr; rr++)
            merge_row(first + rr * per_row, n_chunks, BR * per_row, hd, out_row(g, b * BR + rr));
    });
}

}  // namespace mq::cpu
