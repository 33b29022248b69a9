// Row and elementwise ops of the CUDA backend: get_rows, RMSNorm, LayerNorm,
// residual adds, SwiGLU, GELU, RoPE, KV-cache stores. Memory-bound; each kernel
// reads its inputs once and writes its output once.
#include <algorithm>

#include "cuda/cuda_common.cuh"
#include "cuda/cuda_kernels.h"

namespace mq::cuda {

namespace {

constexpr int kEltThreads = 256;

// Grid for a grid-stride elementwise loop over n items.
unsigned elt_blocks(int64_t n) {
    const int64_t b = ceil_div(n, kEltThreads);
    return static_cast<unsigned>(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

// ---- get_rows -------------------------------------------------------------------
// out[i, :] = dequantized row ids[i] of table. grid.y = row i, threads over
// chunks of 8 values (cols % 8 == 0, every quantized type satisfies it).
template <DType T>
__global__ void get_rows_kernel(const uint8_t* table, size_t row_bytes, int64_t cols, const int32_t* ids, float* out,
                                bool out_vec) {
    const int64_t i = blockIdx.y;
    const uint8_t* row = table + static_cast<size_t>(ids[i]) * row_bytes;
    float* o = out + i * cols;
    for (int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8; c < cols;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x * 8) {
        float v[8];
        Dequant8<T>::run(row, c, v);
        if (out_vec) {  // cols % 8 == 0 and out 16-byte aligned
            float4* o4 = reinterpret_cast<float4*>(o + c);
            o4[0] = make_float4(v[0], v[1], v[2], v[3]);
            o4[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) o[c + e] = v[e];
        }
    }
}
// Float tables whose width is not a multiple of 8 (or misaligned output).
__global__ void get_rows_scalar_kernel(const uint8_t* table, size_t row_bytes, int64_t cols, DType t,
                                       const int32_t* ids, float* out) {
    const int64_t i = blockIdx.y;
    const uint8_t* row = table + static_cast<size_t>(ids[i]) * row_bytes;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols;
         c += static_cast<int64_t>(gridDim.x) * blockDim.x)
        out[i * cols + c] = load_float_elem(row, c, t);
}

// ---- norms ----------------------------------------------------------------------
// One block per row; x read twice (second read hits L1/L2), y written once.
// HF: MllamaTextRMSNorm.forward (modeling_mllama.py): x * rsqrt(mean(x^2) + eps) * w
__global__ void rms_norm_kernel(const float* x, const float* w, float* y, int64_t cols, float eps) {
    __shared__ float red[32];
    const float* xr = x + blockIdx.x * cols;
    float* yr = y + blockIdx.x * cols;
    float ss = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, red);
    const float r = rsqrtf(ss / static_cast<float>(cols) + eps);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = xr[c] * r * w[c];
}

// torch.nn.LayerNorm: (x - mean) / sqrt(var + eps) * w + b, biased variance.
// Two-pass (mean, then sum of squared deviations) for accuracy.
__global__ void layer_norm_kernel(const float* x, const float* w, const float* b, float* y, int64_t cols, float eps) {
    __shared__ float red[32];
    const float* xr = x + blockIdx.x * cols;
    float* yr = y + blockIdx.x * cols;
    float s = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += xr[c];
    const float mean = block_sum(s, red) / static_cast<float>(cols);
    float ss = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = xr[c] - mean;
        ss += d * d;
    }
    const float r = rsqrtf(block_sum(ss, red) / static_cast<float>(cols) + eps);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) yr[c] = (xr[c] - mean) * r * w[c] + b[c];
}

// ---- elementwise ----------------------------------------------------------------
#define MQ_GRID_STRIDE(i, n)                                                               \
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)

__global__ void add_kernel(float* y, const float* x, int64_t n) { MQ_GRID_STRIDE(i, n) y[i] += x[i]; }
__global__ void add_scaled_kernel(float* y, const float* x, float s, int64_t n) {
    MQ_GRID_STRIDE(i, n) y[i] = fmaf(s, x[i], y[i]);
}
// silu(g) * u = g / (1 + exp(-g)) * u  (HF: MllamaTextMLP, ACT2FN["silu"])
__global__ void silu_mul_kernel(const float* g, const float* u, float* out, int64_t n) {
    MQ_GRID_STRIDE(i, n) {
        const float a = g[i];
        out[i] = a / (1.0f + expf(-a)) * u[i];
    }
}
// Exact GELU 0.5 x (1 + erf(x / sqrt 2)) (HF: ACT2FN["gelu"], the vision MLP).
__global__ void gelu_kernel(float* x, int64_t n) {
    MQ_GRID_STRIDE(i, n) {
        const float a = x[i];
        x[i] = 0.5f * a * (1.0f + erff(a * 0.70710678118654752f));
    }
}

// ---- RoPE ---------------------------------------------------------------------------
// Interleaved pairs (llama.cpp layout): pair i of head h of token t rotates
// (x[2i], x[2i+1]) by pos[t] * inv_freq[i]. One thread per pair. The angle is
// computed in float from an integer position times inv_freq, like the CPU
// backend and HF (MllamaRotaryEmbedding.forward); its sine and cosine in double
// (one per pair: negligible cost) so that positions in the thousands stay exact.
__global__ void rope_kernel(float* x, int64_t n_tok, int n_head, int half_dim, const int32_t* pos,
                            const float* inv_freq) {
    const int64_t n = n_tok * n_head * half_dim;
    MQ_GRID_STRIDE(idx, n) {
        const int i = static_cast<int>(idx % half_dim);
        const int64_t t = idx / (static_cast<int64_t>(half_dim) * n_head);
        const float ang = static_cast<float>(pos[t]) * inv_freq[i];  // float32 product, as HF
        double sd, cd;
        sincos(static_cast<double>(ang), &sd, &cd);                          // --use_fast_math would turn sincosf into
        const float s = static_cast<float>(sd), c = static_cast<float>(cd);  // __sincosf: wrong at large angles
        float2* p = reinterpret_cast<float2*>(x) + idx;
        const float2 v = *p;
        *p = make_float2(v.x * c - v.y * s, v.x * s + v.y * c);
    }
}

// ---- KV-cache stores ------------------------------------------------------------------
// Row j of src goes to row rows[j] of dst (row j when rows is null: a step's cache rows
// slot * n_ctx + pos come from the step block).
__global__ void store_rows_f16_kernel(const float* src, __half* dst, int64_t n, int64_t width, int64_t stride,
                                      const int32_t* rows) {
    MQ_GRID_STRIDE(idx, n * width) {
        const int64_t j = idx / width, c = idx % width;
        const int64_t r = rows ? rows[j] : j;
        dst[r * stride + c] = __float2half_rn(src[idx]);
    }
}
__global__ void store_rows_f32_kernel(const float* src, float* dst, int64_t n, int64_t width, int64_t stride,
                                      const int32_t* rows) {
    MQ_GRID_STRIDE(idx, n * width) {
        const int64_t j = idx / width, c = idx % width;
        const int64_t r = rows ? rows[j] : j;
        dst[r * stride + c] = src[idx];
    }
}
__global__ void scatter_i32_kernel(const int32_t* src, int32_t* dst, const int32_t* idx, int64_t n) {
    MQ_GRID_STRIDE(j, n) dst[idx[j]] = src[j];
}

int norm_threads(int64_t cols) {
    if (cols >= 4096) return 1024;
    if (cols >= 1024) return 256;
    return 128;
}

}  // namespace

// ---- launchers ------------------------------------------------------------------------
void get_rows(DType type, const void* table, int64_t cols, const int32_t* ids, int64_t n, float* out,
              cudaStream_t stream) {
    if (n == 0 || cols == 0) return;
    // grid.y is limited to 65535 rows per launch
    for (int64_t i0 = 65535; i0 < n; i0 += 65535)
        get_rows(type, table, cols, ids + i0, std::min<int64_t>(65535, n - i0), out + i0 * cols, stream);
    n = std::min<int64_t>(n, 65535);
    const size_t rb = row_size(type, cols);
    const uint8_t* t = static_cast<const uint8_t*>(table);
    const bool out_vec = cols % 8 == 0 && (reinterpret_cast<uintptr_t>(out) % 16) == 0;
    const bool vec = cols % 8 == 0 && (reinterpret_cast<uintptr_t>(table) % 16) == 0;
    const bool quantized = type_info(type).block_size > 1;
    const int threads = 128;
    if (vec || quantized) {
        // quantized rows always have cols % 32 == 0 (row_size checked it); Q4_K
        // needs a 16-byte aligned table (every upload() is 256-byte aligned)
        const dim3 grid(static_cast<unsigned>(ceil_div(cols / 8, threads)), static_cast<unsigned>(n));
        dispatch_weight_type(type, "cuda get_rows: unsupported table type ", [&](auto tt) {
            get_rows_kernel<decltype(tt)::value><<<grid, threads, 0, stream>>>(t, rb, cols, ids, out, out_vec);
        });
    } else {
        const dim3 grid(static_cast<unsigned>(ceil_div(cols, threads)), static_cast<unsigned>(n));
        get_rows_scalar_kernel<<<grid, threads, 0, stream>>>(t, rb, cols, type, ids, out);
    }
    MQ_CUDA_CHECK_LAUNCH();
}

void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
    if (rows == 0) return;
    rms_norm_kernel<<<static_cast<unsigned>(rows), norm_threads(cols), 0, stream>>>(x, w, y, cols, eps);
    MQ_CUDA_CHECK_LAUNCH();
}
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t cols, float eps,
                cudaStream_t stream) {
    if (rows == 0) return;
    layer_norm_kernel<<<static_cast<unsigned>(rows), norm_threads(cols), 0, stream>>>(x, w, b, y, cols, eps);
    MQ_CUDA_CHECK_LAUNCH();
}
void add(float* y, const float* x, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    add_kernel<<<elt_blocks(n), kEltThreads, 0, stream>>>(y, x, n);
    MQ_CUDA_CHECK_LAUNCH();
}
void add_scaled(float* y, const float* x, float s, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    add_scaled_kernel<<<elt_blocks(n), kEltThreads, 0, stream>>>(y, x, s, n);
    MQ_CUDA_CHECK_LAUNCH();
}
void silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    silu_mul_kernel<<<elt_blocks(n), kEltThreads, 0, stream>>>(gate, up, out, n);
    MQ_CUDA_CHECK_LAUNCH();
}
void gelu(float* x, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    gelu_kernel<<<elt_blocks(n), kEltThreads, 0, stream>>>(x, n);
    MQ_CUDA_CHECK_LAUNCH();
}
void rope(float* x, int64_t n_tok, int n_head, int head_dim, const int32_t* pos, const float* inv_freq,
          cudaStream_t stream) {
    const int64_t n = n_tok * n_head * (head_dim / 2);
    if (n == 0) return;
    rope_kernel<<<elt_blocks(n), kEltThreads, 0, stream>>>(x, n_tok, n_head, head_dim / 2, pos, inv_freq);
    MQ_CUDA_CHECK_LAUNCH();
}
void store_rows(const float* src, void* dst, DType dst_type, int64_t n, int64_t width, int64_t dst_stride,
                const int32_t* rows, cudaStream_t stream) {
    if (n == 0 || width == 0) return;
    if (dst_type == DType::F16)
        store_rows_f16_kernel<<<elt_blocks(n * width), kEltThreads, 0, stream>>>(src, static_cast<__half*>(dst), n,
                                                                                 width, dst_stride, rows);
    else
        store_rows_f32_kernel<<<elt_blocks(n * width), kEltThreads, 0, stream>>>(src, static_cast<float*>(dst), n,
                                                                                 width, dst_stride, rows);
    MQ_CUDA_CHECK_LAUNCH();
}
void scatter_i32(const int32_t* src, int32_t* dst, const int32_t* idx, int64_t n, cudaStream_t stream) {
    if (n == 0) return;
    scatter_i32_kernel<<<elt_blocks(n), kEltThreads, 0, stream>>>(src, dst, idx, n);
    MQ_CUDA_CHECK_LAUNCH();
}

}  // namespace mq::cuda
