// The amx path: the AVX-512 path (kernels_avx512.cpp) with the Q8_0 panel GEMM (M >= 16: the
// vision tower, the projector, a Q8_0 model's prefill) on Intel AMX tiles (Sapphire Rapids and
// later Xeons). Compiled with -mamx-tile -mamx-int8 and the AVX-512 flags (CMakeLists.txt); the
// path is chosen only where the CPU has AMX-TILE + AMX-INT8, the OS saves the tile state (XCR0
// bits 17-18) and Linux grants this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM,
// matmul.cpp amx_ok). Everything else is the avx512 table's.
//
// One TDPBSSD (signed x signed bytes -> int32, Intel SDM vol. 2 "TDPBSSD") of
//   A = 16 W rows x 32 codes   (tile rows 32 bytes: each row's Q8_0 block qs, loaded straight
//                               from the GGUF rows with the row stride: no unpacking)
//   B = the X panel's block    (panel_gemm.h: q [8 groups][16 rows][4] is AMX's B layout,
//                               K/4 = 8 rows of 16 x 4 bytes)
// gives C [16 W rows][16 X rows] = the exact int32 sum of each (W row, X row) block, the sumi
// of dot_q8_0 and of the avx512 panel (which gets it as sum(u x) - 128 sum(x)). The float
// epilogue is the avx512 micro-kernel's, in the same order (per block: acc += cvt(C) *
// (dw * dx), blocks ascending), so the amx path gives the avx512 path's bits
// (test_amx_same_floats_as_avx512). Q8_0's per-block scales mean one C tile stored per 32
// values and a float epilogue of 16 x (cvt, mul, FMA) per block, which bounds the kernel:
// measured on a 2-core Intel Xeon guest (AMX, 480 MiB L3), one thread, M = 512: a TDPBSSD of
// K = 32 alone takes ~5 ns, tile loads + store + TDPBSSD ~12 ns, the epilogue ~8 ns, and they
// barely overlap (panel16: ~22 ns per block and 16 x 16 outputs, ~730 GOP/s in L2); Q8_0
// matmuls 1.5-1.8x the avx512 path's (bench/results/2026-12-04-xeon-amx-2c.md).
#include <immintrin.h>

#include <cstddef>
#include <vector>

#include "common/fp16.h"
#include "cpu/kernels.h"
#include "cpu/panel_gemm.h"

namespace mq::cpu::detail {
namespace {

constexpr int kTileW = 16;  // W rows per A tile (and C rows)

// Tile configuration (palette 1; Intel SDM vol. 1 "Intel AMX", LDTILECFG's 64-byte operand).
//   tmm0, tmm1  C  16 rows x 64 bytes (16 int32)     even / odd blocks' accumulators
//   tmm2, tmm4  A  16 rows x 32 bytes (one block of 16 W rows)   even / odd blocks
//   tmm3, tmm5  B   8 rows x 64 bytes (one block of the X panel) even / odd blocks
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 32, 64, 32, 64};
    uint8_t rows[16] = {16, 16, 16, 8, 16, 8};
};

// out[t][i] (t < 16 W rows, i < 16 X rows) of one panel against 16 W rows:
//   w: the W rows' Q8_0 blocks, row t at w + t * ws;  dw [nb][16]: their scales as floats;
//   P: the panel (nb blocks of kPanelBlockQ80 bytes).
// acc[t] holds row t's 16 X lanes (the avx512 micro-kernel's facc). Even and odd blocks
// have their own tiles, and block b + 1's TDPBSSD is issued before block b's C is stored
// and goes through the float epilogue, so the tile unit and the vector units overlap.
// GCC's _tile_stored clobbers all memory, which makes the compiler keep acc[] in memory (a
// store and reload of all 16 accumulators around every tile store: half the speed). This one
// says what it writes: the 1 KiB C buffer.
#define MQ_TILE_STORE_C(T, buf)                                                                \
    __asm__ volatile("{tilestored\t%%tmm" #T ", (%1,%2,1)|tilestored\t[%1+%2*1], %%tmm" #T "}" \
                     : "=m"(*reinterpret_cast<int32_t (*)[kTileW * 16]>(buf))                  \
                     : "r"(buf), "r"(64L))
// Block b's float epilogue from the stored C: acc[t] += cvt(C[t]) * (dw[t][b] * dx[b]).
#define MQ_AMX_EPILOGUE(b)                                                                                       \
    do {                                                                                                         \
        const __m512 dx = _mm512_load_ps(reinterpret_cast<const float*>(P + (b) * kPanelBlockQ80 + kQ80PanelD)); \
        const float* d = dw + (b) * kTileW;                                                                      \
        for (int t = 0; t < kTileW; t++) {                                                                       \
            const __m512 f = _mm512_cvtepi32_ps(_mm512_load_si512(c + 16 * t));                                  \
            acc[t] = _mm512_fmadd_ps(f, _mm512_mul_ps(_mm512_set1_ps(d[t]), dx), acc[t]);                        \
        }                                                                                                        \
    } while (0)
// Block b into C tile TC through A tile TA and B tile TB.
#define MQ_AMX_ISSUE(TC, TA, TB, b)                         \
    do {                                                    \
        _tile_zero(TC);                                     \
        _tile_loadd(TA, a + (b) * sizeof(block_q8_0), lda); \
        _tile_loadd(TB, P + (b) * kPanelBlockQ80, 64);      \
        _tile_dpbssd(TC, TA, TB);                           \
    } while (0)

void panel16(const uint8_t* w, size_t ws, const float* dw, int64_t nb, const uint8_t* P, float* out) {
    __m512 acc[kTileW];
    for (int t = 0; t < kTileW; t++) acc[t] = _mm512_setzero_ps();
    alignas(64) int32_t c[kTileW * 16];  // one stored C tile
    const long lda = static_cast<long>(ws);
    const uint8_t* a = w + offsetof(block_q8_0, qs);  // row 0's block 0 codes
    // Tile numbers are immediates, hence the spelled-out even / odd halves.
    MQ_AMX_ISSUE(0, 2, 3, 0);
    for (int64_t b = 0; b < nb; b += 2) {
        const bool odd = b + 1 < nb;
        if (odd) MQ_AMX_ISSUE(1, 4, 5, b + 1);
        MQ_TILE_STORE_C(0, c);
        MQ_AMX_EPILOGUE(b);
        if (b + 2 < nb) MQ_AMX_ISSUE(0, 2, 3, b + 2);
        if (odd) {
            MQ_TILE_STORE_C(1, c);
            MQ_AMX_EPILOGUE(b + 1);
        }
    }
    for (int t = 0; t < kTileW; t++) _mm512_store_ps(out + 16 * t, acc[t]);
}
#undef MQ_AMX_ISSUE
#undef MQ_AMX_EPILOGUE
#undef MQ_TILE_STORE_C

// PanelGemmFn (kernels.h) for Q8_0: W rows in groups of 16 on the tiles; a last group of
// fewer than 16 rows goes to the avx512 panel (same bits).
void panel_gemm_q8_0_amx(const void* w, size_t ws, int64_t nw, const void* panels, size_t pstride, int n_panels,
                         int64_t m_rows, int64_t K, float* y, int64_t ldy) {
    static const PanelGemmFn avx512_panel = avx512_kernels().find(DType::Q8_0)->panel_gemm;
    const int64_t nb = K / QK8_0;
    const int64_t n16 = nw / kTileW * kTileW;
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    const uint8_t* pp = static_cast<const uint8_t*>(panels);
    if (n16 > 0) {
        // The tile state is per thread: configure on entry, release on exit (the OS then needs
        // not save 8 KiB of tile data for this thread on every switch; keeping it configured
        // across calls measured the same).
        static const TileConfig cfg;
        _tile_loadconfig(&cfg);
        thread_local std::vector<float> dw;  // [nb][16] the group's W scales as floats
        if (dw.size() < size_t(kTileW * nb)) dw.resize(size_t(kTileW * nb));
        alignas(64) float out[kTileW * kPanelRows];
        for (int64_t j0 = 0; j0 < n16; j0 += kTileW) {
            const uint8_t* wg = wb + j0 * ws;
            for (int t = 0; t < kTileW; t++) {
                const block_q8_0* row = reinterpret_cast<const block_q8_0*>(wg + t * ws);
                for (int64_t b = 0; b < nb; b++) dw[b * kTileW + t] = fp16_to_fp32(row[b].d);
            }
            for (int p = 0; p < n_panels; p++) {
                panel16(wg, ws, dw.data(), nb, pp + p * pstride, out);
                const int64_t left = m_rows - int64_t(p) * kPanelRows;
                const int64_t rows = left < kPanelRows ? left : kPanelRows;
                for (int64_t i = 0; i < rows; i++)
                    for (int t = 0; t < kTileW; t++) y[(int64_t(p) * kPanelRows + i) * ldy + j0 + t] = out[16 * t + i];
            }
        }
        _tile_release();
    }
    if (n16 < nw) avx512_panel(wb + n16 * ws, ws, nw - n16, panels, pstride, n_panels, m_rows, K, y + n16, ldy);
}

}  // namespace

const KernelTable& amx_kernels() {
    static const KernelTable k = [] {
        const KernelTable& base = avx512_kernels();
        TypeKernels q80 = *base.find(DType::Q8_0);
        q80.panel_gemm = panel_gemm_q8_0_amx;
        return base.with(DType::Q8_0, q80);
    }();
    return k;
}

}  // namespace mq::cpu::detail
