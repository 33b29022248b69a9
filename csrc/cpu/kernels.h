// Internal interface between the matmul driver (matmul.cpp) and the per-ISA
// kernel files (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp).
//
// The driver owns threading and tiling; a path only supplies, per weight type,
//   prep_x : turn one float32 row of X into the path's activation format
//            (Q8_K for Q4_K/Q6_K, Q8_0-like for Q8_0; null = X used as float32)
//   tile   : a small dense block of outputs, nw (<= kMaxTileW) rows of W
//            against nx (any count) prepared rows of X.
// Integer parts of every quantized dot product are exact in all paths (the
// same X quants, the same int32 sums as ggml's vec_dot_*), so paths differ
// only in the order of the float additions.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common/formats.h"

namespace mq::cpu::detail {

constexpr int kMaxTileW = 4;   // W rows per tile() call

// Y tile: y[i * ldy + j] = dot(X row i, W row j), i < nx, j < nw.
//   w: nw rows of W, row j at (const uint8_t*)w + j * w_stride   (GGUF bytes)
//   x: nx prepared X rows, row i at (const uint8_t*)x + i * x_stride
//   K: values per row (a multiple of the weight block size)
using TileFn = void (*)(const void* w, size_t w_stride, int nw, const void* x, size_t x_stride, int nx,
                        int64_t K, float* y, int64_t ldy);
// Prepare one X row of K floats into xq (x_row_bytes(K) bytes).
using PrepFn = void (*)(const float* x, void* xq, int64_t K);
using RowBytesFn = size_t (*)(int64_t K);

struct TypeKernels {
    PrepFn prep_x = nullptr;          // null: tile() reads float32 X directly
    RowBytesFn x_row_bytes = nullptr; // bytes of one prepared X row (when prep_x)
    TileFn tile = nullptr;
};

struct PathKernels {
    TypeKernels f32, f16, bf16, q8_0, q4_K, q6_K;
};

const PathKernels& scalar_kernels();
#if defined(MQ_X86)
const PathKernels& avx2_kernels();
const PathKernels& avx512_kernels();
uint64_t read_sum_avx2(const uint64_t* p, size_t n);
uint64_t read_sum_avx512(const uint64_t* p, size_t n);
#endif

// Helpers shared by the kernel files. They are `static` (or in an unnamed
// namespace) on purpose: each ISA file compiles them with its own flags, and
// an inline function with external linkage could let the linker pick the
// AVX-512 copy for the portable code.

// Tile runner: splits nx X rows into groups of NXG and calls
// Impl::template run<NX, NW>(w, ws, x, xs, K, y, ldy) with compile-time
// tile sizes, so the accumulators of one tile live in registers.
namespace {
template <class Impl, int NX>
inline void run_nw(int nw, const uint8_t* w, size_t ws, const uint8_t* x, size_t xs, int64_t K, float* y,
                   int64_t ldy) {
    switch (nw) {
        case 4: Impl::template run<NX, 4>(w, ws, x, xs, K, y, ldy); break;
        case 3: Impl::template run<NX, 3>(w, ws, x, xs, K, y, ldy); break;
        case 2: Impl::template run<NX, 2>(w, ws, x, xs, K, y, ldy); break;
        default: Impl::template run<NX, 1>(w, ws, x, xs, K, y, ldy); break;
    }
}
template <class Impl, int NXG>
void run_tile(const void* w, size_t ws, int nw, const void* x, size_t xs, int nx, int64_t K, float* y,
              int64_t ldy) {
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    const uint8_t* xb = static_cast<const uint8_t*>(x);
    int i = 0;
    for (; i + NXG <= nx; i += NXG) run_nw<Impl, NXG>(nw, wb, ws, xb + i * xs, xs, K, y + i * ldy, ldy);
    switch (nx - i) {   // remainder: fewer than NXG (<= 4) rows
        case 3: if constexpr (NXG > 3) run_nw<Impl, (NXG > 3 ? 3 : 1)>(nw, wb, ws, xb + i * xs, xs, K, y + i * ldy, ldy); break;
        case 2: if constexpr (NXG > 2) run_nw<Impl, (NXG > 2 ? 2 : 1)>(nw, wb, ws, xb + i * xs, xs, K, y + i * ldy, ldy); break;
        case 1: run_nw<Impl, 1>(nw, wb, ws, xb + i * xs, xs, K, y + i * ldy, ldy); break;
        default: break;
    }
}
}  // namespace

// Scalar helpers -----------------------------------------------------

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
