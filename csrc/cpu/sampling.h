// Token sampling on the CPU: the CPU backend's sample() op (backend.h).
//
// The rules and their order are transformers' logits processors for one
// sequence (generation/logits_process.py: RepetitionPenalty, Temperature,
// TopK, TopP, MinP, then softmax and a multinomial draw), statement for
// statement the same as mllama_q/sampling.py (whose tests compare it with
// transformers; tests/test_generate.py runs the same comparison on this
// code through _core.sample_probs / _core.sample_token):
//   * repetition penalty: every distinct id of the history once,
//     s < 0 ? s * p : s / p;
//   * temperature 0: argmax (lowest index among equal maxima);
//   * else s / T in float32, top-k keeps s >= the k-th largest (ties kept),
//     top-p keeps a token iff the probability mass ranked strictly above it
//     (descending probability, ties by lower id) is < top_p (cumulative sums
//     in double), min-p keeps p >= min_p * max p, softmax in float32 over the
//     survivors;
//   * the draw: the first survivor (in the order the filters leave them) whose
//     cumulative probability (double) exceeds u * total.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.h"

namespace mq::cpu {

// Scratch reused across calls (one per thread).
struct SampleScratch {
    std::vector<float> s, v, p;
    std::vector<int32_t> ids, order;
    std::vector<uint32_t> seen;  // generation-stamped "id in history" marks [vocab]
    uint32_t stamp = 0;
};

// The surviving (id, probability) pairs of one logits row in draw order (the
// distribution the draw picks from; tests compare it with transformers').
// Greedy (temperature 0) gives the single argmax with probability 1.
void sample_distribution(const float* logits, int64_t vocab, const Backend::SampleParams& p, const int32_t* hist,
                         SampleScratch& sc, std::vector<int32_t>& ids, std::vector<float>& probs);

// One token id for one logits row.
int32_t sample_row(const float* logits, int64_t vocab, const Backend::SampleParams& p, const int32_t* hist,
                   SampleScratch& sc);

// Checks one row's parameters (finite, in range); throws std::invalid_argument naming the bad one.
void check_sample_params(const Backend::SampleParams& p);

}  // namespace mq::cpu
