// Prototype (bench only, not the product): would a load-time repack of Q4_K's quants make the
// AVX-512 tiles of a batched decode step (M = 2..8 X rows, one W row per call) cheaper?
//
// Today's tile (Q4KTile::run_pairs, kernels_avx512.cpp, included below so it is measured as
// built) reads ggml's layout: each 64-value chunk of a block holds 2 sub-blocks of 32 in 8
// int32 lanes each, so the per-sub-block scales are applied per chunk and X row:
//   per X row and PAIR of blocks: 8 vpdpbusd + 4 vpackssdw + 4 vpdpwssd/vpmaddwd + 4 float ops.
// Lane layout (this file): the 2 blocks' 16 sub-blocks get one int32 lane each. Packed zmm r
// (r = 0..3) of a block pair holds, in byte 4 * lane + b (lane = 8 h + s: block h of the pair,
// sub-block s), code (h, s, 8 r + b) in its low nibble and (h, s, 8 r + 4 + b) in its high
// nibble, so the unpacked vectors U[2r] = P[r] & 15 and U[2r + 1] = (P[r] >> 4) & 15 have in
// lane 8h + s the codes 4t..4t+3 of sub-block s (t = 0..7). X is laid out to match (XV[t], the
// same bytes of Q8_K quants), and 8 vpdpbusd into ONE accumulator give the 16 exact
// sub-block dot products; then
//   y += sum_lanes( float(acc) * dx[lane] * (d * sc)[lane]  -  (dmin * m)[lane] * (dx * bsum)[lane] )
//   per X row and pair: 8 vpdpbusd + 4 float ops (12 instead of 20).
// Same int32 sub-block sums as ggml's vec_dot_q4_K_q8_K; the float order differs (per
// sub-block product d * sc, exact: fp16 x 6-bit integer fits float's 24 bits).
//
//   g++ -O3 -std=c++17 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx2 -mfma -mf16c -mbmi2 \
//       -DMQ_X86 -Icsrc bench/q4k_lane_proto.cpp csrc/quants/*.cpp csrc/common/formats.cpp csrc/common/env.cpp \
//       -o /tmp/q4k_lane -pthread   [-DLANE_CHAINS=1|2|4|8: independent vpdpbusd chains per row, default 2]
//   /tmp/q4k_lane [N K M threads]      (default 14336 4096 4 1)
//
// Result (AMD EPYC Zen 4, 2 cores, 2026-12-04; bench/results/2026-12-04-epyc-zen4-2c-peer.md
// section 5): not worth a second layout. In L2 (N = 256, K = 4096, one thread) M = 4: today
// ~200 GOP/s, lane 1.04-1.23x of that; from DRAM (N = 14336, 2 threads) M = 4 1.01-1.07x,
// M = 8 1.01-1.19x, and M = 1 (decode) 0.77-0.96x. Kept as the record of the experiment.
#include "cpu/kernels_avx512.cpp"  // Q4KTile, prep_xq4k, quantize_q8_K_block: the product's code as built

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

using namespace mq;
using namespace mq::cpu::detail;

namespace {

// ggml's Q4_K block pair with the quants in the lane layout (same 288 bytes as two blocks).
struct LanePair {
    uint8_t qs[4][64];      // P[r], see the file comment
    uint8_t scales[2][12];  // each block's packed 6-bit scales / mins, as in the file
    uint32_t dd[2];         // d | dmin << 16 (fp16 bits) of each block
};
static_assert(sizeof(LanePair) == 2 * sizeof(block_q4_K), "same bytes as two blocks");

inline int q4_code(const block_q4_K& b, int v) {  // ggml layout: value v of the block
    const int c = v / 64, l = v % 64;
    const uint8_t byte = b.qs[32 * c + (l % 32)];
    return l < 32 ? (byte & 15) : (byte >> 4);
}

void repack_row(const block_q4_K* w, int64_t nb, LanePair* out) {
    for (int64_t p = 0; p < (nb + 1) / 2; p++) {
        LanePair& o = out[p];
        std::memset(&o, 0, sizeof(o));
        for (int h = 0; h < 2; h++) {
            if (2 * p + h >= nb) continue;  // odd last block: its partner stays zero
            const block_q4_K& b = w[2 * p + h];
            for (int s = 0; s < 8; s++)
                for (int r = 0; r < 4; r++)
                    for (int bb = 0; bb < 4; bb++) {
                        const int lo = q4_code(b, 32 * s + 8 * r + bb), hi = q4_code(b, 32 * s + 8 * r + 4 + bb);
                        o.qs[r][4 * (8 * h + s) + bb] = uint8_t(lo | hi << 4);
                    }
            std::memcpy(o.scales[h], b.scales, 12);
            std::memcpy(&o.dd[h], &b.d, 4);
        }
    }
}

// X row per block pair, matching LanePair: XV[t] byte 4 * lane + b = quant (h, s, 4t + b).
struct alignas(64) LaneX {  // 64-byte aligned rows, as the product aligns its X rows (matmul.cpp)
    int8_t xv[8][64];
    float dx[16];  // lane 8h + s: dx of block h
    float dm[16];  // lane 8h + s: dx * (bsums[2s] + bsums[2s + 1]) of block h
};
void prep_lane_x(const float* x, int64_t K, LaneX* out) {
    const int64_t nb = K / QK_K;
    for (int64_t p = 0; p < (nb + 1) / 2; p++) {
        LaneX& o = out[p];
        std::memset(&o, 0, sizeof(o));
        for (int h = 0; h < 2; h++) {
            if (2 * p + h >= nb) continue;
            block_q8_K q;
            quantize_q8_K_block(x + QK_K * (2 * p + h), &q, false);
            for (int s = 0; s < 8; s++) {
                for (int t = 0; t < 8; t++)
                    for (int bb = 0; bb < 4; bb++) o.xv[t][4 * (8 * h + s) + bb] = q.qs[32 * s + 4 * t + bb];
                o.dx[8 * h + s] = q.d;
                o.dm[8 * h + s] = q.d * float(q.bsums[2 * s] + q.bsums[2 * s + 1]);
            }
        }
    }
}

template <int NX>
__attribute__((noinline)) void lane_tile(const LanePair* w, int64_t np, const LaneX* x, size_t xs_pairs, float* y,
                                         int64_t ldy) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i lo_idx = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i hi_idx = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1);
    __m512 acc[NX];
    for (int i = 0; i < NX; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        const LanePair& wp = w[p];
        prefetch_w<sizeof(LanePair)>(&wp);
        __m512i u[8];
        for (int r = 0; r < 4; r++) {
            const __m512i q = _mm512_loadu_si512(wp.qs[r]);
            u[2 * r] = _mm512_and_si512(q, m4);
            u[2 * r + 1] = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
        }
        uint64_t sa, ma, sc, mc;
        unpack_q4_K_scales(wp.scales[0], &sa, &ma);
        unpack_q4_K_scales(wp.scales[1], &sc, &mc);
        const __m512 f4 = pair_f4(wp.dd[0], wp.dd[1]);  // [d0, dmin0, d1, dmin1]
        const __m512 ws =
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(int64_t(sc), int64_t(sa)))),
                          _mm512_permutexvar_ps(lo_idx, f4));
        const __m512 wm =
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_set_epi64x(int64_t(mc), int64_t(ma)))),
                          _mm512_permutexvar_ps(hi_idx, f4));
        for (int i = 0; i < NX; i++) {
            const LaneX& xp = x[i * xs_pairs + p];
#ifndef LANE_CHAINS
#define LANE_CHAINS 2
#endif
            // LANE_CHAINS independent vpdpbusd chains (its latency), added once
            constexpr int C = LANE_CHAINS;
            __m512i sc4[C];
            for (int c = 0; c < C; c++) {
                // a zero idiom per chain (GCC would copy one hoisted zero register: a real zmm move)
                __m512i z;
                asm volatile("vpxord %0, %0, %0" : "=v"(z));
                sc4[c] = _mm512_dpbusd_epi32(z, u[c], _mm512_loadu_si512(xp.xv[c]));
            }
            for (int t = C; t < 8; t += C)
                for (int c = 0; c < C; c++)
                    sc4[c] = _mm512_dpbusd_epi32(sc4[c], u[t + c], _mm512_loadu_si512(xp.xv[t + c]));
            for (int w2 = C / 2; w2 >= 1; w2 /= 2)
                for (int c = 0; c < w2; c++) sc4[c] = _mm512_add_epi32(sc4[c], sc4[c + w2]);
            const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(sc4[0]), _mm512_loadu_ps(xp.dx));
            acc[i] = _mm512_fmadd_ps(f, ws, acc[i]);
            acc[i] = _mm512_fnmadd_ps(wm, _mm512_loadu_ps(xp.dm), acc[i]);
        }
    }
    for (int i = 0; i < NX; i++) y[i * ldy] = _mm512_reduce_add_ps(acc[i]);
}

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

template <class F>
void parallel_rows(int64_t N, int threads, F f) {
    if (threads == 1) return f(0, N);  // no thread start in the timed region
    std::vector<std::thread> ts;
    for (int t = 0; t < threads; t++) ts.emplace_back([=] { f(N * t / threads, N * (t + 1) / threads); });
    for (auto& t : ts) t.join();
}

}  // namespace

int main(int argc, char** argv) {
    const int64_t N = argc > 1 ? atoll(argv[1]) : 14336, K = argc > 2 ? atoll(argv[2]) : 4096;
    const int M = argc > 3 ? atoi(argv[3]) : 4, threads = argc > 4 ? atoi(argv[4]) : 1;
    if (M != 1 && M != 2 && M != 4 && M != 8) return fprintf(stderr, "M: 1, 2, 4 or 8\n"), 2;
    if (K % QK_K || K > kPairMaxK) return fprintf(stderr, "K: a multiple of 256, <= %lld\n", (long long)kPairMaxK), 2;
    const int64_t nb = K / QK_K, np = (nb + 1) / 2;
    std::mt19937 rng(1);
    std::normal_distribution<float> g;
    std::vector<float> wf(size_t(N * K)), xf(size_t(M * K));
    for (auto& v : wf) v = g(rng);
    for (auto& v : xf) v = g(rng);
    std::vector<block_q4_K> w(size_t(N * nb));
    for (int64_t n = 0; n < N; n++) quantize_row_q4_K_ref(wf.data() + n * K, w.data() + n * nb, K);
    std::vector<LanePair> wl(size_t(N * np));
    for (int64_t n = 0; n < N; n++) repack_row(w.data() + n * nb, nb, wl.data() + n * np);
    // X: the product's prepared rows (XQ4KPair) and the lane layout
    const size_t xb = bytes_xq4k(K);
    // X rows 64-byte aligned, as matmul.cpp aligns them (xb is a multiple of 64: 640 B per pair)
    std::vector<LaneX> xq_store(xb * M / sizeof(LaneX) + 1);
    uint8_t* xq = reinterpret_cast<uint8_t*>(xq_store.data());
    for (int i = 0; i < M; i++) prep_xq4k(xf.data() + i * K, xq + i * xb, K);
    std::vector<LaneX> xl(size_t(M * np));
    for (int i = 0; i < M; i++) prep_lane_x(xf.data() + i * K, K, xl.data() + i * np);
    // reference: double sums over the same quants (ggml's vec_dot_q4_K_q8_K maths)
    std::vector<double> yref(size_t(M * N));
    for (int i = 0; i < M; i++) {
        std::vector<block_q8_K> q(nb);
        quantize_row_q8_K_ref(xf.data() + i * K, q.data(), K);
        for (int64_t n = 0; n < N; n++) {
            double s = 0;
            for (int64_t b = 0; b < nb; b++) {
                const block_q4_K& wb = w[n * nb + b];
                uint64_t sc, m;
                unpack_q4_K_scales(wb.scales, &sc, &m);
                for (int j = 0; j < 8; j++) {
                    int64_t dot = 0, bs = 0;
                    for (int l = 0; l < 32; l++) {
                        dot += q4_code(wb, 32 * j + l) * q[b].qs[32 * j + l];
                        bs += q[b].qs[32 * j + l];
                    }
                    s += double(q[b].d) * (double(h2f(wb.d)) * double((sc >> (8 * j)) & 255) * double(dot) -
                                           double(h2f(wb.dmin)) * double((m >> (8 * j)) & 255) * double(bs));
                }
            }
            yref[i * N + n] = s;
        }
    }
    std::vector<float> ya(size_t(M * N)), yb(size_t(M * N));
    const size_t rowb = size_t(nb) * sizeof(block_q4_K);
    auto run_a = [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; n++) {
            const uint8_t* wr = reinterpret_cast<const uint8_t*>(w.data()) + n * rowb;
            switch (M) {
                case 1: Q4KTile::run_pairs<1, 1>(wr, rowb, xq, xb, K, ya.data() + n, N); break;
                case 2: Q4KTile::run_pairs<2, 1>(wr, rowb, xq, xb, K, ya.data() + n, N); break;
                case 4: Q4KTile::run_pairs<4, 1>(wr, rowb, xq, xb, K, ya.data() + n, N); break;
                default: Q4KTile::run_pairs<8, 1>(wr, rowb, xq, xb, K, ya.data() + n, N); break;
            }
        }
    };
    auto run_b = [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; n++) {
            const LanePair* wr = wl.data() + n * np;
            switch (M) {
                case 1: lane_tile<1>(wr, np, xl.data(), np, yb.data() + n, N); break;
                case 2: lane_tile<2>(wr, np, xl.data(), np, yb.data() + n, N); break;
                case 4: lane_tile<4>(wr, np, xl.data(), np, yb.data() + n, N); break;
                default: lane_tile<8>(wr, np, xl.data(), np, yb.data() + n, N); break;
            }
        }
    };
    run_a(0, N);
    run_b(0, N);
    double ea = 0, eb = 0, scale = 0;
    for (size_t k = 0; k < yref.size(); k++) {
        ea = std::max(ea, std::fabs(ya[k] - yref[k]));
        eb = std::max(eb, std::fabs(yb[k] - yref[k]));
        scale = std::max(scale, std::fabs(yref[k]));
    }
    printf("N=%lld K=%lld M=%d threads=%d  max |err| / max |y|: today %.2e, lane %.2e\n", (long long)N, (long long)K, M,
           threads, ea / scale, eb / scale);
    // alternate the two kernels, best of 7 each
    double ta = 1e9, tb = 1e9;
    const int inner = std::max<int64_t>(1, 20000000 / (N * K));  // ~>= 10 ms per timed call
    for (int rep = 0; rep < 7; rep++) {
        double t0 = now();
        for (int r = 0; r < inner; r++) parallel_rows(N, threads, run_a);
        ta = std::min(ta, (now() - t0) / inner);
        t0 = now();
        for (int r = 0; r < inner; r++) parallel_rows(N, threads, run_b);
        tb = std::min(tb, (now() - t0) / inner);
    }
    const double gop = 2.0 * double(N) * double(K) * M * 1e-9;
    printf(
        "today (Q4KTile::run_pairs): %.3f ms  %.1f GOP/s\nlane layout:                %.3f ms  %.1f GOP/s  (%.2fx)\n",
        ta * 1e3, gop / ta, tb * 1e3, gop / tb, ta / tb);
    return 0;
}
