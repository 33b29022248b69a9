// CPU token sampling (sampling.h): transformers' logits processors, as
// mllama_q/sampling.py states them.
#include "cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace mq::cpu {
namespace {

// float32 softmax of v[0..n) into p (max subtracted; the sum accumulated in double, rounded once).
void softmax(const float* v, int64_t n, float* p) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; i++) m = std::max(m, v[i]);
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        p[i] = std::exp(v[i] - m);
        sum += p[i];
    }
    const float inv = float(sum);
    for (int64_t i = 0; i < n; i++) p[i] = p[i] / inv;
}

// s := repetition-penalised copy of logits (or the logits themselves when p == 1). Returns the row to use.
const float* penalised(const float* logits, int64_t vocab, const Backend::SampleParams& p, const int32_t* hist,
                       SampleScratch& sc) {
    if (p.repetition_penalty == 1.0f || p.hist_len <= 0) return logits;
    sc.s.assign(logits, logits + vocab);
    if (sc.seen.size() != size_t(vocab)) {
        sc.seen.assign(size_t(vocab), 0u);
        sc.stamp = 0;
    }
    if (++sc.stamp == 0) {  // wrapped: clear the marks
        std::fill(sc.seen.begin(), sc.seen.end(), 0u);
        sc.stamp = 1;
    }
    const float pen = p.repetition_penalty;
    const int32_t* h = hist + p.hist_begin;
    for (int32_t i = 0; i < p.hist_len; i++) {
        const int32_t id = h[i];
        // ids past the logits (the <|image|> token, embedding row vocab_size) have no score to penalise
        if (id < 0 || id >= vocab || sc.seen[id] == sc.stamp) continue;
        sc.seen[id] = sc.stamp;
        const float x = sc.s[id];
        sc.s[id] = x < 0 ? x * pen : x / pen;
    }
    return sc.s.data();
}

int32_t argmax(const float* s, int64_t n) {
    int64_t best = 0;
    for (int64_t i = 1; i < n; i++)
        if (s[i] > s[best]) best = i;
    return int32_t(best);
}

// Filters of sampling.py's filter_logits on s [vocab] (penalised): sc.ids / sc.v hold the
// survivors (ids and temperature-scaled logits) in draw order; returns their count.
int64_t filter(const float* s, int64_t vocab, const Backend::SampleParams& p, SampleScratch& sc) {
    auto& x = sc.v;  // scaled logits [vocab]
    x.resize(size_t(vocab));
    if (p.temperature != 1.0f)
        for (int64_t i = 0; i < vocab; i++) x[i] = s[i] / p.temperature;
    else std::copy(s, s + vocab, x.begin());
    auto& ids = sc.ids;
    ids.clear();
    if (p.top_k > 0 && p.top_k < vocab) {
        // HF TopK: remove scores < the k-th largest (ties with it survive)
        sc.p.assign(x.begin(), x.end());
        std::nth_element(sc.p.begin(), sc.p.begin() + (vocab - p.top_k), sc.p.end());
        const float kth = sc.p[size_t(vocab - p.top_k)];
        for (int64_t i = 0; i < vocab; i++)
            if (x[i] >= kth) ids.push_back(int32_t(i));
    } else {
        ids.resize(size_t(vocab));
        for (int64_t i = 0; i < vocab; i++) ids[i] = int32_t(i);
    }
    int64_t n = int64_t(ids.size());
    std::vector<float> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; i++) v[i] = x[ids[i]];
    std::vector<float> pr(static_cast<size_t>(n));
    if (p.top_p < 1.0f && n > 1) {
        // HF TopP: a token is kept iff the mass ranked strictly above it is < top_p
        // (sampling.py _top_p_keep: the 1024 most likely first, a full sort if they fall short).
        softmax(v.data(), n, pr.data());
        auto& order = sc.order;
        order.resize(size_t(n));
        for (int64_t i = 0; i < n; i++) order[i] = int32_t(i);
        auto before = [&](int32_t a, int32_t b) { return pr[a] > pr[b] || (pr[a] == pr[b] && a < b); };
        constexpr int64_t kFirst = 1024;
        int64_t m = n;
        if (n > kFirst) {
            std::nth_element(order.begin(), order.begin() + kFirst, order.end(), before);
            m = kFirst;
        }
        std::sort(order.begin(), order.begin() + m, before);
        double c = 0.0;
        for (int64_t i = 0; i < m; i++) c += double(pr[order[i]]);
        if (m < n && c < double(p.top_p)) {
            std::sort(order.begin(), order.end(), before);
            m = n;
        }
        std::vector<int32_t> kid;
        std::vector<float> kv;
        c = 0.0;
        for (int64_t i = 0; i < m; i++) {
            const double pd = double(pr[order[i]]);
            c += pd;
            if (c - pd < double(p.top_p)) {  // sampling.py: above = cumsum(pd) - pd
                kid.push_back(ids[order[i]]);
                kv.push_back(v[order[i]]);
            }
        }
        ids.swap(kid);
        v.swap(kv);
        n = int64_t(ids.size());
        pr.resize(size_t(n));
    }
    if (p.min_p > 0.0f && n > 1) {
        // HF MinP: remove p < min_p * max(p)
        softmax(v.data(), n, pr.data());
        float pmax = 0.0f;
        for (int64_t i = 0; i < n; i++) pmax = std::max(pmax, pr[i]);
        const float thr = p.min_p * pmax;
        int64_t w = 0;
        for (int64_t i = 0; i < n; i++)
            if (pr[i] >= thr) {
                ids[w] = ids[i];
                v[w] = v[i];
                w++;
            }
        ids.resize(size_t(w));
        v.resize(size_t(w));
        n = w;
    }
    sc.v.assign(v.begin(), v.end());
    return n;
}

}  // namespace

void check_sample_params(const Backend::SampleParams& p) { Backend::check(p); }

void sample_distribution(const float* logits, int64_t vocab, const Backend::SampleParams& p, const int32_t* hist,
                         SampleScratch& sc, std::vector<int32_t>& ids, std::vector<float>& probs) {
    const float* s = penalised(logits, vocab, p, hist, sc);
    if (p.temperature == 0.0f) {
        ids.assign(1, argmax(s, vocab));
        probs.assign(1, 1.0f);
        return;
    }
    const int64_t n = filter(s, vocab, p, sc);
    ids.assign(sc.ids.begin(), sc.ids.begin() + n);
    probs.resize(size_t(n));
    softmax(sc.v.data(), n, probs.data());
}

int32_t sample_row(const float* logits, int64_t vocab, const Backend::SampleParams& p, const int32_t* hist,
                   SampleScratch& sc) {
    const float* s = penalised(logits, vocab, p, hist, sc);
    if (p.temperature == 0.0f) return argmax(s, vocab);
    const int64_t n = filter(s, vocab, p, sc);
    if (n <= 0) return argmax(s, vocab);  // every logit NaN: nothing survived
    sc.p.resize(size_t(n));
    softmax(sc.v.data(), n, sc.p.data());
    // sampling.py Sampler: cdf = cumsum(p as float64); r = u * cdf[-1]; first index with cdf > r
    double total = 0.0;
    for (int64_t i = 0; i < n; i++) total += double(sc.p[i]);
    const double r = p.u * total;
    double c = 0.0;
    for (int64_t i = 0; i < n; i++) {
        c += double(sc.p[i]);
        if (c > r) return sc.ids[i];
    }
    return sc.ids[n - 1];
}

}  // namespace mq::cpu
