// CPU matrix multiplication with quantized weights: Y = X · Wᵀ.
//
//   X : float32 [M, K], row-major, row stride ldx (floats)
//   W : [N, K] in GGUF layout: N rows, each row_size(wtype, K) bytes, contiguous
//   Y : float32 [M, N], row-major, row stride ldy (floats)
//
// Fused: W is never dequantized into a full float matrix. Paths (scalar
// reference, AVX2, AVX-VNNI (AVX2 with vpdpbusd on ymm), AVX-512) are chosen at
// run time from CPU features; the MLLAMA_Q_CPU_PATH environment variable
// (scalar|avx2|avxvnni|avx512) or
// set_cpu_path() forces one (tests use this to cover each path).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "common/formats.h"
#include "common/threadpool.h"

namespace mq::cpu {

// The kernel paths; their names, CPU checks and kernel tables are the path table in matmul.cpp.
// The values are ids (the table's order, not theirs, ranks the paths).
enum class Path : int { Scalar = 0, AVX2 = 1, AVX512 = 2, AVXVNNI = 3, AMX = 4 };

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vnni = false;
    bool avx512bf16 = false, avxvnni = false;
    // AMX-TILE + AMX-INT8 with the tile state saved by the OS and (Linux) granted to this process.
    bool amx = false;
    // AMX-BF16 (CPUID.(EAX=7,ECX=0):EDX bit 22) on top of `amx`: the amx path's attention.
    bool amx_bf16 = false;
    // CPUID vendor AuthenticAMD or HygonGenuine (Zen cores): the decode tiles' prefetch distance.
    bool amd = false;
};

// How far ahead (bytes) the decode tiles prefetch W into L2 (simd_x86.h prefetch_w): by vendor,
// fixed at load time; the compile-time MQ_WPF overrides it (for sweeps).
int w_prefetch_bytes();
const CpuFeatures& cpu_features();

Path best_path();    // fastest path this CPU supports
Path active_path();  // path in use (forced or best)
// "", "auto", "scalar", "avx2", "avxvnni", "avx512", "amx"; throws if unsupported
void set_cpu_path(const std::string& name);
const char* path_name(Path p);
Path path_by_name(const std::string& name);  // throws for unknown or unsupported names
std::vector<std::string> available_paths();
// The path whose float kernels (row ops, attention) path p uses: its own, except
// avxvnni's, which are AVX2's (AVX-VNNI adds only int8 multiply-adds).
Path float_path(Path p);

// Which kernels compute the rows of a matmul. The quantized types have two: the per-row
// tiles (decode: W streamed once for a few X rows) and the panel GEMM (16 X rows per
// micro-kernel call: prefill, the vision tower). Each gives every row the same bits
// whatever M is and whatever the other rows are (the X rows are quantized one by one and
// every output element has its own accumulators), but the two sum an element's float
// terms in different orders, so a row's bits depend on which of them computed it.
//   Auto:  the panel from kPanelMinRows rows on (where the path's table has one), else the tiles
//   Tiles: the tiles for any M (the text decoder's decode rows)
//   Panel: the panel for any M, padding a last panel of fewer rows (the decoder's prompt
//          rows); types without a panel kernel take the tiles
// The text decoder routes its rows by role, not by M (TextDecoder::step), so a sequence's
// logits do not depend on what it was batched with (session.py, the server).
enum class Route { Auto, Tiles, Panel };

// Throws std::invalid_argument on unsupported wtype or K not a multiple of its block.
void matmul(const float* x, int64_t M, int64_t K, int64_t ldx, const void* w, DType wtype, int64_t N, float* y,
            int64_t ldy, ThreadPool& pool, Route route = Route::Auto);

// The Q8_K activation quantizer that `path` uses inside matmul (bytes as
// ggml's quantize_row_q8_K_ref, natural value order). For tests.
void quantize_row_q8_K_path(const float* x, block_q8_K* y, int64_t k, Path path);
void quantize_row_q8_0_path(const float* x, block_q8_0* y, int64_t k, Path path);  // same for Q8_0

// Memory read bandwidth in bytes/s: every thread of `pool` sums its share of
// a `bytes` buffer; best of `repeats` passes. For benchmark context.
double measure_read_bandwidth(size_t bytes, int repeats, ThreadPool& pool);
uint64_t read_sum(const uint64_t* p, size_t n);  // sum of n words, widest loads available

}  // namespace mq::cpu
