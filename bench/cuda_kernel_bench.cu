// Kernel micro-benchmark of the CUDA backend (run by bench/cuda_device_run.sh on
// a GPU machine; it cannot run without one).
//
// Built straight from the backend sources, without Python:
//   nvcc -O3 --use_fast_math -std=c++17 -arch=sm_90 -Icsrc bench/cuda_kernel_bench.cu \
//        csrc/cuda/cuda_backend.cu csrc/cuda/kernels_*.cu csrc/cuda/cuda_sampling.cu \
//        csrc/common/formats.cpp csrc/common/env.cpp -o cuda_kernel_bench
//
// Reports, on the real Llama 3.2 11B shapes:
//   * device-to-device copy bandwidth (bytes read + written per second): the
//     ceiling for the matrix-vector kernels;
//   * matvec (M = 1) per weight type: weight bytes / time in GB/s and as a
//     fraction of that ceiling (weights rotated over several copies so L2
//     cannot hold them);
//   * GEMM (M = 512 prefill, M = 6432 vision tower): TFLOP/s, with an A/B of
//     the software-pipelined dequantization (default) against the simple one;
//   * attention (decode, cross-attention decode, prefill, vision tower): ms;
//   * sampling (argmax, top-k 40 / top-p 0.9 over 128256 logits): us;
//   * a decode-step estimate for 11B q4_k_m from the matvec timings.
// Times: CUDA events around batches of launches on the backend's stream;
// median of 7 batches after a warm-up. Inputs are random (never zeros).
//
// Usage: cuda_kernel_bench [--quick] [--json FILE]
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "common/fp16.h"
#include "common/formats.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_kernels.h"
#include "cuda/cuda_sampling.h"

using namespace mq;

namespace {

std::mt19937_64 rng(12345);
FILE* json = nullptr;
bool first_json = true;

void jrecord(const std::string& kind, const std::string& name, double value, const char* unit) {
    if (!json) return;
    std::fprintf(json, "%s  {\"kind\": \"%s\", \"name\": \"%s\", \"value\": %.6g, \"unit\": \"%s\"}",
                 first_json ? "" : ",\n", kind.c_str(), name.c_str(), value, unit);
    first_json = false;
}

// Random valid GGUF bytes for rows x cols of type t (fp16 scales kept finite and small).
std::vector<uint8_t> random_weight(DType t, int64_t rows, int64_t cols) {
    const size_t rb = row_size(t, cols);
    std::vector<uint8_t> w(rb * rows);
    std::uniform_int_distribution<int> byte(0, 255);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> sd(0.5f, 1.5f);
    auto put_half = [&](uint8_t* p, float v) { const uint16_t h = fp32_to_fp16(v); std::memcpy(p, &h, 2); };
    switch (t) {
        case DType::F32: for (size_t i = 0; i < w.size() / 4; ++i) { float v = nd(rng); std::memcpy(&w[4 * i], &v, 4); } break;
        case DType::F16: for (size_t i = 0; i < w.size() / 2; ++i) put_half(&w[2 * i], nd(rng)); break;
        case DType::BF16:
            for (size_t i = 0; i < w.size() / 2; ++i) { const uint16_t h = fp32_to_bf16(nd(rng)); std::memcpy(&w[2 * i], &h, 2); }
            break;
        default: {
            for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
            const TypeInfo& ti = type_info(t);
            const size_t nblk = w.size() / ti.type_size;
            for (size_t b = 0; b < nblk; ++b) {
                uint8_t* blk = &w[b * ti.type_size];
                if (t == DType::Q8_0) put_half(blk, sd(rng) / 64);
                if (t == DType::Q4_K) { put_half(blk, sd(rng) / 256); put_half(blk + 2, sd(rng) / 512); }
                if (t == DType::Q6_K) put_half(blk + 208, sd(rng) / 512);
            }
        }
    }
    return w;
}

std::vector<float> random_floats(size_t n) {
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> v(n);
    for (auto& x : v) x = nd(rng);
    return v;
}

// Median over 7 batches of `reps` calls of fn(i), in seconds per call.
double time_it(cudaStream_t s, int reps, const std::function<void(int)>& fn) {
    cudaEvent_t a, b;
    MQ_CUDA_CHECK(cudaEventCreate(&a));
    MQ_CUDA_CHECK(cudaEventCreate(&b));
    for (int i = 0; i < std::max(3, reps / 4); ++i) fn(i);   // warm-up
    std::vector<double> t;
    for (int batch = 0; batch < 7; ++batch) {
        MQ_CUDA_CHECK(cudaEventRecord(a, s));
        for (int i = 0; i < reps; ++i) fn(i);
        MQ_CUDA_CHECK(cudaEventRecord(b, s));
        MQ_CUDA_CHECK(cudaEventSynchronize(b));
        float ms = 0;
        MQ_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
        t.push_back(ms * 1e-3 / reps);
    }
    MQ_CUDA_CHECK(cudaGetLastError());
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

const char* tname(DType t) { return type_info(t).name; }

}  // namespace

int main(int argc, char** argv) {
    bool quick = false;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--quick")) quick = true;
        else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = std::fopen(argv[++i], "w");
    }
    if (json) std::fprintf(json, "[\n");
    try {
        auto be = make_cuda_backend(0);
        cudaStream_t s = cuda::backend_stream(*be);
        cudaDeviceProp prop;
        MQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
        std::printf("device: %s, %d SMs, L2 %d MiB, %.1f GiB\n", prop.name, prop.multiProcessorCount,
                    prop.l2CacheSize >> 20, prop.totalGlobalMem / 1073741824.0);
        const double l2 = prop.l2CacheSize;

        // Out-of-memory must be a clear exception, and the backend must keep working after it.
        {
            bool ok = false;
            try {
                be->alloc(size_t(1) << 48);   // 256 TiB
            } catch (const std::runtime_error& e) {
                ok = std::strstr(e.what(), "out of memory") != nullptr;
                std::printf("out-of-memory check: %s\n", e.what());
            }
            void* p = be->alloc(1 << 20);
            be->free(p);
            be->synchronize();
            if (!ok) throw std::runtime_error("alloc of 256 TiB did not raise a clear out-of-memory error");
        }

        // ---- device-to-device bandwidth -------------------------------------------
        const size_t cb = size_t(1) << 30;
        void* c0 = be->alloc(cb);
        void* c1 = be->alloc(cb);
        MQ_CUDA_CHECK(cudaMemsetAsync(c0, 0x5a, cb, s));
        const double tcopy = time_it(s, 10, [&](int) { MQ_CUDA_CHECK(cudaMemcpyAsync(c1, c0, cb, cudaMemcpyDeviceToDevice, s)); });
        const double bw = 2.0 * cb / tcopy;
        std::printf("\ndevice-to-device copy: %.0f GB/s (read + write)\n", bw * 1e-9);
        jrecord("bandwidth", "d2d_copy", bw * 1e-9, "GB/s");
        be->free(c0);
        be->free(c1);

        // ---- matvec -------------------------------------------------------------------
        struct Shape { const char* name; int64_t n, k; };
        const std::vector<Shape> shapes = {{"q/o 4096x4096", 4096, 4096}, {"k/v 1024x4096", 1024, 4096},
                                           {"gate/up 14336x4096", 14336, 4096}, {"down 4096x14336", 4096, 14336},
                                           {"lm_head 128256x4096", 128256, 4096}};
        const std::vector<DType> types = {DType::Q4_K, DType::Q6_K, DType::Q8_0, DType::F16, DType::BF16, DType::F32};
        std::printf("\nmatvec M=1: weight GB/s and %% of copy bandwidth\n%-22s", "shape");
        for (DType t : types) std::printf("%14s", tname(t));
        std::printf("\n");
        double t_mv[6][5] = {};
        float* x = static_cast<float*>(be->alloc(14336 * 4 * 16));
        float* y = static_cast<float*>(be->alloc(128256 * 4 * 16));
        auto hx = random_floats(14336 * 16);
        be->to_device(x, hx.data(), hx.size() * 4);
        for (size_t si = 0; si < shapes.size(); ++si) {
            const Shape& sh = shapes[si];
            std::printf("%-22s", sh.name);
            for (size_t ti = 0; ti < types.size(); ++ti) {
                const DType t = types[ti];
                const size_t bytes = row_size(t, sh.k) * sh.n;
                if (quick && bytes > (size_t(600) << 20)) { std::printf("%14s", "-"); continue; }
                // enough copies that the set is 4x the L2 (each launch reads weights L2 does not hold)
                const int copies = static_cast<int>(std::min<double>(16, std::max<double>(1, 4 * l2 / bytes + 1)));
                auto hw = random_weight(t, sh.n, sh.k);
                std::vector<Weight> ws;
                for (int c = 0; c < copies; ++c) ws.push_back(be->upload(hw.data(), t, sh.n, sh.k));
                const double tt = time_it(s, 20, [&](int i) { be->matmul(x, 1, sh.k, ws[i % copies], nullptr, y, sh.n); });
                t_mv[ti][si] = tt;
                const double gbs = bytes / tt * 1e-9;
                std::printf("%8.0f %4.0f%%", gbs, 100.0 * bytes / tt / bw);
                jrecord("matvec", std::string(tname(t)) + " " + sh.name, gbs, "GB/s");
                for (auto& w : ws) be->free(const_cast<void*>(w.data));
            }
            std::printf("\n");
        }

        // Decode-step estimate, 11B q4_k_m-like (config.json: 40 text layers, 8 of them cross-attention):
        // self-attention layer: q,o (4096x4096 q4_k), k,v (1024x4096 q4_k), gate,up (14336x4096 q4_k),
        // down (4096x14336 q6_k); cross-attention layer: q,o, gate,up, down (its k/v come from the image
        // cache); + lm_head (128256x4096 q6_k). Matvec time only: no attention, norms or launch gaps.
        if (t_mv[1][4] > 0 && t_mv[0][0] > 0) {
            const double mlp = 2 * t_mv[0][2] + t_mv[1][3];
            const double step = 32 * (2 * t_mv[0][0] + 2 * t_mv[0][1] + mlp) + 8 * (2 * t_mv[0][0] + mlp) + t_mv[1][4];
            std::printf("\ndecode estimate (matvec only, 11B q4_k_m-like): %.2f ms/token = %.0f tokens/s\n",
                        step * 1e3, 1.0 / step);
            jrecord("estimate", "decode_matvec_only_tokens_per_s", 1.0 / step, "tokens/s");
        }

        // ---- GEMM -------------------------------------------------------------------------------
        std::printf("\nGEMM TFLOP/s (tensor cores, f16 operands)\n%-26s", "M x N x K");
        const std::vector<DType> gtypes = {DType::Q4_K, DType::Q6_K, DType::Q8_0, DType::F16, DType::BF16};
        for (DType t : gtypes) std::printf("%9s", tname(t));
        std::printf("\n");
        struct G { int64_t m, n, k; };
        std::vector<G> gs = {{512, 4096, 4096}, {512, 14336, 4096}, {512, 4096, 14336}, {6432, 1280, 1280},
                             {6432, 5120, 1280}, {6432, 1280, 5120}, {6432, 4096, 7680}};
        if (quick) gs.resize(4);
        float* gx = static_cast<float*>(be->alloc(size_t(6432) * 14336 * 4));
        float* gy = static_cast<float*>(be->alloc(size_t(6432) * 14336 * 4));
        {
            auto hgx = random_floats(size_t(6432) * 14336);
            be->to_device(gx, hgx.data(), hgx.size() * 4);
        }
        for (const G& g : gs) {
            char label[64];
            std::snprintf(label, sizeof label, "%lld x %lld x %lld", (long long)g.m, (long long)g.n, (long long)g.k);
            std::printf("%-26s", label);
            for (DType t : gtypes) {
                auto hw = random_weight(t, g.n, g.k);
                Weight w = be->upload(hw.data(), t, g.n, g.k);
                const double tt = time_it(s, 5, [&](int) { be->matmul(gx, g.m, g.k, w, nullptr, gy, g.n); });
                const double tf = 2.0 * g.m * g.n * g.k / tt * 1e-12;
                std::printf("%9.1f", tf);
                jrecord("gemm", std::string(tname(t)) + " " + label, tf, "TFLOP/s");
                be->free(const_cast<void*>(w.data));
            }
            // A/B: the same shape without software pipelining of the dequantization (q4_k, f16)
            for (DType t : {DType::Q4_K, DType::F16}) {
                auto hw = random_weight(t, g.n, g.k);
                Weight w = be->upload(hw.data(), t, g.n, g.k);
                cuda::gemm_set_prefetch(false);
                const double tt = time_it(s, 5, [&](int) { be->matmul(gx, g.m, g.k, w, nullptr, gy, g.n); });
                // the two variants do the same arithmetic: their outputs must be identical
                std::vector<float> y_simple(g.m * g.n), y_pf(g.m * g.n);
                be->to_host(y_simple.data(), gy, y_simple.size() * 4);
                cuda::gemm_set_prefetch(true);
                be->matmul(gx, g.m, g.k, w, nullptr, gy, g.n);
                be->to_host(y_pf.data(), gy, y_pf.size() * 4);
                if (std::memcmp(y_simple.data(), y_pf.data(), y_pf.size() * 4) != 0) {
                    double md = 0, mx = 0;
                    for (size_t e = 0; e < y_pf.size(); ++e) {
                        md = std::max(md, double(std::fabs(y_pf[e] - y_simple[e])));
                        mx = std::max(mx, double(std::fabs(y_pf[e])));
                    }
                    std::printf("  [WARNING: variants differ, max |diff| %.3g of max |y| %.3g]", md, mx);
                }
                const double tf = 2.0 * g.m * g.n * g.k / tt * 1e-12;
                std::printf("  %s simple: %.1f", tname(t), tf);
                jrecord("gemm_simple", std::string(tname(t)) + " " + label, tf, "TFLOP/s");
                be->free(const_cast<void*>(w.data));
            }
            std::printf("\n");
        }

        // ---- attention --------------------------------------------------------------------------
        std::printf("\nattention\n");
        struct A { const char* name; int64_t nq, nk; int nh, nkv, hd; DType kv; bool causal, mask; };
        const std::vector<A> as = {{"decode self nk=4096", 1, 4096, 32, 8, 128, DType::F16, true, false},
                                   {"decode cross nk=6404", 1, 6404, 32, 8, 128, DType::F16, false, false},
                                   {"prefill 512", 512, 512, 32, 8, 128, DType::F16, true, false},
                                   {"vision 6432 (per layer)", 6432, 6432, 16, 16, 80, DType::F32, false, true}};
        for (const A& a : as) {
            const size_t elt = a.kv == DType::F16 ? 2 : 4;
            float* q = static_cast<float*>(be->alloc(a.nq * a.nh * a.hd * 4));
            void* k = be->alloc(a.nk * a.nkv * a.hd * elt);
            void* v = be->alloc(a.nk * a.nkv * a.hd * elt);
            float* o = static_cast<float*>(be->alloc(a.nq * a.nh * a.hd * 4));
            float* m = a.mask ? static_cast<float*>(be->alloc(a.nq * a.nk * 4)) : nullptr;
            auto hq = random_floats(a.nq * a.nh * a.hd);
            be->to_device(q, hq.data(), hq.size() * 4);
            auto hk = random_floats(a.nk * a.nkv * a.hd);
            {
                float* tmp = static_cast<float*>(be->alloc(hk.size() * 4));
                be->to_device(tmp, hk.data(), hk.size() * 4);
                be->store_rows(tmp, k, a.kv, a.nk, a.nkv * a.hd, a.nkv * a.hd);
                be->store_rows(tmp, v, a.kv, a.nk, a.nkv * a.hd, a.nkv * a.hd);
                be->synchronize();
                be->free(tmp);
            }
            if (m) {
                std::vector<float> hm(a.nq * a.nk, 0.0f);
                for (int64_t i = 0; i < a.nq; ++i)
                    for (int64_t j = a.nk - a.nk / 16; j < a.nk; ++j) hm[i * a.nk + j] = -3.0e38f;   // padding
                be->to_device(m, hm.data(), hm.size() * 4);
            }
            const int reps = a.nq > 1000 ? 2 : 50;
            const double tt = time_it(s, reps, [&](int) {
                be->attention(q, k, v, a.kv, a.nkv * a.hd, o, a.nq, a.nk, a.nh, a.nkv, a.hd, 0.1f, m, a.nk, a.causal,
                              a.causal ? a.nk - a.nq : 0);
            });
            const double kv_bytes = 2.0 * a.nk * a.nkv * a.hd * elt;
            const double flops = 4.0 * a.nq * a.nk * a.nh * a.hd;
            std::printf("%-26s %9.3f ms  %7.0f GB/s of K/V  %7.1f TFLOP/s\n", a.name, tt * 1e3, kv_bytes / tt * 1e-9,
                        flops / tt * 1e-12);
            jrecord("attention", a.name, tt * 1e3, "ms");
            be->free(q); be->free(k); be->free(v); be->free(o);
            if (m) be->free(m);
        }

        // ---- sampling ------------------------------------------------------------------------------
        {
            const int64_t n = 128256;
            float* lg = static_cast<float*>(be->alloc(n * 4));
            float* u = static_cast<float*>(be->alloc(4));
            int32_t* out = static_cast<int32_t*>(be->alloc(4));
            auto hl = random_floats(n);
            be->to_device(lg, hl.data(), n * 4);
            const float hu = 0.37f;
            be->to_device(u, &hu, 4);
            const double ta = time_it(s, 50, [&](int) { cuda::sample_argmax(lg, n, out, s); });
            cuda::SampleParams p;
            p.temperature = 0.8f; p.top_k = 40; p.top_p = 0.9f;
            const double tk = time_it(s, 50, [&](int) { cuda::sample_top_k_top_p(lg, n, p, u, out, s); });
            int32_t got = -1;
            cuda::sample_argmax(lg, n, out, s);
            be->to_host(&got, out, 4);
            const int64_t want = std::max_element(hl.begin(), hl.end()) - hl.begin();
            std::printf("\nsampling over %lld logits: argmax %.1f us (%s), top-k 40 / top-p 0.9 %.1f us\n", (long long)n,
                        ta * 1e6, got == want ? "matches host argmax" : "MISMATCH with host argmax", tk * 1e6);
            jrecord("sampling", "argmax", ta * 1e6, "us");
            jrecord("sampling", "top_k_top_p", tk * 1e6, "us");
            if (got != want) throw std::runtime_error("argmax mismatch");
            // Sanity checks of top-k / top-p (no Python binding yet): u = 0 picks the largest logit;
            // any u picks one of the 40 largest; top_k = 1 is greedy.
            std::vector<int64_t> order(n);
            for (int64_t i = 0; i < n; ++i) order[i] = i;
            std::partial_sort(order.begin(), order.begin() + 40, order.end(),
                              [&](int64_t a2, int64_t b2) { return hl[a2] > hl[b2] || (hl[a2] == hl[b2] && a2 < b2); });
            int bad = 0;
            for (float uu : {0.0f, 0.3f, 0.7f, 0.9999f}) {
                be->to_device(u, &uu, 4);
                cuda::sample_top_k_top_p(lg, n, p, u, out, s);
                be->to_host(&got, out, 4);
                const bool in_top = std::find(order.begin(), order.begin() + 40, got) != order.begin() + 40;
                if (!in_top || (uu == 0.0f && got != want)) ++bad;
            }
            std::printf("top-k/top-p sanity checks: %s\n", bad ? "FAILED" : "ok");
            if (bad) throw std::runtime_error("top-k sampling sanity check failed");
        }
        be->synchronize();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "cuda_kernel_bench: %s\n", e.what());
        if (json) { std::fprintf(json, "\n]\n"); std::fclose(json); }
        return 1;
    }
    if (json) { std::fprintf(json, "\n]\n"); std::fclose(json); }
    return 0;
}
