// Tensor-core GEMM for prefill, the vision tower and the image-side K/V:
//   y[M, N] = x[M, K] · Wᵀ (+ bias),  x float32, W in GGUF layout, y float32.
//
// Idea (as in Marlin and ggml's mmq, written afresh and kept simple): each
// thread block computes a BM x BN tile of y. For each BK-wide slice of K it
//   1. reads its part of x (float32 -> f16) and of W (GGUF blocks ->
//      dequantized -> f16) into registers,
//   2. stores them into shared memory (double-buffered: the loads of slice
//      k+1 are issued before the tensor-core work on slice k and, with PF,
//      dequantized after it),
//   3. runs mma.sync.m16n8k16 (f16 x f16 -> f32) from fragments fetched with
//      ldmatrix.
// The dequantized weight matrix never exists in device memory; every weight
// byte is read from VRAM once per BM rows of x (L2 serves the rest).
//
// Precision: operands are rounded to f16 (11-bit mantissa), products and sums
// are f32. |x| above 65504 would overflow f16; Llama activations after RMSNorm
// and SwiGLU stay far below. A bf16 variant (mma ... .bf16) is a one-line
// change of the operand type if ever needed.
//
// Not yet done (perf, see bench/RESULTS.md): cp.async / TMA copies of the raw
// blocks into shared memory, split-K for tall-skinny shapes, wgmma on sm_90a.
#include <cstdlib>
#include <string>

#include "common/env.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_kernels.h"
#include "cuda/mma.cuh"

namespace mq::cuda {

namespace {

// Tile shape (compile-time):
//   BM = 64 or 128  rows of x (and y) per block (template parameter: 128 halves
//                   the dequantization work per FLOP and is used when M > 64)
//   BN = 128  rows of W (columns of y) per block
//   BK = 32   values of K per pipeline stage (= one Q4_K/Q8_0 sub-block)
//   8 warps in a (BM / 32) x (8 / (BM / 32)) grid; each computes a 32 x WN
//   sub-tile (WN = 32 for BM = 64, 64 for BM = 128) as 2 (m16) x WN / 8 (n8)
//   mma tiles: 32 or 64 f32 accumulators per thread.
//   PAD = 8 halves appended to each shared row (row stride 80 bytes) so the
//   8 row addresses of one ldmatrix fall in distinct bank groups.
constexpr int BN = 128, BK = 32, PAD = 8, LDS = BK + PAD;
constexpr int kGemmThreads = 256;
constexpr int WM = 32, MI = WM / 16;

// Template parameters:
//   T      GGUF type of W (selects the Dequant8 specialisation at compile time)
//   BM     rows of x per block (64 or 128, see above)
//   PF     software pipelining of the global loads: true = the raw loads of
//          slice k+1 are issued before the mma of slice k and decoded after it
//          (their latency hides behind the tensor-core work); false = decoded
//          at once, before the mma (fewer live registers). Default true;
//          MLLAMA_Q_CUDA_GEMM=simple or gemm_set_prefetch(false) picks false.
// Run-time flags:
//   x_vec  x rows are 16-byte aligned with K % 8 == 0 (float4 loads), else scalar
//   w_vec  (float W only) rows 16-byte aligned with K % 8 == 0, else per element
template <DType T, int BM, bool PF>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t N, int64_t K, const float* __restrict__ x,
                int64_t M, int64_t ldx, const float* __restrict__ bias, float* __restrict__ y, int64_t ldy, bool x_vec,
                bool w_vec) {
    using DQ = Dequant8<T>;
    constexpr bool kQuant = TypeTraits<T>::quantized;
    constexpr int WARPS_M = BM / WM, WARPS_N = 8 / WARPS_M;
    constexpr int WN = BN / WARPS_N, NJ = WN / 8;
    constexpr int XCH = BM / 64;                     // x chunks of 8 per thread per slice (W: always 2)
    __shared__ __align__(16) __half As[2][BM][LDS];  // x slice, [row of x][k]
    __shared__ __align__(16) __half Bs[2][BN][LDS];  // W slice, [row of W][k]

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp / WARPS_N, wn = warp % WARPS_N;
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
    const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
    const int nk = static_cast<int>(ceil_div(K, BK));

    // Per-thread load assignment: chunks of 8 consecutive k values; 4 threads
    // cover one 32-wide row of the slice; thread t owns rows t/4 + 64 i.
    const int a_row = tid / 4, a_col = (tid % 4) * 8;
    float4 x_raw[XCH][2];  // raw x (vector path)
    bool x_ok[XCH];
    typename DQ::Raw w_raw[2];  // raw W blocks (vector path)
    bool w_ok[2];
    uint4 a_reg[XCH];  // 8 halves of x, per chunk
    uint4 b_reg[2];    // 8 halves of W, twice

    // 1. global loads only
    auto fetch_slice = [&](int kt) {
        const int64_t k = static_cast<int64_t>(kt) * BK + a_col;
#pragma unroll
        for (int c = 0; c < XCH; ++c) {
            const int64_t m = m0 + a_row + 64 * c;
            x_ok[c] = m < M && x_vec && k < K;
            if (x_ok[c]) {
                x_raw[c][0] = __ldg(reinterpret_cast<const float4*>(x + m * ldx + k));
                x_raw[c][1] = __ldg(reinterpret_cast<const float4*>(x + m * ldx + k + 4));
            }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int64_t n = n0 + a_row + 64 * i;
            w_ok[i] = n < N && k < K && (kQuant || w_vec);
            if (w_ok[i]) w_raw[i] = DQ::fetch(w + n * row_bytes, k);
        }
    };
    // 2. decode and round to f16 (the scalar fallbacks load here)
    auto pack_slice = [&](int kt) {
        const int64_t k = static_cast<int64_t>(kt) * BK + a_col;
#pragma unroll
        for (int c = 0; c < XCH; ++c) {
            const int64_t m = m0 + a_row + 64 * c;
            float v[8];
            if (x_ok[c]) {
                const float4 p = x_raw[c][0], q = x_raw[c][1];
                v[0] = p.x;
                v[1] = p.y;
                v[2] = p.z;
                v[3] = p.w;
                v[4] = q.x;
                v[5] = q.y;
                v[6] = q.z;
                v[7] = q.w;
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) v[i] = (m < M && k + i < K) ? x[m * ldx + k + i] : 0.0f;
            }
            a_reg[c] = make_uint4(pack_half2(v[0], v[1]), pack_half2(v[2], v[3]), pack_half2(v[4], v[5]),
                                  pack_half2(v[6], v[7]));
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int64_t n = n0 + a_row + 64 * i;
            float v[8];
            if (w_ok[i]) {
                DQ::decode(w_raw[i], k, v);
            } else {
                // past N or K (zeros), or float W without 16-byte rows (element loads)
#pragma unroll
                for (int j = 0; j < 8; ++j)
                    v[j] = (!kQuant && n < N && k + j < K) ? load_float_elem(w + n * row_bytes, k + j, T) : 0.0f;
            }
            b_reg[i] = make_uint4(pack_half2(v[0], v[1]), pack_half2(v[2], v[3]), pack_half2(v[4], v[5]),
                                  pack_half2(v[6], v[7]));
        }
    };
    // 3. shared-memory stores
    auto store_slice = [&](int buf) {
#pragma unroll
        for (int c = 0; c < XCH; ++c) *reinterpret_cast<uint4*>(&As[buf][a_row + 64 * c][a_col]) = a_reg[c];
        *reinterpret_cast<uint4*>(&Bs[buf][a_row][a_col]) = b_reg[0];
        *reinterpret_cast<uint4*>(&Bs[buf][a_row + 64][a_col]) = b_reg[1];
    };

    float acc[MI][NJ][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    fetch_slice(0);
    pack_slice(0);
    store_slice(0);
    __syncthreads();

    for (int kt = 0; kt < nk; ++kt) {
        const int buf = kt & 1;
        const bool more = kt + 1 < nk;
        if (more) {
            fetch_slice(kt + 1);  // global loads in flight during the mma below
            if constexpr (!PF) pack_slice(kt + 1);
        }

#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            uint32_t af[MI][4], bf[NJ][2];
#pragma unroll
            for (int i = 0; i < MI; ++i)
                // lanes 0-15 address rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8:
                // registers come back as the m16k16 A fragment a0..a3.
                ldmatrix_x4(af[i], &As[buf][wm * WM + 16 * i + (lane & 15)][16 * ks + (lane >> 4) * 8]);
#pragma unroll
            for (int p = 0; p < NJ / 2; ++p) {
                // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                // = B fragments b0, b1 of n-tile 2p and b0, b1 of n-tile 2p+1.
                const int mat = lane >> 3;
                uint32_t r[4];
                ldmatrix_x4(r, &Bs[buf][wn * WN + 16 * p + (mat >> 1) * 8 + (lane & 7)][16 * ks + (mat & 1) * 8]);
                bf[2 * p][0] = r[0];
                bf[2 * p][1] = r[1];
                bf[2 * p + 1][0] = r[2];
                bf[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NJ; ++j) mma_m16n8k16(acc[i][j], af[i], bf[j][0], bf[j][1]);
        }

        if (more) {
            if constexpr (PF) pack_slice(kt + 1);
            store_slice(buf ^ 1);  // the other buffer: last read before the previous barrier
        }
        __syncthreads();
    }

    // Accumulator layout of m16n8: c0, c1 at (row lane/4, cols 2*(lane%4) + 0/1), c2, c3 at row + 8.
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int64_t m = m0 + wm * WM + 16 * i + (lane >> 2) + (c >= 2 ? 8 : 0);
                const int64_t n = n0 + wn * WN + 8 * j + 2 * (lane & 3) + (c & 1);
                if (m < M && n < N) y[m * ldy + n] = acc[i][j][c] + (bias ? bias[n] : 0.0f);
            }
}

// -1: not yet decided (read MLLAMA_Q_CUDA_GEMM on first use); 0 / 1 set by gemm_set_prefetch.
int g_prefetch = -1;
bool prefetch_enabled() {
    if (g_prefetch < 0) { g_prefetch = env::cuda_gemm_simple() ? 0 : 1; }
    return g_prefetch == 1;
}

}  // namespace

void gemm_set_prefetch(bool on) { g_prefetch = on ? 1 : 0; }

void gemm(DType wtype, const void* w, int64_t N, int64_t K, const float* x, int64_t M, int64_t ldx, const float* bias,
          float* y, int64_t ldy, cudaStream_t stream) {
    if (M == 0 || N == 0) return;
    if (ceil_div(M, 128) > 65535) throw std::invalid_argument("cuda matmul: M too large for one launch");
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    const size_t rb = row_size(wtype, K);
    const bool x_vec = K % 8 == 0 && ldx % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    const bool w_vec = K % 8 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
    const dim3 grid64(static_cast<unsigned>(ceil_div(N, BN)), static_cast<unsigned>(ceil_div(M, 64)));
    const dim3 grid128(static_cast<unsigned>(ceil_div(N, BN)), static_cast<unsigned>(ceil_div(M, 128)));
    const bool pf = prefetch_enabled();
    auto launch = [&](auto kernel, dim3 grid) {
        kernel<<<grid, kGemmThreads, 0, stream>>>(wb, rb, N, K, x, M, ldx, bias, y, ldy, x_vec, w_vec);
    };
    dispatch_weight_type(wtype, "cuda matmul: unsupported weight type ", [&](auto type) {
        constexpr DType T = decltype(type)::value;
        if (M > 64) launch(pf ? gemm_kernel<T, 128, true> : gemm_kernel<T, 128, false>, grid128);
        else launch(pf ? gemm_kernel<T, 64, true> : gemm_kernel<T, 64, false>, grid64);
    });
    MQ_CUDA_CHECK_LAUNCH();
}

}  // namespace mq::cuda
