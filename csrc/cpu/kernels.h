// Internal interface between the matmul driver (matmul.cpp) and the per-ISA
// kernel files (kernels_scalar.cpp, kernels_avx2.cpp (also built as the avxvnni
// path by kernels_avxvnni.cpp), kernels_avx512.cpp).
//
// The driver owns threading and tiling; a CPU path supplies ONE KernelTable:
// per weight type (a TypeTable indexed by DType, as ggml's type_traits_cpu) a
// TypeKernels entry of
//   prep_x : turn one float32 row of X into the path's activation format
//            (Q8_K for Q4_K/Q6_K, Q8_0-like for Q8_0; null = X used as float32)
//   tile   : a small dense block of outputs, nw (<= kMaxTileW) rows of W
//            against nx (any count) prepared rows of X
//   panel_*: optionally, the panel GEMM for many X rows (below).
// Types a path leaves out of its table are not supported on it. The driver
// looks the entry up once per matmul call (never per row).
// Integer parts of every quantized dot product are exact in all paths (the
// same X quants, the same int32 sums as ggml's vec_dot_*), so paths differ
// only in the order of the float additions.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/formats.h"
#include "quants/quants.h"

namespace mq::cpu::detail {

// Bytes ahead of the decode tiles' W reads that they prefetch (matmul.cpp: by CPU vendor,
// set once when the library loads; read by simd_x86.h prefetch_w).
extern int g_w_prefetch;

constexpr int kMaxTileW = 4;  // W rows per tile() call

// Y tile: y[i * ldy + j] = dot(X row i, W row j), i < nx, j < nw.
//   w: nw rows of W, row j at (const uint8_t*)w + j * w_stride   (GGUF bytes)
//   x: nx prepared X rows, row i at (const uint8_t*)x + i * x_stride
//   K: values per row (a multiple of the weight block size)
using TileFn = void (*)(const void* w, size_t w_stride, int nw, const void* x, size_t x_stride, int nx, int64_t K,
                        float* y, int64_t ldy);
// Prepare one X row of K floats into xq (x_row_bytes(K) bytes).
using PrepFn = void (*)(const float* x, void* xq, int64_t K);
using RowBytesFn = size_t (*)(int64_t K);

// Optional "panel" GEMM for many X rows (Q4_K/Q6_K on AVX-512 and AVX2, Q8_0 on AVX2): X is
// prepared in panels of kPanelRows rows, interleaved so one 64-byte load holds
// 4 consecutive k of all 16 rows; W rows are unpacked once per task and each
// group of 4 W codes is broadcast against a panel (vpdpbusd: 64 useful MACs
// per instruction, AVX2 maddubs: 32; no horizontal sums). Same exact int32
// block sums as tile().
constexpr int kPanelRows = 16;
// Prepare rows [0, rows) (rows <= 16, the rest zero) of X (row stride ldx floats) into one panel.
using PanelPrepFn = void (*)(const float* x, int64_t ldx, int rows, void* panel, int64_t K);
// y[i * ldy + j] for the valid X rows i of n_panels panels (m_rows in all) and the nw W rows j.
using PanelGemmFn = void (*)(const void* w, size_t w_stride, int64_t nw, const void* panels, size_t panel_stride,
                             int n_panels, int64_t m_rows, int64_t K, float* y, int64_t ldy);

struct TypeKernels {
    PrepFn prep_x = nullptr;           // null: tile() reads float32 X directly
    RowBytesFn x_row_bytes = nullptr;  // bytes of one prepared X row (when prep_x)
    TileFn tile = nullptr;
    PanelPrepFn prep_panel = nullptr;  // panel route (optional, used for M >= kPanelMinRows)
    RowBytesFn panel_bytes = nullptr;  // bytes of one prepared panel for K
    PanelGemmFn panel_gemm = nullptr;
};
constexpr int kPanelMinRows = 16;

// One CPU path's kernels, per weight type.
using KernelTable = TypeTable<TypeKernels>;

// The paths' tables (matmul.cpp's path table lists them with their CPU checks).
const KernelTable& scalar_kernels();
#if defined(MQ_X86)
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();
void quantize_row_q8_K_avx2(const float* x, block_q8_K* y, int64_t k);
void quantize_row_q8_0_avx2(const float* x, block_q8_0* y, int64_t k);
void quantize_row_q8_K_avx512(const float* x, block_q8_K* y, int64_t k);
void quantize_row_q8_0_avx512(const float* x, block_q8_0* y, int64_t k);
uint64_t read_sum_avx2(const uint64_t* p, size_t n);
uint64_t read_sum_avx512(const uint64_t* p, size_t n);
#endif
#if defined(MQ_AVXVNNI_BUILD)
const KernelTable& avxvnni_kernels();  // kernels_avx2.cpp built with AVX-VNNI (its quantizers: the _avx2 ones)
#endif
#if defined(MQ_AMX_BUILD)
const KernelTable& amx_kernels();  // avx512's table with the Q8_0 panel on AMX tiles (kernels_amx.cpp)
#endif

// Helpers shared by the kernel files. They are `static` (or in an unnamed
// namespace) on purpose: each ISA file compiles them with its own flags, and
// an inline function with external linkage could let the linker pick the
// AVX-512 copy for the portable code.

// Tile runner: splits the nx X rows into groups of NXG and the nw (<= 4) W
// rows into groups of NWG (NWGD when the X group has <= 2 rows) and calls Impl::template run<NX, NW>(w, ws, x, xs,
// K, y, ldy) with compile-time tile sizes, so one tile's accumulators live in
// registers. Remainder groups get the smaller sizes.
namespace {
template <class Impl, int NX>
inline void run_nw(int nw, const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y, int64_t ldy) {
    switch (nw) {
        case 4: Impl::template run<NX, 4>(w, ws, x, xs, K, y, ldy); break;
        case 3: Impl::template run<NX, 3>(w, ws, x, xs, K, y, ldy); break;
        case 2: Impl::template run<NX, 2>(w, ws, x, xs, K, y, ldy); break;
        default: Impl::template run<NX, 1>(w, ws, x, xs, K, y, ldy); break;
    }
}
// NX <= 2 (decode) uses W groups of NWGD rows instead of NWG.
template <class Impl, int NX, int NWG, int NWGD>
inline void run_x_group(int nw, const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y,
                        int64_t ldy) {
    constexpr int G = NX <= 2 ? NWGD : NWG;
    for (int j = 0; j < nw; j += G) run_nw<Impl, NX>(nw - j < G ? nw - j : G, w + j * ws, ws, x, xs, K, y + j, ldy);
}
template <class Impl, int NXG, int NWG = kMaxTileW, int NWGD = NWG>
void run_tile(const void* w, size_t ws, int nw, const void* x, size_t xs, int nx, int64_t K, float* y, int64_t ldy) {
    static_assert(NXG >= 1 && NXG <= 8 && NWG >= 1 && NWG <= kMaxTileW, "tile sizes");
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    const uint8_t* xb = static_cast<const uint8_t*>(x);
    int i = 0;
    for (; i + NXG <= nx; i += NXG) run_x_group<Impl, NXG, NWG, NWGD>(nw, wb, ws, xb + i * xs, xs, K, y + i * ldy, ldy);
    // remainder (< NXG rows): groups of 4, 2, 1 (each only if smaller than NXG)
    if constexpr (NXG > 4) {
        if (nx - i >= 4) {
            run_x_group<Impl, 4, NWG, NWGD>(nw, wb, ws, xb + i * xs, xs, K, y + i * ldy, ldy);
            i += 4;
        }
    }
    if constexpr (NXG > 2) {
        if (nx - i >= 2) {
            run_x_group<Impl, 2, NWG, NWGD>(nw, wb, ws, xb + i * xs, xs, K, y + i * ldy, ldy);
            i += 2;
        }
    }
    if constexpr (NXG > 1) {
        if (nx - i >= 1) {
            run_x_group<Impl, 1, NWG, NWGD>(nw, wb, ws, xb + i * xs, xs, K, y + i * ldy, ldy);
            i += 1;
        }
    }
}
}  // namespace

// Scalar helpers -----------------------------------------------------

// X rows in ggml's reference activation formats (the bytes of
// quantize_row_q8_K_ref / quantize_row_q8_0_ref), for the paths whose tiles
// read them as they are (prep_x / x_row_bytes of a TypeKernels entry).
static inline void prep_q8_K_ref(const float* x, void* xq, int64_t K) {
    quantize_row_q8_K_ref(x, static_cast<block_q8_K*>(xq), K);
}
static inline void prep_q8_0_ref(const float* x, void* xq, int64_t K) {
    quantize_row_q8_0_ref(x, static_cast<block_q8_0*>(xq), K);
}
static inline size_t bytes_q8_K(int64_t K) { return size_t(K / QK_K) * sizeof(block_q8_K); }
static inline size_t bytes_q8_0(int64_t K) { return size_t(K / QK8_0) * sizeof(block_q8_0); }

// Q4_K's 12 packed bytes -> 8 six-bit scales and 8 six-bit mins, as two
// little-endian 64-bit words (byte j = value j). Same values as
// get_scale_min_k4(j, ...) for j = 0..7 (ggml-quants.c), done 4 at a time:
//   sc[0..3] = q[0..3] & 63          m[0..3] = q[4..7] & 63
//   sc[4..7] = (q[8..11] & 15) | (q[0..3] >> 6) << 4
//   m[4..7]  = (q[8..11] >> 4) | (q[4..7] >> 6) << 4
static inline void unpack_q4_K_scales(const uint8_t* q, uint64_t* sc, uint64_t* m) {
    uint32_t a, b, c;
    __builtin_memcpy(&a, q, 4);
    __builtin_memcpy(&b, q + 4, 4);
    __builtin_memcpy(&c, q + 8, 4);
    const uint32_t sc_lo = a & 0x3f3f3f3fu;
    const uint32_t m_lo = b & 0x3f3f3f3fu;
    const uint32_t sc_hi = (c & 0x0f0f0f0fu) | (((a >> 6) & 0x03030303u) << 4);
    const uint32_t m_hi = ((c >> 4) & 0x0f0f0f0fu) | (((b >> 6) & 0x03030303u) << 4);
    *sc = uint64_t(sc_lo) | (uint64_t(sc_hi) << 32);
    *m = uint64_t(m_lo) | (uint64_t(m_hi) << 32);
}

}  // namespace mq::cpu::detail
