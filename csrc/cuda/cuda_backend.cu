// mq::Backend on one CUDA device (contract: csrc/backend/backend.h).
//
// Memory
//   * alloc()/free() go through a caching pool: freed blocks are kept and
//     handed out again (best fit within 2x), so a decode loop that allocates
//     and frees the same activations calls cudaMalloc only on its first step.
//     On out-of-memory the cache is released and the allocation retried once;
//     if it still fails a std::runtime_error gives the request and the free /
//     total VRAM.
//   * MLLAMA_Q_CUDA_POISON=1 (tests): every alloc() is filled with NaN bytes.
//   * Weights: upload() copies the GGUF bytes once, unchanged (quantized), into
//     their own allocation.
//   * Scratch owned by the backend (8-bit activations for the matrix-vector
//     kernels, attention split partials) grows on demand and is never freed
//     per call: after a warm-up step with the largest shapes no allocation happens.
//
// Step inputs
//   Every array an op reads is device memory: the model puts a step's token
//   ids, positions, cache rows, attention segment tables and sampling
//   parameters in ONE block (csrc/model/step_block.h) and sends it with one
//   cudaMemcpyAsync per step; nothing else is staged.
//
// Toward CUDA graphs (next step; nothing here is captured yet): all kernels
// run on one stream and take device pointers only, and the step block's
// device address is stable, so a decode step can be captured once per batch
// size and replayed after the block copy. What still prevents it: (1) the
// attention launches take their key counts (and split counts derived from
// them) as kernel arguments from the segment table's host mirror: a captured
// step needs a kernel that reads them from the block's device copy (already
// in the block, `segs`) with a fixed upper bound; (2) scratch growth
// (cudaMalloc) must not happen inside a capture: warm up with the largest
// shapes first. Sampling already reads its parameters and draws on the device.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "backend/backend.h"
#include "common/env.h"
#include "cuda/cuda_common.cuh"
#include "cuda/cuda_kernels.h"
#include "cuda/cuda_sampling.h"

namespace mq::cuda {

void throw_cuda_error(cudaError_t e, const char* what, const char* file, int line) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string("CUDA error ") + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ") in " +
                             what + " at " + file + ":" + std::to_string(line));
}

namespace {

constexpr size_t kAlign = 256;

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

void require(bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument("cuda backend: " + msg);
}

class CudaBackend final : public Backend {
public:
    explicit CudaBackend(int device) : device_(device) {
        int n = 0;
        if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
            cudaGetLastError();
            throw std::runtime_error("no usable CUDA device (driver missing or no GPU)");
        }
        if (device < 0 || device >= n)
            throw std::runtime_error("CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(n) +
                                     " device(s))");
        MQ_CUDA_CHECK(cudaSetDevice(device_));
        cudaDeviceProp prop;
        MQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
        if (prop.major < 8)
            throw std::runtime_error(std::string("CUDA device ") + prop.name + " has compute capability " +
                                     std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                                     "; mllama-q needs 8.0 or newer");
        poison_ = env::cuda_poison();
        name_ = std::string("cuda:") + std::to_string(device) + " (" + prop.name + ")";
        num_sms_ = prop.multiProcessorCount;
        MQ_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    }

    ~CudaBackend() override {
        // Never throw from a destructor: errors here are ignored.
        cudaSetDevice(device_);
        if (stream_) cudaStreamSynchronize(stream_);
        for (auto& kv : live_) cudaFree(kv.first);
        for (auto& kv : cache_) cudaFree(kv.second);
        for (void* p : {act_buf_, attn_buf_, samp_buf_})
            if (p) cudaFree(p);
        if (stream_) cudaStreamDestroy(stream_);
        cudaGetLastError();
    }

    std::string name() const override { return name_; }

    // ---- memory ---------------------------------------------------------------
    // alloc/free may be called from any thread (an image's K/V can be released by
    // Python while another thread's step runs): the pool is locked.
    void* alloc(size_t bytes) override {
        activate();
        std::lock_guard<std::mutex> lock(mem_mu_);
        const size_t size = round_up(std::max<size_t>(bytes, 1), kAlign);
        void* p = nullptr;
        auto it = cache_.lower_bound(size);
        if (it != cache_.end() && it->first <= 2 * size) {
            p = it->second;
            live_[p] = it->first;
            cache_.erase(it);
        } else {
            p = raw_alloc(size);
            live_[p] = size;
        }
        // Debug/test hook: fill new allocations with 0xFF bytes (NaN as f32 and f16)
        // so that an output element a kernel forgot to write shows up as NaN.
        if (poison_) MQ_CUDA_CHECK(cudaMemsetAsync(p, 0xFF, live_[p], stream_));
        return p;
    }

    void free(void* p) override {
        if (!p) return;
        std::lock_guard<std::mutex> lock(mem_mu_);
        auto it = live_.find(p);
        require(it != live_.end(), "free() of a pointer this backend did not allocate");
        // Stream order makes reuse safe: any later op that gets this block runs
        // after every op already queued that reads it.
        cache_.emplace(it->second, p);
        live_.erase(it);
    }

    void to_device(void* dst, const void* src_host, size_t bytes) override {
        if (bytes == 0) return;
        activate();
        // From pageable memory the call returns once the source has been staged,
        // so the caller may reuse src_host at once.
        MQ_CUDA_CHECK(cudaMemcpyAsync(dst, src_host, bytes, cudaMemcpyHostToDevice, stream_));
    }

    void to_host(void* dst_host, const void* src, size_t bytes) override {
        if (bytes == 0) return;
        activate();
        MQ_CUDA_CHECK(cudaMemcpyAsync(dst_host, src, bytes, cudaMemcpyDeviceToHost, stream_));
        MQ_CUDA_CHECK(cudaStreamSynchronize(stream_));
    }

    void copy(void* dst, const void* src, size_t bytes) override {
        if (bytes == 0) return;
        activate();
        MQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
    }

    Weight upload(const void* host, DType type, int64_t rows, int64_t cols) override {
        require(host != nullptr, "upload() of a null buffer");
        require(rows >= 0 && cols >= 0, "upload(): negative shape");
        require(type_info(type).weight,
                std::string(type_info(type).name) + " is an activation format, not a weight type");
        const size_t bytes = static_cast<size_t>(rows) * row_size(type, cols);  // throws on a bad cols
        Weight w;
        w.type = type;
        w.rows = rows;
        w.cols = cols;
        void* p = alloc(bytes);
        try {
            MQ_CUDA_CHECK(cudaMemcpyAsync(p, host, bytes, cudaMemcpyHostToDevice, stream_));
        } catch (...) {
            free(p);
            throw;
        }
        w.data = p;
        return w;
    }

    void synchronize() override {
        activate();
        MQ_CUDA_CHECK(cudaStreamSynchronize(stream_));
        MQ_CUDA_CHECK(cudaGetLastError());
    }

    // ---- linear algebra ---------------------------------------------------------
    // No batch-invariance promise yet (backend.h): decode and prompt rows alike.
    void matmul_rows(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy, bool) override {
        matmul(x, M, ldx, w, nullptr, y, ldy);
    }
    void matmul(const float* x, int64_t M, int64_t ldx, const Weight& w, const float* bias, float* y,
                int64_t ldy) override {
        require(M >= 0, "matmul: negative M");
        check_weight(w, "matmul");
        const int64_t K = w.cols, N = w.rows;
        require(ldx >= K, "matmul: ldx " + std::to_string(ldx) + " < K " + std::to_string(K));
        require(ldy >= N, "matmul: ldy " + std::to_string(ldy) + " < N " + std::to_string(N));
        if (M == 0 || N == 0) return;
        require(x && y, "matmul: null x or y");
        activate();
        if (M == 1) {
            if (matvec_uses_q8(w.type)) {
                const int64_t Kp = act_q8_kp(K);
                int8_t* xq = nullptr;
                float2* xds = nullptr;
                act_q8_buffers(1, Kp, xq, xds);
                quantize_act_q8(x, 1, K, ldx, xq, xds, Kp, stream_);
                matvec(w.type, w.data, N, K, x, xq, xds, bias, y, stream_);
            } else {
                matvec(w.type, w.data, N, K, x, nullptr, nullptr, bias, y, stream_);
            }
            return;
        }
        gemm(w.type, w.data, N, K, x, M, ldx, bias, y, ldy, stream_);
    }

    void get_rows(const Weight& table, const int32_t* ids, int64_t n, float* out) override {
        // float32 activations wrapped as a table (the logit rows' gather) are F32 Weights too
        check_weight(table, "get_rows");
        require(n >= 0, "get_rows: negative n");
        if (n == 0) return;
        require(ids && out, "get_rows: null ids or out");
        activate();
        cuda::get_rows(table.type, table.data, table.cols, ids, n, out, stream_);
    }

    // ---- elementwise and normalisation ---------------------------------------------
    void rms_norm(const float* x, const float* w, float* y, int64_t rows, int64_t cols, float eps) override {
        require(rows >= 0 && cols > 0, "rms_norm: bad shape");
        activate();
        cuda::rms_norm(x, w, y, rows, cols, eps, stream_);
    }
    void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t rows, int64_t cols,
                    float eps) override {
        require(rows >= 0 && cols > 0, "layer_norm: bad shape");
        activate();
        cuda::layer_norm(x, w, b, y, rows, cols, eps, stream_);
    }
    void add(float* y, const float* x, int64_t n) override {
        require(n >= 0, "add: negative n");
        activate();
        cuda::add(y, x, n, stream_);
    }
    void add_scaled(float* y, const float* x, float s, int64_t n) override {
        require(n >= 0, "add_scaled: negative n");
        activate();
        cuda::add_scaled(y, x, s, n, stream_);
    }
    void silu_mul(const float* gate, const float* up, float* out, int64_t n) override {
        require(n >= 0, "silu_mul: negative n");
        activate();
        cuda::silu_mul(gate, up, out, n, stream_);
    }
    void gelu(float* x, int64_t n) override {
        require(n >= 0, "gelu: negative n");
        activate();
        cuda::gelu(x, n, stream_);
    }
    void rope(float* x, int64_t n_tok, int n_head, int head_dim, const int32_t* pos, const float* inv_freq) override {
        require(n_tok >= 0 && n_head >= 0, "rope: negative shape");
        require(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim must be even and positive");
        if (n_tok == 0 || n_head == 0) return;
        require(pos && inv_freq, "rope: null pos or inv_freq");
        activate();
        cuda::rope(x, n_tok, n_head, head_dim, pos, inv_freq, stream_);
    }

    // ---- attention --------------------------------------------------------------------
    void attention(const float* q, const void* k, const void* v, DType kv_type, int64_t kv_stride, float* out,
                   int64_t nq, int64_t nk, int n_head, int n_kv_head, int hd, float scale, const float* mask,
                   int64_t ld_mask, bool causal, int64_t q_offset) override {
        require(kv_type == DType::F32 || kv_type == DType::F16, "attention: K/V must be f32 or f16");
        require(nq >= 0 && nk >= 0, "attention: negative nq or nk");
        require(n_head > 0 && n_kv_head > 0 && n_head % n_kv_head == 0,
                "attention: n_head must be a positive multiple of n_kv_head");
        require(hd > 0 && hd <= 256, "attention: head_dim must be in 1..256");
        require(kv_stride >= static_cast<int64_t>(n_kv_head) * hd, "attention: kv_stride < n_kv_head * head_dim");
        require(!mask || ld_mask >= nk, "attention: ld_mask < nk");
        if (nq == 0) return;
        activate();
        AttnArgs a{q,      k,         v,  kv_type, kv_stride, out,     nq,     nk,
                   n_head, n_kv_head, hd, scale,   mask,      ld_mask, causal, q_offset};
        const size_t need = attention_scratch_floats(a, num_sms_);
        float* scratch = nullptr;
        if (need) scratch = static_cast<float*>(grow(attn_buf_, attn_cap_, need * sizeof(float)));
        cuda::attention(a, scratch, num_sms_, stream_);
    }

    void attention_segments(const float* q, float* out, const AttnSegment* segs_host, const AttnSegment*, int n_segs,
                            DType kv_type, int64_t kv_stride, int n_head, int n_kv_head, int hd, float scale) override {
        // One launch per segment from the host mirror (see the file comment: a
        // graph-capturable step needs one kernel reading the device table).
        // The CUDA kernels are not batch-invariant (split counts follow nk).
        for (int i = 0; i < n_segs; i++) {
            const AttnSegment& g = segs_host[i];
            if (g.n_q <= 0) continue;
            const int64_t off = g.q_row * int64_t(n_head) * hd;
            attention(q + off, g.k, g.v, kv_type, kv_stride, out + off, g.n_q, g.n_k, n_head, n_kv_head, hd, scale,
                      nullptr, 0, g.causal != 0, g.q_offset);
        }
    }

    void store_rows(const float* src, void* dst, DType dst_type, int64_t n, int64_t width, int64_t dst_stride,
                    const int32_t* dst_rows) override {
        require(dst_type == DType::F32 || dst_type == DType::F16, "store_rows: dst_type must be f32 or f16");
        require(n >= 0 && width >= 0 && dst_stride >= width, "store_rows: bad shape or stride");
        activate();
        cuda::store_rows(src, dst, dst_type, n, width, dst_stride, dst_rows, stream_);
    }

    void scatter_i32(const int32_t* src, int32_t* dst, const int32_t* idx, int64_t n) override {
        require(n >= 0, "scatter_i32: negative n");
        activate();
        cuda::scatter_i32(src, dst, idx, n, stream_);
    }

    void sample(const float* logits, int64_t n_rows, int64_t vocab, const SampleParams* params, const int32_t* hist,
                int32_t* out_ids) override {
        require(n_rows >= 0 && vocab > 0 && vocab <= 0x7fffffff, "sample: bad shape");
        if (n_rows == 0) return;
        activate();
        // The penalty needs a copy of the rows (duplicate history ids must see the original
        // score): [n_rows, vocab] floats of backend scratch, then the sampled rows in place.
        float* work = static_cast<float*>(grow(samp_buf_, samp_cap_, size_t(n_rows) * vocab * sizeof(float)));
        MQ_CUDA_CHECK(
            cudaMemcpyAsync(work, logits, size_t(n_rows) * vocab * sizeof(float), cudaMemcpyDeviceToDevice, stream_));
        cuda::repetition_penalty(logits, work, n_rows, vocab, params, hist, stream_);
        cuda::sample_rows(work, n_rows, vocab, params, out_ids, stream_);
    }

    // The stream every op is queued on (for the model's graph capture and sampling).
    cudaStream_t stream() const { return stream_; }

private:
    void activate() { MQ_CUDA_CHECK(cudaSetDevice(device_)); }

    void check_weight(const Weight& w, const char* op) {
        require(w.data != nullptr, std::string(op) + ": weight has no data (not uploaded?)");
        require(type_info(w.type).weight, std::string(op) + ": unsupported weight type " + type_info(w.type).name);
        require(w.rows >= 0 && w.cols > 0, std::string(op) + ": bad weight shape");
        row_size(w.type, w.cols);  // throws std::invalid_argument when cols is not a multiple of the block
        // The loads of each type need Dequant8<T>::kAlign (Q4_K blocks are read with 16-byte loads,
        // Q6_K / Q8_0 / 16-bit types with 2-byte loads; upload() gives 256-byte alignment, a Weight
        // that views into the middle of one must keep this).
        const uintptr_t addr = reinterpret_cast<uintptr_t>(w.data);
        const uintptr_t need = dispatch_weight_type(w.type, "unsupported weight type ", [](auto type) {
            return uintptr_t(Dequant8<decltype(type)::value>::kAlign);
        });
        require(addr % need == 0, std::string(op) + ": " + type_info(w.type).name + " weight data must be " +
                                      std::to_string(need) + "-byte aligned in device memory");
    }

    // cudaMalloc with one retry after releasing the cache, and a clear message.
    void* raw_alloc(size_t size) {
        void* p = nullptr;
        cudaError_t e = cudaMalloc(&p, size);
        if (e == cudaErrorMemoryAllocation) {
            cudaGetLastError();
            release_cache();
            e = cudaMalloc(&p, size);
        }
        if (e == cudaErrorMemoryAllocation) {
            cudaGetLastError();
            size_t free_b = 0, total_b = 0;
            cudaMemGetInfo(&free_b, &total_b);
            cudaGetLastError();
            size_t held = 0;
            for (auto& kv : live_) held += kv.second;
            throw std::runtime_error("CUDA out of memory on " + name_ + ": requested " + mib(size) + ", free " +
                                     mib(free_b) + " of " + mib(total_b) + " (mllama-q holds " + mib(held) + ")");
        }
        if (e != cudaSuccess) throw_cuda_error(e, "cudaMalloc", __FILE__, __LINE__);
        return p;
    }

    void release_cache() {  // with mem_mu_ held
        if (cache_.empty()) return;
        cudaStreamSynchronize(stream_);
        for (auto& kv : cache_) cudaFree(kv.second);
        cache_.clear();
    }

    static std::string mib(size_t b) { return std::to_string(b >> 20) + " MiB"; }

    // Backend-owned scratch: grows (never shrinks). Growing waits for queued work
    // that may still read the old buffer.
    void* grow(void*& buf, size_t& cap, size_t need) {
        if (need <= cap) return buf;
        MQ_CUDA_CHECK(cudaStreamSynchronize(stream_));
        if (buf) MQ_CUDA_CHECK(cudaFree(buf));
        buf = nullptr;
        cap = 0;
        const size_t size = round_up(std::max(need, need + need / 4), kAlign);
        {
            std::lock_guard<std::mutex> lock(mem_mu_);
            buf = raw_alloc(size);
        }
        cap = size;
        return buf;
    }

    void act_q8_buffers(int64_t M, int64_t Kp, int8_t*& xq, float2*& xds) {
        const size_t q_bytes = round_up(static_cast<size_t>(M * Kp), kAlign);
        const size_t ds_bytes = static_cast<size_t>(M * (Kp / 32)) * sizeof(float2);
        uint8_t* base = static_cast<uint8_t*>(grow(act_buf_, act_cap_, q_bytes + ds_bytes));
        xq = reinterpret_cast<int8_t*>(base);
        xds = reinterpret_cast<float2*>(base + q_bytes);
    }

    int device_;
    bool poison_ = false;  // MLLAMA_Q_CUDA_POISON=1
    std::string name_;
    int num_sms_ = 1;
    cudaStream_t stream_ = nullptr;

    std::unordered_map<void*, size_t> live_;  // pointer -> size of live allocations
    std::multimap<size_t, void*> cache_;      // freed blocks by size

    std::mutex mem_mu_;  // live_ and cache_

    void* act_buf_ = nullptr;  // 8-bit activations
    size_t act_cap_ = 0;
    void* attn_buf_ = nullptr;  // attention split partials
    size_t attn_cap_ = 0;
    void* samp_buf_ = nullptr;  // sampling: penalised copies of the logits rows
    size_t samp_cap_ = 0;
};

}  // namespace

cudaStream_t backend_stream(Backend& b) {
    auto* cb = dynamic_cast<CudaBackend*>(&b);
    if (!cb) throw std::invalid_argument("backend_stream(): not a CUDA backend");
    return cb->stream();
}

}  // namespace mq::cuda

namespace mq {
std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<cuda::CudaBackend>(device); }
}  // namespace mq
