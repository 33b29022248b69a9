// Helpers shared by the x86 SIMD kernel files (kernels_avx2.cpp,
// kernels_avx512.cpp; include only from files built with F16C). `static` /
// the unnamed namespace keep each including file's copy private to its ISA flags.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "cpu/kernels.h"  // g_w_prefetch

namespace mq::cpu::detail {
namespace {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }  // fp16 bits -> float (F16C)

// Software prefetch of BYTES of W, g_w_prefetch bytes ahead (kernels.h), for the
// decode-sized tiles (few X rows: the kernel streams W from DRAM; the tiles then take one
// W row at a time, a single sequential stream the prefetch keeps ahead of the arithmetic).
// On AVX-512 this made M = 1 on 14336 x 4096 / 128256 x 4096 1.3-2.5x faster on one
// thread (measured: Q6_K 3.1 -> 1.1 ms, Q8_0 3.5 -> 1.5 ms, Q4_K 1.0 -> 0.9 ms); the AVX2
// decode tiles use the same scheme. Into L2 (T1; the L1 streamer brings it the rest of the
// way): on a 2-core Intel Xeon guest an L1 prefetch (T0) holds one of the few fill buffers
// until the line arrives, an L2 prefetch does not (11B decode step 2048 B: T0 280-282 ms,
// T1 257-264; bench/results/2026-12-04-xeon-amx-2c.md); on Zen 4, T0 made the 4-sequence
// step slower (8192 B: 238-246 against 189-203 ms for T1) and T2 measured as T1. The
// distance depends on the CPU (matmul.cpp default_w_prefetch). MQ_WPF / MQ_WPF_HINT:
// compile-time overrides for such sweeps.
#ifndef MQ_WPF_HINT
#define MQ_WPF_HINT _MM_HINT_T1
#endif
template <int BYTES>
inline void prefetch_w(const void* p) {
    const char* c = static_cast<const char*>(p) + g_w_prefetch;
    for (int o = 0; o < BYTES; o += 64) _mm_prefetch(c + o, MQ_WPF_HINT);
}

}  // namespace
}  // namespace mq::cpu::detail
