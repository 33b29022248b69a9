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
#ifndef MQ_WPF
#define MQ_WPF 4096
#endif
constexpr int kWPrefetch = MQ_WPF;
template <int BYTES>
inline void prefetch_w(const void* p) {
    const char* c = static_cast<const char*>(p) + kWPrefetch;
    for (int o = 0; o < BYTES; o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

}  // namespace
}  // namespace mq::cpu::detail
