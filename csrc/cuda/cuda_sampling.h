// Token sampling on the GPU: the CUDA backend's sample() op (backend.h), so
// that only the sampled ids (4 bytes per sequence) cross to the host each
// decode step.
//
// Everything takes device pointers, reads each row's parameters and random
// draw from device memory (the step block), runs one thread block per row and
// never synchronises with the host: launches depend only on (n_rows, vocab),
// so they can sit in a captured decode graph replayed with fresh parameters.
//
// Built and compiled, not yet run on a GPU. Differences from the CPU sampler
// (csrc/cpu/sampling.h, transformers' rules): top-k is at most kMaxTopK, and
// top_k = 0 ("off") keeps the kMaxTopK largest logits (the probability mass
// past the 1024 most likely tokens is dropped); draws are float32.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/backend.h"

namespace mq::cuda {

// Largest top_k supported (candidates are sorted in shared memory).
constexpr int kMaxTopK = 1024;

// transformers' RepetitionPenaltyLogitsProcessor: for every id of row r's
// history (params[r].hist_begin / hist_len into hist), dst[r, id] =
// src[r, id] < 0 ? src * p : src / p with p = params[r].repetition_penalty.
// dst starts as a copy of src; reading src only makes repeated ids harmless.
//   src, dst: [n_rows, vocab] float32, device
void repetition_penalty(const float* src, float* dst, int64_t n_rows, int64_t vocab,
                        const Backend::SampleParams* params, const int32_t* hist, cudaStream_t stream);

// One token per row: temperature 0 -> argmax (the lowest index wins ties, NaN
// counts as -inf); else the top_k largest logits (ties broken by lower index),
// p_i = softmax(logit_i / temperature) over them, cut to the top_p nucleus
// (the smallest prefix whose mass reaches top_p) and to min_p (p_i >= min_p *
// p_max), renormalised, and the token whose cumulative probability interval
// holds u (as transformers' and llama.cpp's samplers do, up to the RNG).
//   logits: [n_rows, vocab] float32, device; out: int32 [n_rows], device
void sample_rows(const float* logits, int64_t n_rows, int64_t vocab, const Backend::SampleParams* params, int32_t* out,
                 cudaStream_t stream);

}  // namespace mq::cuda
