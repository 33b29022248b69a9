// The mllama text decoder: Llama 3.1 self-attention layers interleaved with
// gated cross-attention layers that read the projected image states.
//
// Numerics follow HF transformers models/mllama/modeling_mllama.py
// (MllamaTextModel, MllamaSelfAttentionDecoderLayer,
// MllamaCrossAttentionDecoderLayer, MllamaTextCrossAttention). Weights use the
// GGUF layout of mllama_q/gguf_keys.py (llama.cpp names; Q/K rows, and the
// cross-attention q/k norm vectors, permuted to the interleaved-pair RoPE
// order, so q·k products equal HF's).
//
// Everything is computed through the Backend interface (backend.h).
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "backend/backend.h"
#include "model/tensors.h"

namespace mq {

struct TextHParams {
    int64_t vocab_size = 0;         // rows of output.weight (128256)
    int64_t hidden_size = 0;        // D (4096)
    int64_t intermediate_size = 0;  // F (14336)
    int n_layer = 0;                // all decoder layers, self + cross (40)
    int n_head = 0;                 // H (32)
    int n_kv_head = 0;              // Hkv (8)
    int head_dim = 0;               // hd (128) = D / H
    float rms_eps = 1e-5f;
    std::vector<int> cross_attention_layers;  // layer indices that are cross-attention layers
    // RoPE inverse frequencies [head_dim / 2], llama3 scaling already applied
    // (computed in Python from the file: theta^(-2i/hd) / rope_freqs[i]).
    std::vector<float> rope_inv_freq;
};

// Backend memory that frees itself and grows on demand (scratch activations).
class BackendBuffer {
public:
    BackendBuffer() = default;
    explicit BackendBuffer(Backend* be) : be_(be) {}
    ~BackendBuffer() { release(); }
    BackendBuffer(const BackendBuffer&) = delete;
    BackendBuffer& operator=(const BackendBuffer&) = delete;
    BackendBuffer(BackendBuffer&& o) noexcept : be_(o.be_), p_(o.p_), bytes_(o.bytes_) {
        o.p_ = nullptr;
        o.bytes_ = 0;
    }
    BackendBuffer& operator=(BackendBuffer&& o) noexcept {
        if (this != &o) {
            release();
            be_ = o.be_;
            p_ = o.p_;
            bytes_ = o.bytes_;
            o.p_ = nullptr;
            o.bytes_ = 0;
        }
        return *this;
    }
    // Makes the buffer at least `bytes` long (contents are lost when it grows).
    void* reserve(size_t bytes) {
        if (bytes > bytes_) {
            release();
            p_ = be_->alloc(bytes);
            bytes_ = bytes;
        }
        return p_;
    }
    float* f32(int64_t n) { return static_cast<float*>(reserve(size_t(n) * sizeof(float))); }
    void* data() const { return p_; }
    size_t bytes() const { return bytes_; }
    Backend* backend() const { return be_; }
    void release() {
        if (p_) be_->free(p_);
        p_ = nullptr;
        bytes_ = 0;
    }

private:
    Backend* be_ = nullptr;
    void* p_ = nullptr;
    size_t bytes_ = 0;
};

// Cross-attention K/V of one set of keys (an image's tiles x vision tokens,
// or a concatenation of several images' keys), one pair of buffers per
// cross-attention layer: k[c], v[c] are [n_keys, Hkv*hd] of the decoder's
// kv_type (HF MllamaTextCrossAttention: K = k_norm(k_proj(states)) per head,
// V = v_proj(states)), keys in HF's order (image, tile, vision token).
struct CrossKV {
    std::vector<BackendBuffer> k, v;  // [n_cross_layers]
    int64_t n_keys = 0;
    size_t bytes = 0;  // all layers, K and V
};

// Thrown by TextDecoder::step when the abort flag was raised: the step's rows
// were not committed (their cache rows are garbage past every sequence's
// length, which the next step overwrites).
struct StepAborted : std::runtime_error {
    StepAborted() : std::runtime_error("step aborted") {}
};

class TextDecoder {
public:
    // kv_type: F16 or F32, for the self-attention KV cache and the cached
    // cross-attention K/V. n_ctx: self-attention cache length in tokens, per
    // sequence; n_seq: sequences (cache slots). The caches are allocated here:
    // n_self_layers x 2 x n_seq x n_ctx x Hkv*hd values of kv_type.
    TextDecoder(Backend& be, const TensorMap& tm, const TextHParams& hp, int64_t n_ctx, DType kv_type, int n_seq);
    ~TextDecoder();

    const TextHParams& hparams() const { return hp_; }
    int64_t n_ctx() const { return n_ctx_; }
    int n_seq() const { return n_seq_; }
    int n_cross_layers() const { return int(cross_idx_.size()); }
    DType kv_type() const { return kv_type_; }
    // Bytes of the self-attention KV cache of one sequence (all layers, K and V).
    size_t kv_bytes_per_seq() const;
    // Bytes of the cross-attention K/V of n_keys keys (all layers, K and V).
    size_t cross_bytes(int64_t n_keys) const;

    // Cross-attention K/V of key states (HF cross_attention_states after the projector):
    //   states: backend f32 [n_keys, D].
    void cross_kv(const float* states, int64_t n_keys, CrossKV& out);
    // out = the concatenation of key ranges [key0, key0 + n) of existing sets (backend copies).
    struct KeyRange {
        const CrossKV* kv;
        int64_t key0, n;
    };
    void concat(const std::vector<KeyRange>& parts, CrossKV& out);

    // Rows [first, first + n) of one sequence's cache (every self-attention
    // layer's K and V, and its token history), copied out and back: a turn
    // that diverges from the cache overwrites rows a cancelled turn must give
    // back (MllamaModel::seq_snapshot).
    struct SavedRows {
        int64_t first = 0, n = 0;
        std::vector<BackendBuffer> k, v;  // per self layer [n, Hkv*hd] of kv_type
        BackendBuffer hist;               // int32 [n]
        size_t bytes = 0;
    };
    void save_rows(int slot, int64_t first, int64_t n, SavedRows& out);
    void load_rows(int slot, const SavedRows& in);

    // ---- one batched step ---------------------------------------------------
    // R rows (tokens) of several sequences go through all layers as ONE batch
    // (every matmul has M = R: the weights are read once for all sequences).
    struct SeqRows {  // one sequence's rows [row0, row0 + n) of the batch
        int slot;
        int64_t row0, n;
        int64_t n_past;       // tokens already in its cache (positions n_past ..)
        bool decode = false;  // decode rows (a generating sequence's next token), else prompt rows
    };
    struct CrossRun {  // rows [row0, row0 + n) attend keys [key0, key0 + n_keys) of kv
        int64_t row0, n;
        const CrossKV* kv;
        int64_t key0, n_keys;
        bool mlp;  // add the cross layer's MLP output (false: HF full_text_row_masked_out_mask = 0)
    };
    struct Step {
        const int32_t* tokens = nullptr;  // host int32 [R]
        int64_t R = 0;
        std::vector<SeqRows> seqs;  // cover rows [0, R) in order
        // Rows [0, n_cross_rows) belong to sequences with images and are all
        // covered by `cross` runs; the other rows skip the cross-attention
        // layers (HF MllamaTextModel skips them for text-only input).
        std::vector<CrossRun> cross;
        int64_t n_cross_rows = 0;
        std::vector<int64_t> logit_rows;  // rows whose logits are computed
        // Sampling for the first sample.size() logit rows (hist_begin/hist_len
        // are filled in by step(): the row's sequence history up to that row).
        std::vector<Backend::SampleParams> sample;
        std::vector<int> sample_slot;      // the sequence slot of each sampled row
        std::vector<int64_t> sample_hist;  // tokens of that sequence up to and including the row
    };
    // Runs the step: K/V of every row are written at cache rows slot * n_ctx +
    // n_past + i; logits of the logit rows are copied to logits_host [L, vocab]
    // when it is not nullptr; sampled ids to ids_host [sample.size()].
    // `abort` is checked between layers (StepAborted).
    void step(const Step& st, float* logits_host, int32_t* ids_host, const std::atomic<bool>* abort);

private:
    struct SelfLayer {
        Weight attn_norm, wq, wk, wv, wo;
        BackendBuffer k_cache, v_cache;  // [n_seq * n_ctx, Hkv*hd] of kv_type (slot-major)
    };
    struct CrossLayer {
        Weight attn_norm, wq, wk, wv, wo, q_norm, k_norm;
        float attn_gate = 0.f, mlp_gate = 0.f;  // tanh of the stored raw gates
    };
    struct Layer {
        bool is_cross = false;
        int cross_index = -1;  // index into CrossKV::k/v
        SelfLayer self;
        CrossLayer cross;
        Weight ffn_norm, ffn_gate, ffn_up, ffn_down;
    };

    // Consecutive rows of one class (SeqRows::decode): every matmul of a step runs once per
    // run (Backend::matmul_rows), so each row is computed by its class's kernels.
    struct RowRun {
        int64_t row0, n;
        bool decode;
    };
    // y[r, :] = x[r, :] · Wᵀ for rows r < n_rows (runs cut there). x, y: [n_rows, ldx / ldy].
    void matmul_runs(const std::vector<RowRun>& runs, int64_t n_rows, const float* x, int64_t ldx, const Weight& w,
                     float* y, int64_t ldy);
    void mlp(Layer& L, const std::vector<RowRun>& runs, int64_t n);

    Backend& be_;
    TextHParams hp_;
    int64_t n_ctx_;
    DType kv_type_;
    int n_seq_;
    Weight tok_embd_, output_norm_, output_;
    std::vector<Layer> layers_;
    std::vector<int> cross_idx_;  // layer index of each cross-attention layer
    int n_self_ = 0;
    BackendBuffer inv_freq_;  // f32 [head_dim / 2]
    BackendBuffer hist_;      // int32 [n_seq * n_ctx]: every sequence's tokens (sampling history)

    // Scratch activations for one batch of R tokens (grown as needed).
    BackendBuffer x_, h_, q_, k_, v_, attn_, ffn_a_, ffn_b_, logits_, xl_, ids_;
    std::unique_ptr<class StepBlock> block_;
};

}  // namespace mq
