// Panel GEMM (M >= 16), the parts shared by kernels_avx2.cpp and
// kernels_avx512.cpp: the X-panel packing, the W-row unpacking and the driver
// panel_gemm<U, Micro>, templated on the W format's unpacker U and the ISA's
// micro-kernel (its vector width). Only the micro-kernels differ between the
// two files; this part is plain C++.
//
// K-quant X panel (kPanelRows = 16 rows of X), per 256-value block, kPanelBlock bytes:
//   q    [64 groups][16 rows][4]  Q8_K quants, 4 consecutive k of each row per group
//   d    [16] float               Q8_K scale of each row
//   bs   [8 pairs][16 rows][2]    int16 sub-block sums of the quants (Q4_K: 8 sums
//                                 of 32 values; Q6_K: 16 sums of 16), two per int32 lane
// W rows are unpacked per block into WUnpT: the 256 codes as bytes in value order
// (Q4_K 0..15, Q6_K 0..63), the sub-block scales (Sc: int16 for AVX2 madd, int32
// for AVX-512 vpmulld), and int16 pairs of the coefficient of the bsums term
// (Q4_K: the mins m_s; Q6_K: 32 * sc_s).
//
// Q8_0 X panel, per 32-value block, kPanelBlockQ80 bytes:
//   q    [8 groups][16 rows][4]   Q8_0 quants (quantize_row_q8_0_ref's bytes)
//   d    [16] float               each row's block scale (its fp16 d, widened)
//   c    [16] int32               128 * the sum of each row's 32 quants: the term the
//                                 unsigned-W micro-kernels (u = w + 128) take off each
//                                 block's int32 sum; made once here instead of once per
//                                 micro call (8 vpdpbusd per block and call)
// Q8_0 W rows are unpacked per block into WUnpQ80 (AVX2): the 32 signed codes, their
// absolute values (the unsigned operand of maddubs) and d as a float; or into
// WUnpQ80U (AVX-512): the codes + 128 and d.
//
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

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

// The X-panel packer of both formats: rows [0, rows) of X, every block of K / kBK
// values quantized by QuantizeBlock (ggml's reference bytes) into a Block, then
// Pack(q, r, pb) spreads row r's block into the panel block pb (kBytes apart);
// padding rows (r >= rows) pack an all-zero block: they contribute zeros and are
// never written out.
template <class Block, int64_t kBK, size_t kBytes, void (*QuantizeBlock)(const float*, Block*), class Pack>
void pack_panel(const float* x, int64_t ldx, int rows, void* panel, int64_t K, Pack pack) {
    uint8_t* P = static_cast<uint8_t*>(panel);
    const int64_t nb = K / kBK;
    for (int r = 0; r < kPanelRows; r++) {
        for (int64_t b = 0; b < nb; b++) {
            Block q;
            if (r < rows) QuantizeBlock(x + r * ldx + kBK * b, &q);
            else std::memset(&q, 0, sizeof(q));
            pack(q, r, P + b * kBytes);
        }
    }
}

// QuantizeBlock(x, y): 256 floats -> one Q8_K block.
template <bool Q4, void (*QuantizeBlock)(const float*, block_q8_K*)>
void prep_panel(const float* x, int64_t ldx, int rows, void* panel, int64_t K) {
    pack_panel<block_q8_K, QK_K, kPanelBlock, QuantizeBlock>(
        x, ldx, rows, panel, K, [](const block_q8_K& q, int r, uint8_t* pb) {
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
        });
}

[[maybe_unused]] size_t panel_bytes(int64_t K) { return size_t(K / QK_K) * kPanelBlock; }

// Byte offsets of the Q8_0 panel block's fields (layout above).
constexpr int kQ80PanelD = 512, kQ80PanelC = 512 + 64, kPanelBlockQ80 = 512 + 64 + 64;

// QuantizeBlock(x, y): 32 floats -> one Q8_0 block.
template <void (*QuantizeBlock)(const float*, block_q8_0*)>
void prep_panel_q8_0(const float* x, int64_t ldx, int rows, void* panel, int64_t K) {
    pack_panel<block_q8_0, QK8_0, kPanelBlockQ80, QuantizeBlock>(
        x, ldx, rows, panel, K, [](const block_q8_0& q, int r, uint8_t* pb) {
            for (int g = 0; g < 8; g++) std::memcpy(pb + 64 * g + 4 * r, q.qs + 4 * g, 4);
            reinterpret_cast<float*>(pb + kQ80PanelD)[r] = fp16_to_fp32(q.d);
            int32_t sum = 0;
            for (int l = 0; l < QK8_0; l++) sum += q.qs[l];
            reinterpret_cast<int32_t*>(pb + kQ80PanelC)[r] = 128 * sum;
        });
}

[[maybe_unused]] size_t panel_bytes_q8_0(int64_t K) { return size_t(K / QK8_0) * kPanelBlockQ80; }

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
        for (int h = 0; h < 2; h++) {  // value order as ggml's dequantize_row_q6_K
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

struct alignas(32) WUnpQ80 {
    int8_t q[QK8_0];   // the codes
    uint8_t a[QK8_0];  // |code| (128 for -128), maddubs' unsigned operand
    float d;
};

void unpack_w_q8_0(const uint8_t* row, int64_t nb, WUnpQ80* out) {
    const block_q8_0* wb = reinterpret_cast<const block_q8_0*>(row);
    for (int64_t b = 0; b < nb; b++) {
        for (int l = 0; l < QK8_0; l++) {
            const int v = wb[b].qs[l];
            out[b].q[l] = int8_t(v);
            out[b].a[l] = uint8_t(v < 0 ? -v : v);
        }
        out[b].d = fp16_to_fp32(wb[b].d);
    }
}

// The W formats of the driver: WUnp (one unpacked block), kBlock (values per
// block), unpack(row, nb, out) (nb blocks of one GGUF row).
template <typename Sc, bool Q4>
struct PanelKQuant {
    using WUnp = WUnpT<Sc>;
    static constexpr int64_t kBlock = QK_K;
    static constexpr bool kQ4 = Q4;
    static void unpack(const uint8_t* row, int64_t nb, WUnp* out) {
        if (Q4) unpack_w_q4_K(row, nb, out);
        else unpack_w_q6_K(row, nb, out);
    }
};
template <typename Sc>
using PanelQ4K = PanelKQuant<Sc, true>;
template <typename Sc>
using PanelQ6K = PanelKQuant<Sc, false>;
struct PanelQ80 {
    using WUnp = WUnpQ80;
    static constexpr int64_t kBlock = QK8_0;
    static void unpack(const uint8_t* row, int64_t nb, WUnp* out) { unpack_w_q8_0(row, nb, out); }
};

// Q8_0 W rows for vpdpbusd (AVX-512 VNNI: unsigned x signed bytes, no vpsignb on zmm):
// the codes shifted to unsigned, u = w + 128 (an XOR with 0x80), and d as a float; the
// micro-kernel takes the extra 128 * sum(x) off per block.
struct WUnpQ80U {
    uint8_t u[QK8_0];  // w + 128
    float d;
};
struct PanelQ80U {
    using WUnp = WUnpQ80U;
    static constexpr int64_t kBlock = QK8_0;
    static void unpack(const uint8_t* row, int64_t nb, WUnp* out) {
        const block_q8_0* wb = reinterpret_cast<const block_q8_0*>(row);
        for (int64_t b = 0; b < nb; b++) {
            for (int l = 0; l < QK8_0; l++) out[b].u[l] = uint8_t(wb[b].qs[l]) ^ 0x80u;
            out[b].d = fp16_to_fp32(wb[b].d);
        }
    }
};

// The driver. W rows are unpacked Micro::kMaxRows at a time (once per task and
// kept in L1/L2), then each panel is multiplied by them in groups of 8 / 4 / 2 / 1
// rows (8 only when kMaxRows >= 8) and the valid rows of out are copied to y.
// U: one of the W formats above (its WUnp must be the one Micro reads).
// Micro (one per ISA file and format family):
//   kMaxRows  W rows unpacked at once and the widest micro call (AVX2 4, AVX-512 8)
//   kLanes    X rows per micro call: 8 (a ymm holds half a panel) or 16 (zmm)
//   run<U, NWR>(wu, nb, panel, part, out): W rows t < NWR (row t: nb unpacked
//             blocks at wu + t * nb) against panel rows [kLanes * part, kLanes * (part + 1)):
//             out[t * 16 + i] = dot(W row t, X row i) for those i.
// The arguments are those of PanelGemmFn (kernels.h).
template <class U, class Micro>
void panel_gemm(const void* w, size_t ws, int64_t nw, const void* panels, size_t pstride, int n_panels, int64_t m_rows,
                int64_t K, float* y, int64_t ldy) {
    using WUnp = typename U::WUnp;
    constexpr int kMax = Micro::kMaxRows;
    static_assert(kMax == 4 || kMax == 8, "micro-kernel row groups");
    static_assert(kPanelRows % Micro::kLanes == 0, "micro-kernel lanes");
    const int64_t nb = K / U::kBlock;
    thread_local std::vector<WUnp> scratch;  // kMax unpacked W rows
    if (scratch.size() < size_t(kMax * nb)) scratch.resize(size_t(kMax * nb));
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    const uint8_t* pp = static_cast<const uint8_t*>(panels);
    alignas(64) float out[kMax * kPanelRows];
    for (int64_t j0 = 0; j0 < nw; j0 += kMax) {
        const int nwr = int(nw - j0 < kMax ? nw - j0 : kMax);
        for (int t = 0; t < nwr; t++) U::unpack(wb + (j0 + t) * ws, nb, scratch.data() + t * nb);
        for (int p = 0; p < n_panels; p++) {
            const uint8_t* P = pp + p * pstride;
            const int64_t left_rows = m_rows - int64_t(p) * kPanelRows;
            const int64_t rows = left_rows < kPanelRows ? left_rows : kPanelRows;
            const int parts = int((rows + Micro::kLanes - 1) / Micro::kLanes);  // skip all-padding parts
            for (int part = 0; part < parts; part++) {
                int t0 = 0;  // W rows in groups of 8 / 4 / 2 / 1
                while (t0 < nwr) {
                    const int left = nwr - t0;
                    const WUnp* wu = scratch.data() + t0 * nb;
                    float* o = out + 16 * t0;
                    if constexpr (kMax >= 8) {
                        if (left >= 8) {
                            Micro::template run<U, 8>(wu, nb, P, part, o);
                            t0 += 8;
                            continue;
                        }
                    }
                    if (left >= 4) {
                        Micro::template run<U, 4>(wu, nb, P, part, o);
                        t0 += 4;
                    } else if (left >= 2) {
                        Micro::template run<U, 2>(wu, nb, P, part, o);
                        t0 += 2;
                    } else {
                        Micro::template run<U, 1>(wu, nb, P, part, o);
                        t0 += 1;
                    }
                }
            }
            for (int64_t i = 0; i < rows; i++)
                for (int t = 0; t < nwr; t++) y[(int64_t(p) * kPanelRows + i) * ldy + j0 + t] = out[16 * t + i];
        }
    }
}

}  // namespace
}  // namespace mq::cpu::detail
