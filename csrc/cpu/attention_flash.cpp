// Flash attention for many queries (attention_flash.h): the driver (K/V
// packing per KV group, tasks over query-row blocks) and the portable scalar
// kernel, the reference the AVX2 / AVX-512 kernels are tested against.
#include "cpu/attention_flash.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/align.h"
#include "common/profile.h"
#include "cpu/attention_flash_impl.h"
#include "cpu/matmul.h"
#include "cpu/simd_scalar.h"
#include "quants/quants.h"

namespace mq::cpu {
namespace detail {

// 4 rows per group, 4 groups per task, key blocks of 16, 4 x 4 tiles.
FlashKernel flash_kernel_scalar() { return {16, flash_rows<VScalar, 4, 4, 16, 4, 4>}; }

}  // namespace detail

bool amx_attention_supported(int hd) {
#ifdef MQ_AMX_BF16_BUILD
    const CpuFeatures& f = cpu_features();
    return f.amx_bf16 && f.avx512bf16 && hd % 16 == 0 && hd > 0 && hd <= 256;
#else
    (void)hd;
    return false;
#endif
}

void attention_flash(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                     int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                     int64_t ld_mask, bool causal, int64_t q_offset, ThreadPool& pool) {
    if (n_kv_head <= 0 || n_head % n_kv_head)
        throw std::invalid_argument("attention_flash: n_head must be a multiple of n_kv_head");
    if (kv_type != DType::F32 && kv_type != DType::F16)
        throw std::invalid_argument("attention_flash: KV type must be f32 or f16");
    if (hd <= 0) throw std::invalid_argument("attention_flash: head size must be positive");
    if (nq <= 0) return;
    if (nk <= 0) {
        std::fill(out, out + nq * n_head * hd, 0.0f);
        return;
    }
    detail::FlashKernel kern = detail::flash_kernel_scalar();
#ifdef MQ_X86
    const Path fp = float_path(active_path());
    if (fp == Path::AVX512) kern = detail::flash_kernel_avx512();
    else if (fp == Path::AVX2) kern = detail::flash_kernel_avx2();
#endif
#ifdef MQ_AMX_BF16_BUILD
    // The amx path where the CPU has AMX-BF16 (attention_flash_amx.cpp: its tiles hold 16
    // head dims; other head sizes take the AVX-512 kernel above), for 128 query rows per KV
    // group or more: its packing of K/V (~10x the float copy) costs more than it saves for a
    // few rows (the vision tower's 28 padding rows: 1.4 s of a 45 s encode).
    if (active_path() == Path::AMX && amx_attention_supported(hd) && nq * (n_head / n_kv_head) >= 128)
        kern = detail::flash_kernel_amx();
#endif
    const bool prof_on = prof::enabled();
    const int G = n_head / n_kv_head;
    const int64_t rows = nq * G;  // query rows per KV group
    const int64_t n_tasks = (rows + kern.rows - 1) / kern.rows;
    // Per KV group, K and V are first copied (F16 widened) into contiguous
    // float32 [nk][hd] arrays: read in place, the rows of one head lie
    // kv_stride apart (5 KiB in the vision tower), so the 32 rows of a key
    // block fall into a few L1 sets and evict each other (measured: 136 vs
    // 175 GFLOP/s on one AVX-512 thread). With one task per group (few query
    // rows, e.g. the vision tower's padding rows) every key is read once
    // anyway, so float32 K/V are then read in place and all groups run in one
    // parallel loop.
    // Kernels with their own layout (kern.pack) always pack, per group.
    const bool pack = kv_type == DType::F16 || n_tasks > 1 || kern.pack;
    // Profiling (common/profile.h): wall time of the packing, and of the row
    // tasks split into score / softmax / P·V in proportion to the threads'
    // time in each (prof_ns: [threads][3]).
    std::vector<uint64_t> prof_ns(prof_on ? size_t(pool.size()) * 3 : 0, 0);
    uint64_t pack_ns = 0, rows_ns = 0;
    auto run_tasks = [&](const float* kg, const float* vg, int64_t stride, int g0, int n_groups,
                         const uint16_t* packed) {
        const uint64_t t0 = prof_on ? prof::op_now_ns() : 0;
        pool.parallel_for(n_groups * n_tasks, [&](int64_t t, int thread) {
            const int g = g0 + int(t / n_tasks);
            const int64_t r0 = (t % n_tasks) * kern.rows;
            const int64_t goff = pack ? 0 : int64_t(g) * hd;
            const detail::FlashArgs a{kg + goff, vg + goff, stride, nk,      hd,     scale,    q,   n_head,
                                      G,         g,         mask,   ld_mask, causal, q_offset, out, packed};
            kern.run(a, r0, int(std::min<int64_t>(kern.rows, rows - r0)),
                     prof_on ? &prof_ns[size_t(thread) * 3] : nullptr);
        });
        if (prof_on) rows_ns += prof::op_now_ns() - t0;
    };
    if (!pack) {
        run_tasks(static_cast<const float*>(k), static_cast<const float*>(v), kv_stride, 0, n_kv_head, nullptr);
    } else {
        // float32 rows of one group: [nk][hd] copies (F16 widened), or (F32 K/V for a kernel
        // with its own layout, which reads them once to pack) the rows in place
        const bool copy = kv_type == DType::F16 || !kern.pack;
        std::vector<float> kp(copy ? size_t(nk) * hd : 0), vp(copy ? size_t(nk) * hd : 0);
        // (64-byte aligned: the amx kernel loads whole cache lines as tile rows)
        std::vector<uint16_t> packed_buf(kern.pack ? kern.packed_elems(nk, hd) + 32 : 0);
        uint16_t* packed = align64(packed_buf.data());
        for (int g = 0; g < n_kv_head; g++) {
            const uint64_t t0 = prof_on ? prof::op_now_ns() : 0;
            const float* kg = kp.data();
            const float* vg = vp.data();
            int64_t stride = hd;
            if (copy) {
                pool.parallel_for((nk + 255) / 256, [&](int64_t t, int) {
                    for (int64_t j = t * 256; j < std::min(nk, t * 256 + 256); j++) {
                        const int64_t off = j * kv_stride + int64_t(g) * hd;
                        if (kv_type == DType::F32) {
                            std::memcpy(&kp[j * hd], static_cast<const float*>(k) + off, size_t(hd) * sizeof(float));
                            std::memcpy(&vp[j * hd], static_cast<const float*>(v) + off, size_t(hd) * sizeof(float));
                        } else {
                            dequantize_row_f16(static_cast<const uint16_t*>(k) + off, &kp[j * hd], hd);
                            dequantize_row_f16(static_cast<const uint16_t*>(v) + off, &vp[j * hd], hd);
                        }
                    }
                });
            } else {
                kg = static_cast<const float*>(k) + int64_t(g) * hd;
                vg = static_cast<const float*>(v) + int64_t(g) * hd;
                stride = kv_stride;
            }
            if (kern.pack) {
                pool.parallel_for((nk + 255) / 256, [&](int64_t t, int) {
                    kern.pack(kg, vg, stride, nk, hd, t * 256, std::min(nk, t * 256 + 256), packed);
                });
            }
            if (prof_on) pack_ns += prof::op_now_ns() - t0;
            run_tasks(kg, vg, stride, g, 1, kern.pack ? packed : nullptr);
        }
    }
    if (prof_on) {
        double ph[3] = {0, 0, 0}, tot = 0;
        for (size_t i = 0; i < prof_ns.size(); i++) {
            ph[i % 3] += double(prof_ns[i]);
            tot += double(prof_ns[i]);
        }
        const std::string det = "hd=" + std::to_string(hd);
        const double f = tot > 0 ? rows_ns * 1e-9 / tot : 0;
        const double flop = 2.0 * nq * nk * hd * n_head;  // each product
        if (pack)
            prof::record_seconds("attention:pack K/V", det, pack_ns * 1e-9, 0,
                                 (kv_type == DType::F16 ? 12.0 : 16.0) * nk * n_kv_head * hd);
        prof::record_seconds("attention:score", det, ph[0] * f, flop);
        prof::record_seconds("attention:softmax", det, ph[1] * f, 0);
        prof::record_seconds("attention:P.V", det, ph[2] * f, flop);
    }
}

}  // namespace mq::cpu
