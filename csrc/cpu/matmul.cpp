// CPU matmul driver: feature detection, path choice, activation
// quantization, threading and 2-D tiling. The arithmetic lives in the
// kernels_*.cpp files behind the interface in kernels.h.
#include "cpu/matmul.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/align.h"
#include "common/env.h"
#include "cpu/kernels.h"
#include "quants/quants.h"

#if defined(MQ_X86)
#include <cpuid.h>
#endif
#if defined(MQ_X86) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mq::cpu {

// ------------------------------------------------------------------ features
#if defined(MQ_X86)
static uint64_t read_xcr0() {
    uint32_t eax, edx;
    // xgetbv with ecx = 0: which register states the OS saves on context switch.
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (uint64_t(edx) << 32) | eax;
}

// Linux (5.16+) hands the AMX tile data state to a process only on request: without it the
// first tile instruction faults (SIGILL). ARCH_REQ_XCOMP_PERM = 0x1023 with feature 18
// (XTILEDATA), kernel Documentation/arch/x86/xstate.rst; process-wide, threads included.
// Other OSes: not attempted (the amx path then stays off).
static bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return false;
#endif
}
#endif

static CpuFeatures detect() {
    CpuFeatures f;
#if defined(MQ_X86)
    unsigned a, b, c, d;
    if (__get_cpuid(0, &a, &b, &c, &d)) {
        char v[13] = {};
        std::memcpy(v, &b, 4);  // the vendor string is EBX, EDX, ECX
        std::memcpy(v + 4, &d, 4);
        std::memcpy(v + 8, &c, 4);
        f.amd = std::strcmp(v, "AuthenticAMD") == 0 || std::strcmp(v, "HygonGenuine") == 0;
    }
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = (c >> 27) & 1;
    const bool avx = (c >> 28) & 1;
    if (!osxsave || !avx) return f;  // no AVX state saved by the OS: SIMD paths unusable
    const uint64_t xcr0 = read_xcr0();
    const bool os_avx = (xcr0 & 0x6) == 0x6;       // XMM + YMM state
    const bool os_avx512 = (xcr0 & 0xe6) == 0xe6;  // + opmask, ZMM_Hi256, Hi16_ZMM
    if (!os_avx) return f;
    f.fma = (c >> 12) & 1;
    f.f16c = (c >> 29) & 1;
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        f.avx2 = (b >> 5) & 1;
        const bool bmi2 = (b >> 8) & 1;
        f.avx2 = f.avx2 && bmi2;  // the AVX2 files are compiled with -mbmi2
        if (os_avx512) {
            f.avx512f = (b >> 16) & 1;
            f.avx512dq = (b >> 17) & 1;
            f.avx512bw = (b >> 30) & 1;
            f.avx512vl = (b >> 31) & 1;
            f.avx512vnni = (c >> 11) & 1;
        }
        // AMX-TILE: EDX bit 24, AMX-INT8: bit 25; the OS must save XTILECFG + XTILEDATA
        // (XCR0 bits 17 and 18) and grant the tile data.
        const bool amx_cpu = ((d >> 24) & 1) && ((d >> 25) & 1);
        f.amx = amx_cpu && (xcr0 & 0x60000) == 0x60000 && request_amx_permission();
        f.amx_bf16 = f.amx && ((d >> 22) & 1);
        unsigned a1, b1, c1, d1;
        if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) {
            f.avxvnni = (a1 >> 4) & 1;
            f.avx512bf16 = os_avx512 && ((a1 >> 5) & 1);
        }
    }
#endif
    return f;
}

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();
    return f;
}

// The decode tiles' W prefetch distance (simd_x86.h), measured on the 11B q4_k_m decode step
// (2 threads, synthetic model, kernel builds alternated in one sitting):
//   Intel Xeon guest (AMX, 2026-12-04): 2048 B 257-264 ms, 4096 268-273, 8192 278 (all T1)
//   AMD EPYC Zen 4 guest (2026-12-05): 2048 B 162-174 ms, 4096 116-140, 8192 94-102 (one 140),
//     16384 97-101, 32768 100-102 (all T1); 4 sequences 217-227 ms at 2048, 189-203 at 8192
// (bench/results/2026-12-05-epyc-zen4-2c-decode.md). Zen keeps more lines in flight than the
// Intel guest, whose fill buffers an early prefetch holds; other vendors take Intel's value.
static int default_w_prefetch() {
#ifdef MQ_WPF
    return MQ_WPF;
#else
    return cpu_features().amd ? 8192 : 2048;
#endif
}
int w_prefetch_bytes() { return detail::g_w_prefetch; }

namespace detail {
int g_w_prefetch = default_w_prefetch();
}

// ------------------------------------------------------------------ paths
// THE list of CPU paths, slowest first (best_path() takes the last one this
// CPU runs). Adding a path: a Path value (matmul.h), a kernel file with its
// KernelTable (kernels.h), and one row here.
struct PathEntry {
    Path path;
    const char* name;
    Path floats;  // the path whose float kernels (row ops, attention) it runs (float_path())
    // The CPU and OS can run the path's file; null: not in this build (SIMD paths off x86).
    bool (*supported)(const CpuFeatures&);
    const detail::KernelTable& (*kernels)();
    // The activation quantizers the path's matmul uses (quantize_row_*_path, for tests).
    void (*quantize_q8_K)(const float* x, block_q8_K* y, int64_t k);
    void (*quantize_q8_0)(const float* x, block_q8_0* y, int64_t k);
    uint64_t (*read_sum)(const uint64_t* p, size_t n);  // bandwidth probe loop
};

static bool scalar_ok(const CpuFeatures&) { return true; }
static uint64_t read_sum_portable(const uint64_t* p, size_t n);
#if defined(MQ_X86)
static bool avx2_ok(const CpuFeatures& f) { return f.avx2 && f.fma && f.f16c; }
// The AVX-512 file is compiled with VNNI and uses it unconditionally:
// CPUs with AVX-512 but no VNNI (Skylake-X) take the AVX2 path.
static bool avx512_ok(const CpuFeatures& f) {
    return avx2_ok(f) && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni;
}
#define MQ_X86_ONLY(...) __VA_ARGS__
#else
#define MQ_X86_ONLY(...) nullptr
#endif
#if defined(MQ_X86) && defined(MQ_AVXVNNI_BUILD)
// AVX-VNNI: CPUID.(EAX=7,ECX=1):EAX bit 4 (cpu_features().avxvnni), VEX-encoded, so
// the YMM state the AVX2 check already asks of the OS is all it needs.
#if defined(MQ_AVXVNNI_EVEX)
// The developer check build (CMake MLLAMA_Q_AVXVNNI_EVEX): the same kernels with the EVEX
// encoding of vpdpbusd / vpdpwssd on ymm, which AVX512_VNNI + AVX512VL CPUs run (f.avx512* are
// set only when the OS saves the AVX-512 state). best_path() still takes avx512 there.
static bool avxvnni_ok(const CpuFeatures& f) { return avx2_ok(f) && f.avx512vl && f.avx512vnni; }
#else
static bool avxvnni_ok(const CpuFeatures& f) { return avx2_ok(f) && f.avxvnni; }
#endif
#define MQ_AVXVNNI_ONLY(...) __VA_ARGS__
#else
#define MQ_AVXVNNI_ONLY(...) nullptr
#endif
#if defined(MQ_X86) && defined(MQ_AMX_BUILD)
// The avx512 path plus the Q8_0 panel on AMX tiles (kernels_amx.cpp).
static bool amx_ok(const CpuFeatures& f) { return avx512_ok(f) && f.amx; }
#define MQ_AMX_ONLY(...) __VA_ARGS__
#else
#define MQ_AMX_ONLY(...) nullptr
#endif

static const PathEntry kPaths[] = {
    {Path::Scalar, "scalar", Path::Scalar, scalar_ok, detail::scalar_kernels, quantize_row_q8_K_ref,
     quantize_row_q8_0_ref, read_sum_portable},
    {Path::AVX2, "avx2", Path::AVX2, MQ_X86_ONLY(avx2_ok), MQ_X86_ONLY(detail::avx2_kernels),
     MQ_X86_ONLY(detail::quantize_row_q8_K_avx2), MQ_X86_ONLY(detail::quantize_row_q8_0_avx2),
     MQ_X86_ONLY(detail::read_sum_avx2)},
    // Before avx512: AVX-512 CPUs have AVX-VNNI too and take avx512; AVX2-only ones with it take this.
    {Path::AVXVNNI, "avxvnni", Path::AVX2, MQ_AVXVNNI_ONLY(avxvnni_ok), MQ_AVXVNNI_ONLY(detail::avxvnni_kernels),
     MQ_X86_ONLY(detail::quantize_row_q8_K_avx2), MQ_X86_ONLY(detail::quantize_row_q8_0_avx2),
     MQ_X86_ONLY(detail::read_sum_avx2)},
    {Path::AVX512, "avx512", Path::AVX512, MQ_X86_ONLY(avx512_ok), MQ_X86_ONLY(detail::avx512_kernels),
     MQ_X86_ONLY(detail::quantize_row_q8_K_avx512), MQ_X86_ONLY(detail::quantize_row_q8_0_avx512),
     MQ_X86_ONLY(detail::read_sum_avx512)},
    {Path::AMX, "amx", Path::AVX512, MQ_AMX_ONLY(amx_ok), MQ_AMX_ONLY(detail::amx_kernels),
     MQ_X86_ONLY(detail::quantize_row_q8_K_avx512), MQ_X86_ONLY(detail::quantize_row_q8_0_avx512),
     MQ_X86_ONLY(detail::read_sum_avx512)},
};
#undef MQ_X86_ONLY
#undef MQ_AVXVNNI_ONLY
#undef MQ_AMX_ONLY

static const PathEntry& entry(Path p) {
    for (const PathEntry& e : kPaths)
        if (e.path == p) return e;
    throw std::invalid_argument("unknown CPU path id " + std::to_string(static_cast<int>(p)));
}
static bool path_supported(const PathEntry& e) { return e.supported && e.supported(cpu_features()); }
static bool path_supported(Path p) { return path_supported(entry(p)); }

const char* path_name(Path p) { return entry(p).name; }
Path float_path(Path p) { return entry(p).floats; }

Path best_path() {
    Path best = Path::Scalar;
    for (const PathEntry& e : kPaths)
        if (path_supported(e)) best = e.path;
    return best;
}

std::vector<std::string> available_paths() {
    std::vector<std::string> out;
    for (const PathEntry& e : kPaths)
        if (path_supported(e)) out.push_back(e.name);
    return out;
}

static std::string path_names() {  // "scalar, avx2, avxvnni, avx512 or amx"
    std::string s;
    const size_t n = sizeof(kPaths) / sizeof(kPaths[0]);
    for (size_t i = 0; i < n; i++) s += std::string(i == 0 ? "" : i + 1 == n ? " or " : ", ") + kPaths[i].name;
    return s;
}

static Path parse_path(const std::string& name, const char* where) {
    const PathEntry* found = nullptr;
    for (const PathEntry& e : kPaths)
        if (name == e.name) found = &e;
    if (!found)
        throw std::invalid_argument(std::string(where) + ": unknown CPU path '" + name + "' (expected auto, " +
                                    path_names() + ")");
    if (!path_supported(*found)) {
        std::string avail;
        for (const auto& s : available_paths()) avail += (avail.empty() ? "" : ", ") + s;
        throw std::invalid_argument(std::string(where) + ": CPU path '" + name +
                                    "' is not supported by this CPU/build (available: " + avail + ")");
    }
    return found->path;
}

Path path_by_name(const std::string& name) { return parse_path(name, "CPU path"); }

// -1: not decided yet (read MLLAMA_Q_CPU_PATH on first use).
static std::atomic<int> g_path{-1};

Path active_path() {
    int p = g_path.load(std::memory_order_acquire);
    if (p >= 0) return static_cast<Path>(p);
    Path chosen = best_path();
    if (const char* env = env::cpu_path()) {
        const std::string s(env);
        if (!s.empty() && s != "auto") chosen = parse_path(s, "MLLAMA_Q_CPU_PATH");  // throws: clear error
    }
    g_path.store(static_cast<int>(chosen), std::memory_order_release);
    return chosen;
}

void set_cpu_path(const std::string& name) {
    if (name.empty() || name == "auto") {
        g_path.store(static_cast<int>(best_path()), std::memory_order_release);
        return;
    }
    g_path.store(static_cast<int>(parse_path(name, "set_cpu_path")), std::memory_order_release);
}

// The kernels of weight type t on path p, looked up once per matmul call. A
// type a SIMD path has no entry for runs the scalar reference kernels (so a new
// weight type works on every path as soon as it has its scalar entry).
static const detail::TypeKernels& type_kernels(Path p, DType t) {
    const PathEntry& e = entry(p);
    const detail::TypeKernels* tk = e.kernels ? e.kernels().find(t) : nullptr;
    if (!tk) tk = detail::scalar_kernels().find(t);
    if (!tk || !tk->tile)
        throw std::invalid_argument(std::string("matmul: unsupported weight type ") + type_info(t).name);
    return *tk;
}

// ------------------------------------------------------------------ driver
//
// Panel route (many X rows, where the path's table has one): X in panels of 16 rows;
// tasks are (32 W rows) x (up to 8 panels), W-chunk-major like below.
static void matmul_panels(const detail::TypeKernels& tk, const float* x, int64_t M, int64_t K, int64_t ldx,
                          const void* w, size_t w_stride, int64_t N, float* y, int64_t ldy, ThreadPool& pool) {
    constexpr int PR = detail::kPanelRows;
    const int64_t n_panels = (M + PR - 1) / PR;
    const size_t pb = (tk.panel_bytes(K) + 63) & ~size_t(63);
    std::unique_ptr<uint8_t[]> buf(new uint8_t[pb * n_panels + 64]);
    uint8_t* base = align64(buf.get());
    pool.parallel_for(n_panels, [&](int64_t p, int) {
        const int rows = static_cast<int>(std::min<int64_t>(PR, M - p * PR));
        tk.prep_panel(x + p * PR * ldx, ldx, rows, base + p * pb, K);
    });
    const int64_t pc = 8;  // panels per task (128 X rows)
    const int64_t n_pchunks = (n_panels + pc - 1) / pc;
    const int64_t nb = 32;  // W rows per task
    const int64_t n_nchunks = (N + nb - 1) / nb;
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    pool.parallel_for(n_nchunks * n_pchunks, [&](int64_t t, int) {
        const int64_t nc = t / n_pchunks, pcix = t % n_pchunks;
        const int64_t n0 = nc * nb, n1 = std::min(N, n0 + nb);
        const int64_t p0 = pcix * pc, p1 = std::min(n_panels, p0 + pc);
        const int64_t m0 = p0 * PR, m1 = std::min(M, p1 * PR);
        tk.panel_gemm(wb + n0 * w_stride, w_stride, n1 - n0, base + p0 * pb, pb, static_cast<int>(p1 - p0), m1 - m0, K,
                      y + m0 * ldy + n0, ldy);
    });
}

// Tile route (every type and path): work is cut into tasks of (nb W rows) x (mb X rows). Tasks are numbered
// W-chunk-major, so the threads work on neighbouring X chunks of the same W
// chunk at the same time: each W chunk comes from memory once and is then
// re-read from cache for every X chunk. Inside a task the kernel takes 4 W
// rows at a time (kMaxTileW, kept in L1) against all mb X rows (from L2).
void matmul(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, DType wtype, int64_t N, float* y,
            int64_t ldy, ThreadPool& pool, Route route) {
    const TypeInfo& ti = type_info(wtype);
    if (M < 0 || N < 0 || K <= 0)
        throw std::invalid_argument("matmul: need M >= 0, N >= 0, K > 0 (got M=" + std::to_string(M) +
                                    ", N=" + std::to_string(N) + ", K=" + std::to_string(K) + ")");
    if (K % ti.block_size != 0)
        throw std::invalid_argument("matmul: K=" + std::to_string(K) + " is not a multiple of the " + ti.name +
                                    " block size " + std::to_string(ti.block_size));
    if (ldx < K || ldy < N) throw std::invalid_argument("matmul: row strides must satisfy ldx >= K and ldy >= N");
    if (M == 0 || N == 0) return;
    if (!x || !w || !y) throw std::invalid_argument("matmul: null buffer");

    const detail::TypeKernels& tk = type_kernels(active_path(), wtype);
    const size_t w_stride = row_size(wtype, K);
    const bool panel = route == Route::Panel || (route == Route::Auto && M >= detail::kPanelMinRows);
    if (tk.panel_gemm && panel) {
        matmul_panels(tk, x, M, K, ldx, w, w_stride, N, y, ldy, pool);
        return;
    }

    // Activations in the kernel's format: quantized once per matmul, in parallel.
    std::unique_ptr<uint8_t[]> xq_buf;
    const void* xp = x;
    size_t x_stride = static_cast<size_t>(ldx) * sizeof(float);
    if (tk.prep_x) {
        x_stride = tk.x_row_bytes(K);
        x_stride = (x_stride + 63) & ~size_t(63);  // 64-byte aligned rows
        // new[] of uint8_t is not 64-byte aligned: over-allocate and align.
        xq_buf.reset(new uint8_t[x_stride * M + 64]);
        uint8_t* base = align64(xq_buf.get());
        const int64_t rows_per_task = std::max<int64_t>(1, 16384 / K);
        const int64_t n_tasks = (M + rows_per_task - 1) / rows_per_task;
        pool.parallel_for(n_tasks, [&](int64_t t, int) {
            const int64_t m1 = std::min(M, (t + 1) * rows_per_task);
            for (int64_t m = t * rows_per_task; m < m1; m++) tk.prep_x(x + m * ldx, base + m * x_stride, K);
        });
        xp = base;
    }

    // X rows per task: as many as fit in ~256 KiB (half a core's L2 here), 4..64.
    int64_t mb = std::max<int64_t>(4, std::min<int64_t>(64, (256 * 1024) / int64_t(x_stride)));
    mb = std::min(mb, M);
    const int64_t n_mchunks = (M + mb - 1) / mb;
    // W rows per task: a multiple of 4, small enough that every thread gets
    // several tasks (dynamic balance), large enough to amortise the dispatch.
    const int64_t threads = pool.size();
    const int64_t want_nchunks = std::max<int64_t>(1, (threads * 8 + n_mchunks - 1) / n_mchunks);
    int64_t nb = (N + want_nchunks - 1) / want_nchunks;
    nb = std::max<int64_t>(detail::kMaxTileW, std::min<int64_t>(nb, M <= 8 ? 256 : 32));
    nb = (nb + detail::kMaxTileW - 1) / detail::kMaxTileW * detail::kMaxTileW;
    const int64_t n_nchunks = (N + nb - 1) / nb;

    const uint8_t* wb = static_cast<const uint8_t*>(w);
    const uint8_t* xb = static_cast<const uint8_t*>(xp);
    pool.parallel_for(n_nchunks * n_mchunks, [&](int64_t t, int) {
        const int64_t nc = t / n_mchunks, mc = t % n_mchunks;
        const int64_t n0 = nc * nb, n1 = std::min(N, n0 + nb);
        const int64_t m0 = mc * mb, m1 = std::min(M, m0 + mb);
        for (int64_t n = n0; n < n1; n += detail::kMaxTileW) {
            const int nw = static_cast<int>(std::min<int64_t>(detail::kMaxTileW, n1 - n));
            tk.tile(wb + n * w_stride, w_stride, nw, xb + m0 * x_stride, x_stride, static_cast<int>(m1 - m0), K,
                    y + m0 * ldy + n, ldy);
        }
    });
}

void quantize_row_q8_K_path(const float* x, block_q8_K* y, int64_t k, Path path) {
    if (k % QK_K != 0) throw std::invalid_argument("quantize_row_q8_K_path: k must be a multiple of 256");
    if (!path_supported(path))
        throw std::invalid_argument(std::string("CPU path ") + path_name(path) + " not supported");
    entry(path).quantize_q8_K(x, y, k);
}

void quantize_row_q8_0_path(const float* x, block_q8_0* y, int64_t k, Path path) {
    if (k % QK8_0 != 0) throw std::invalid_argument("quantize_row_q8_0_path: k must be a multiple of 32");
    if (!path_supported(path))
        throw std::invalid_argument(std::string("CPU path ") + path_name(path) + " not supported");
    entry(path).quantize_q8_0(x, y, k);
}

// ------------------------------------------------------------------ bandwidth probe
double measure_read_bandwidth(size_t bytes, int repeats, ThreadPool& pool) {
    if (bytes < (1u << 20)) throw std::invalid_argument("measure_read_bandwidth: need at least 1 MiB");
    if (repeats < 1) repeats = 1;
    const size_t n = bytes / sizeof(uint64_t);
    std::unique_ptr<uint64_t[]> buf(new uint64_t[n]);
    const int64_t n_tasks = pool.size();
    const size_t per = (n + n_tasks - 1) / n_tasks;
    // Each thread first touches (and so places) its own part, then reads it.
    pool.parallel_for(n_tasks, [&](int64_t t, int) {
        const size_t a = t * per, b = std::min(n, a + per);
        for (size_t i = a; i < b; i++) buf[i] = i * 0x9e3779b97f4a7c15ull;
    });
    std::vector<uint64_t> sink(n_tasks);
    double best = 0;
    for (int r = 0; r < repeats; r++) {
        const auto t0 = std::chrono::steady_clock::now();
        pool.parallel_for(n_tasks, [&](int64_t t, int) {
            const size_t a = t * per, b = std::min(n, a + per);
            sink[t] = read_sum(buf.get() + a, b - a);
        });
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, double(n * sizeof(uint64_t)) / s);
    }
    volatile uint64_t keep = 0;
    for (auto v : sink) keep = keep + v;
    (void)keep;
    return best;
}

// Sum of n words with the widest loads this CPU has (the loop only has to
// be faster than memory). Portable version; SIMD ones live in the ISA files.
uint64_t read_sum(const uint64_t* p, size_t n) { return entry(best_path()).read_sum(p, n); }

static uint64_t read_sum_portable(const uint64_t* p, size_t n) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    for (; i < n; i++) s0 += p[i];
    return s0 + s1 + s2 + s3;
}

}  // namespace mq::cpu
