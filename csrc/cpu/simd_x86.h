// Helpers shared by the x86 SIMD kernel files (kernels_avx2.cpp,
// kernels_avx512.cpp; include only from files built with F16C). `static` /
// the unnamed namespace keep each including file's copy private to its ISA flags.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace mq::cpu::detail {
namespace {

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }  // fp16 bits -> float (F16C)

// Software prefetch of BYTES of W, kWPrefetch bytes ahead, for the decode-sized
// tiles (few X rows: the kernel streams W from DRAM; the tiles then take one W
// row at a time, a single sequential stream the prefetch keeps ahead of the
// arithmetic). On AVX-512 this made M = 1 on 14336 x 4096 / 128256 x 4096
// 1.3-2.5x faster on one thread here (measured: Q6_K 3.1 -> 1.1 ms, Q8_0
// 3.5 -> 1.5 ms, Q4_K 1.0 -> 0.9 ms); the AVX2 decode tiles use the same scheme.
// Distance and hint: 2048 bytes into L2 (T1; the L1 streamer brings it the rest of the
// way). On a 2-core Intel Xeon guest (AMX, 480 MiB L3) the 11B q4_k_m decode step took
// 306-311 ms with 4096 / T0, 302-304 with 16384 / T0, 280-282 with 2048 / T0, 268-272
// with 4096 / T1, 284-285 with 1024 / T1 and 257-264 with 2048 / T1 (avx2 path: 304 ->
// 265 ms): on Intel an L1 prefetch holds one of the few fill buffers until the line
// arrives, an L2 prefetch does not. (bench/results/2026-12-04-xeon-amx-2c.md; on Zen 4,
// T1 / NTA against T0 for the M = 4 tiles measured within the noise.) MQ_WPF /
// MQ_WPF_HINT: compile-time overrides for such sweeps.
#ifndef MQ_WPF
#define MQ_WPF 2048
#endif
constexpr int kWPrefetch = MQ_WPF;
#ifndef MQ_WPF_HINT
#define MQ_WPF_HINT _MM_HINT_T1
#endif
template <int BYTES>
inline void prefetch_w(const void* p) {
    const char* c = static_cast<const char*>(p) + kWPrefetch;
    for (int o = 0; o < BYTES; o += 64) _mm_prefetch(c + o, MQ_WPF_HINT);
}

}  // namespace
}  // namespace mq::cpu::detail
