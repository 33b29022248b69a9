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
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "model/tensors.h"

namespace mq {

struct TextHParams {
    int64_t vocab_size = 0;        // rows of output.weight (128256)
    int64_t hidden_size = 0;       // D (4096)
    int64_t intermediate_size = 0; // F (14336)
    int n_layer = 0;               // all decoder layers, self + cross (40)
    int n_head = 0;                // H (32)
    int n_kv_head = 0;             // Hkv (8)
    int head_dim = 0;              // hd (128) = D / H
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
    BackendBuffer(BackendBuffer&& o) noexcept : be_(o.be_), p_(o.p_), bytes_(o.bytes_) { o.p_ = nullptr; o.bytes_ = 0; }
    BackendBuffer& operator=(BackendBuffer&& o) noexcept {
        if (this != &o) { release(); be_ = o.be_; p_ = o.p_; bytes_ = o.bytes_; o.p_ = nullptr; o.bytes_ = 0; }
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

class TextDecoder {
public:
    // kv_type: F16 or F32, for the self-attention KV cache and the cached
    // cross-attention K/V. n_ctx: self-attention cache length in tokens.
    TextDecoder(Backend& be, const TensorMap& tm, const TextHParams& hp, int64_t n_ctx, DType kv_type);

    const TextHParams& hparams() const { return hp_; }
    int64_t n_ctx() const { return n_ctx_; }

    // Cross-attention K/V for a set of images, computed once and reused by
    // every later token (HF MllamaTextCrossAttention with cross_attention_states):
    //   states: backend f32 [n_keys, D] (all images, tiles and vision tokens, in
    //           that order; = HF cross_attention_states after the projector)
    //   K = k_norm(states · Wkᵀ) per head, V = states · Wvᵀ, stored [n_keys, Hkv*hd] in kv_type.
    void set_cross_states(const float* states, int64_t n_keys);
    void clear_cross();
    bool has_cross() const { return n_cross_keys_ > 0; }
    int64_t n_cross_keys() const { return n_cross_keys_; }

    // Runs n tokens at positions n_past .. n_past+n-1 through all layers,
    // writing their K/V into the cache, and writes the logits of the last
    // token (or of every token when all_logits) to logits_host:
    //   tokens_host: int32 [n]
    //   xmask:       backend f32 [n, n_cross_keys] additive cross-attention mask, or nullptr (attend to all)
    //   row_visible_host: uint8 [n], 0 for text rows that see no image
    //                (HF full_text_row_masked_out_mask), or nullptr (all 1)
    //   logits_host: f32 [all_logits ? n : 1, vocab_size]
    // Cross-attention layers are skipped while no image states are set (HF
    // MllamaTextModel.forward skips them for text-only input).
    void forward(const int32_t* tokens_host, int64_t n, int64_t n_past, const float* xmask,
                 const uint8_t* row_visible_host, bool all_logits, float* logits_host);

private:
    struct SelfLayer {
        Weight attn_norm, wq, wk, wv, wo;
        BackendBuffer k_cache, v_cache;   // [n_ctx, Hkv*hd] of kv_type
    };
    struct CrossLayer {
        Weight attn_norm, wq, wk, wv, wo, q_norm, k_norm;
        float attn_gate = 0.f, mlp_gate = 0.f;  // tanh of the stored raw gates
        BackendBuffer k, v;                      // [n_cross_keys, Hkv*hd] of kv_type
    };
    struct Layer {
        bool is_cross = false;
        SelfLayer self;
        CrossLayer cross;
        Weight ffn_norm, ffn_gate, ffn_up, ffn_down;
    };

    void self_attention(Layer& L, int64_t n, int64_t n_past, const int32_t* pos_host);
    void cross_attention(Layer& L, int64_t n, const float* xmask);
    void mlp(Layer& L, int64_t n);

    Backend& be_;
    TextHParams hp_;
    int64_t n_ctx_;
    DType kv_type_;
    Weight tok_embd_, output_norm_, output_;
    std::vector<Layer> layers_;
    int64_t n_cross_keys_ = 0;

    // Scratch activations for one batch of n tokens (grown as needed).
    BackendBuffer x_, h_, q_, k_, v_, attn_, ffn_a_, ffn_b_, logits_;
};

}  // namespace mq
