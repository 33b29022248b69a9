// X-panel packing and W-row unpacking of the panel GEMM (M >= 16) for Q4_K and
// Q6_K weights, shared by kernels_avx2.cpp and kernels_avx512.cpp. Only the
// dot-product micro-kernels differ between the two; this part is plain C++.
//
// X panel (kPanelRows = 16 rows of X), per 256-value block, kPanelBlock bytes:
//   q    [64 groups][16 rows][4]  Q8_K quants, 4 consecutive k of each row per group
//   d    [16] float               Q8_K scale of each row
//   bs   [8 pairs][16 rows][2]    int16 sub-block sums of the quants (Q4_K: 8 sums
//                                 of 32 values; Q6_K: 16 sums of 16), two per int32 lane
// W rows are unpacked per block into WUnpT: the 256 codes as bytes in value order
// (Q4_K 0..15, Q6_K 0..63), the sub-block scales (Sc: int16 for AVX2 madd, int32
// for AVX-512 vpmulld), and int16 pairs of the coefficient of the bsums term
// (Q4_K: the mins m_s; Q6_K: 32 * sc_s).
//
// Everything here has internal linkage (anonymous namespace): each ISA file is
// compiled with its own -m flags and must get its own copy, never one the linker
// picked from a file built for a wider ISA.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/fp16.h"
#include "cpu/kernels.h"
#include "quants/quants.h"

namespace mq::cpu::detail {
namespace {

constexpr int kPanelBlock = 4096 + 64 + 512;

template <typename Sc>
struct alignas(64) WUnpT {
    uint8_t q[QK_K];
    Sc sc[16];
    uint32_t cm2[8];
    float d, dmin;
};

// QuantizeBlock(x, y): 256 floats -> one Q8_K block (ggml's reference bytes).
template <bool Q4, void (*QuantizeBlock)(const float*, block_q8_K*)>
void prep_panel(const float* x, int64_t ldx, int rows, void* panel, int64_t K) {
    uint8_t* P = static_cast<uint8_t*>(panel);
    const int64_t nb = K / QK_K;
    for (int r = 0; r < kPanelRows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            uint8_t* pb = P + b * kPanelBlock;
            block_q8_K q;
            if (r < rows) QuantizeBlock(x + r * ldx + QK_K * b, &q);
            else std::memset(&q, 0, sizeof(q));   // padding row: contributes zeros, never written out
            for (int g = 0; g < 64; g++) std::memcpy(pb + 64 * g + 4 * r, q.qs + 4 * g, 4);
            reinterpret_cast<float*>(pb + 4096)[r] = q.d;
            int16_t* bs = reinterpret_cast<int16_t*>(pb + 4096 + 64);
            for (int pp = 0; pp < 8; pp++) {
                int16_t lo = 0, hi = 0;
                if (Q4) {
                    if (pp < 4) {
                        lo = int16_t(q.bsums[4 * pp] + q.bsums[4 * pp + 1]);
                        hi = int16_t(q.bsums[4 * pp + 2] + q.bsums[4 * pp + 3]);
                    }
                } else {
                    lo = q.bsums[2 * pp];
                    hi = q.bsums[2 * pp + 1];
                }
                bs[32 * pp + 2 * r] = lo;
                bs[32 * pp + 2 * r + 1] = hi;
            }
        }
    }
}

size_t panel_bytes(int64_t K) { return size_t(K / QK_K) * kPanelBlock; }

template <typename Sc>
void unpack_w_q4_K(const uint8_t* row, int64_t nb, WUnpT<Sc>* out) {
    const block_q4_K* wb = reinterpret_cast<const block_q4_K*>(row);
    for (int64_t b = 0; b < nb; b++) {
        WUnpT<Sc>& u = out[b];
        for (int sb = 0; sb < 8; sb++) {
            const uint8_t* q = wb[b].qs + 32 * (sb / 2);
            const int shift = 4 * (sb & 1);
            for (int l = 0; l < 32; l++) u.q[32 * sb + l] = (q[l] >> shift) & 0xF;
        }
        uint64_t sc8, m8;
        unpack_q4_K_scales(wb[b].scales, &sc8, &m8);
        for (int s = 0; s < 16; s++) u.sc[s] = s < 8 ? Sc((sc8 >> (8 * s)) & 0xff) : 0;
        for (int pp = 0; pp < 8; pp++) {
            const uint32_t lo = pp < 4 ? uint32_t((m8 >> (16 * pp)) & 0xff) : 0;
            const uint32_t hi = pp < 4 ? uint32_t((m8 >> (16 * pp + 8)) & 0xff) : 0;
            u.cm2[pp] = lo | (hi << 16);
        }
        u.d = fp16_to_fp32(wb[b].d);
        u.dmin = fp16_to_fp32(wb[b].dmin);
    }
}

template <typename Sc>
void unpack_w_q6_K(const uint8_t* row, int64_t nb, WUnpT<Sc>* out) {
    const block_q6_K* wb = reinterpret_cast<const block_q6_K*>(row);
    for (int64_t b = 0; b < nb; b++) {
        WUnpT<Sc>& u = out[b];
        for (int h = 0; h < 2; h++) {   // value order as ggml's dequantize_row_q6_K
            const uint8_t* ql = wb[b].ql + 64 * h;
            const uint8_t* qh = wb[b].qh + 32 * h;
            uint8_t* o = u.q + 128 * h;
            for (int l = 0; l < 32; l++) {
                o[l + 0] = uint8_t((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4));
                o[l + 32] = uint8_t((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
                o[l + 64] = uint8_t((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                o[l + 96] = uint8_t((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
            }
        }
        for (int s = 0; s < 16; s++) u.sc[s] = wb[b].scales[s];
        for (int pp = 0; pp < 8; pp++) {
            const uint32_t lo = uint16_t(int16_t(32 * wb[b].scales[2 * pp]));
            const uint32_t hi = uint16_t(int16_t(32 * wb[b].scales[2 * pp + 1]));
            u.cm2[pp] = lo | (hi << 16);
        }
        u.d = fp16_to_fp32(wb[b].d);
        u.dmin = 0.0f;
    }
}

}  // namespace
}  // namespace mq::cpu::detail
