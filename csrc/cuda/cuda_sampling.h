// Token sampling on the GPU, so that only the sampled id (4 bytes) crosses to
// the host each decode step. To be wired by the model (later session): it
// calls these on the backend's stream after the lm_head matmul.
//
// Everything takes device pointers and runs in one thread block, with no host
// synchronisation, so it can sit inside a captured decode graph; the random
// number is read from device memory (`u`, one float in [0, 1)) so a graph
// replay can use a fresh value written before launch (or by a device RNG).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace mq {
class Backend;
}

namespace mq::cuda {

// The stream a CUDA backend queues every op on (throws for a non-CUDA backend).
cudaStream_t backend_stream(Backend& b);

// out[0] = argmax_i logits[i]; the lowest index wins ties; NaN counts as -inf.
//   logits: [n] float32, device; out: one int32, device.
void sample_argmax(const float* logits, int64_t n, int32_t* out, cudaStream_t stream);

// Largest top_k supported (candidates are sorted in shared memory).
constexpr int kMaxTopK = 1024;

struct SampleParams {
    float temperature = 1.0f;   // <= 0: greedy (argmax)
    int top_k = 40;             // 1..kMaxTopK; <= 0 or > kMaxTopK is clamped to kMaxTopK (the
                                // probability mass past the 1024 largest logits is dropped)
    float top_p = 1.0f;         // nucleus: keep the smallest prefix of the sorted top-k whose
                                // probability reaches top_p (1 = keep all k)
};

// Sample one token: take the top_k largest logits (ties broken by lower index),
// p_i = softmax(logit_i / temperature) over them, cut to the top_p nucleus,
// renormalise, and pick the token whose cumulative probability interval holds
// u[0] (as llama.cpp's and HF's samplers do, up to the RNG).
//   logits: [n] float32 device; u: one float in [0, 1) device; out: int32 device.
void sample_top_k_top_p(const float* logits, int64_t n, const SampleParams& p, const float* u, int32_t* out,
                        cudaStream_t stream);

}  // namespace mq::cuda
