#define _POSIX_C_SOURCE 199309L
// llama.cpp peer benchmark: times ggml_mul_mat on the CPU backend for the
// same shapes, weight types and thread count as `python -m mllama_q.bench
// kernels`, through ggml's public API only (ggml.h, ggml-cpu.h).
//
//   ggml_peer [--threads T] [--types q4_k,q6_k,...] [--shapes 4096x4096,...]
//             [--m 1,512] [--iters-m1 N] [--iters-big N]
//
// Prints one line per case: "type N K M best_ms median_ms buffer".
//
// As llama.cpp does when it loads a model, W is placed in the CPU backend's
// "extra" buffer type CPU_REPACK when that accepts the type (on x86 with AVX2:
// Q4_K is repacked to interleaved 8-row blocks with a dedicated GEMM);
// --no-repack keeps W in a plain CPU buffer. Everything else (llamafile
// sgemm for F32/F16/BF16/Q8_0 at M > 1, the vec_dot paths) is ggml's default.
// W is filled with random VALID blocks (random quant bytes, fixed normal
// fp16 scales) so no time goes into ggml's slow reference quantizers; the
// kernel speed does not depend on the values. Build and run with
// bench/run_ggml_peer.sh. Never a dependency of the mllama-q package.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return x < y ? -1 : x > y;
}

static uint64_t rng_state = 0x12345678abcdefull;
static uint64_t rnd(void) {   // xorshift64*
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}
static float rndf(void) { return (float)((rnd() >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f; }

struct tinfo { const char* name; enum ggml_type t; };
static const struct tinfo TYPES[] = {
    {"f32", GGML_TYPE_F32}, {"f16", GGML_TYPE_F16}, {"bf16", GGML_TYPE_BF16},
    {"q8_0", GGML_TYPE_Q8_0}, {"q4_k", GGML_TYPE_Q4_K}, {"q6_k", GGML_TYPE_Q6_K},
};

// Random valid data for n_rows rows of K values of type t.
static void fill_weights(uint8_t* p, size_t nbytes, enum ggml_type t, int64_t N, int64_t K) {
    if (t == GGML_TYPE_F32) {
        float* f = (float*)p;
        for (size_t i = 0; i < (size_t)N * K; i++) f[i] = rndf();
        return;
    }
    if (t == GGML_TYPE_F16) {
        ggml_fp16_t* h = (ggml_fp16_t*)p;
        for (size_t i = 0; i < (size_t)N * K; i++) h[i] = ggml_fp32_to_fp16(rndf());
        return;
    }
    if (t == GGML_TYPE_BF16) {
        ggml_bf16_t* h = (ggml_bf16_t*)p;
        for (size_t i = 0; i < (size_t)N * K; i++) h[i] = ggml_fp32_to_bf16(rndf());
        return;
    }
    for (size_t i = 0; i + 8 <= nbytes; i += 8) {
        uint64_t r = rnd();
        memcpy(p + i, &r, 8);
    }
    const size_t bs = ggml_type_size(t);
    const size_t nb = nbytes / bs;
    const ggml_fp16_t d = ggml_fp32_to_fp16(0.001f);
    for (size_t b = 0; b < nb; b++) {
        uint8_t* blk = p + b * bs;
        if (t == GGML_TYPE_Q8_0) memcpy(blk, &d, 2);                 // d first
        if (t == GGML_TYPE_Q4_K) { memcpy(blk, &d, 2); memcpy(blk + 2, &d, 2); }   // d, dmin first
        if (t == GGML_TYPE_Q6_K) memcpy(blk + bs - 2, &d, 2);        // d last
    }
}

static int parse_list(const char* s, char out[][32], int max) {
    int n = 0;
    const char* p = s;
    while (*p && n < max) {
        const char* e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len > 31) len = 31;
        memcpy(out[n], p, len);
        out[n][len] = 0;
        n++;
        if (!e) break;
        p = e + 1;
    }
    return n;
}

int main(int argc, char** argv) {
    int threads = 2, iters_m1 = 50, iters_big = 3, repack = 1;
    const char* types_s = "q4_k,q6_k,q8_0,f16,bf16,f32";
    const char* shapes_s = "4096x4096,1024x4096,14336x4096,4096x14336,128256x4096";
    const char* m_s = "1,512";
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--types") && i + 1 < argc) types_s = argv[++i];
        else if (!strcmp(argv[i], "--shapes") && i + 1 < argc) shapes_s = argv[++i];
        else if (!strcmp(argv[i], "--m") && i + 1 < argc) m_s = argv[++i];
        else if (!strcmp(argv[i], "--no-repack")) repack = 0;
        else if (!strcmp(argv[i], "--iters-m1") && i + 1 < argc) iters_m1 = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--iters-big") && i + 1 < argc) iters_big = atoi(argv[++i]);
        else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
    }
    char tl[8][32], sl[8][32], ml[8][32];
    const int nt = parse_list(types_s, tl, 8), ns = parse_list(shapes_s, sl, 8), nm = parse_list(m_s, ml, 8);

    ggml_cpu_init();
    fprintf(stderr, "ggml peer: threads=%d avx2=%d avx512=%d avx512_vnni=%d repack=%d\n", threads, ggml_cpu_has_avx2(),
            ggml_cpu_has_avx512(), ggml_cpu_has_avx512_vnni(), repack);
    ggml_backend_t be = ggml_backend_cpu_init();
    struct ggml_threadpool_params tpp = ggml_threadpool_params_default(threads);
    struct ggml_threadpool* tp = ggml_threadpool_new(&tpp);
    ggml_backend_cpu_set_n_threads(be, threads);
    ggml_backend_cpu_set_threadpool(be, tp);
    ggml_backend_buffer_type_t repack_buft = NULL;
    if (repack) {
        ggml_backend_dev_t dev = ggml_backend_get_device(be);
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        ggml_backend_dev_get_extra_bufts_t get_extra =
            (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
        if (get_extra)
            for (ggml_backend_buffer_type_t* b = get_extra(dev); b && *b; b++)
                if (!strcmp(ggml_backend_buft_name(*b), "CPU_REPACK")) repack_buft = *b;
        fprintf(stderr, "ggml peer: CPU_REPACK buffer %s\n", repack_buft ? "found" : "not available");
    }

    for (int ti = 0; ti < nt; ti++) {
        enum ggml_type t = GGML_TYPE_COUNT;
        for (size_t k = 0; k < sizeof(TYPES) / sizeof(TYPES[0]); k++)
            if (!strcmp(TYPES[k].name, tl[ti])) t = TYPES[k].t;
        if (t == GGML_TYPE_COUNT) { fprintf(stderr, "unknown type %s\n", tl[ti]); return 2; }
        for (int si = 0; si < ns; si++) {
            long long N = 0, K = 0;
            if (sscanf(sl[si], "%lldx%lld", &N, &K) != 2) { fprintf(stderr, "bad shape %s\n", sl[si]); return 2; }
            // W in its own context and buffer (repacked when the buffer type takes it).
            struct ggml_init_params wp = {ggml_tensor_overhead() * 2, NULL, true};
            struct ggml_context* wctx = ggml_init(wp);
            struct ggml_tensor* w = ggml_new_tensor_2d(wctx, t, K, N);   // ne0 = K (row length), ne1 = N rows
            ggml_backend_buffer_t wbuf = NULL;
            const char* where = "CPU";
            // CPU_REPACK only takes the types it has kernels for (on x86: Q4_0,
            // Q4_K, IQ4_NL, MXFP4, Q2_K with AVX-512); of ours that is Q4_K.
            if (repack_buft && t == GGML_TYPE_Q4_K) {
                wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, repack_buft);
                where = "CPU_REPACK";
            }
            if (!wbuf) {
                wbuf = ggml_backend_alloc_ctx_tensors(wctx, be);
                where = "CPU";
            }
            if (!wbuf) { fprintf(stderr, "cannot allocate W\n"); return 1; }
            {
                const size_t nbytes = ggml_nbytes(w);
                uint8_t* host = (uint8_t*)malloc(nbytes);
                fill_weights(host, nbytes, t, N, K);
                ggml_backend_tensor_set(w, host, 0, nbytes);   // repacks for CPU_REPACK
                free(host);
            }
            for (int mi = 0; mi < nm; mi++) {
                const int64_t M = atoll(ml[mi]);
                struct ggml_init_params gp = {ggml_tensor_overhead() * 8 + ggml_graph_overhead(), NULL, true};
                struct ggml_context* gctx = ggml_init(gp);
                struct ggml_tensor* x = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, K, M);
                ggml_set_input(x);
                struct ggml_tensor* y = ggml_mul_mat(gctx, w, x);   // [N, M]: y = x . w^T
                ggml_set_output(y);
                struct ggml_cgraph* gf = ggml_new_graph(gctx);
                ggml_build_forward_expand(gf, y);
                ggml_gallocr_t ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(be));
                if (!ggml_gallocr_alloc_graph(ga, gf)) { fprintf(stderr, "cannot allocate graph\n"); return 1; }
                float* xh = (float*)malloc(sizeof(float) * K * M);
                for (int64_t i = 0; i < K * M; i++) xh[i] = rndf();
                ggml_backend_tensor_set(x, xh, 0, sizeof(float) * K * M);
                free(xh);
                const int iters = M == 1 ? iters_m1 : iters_big;
                double* ts = (double*)malloc(sizeof(double) * iters);
                ggml_backend_graph_compute(be, gf);   // warm-up
                for (int it = 0; it < iters; it++) {
                    const double t0 = now_s();
                    ggml_backend_graph_compute(be, gf);
                    ts[it] = now_s() - t0;
                }
                qsort(ts, iters, sizeof(double), cmp_d);
                printf("%s %lld %lld %lld %.4f %.4f %s\n", tl[ti], N, K, (long long)M, ts[0] * 1e3, ts[iters / 2] * 1e3, where);
                fflush(stdout);
                free(ts);
                ggml_gallocr_free(ga);
                ggml_free(gctx);
            }
            ggml_backend_buffer_free(wbuf);
            ggml_free(wctx);
        }
    }
    ggml_backend_free(be);
    ggml_threadpool_free(tp);
    return 0;
}
