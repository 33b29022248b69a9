// The mllama text decoder (see text.h). Reference for every step:
// HF transformers models/mllama/modeling_mllama.py.
#include "model/text.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/checked.h"

namespace mq {
namespace {

std::string blk(int i, const char* name) { return "blk." + std::to_string(i) + "." + name; }

size_t kv_elem_size(DType t) { return t == DType::F16 ? 2 : 4; }

// Norm weights are read by the backend as float32 vectors.
const Weight& f32_vec(const TensorMap& tm, const std::string& name, int64_t n) {
    const Weight& w = tm.get(name, {n});
    if (w.type != DType::F32) throw std::runtime_error("tensor '" + name + "' must be f32 (norm weights are read as float32)");
    return w;
}

// A [1] f32 gate stored raw (gguf_keys: XATTN_ATTN_GATE / XATTN_MLP_GATE): tanh applied here.
float tanh_gate(const TensorMap& tm, const std::string& name) {
    tm.get(name, {1});
    return std::tanh(tm.host_f32(name)[0]);
}

}  // namespace

TextDecoder::TextDecoder(Backend& be, const TensorMap& tm, const TextHParams& hp, int64_t n_ctx, DType kv_type)
    : be_(be), hp_(hp), n_ctx_(n_ctx), kv_type_(kv_type),
      x_(&be), h_(&be), q_(&be), k_(&be), v_(&be), attn_(&be), ffn_a_(&be), ffn_b_(&be), logits_(&be) {
    if (kv_type != DType::F16 && kv_type != DType::F32) throw std::invalid_argument("kv_type must be f16 or f32");
    if (n_ctx <= 0) throw std::invalid_argument("n_ctx must be positive");
    if (hp.n_layer <= 0 || hp.n_head <= 0 || hp.n_kv_head <= 0 || hp.head_dim <= 0 || hp.hidden_size <= 0 ||
        hp.intermediate_size <= 0 || hp.vocab_size <= 0)
        throw std::invalid_argument("text hyper-parameters must be positive");
    if (hp.n_head % hp.n_kv_head) throw std::invalid_argument("head_count must be a multiple of head_count_kv");
    if (hp.head_dim % 2) throw std::invalid_argument("head_dim must be even (RoPE rotates pairs)");
    if (int64_t(hp.rope_inv_freq.size()) * 2 != hp.head_dim)
        throw std::invalid_argument("rope_inv_freq must have head_dim/2 = " + std::to_string(hp.head_dim / 2) + " entries");
    for (int c : hp.cross_attention_layers)
        if (c < 0 || c >= hp.n_layer) throw std::invalid_argument("cross-attention layer index " + std::to_string(c) + " out of range");

    const int64_t D = hp.hidden_size, F = hp.intermediate_size, hd = hp.head_dim;
    const int64_t qdim = int64_t(hp.n_head) * hd, kvdim = int64_t(hp.n_kv_head) * hd;

    // token_embd has vocab + 8 rows in HF (embed_tokens: vocab_size + 8; <|image|> = row vocab_size).
    tok_embd_ = tm.get("token_embd.weight", {-1, D});
    if (tok_embd_.rows < hp.vocab_size)
        throw std::runtime_error("token_embd.weight has " + std::to_string(tok_embd_.rows) + " rows, fewer than vocab_size " +
                                 std::to_string(hp.vocab_size));
    output_norm_ = f32_vec(tm, "output_norm.weight", D);
    output_ = tm.get("output.weight", {hp.vocab_size, D});

    layers_.resize(hp.n_layer);
    const size_t es = kv_elem_size(kv_type);
    for (int i = 0; i < hp.n_layer; i++) {
        Layer& L = layers_[i];
        L.is_cross = std::find(hp.cross_attention_layers.begin(), hp.cross_attention_layers.end(), i) !=
                     hp.cross_attention_layers.end();
        if (L.is_cross) {
            CrossLayer& c = L.cross;
            c.attn_norm = f32_vec(tm, blk(i, "attn_norm.weight"), D);
            c.wq = tm.get(blk(i, "cross_attn_q_proj.weight"), {qdim, D});
            c.wk = tm.get(blk(i, "cross_attn_k_proj.weight"), {kvdim, D});
            c.wv = tm.get(blk(i, "cross_attn_v_proj.weight"), {kvdim, D});
            c.wo = tm.get(blk(i, "cross_attn_o_proj.weight"), {D, qdim});
            c.q_norm = f32_vec(tm, blk(i, "cross_attn_q_norm.weight"), hd);
            c.k_norm = f32_vec(tm, blk(i, "cross_attn_k_norm.weight"), hd);
            c.attn_gate = tanh_gate(tm, blk(i, "cross_attn_attn_gate"));
            c.mlp_gate = tanh_gate(tm, blk(i, "cross_attn_mlp_gate"));
            c.k = BackendBuffer(&be);
            c.v = BackendBuffer(&be);
        } else {
            SelfLayer& s = L.self;
            s.attn_norm = f32_vec(tm, blk(i, "attn_norm.weight"), D);
            s.wq = tm.get(blk(i, "attn_q.weight"), {qdim, D});
            s.wk = tm.get(blk(i, "attn_k.weight"), {kvdim, D});
            s.wv = tm.get(blk(i, "attn_v.weight"), {kvdim, D});
            s.wo = tm.get(blk(i, "attn_output.weight"), {D, qdim});
            s.k_cache = BackendBuffer(&be);
            s.v_cache = BackendBuffer(&be);
            const size_t cache_bytes = checked_bytes(checked_mul(n_ctx, kvdim, "KV cache [n_ctx, kv_dim]"), es,
                                                     "KV cache bytes");
            s.k_cache.reserve(cache_bytes);
            s.v_cache.reserve(cache_bytes);
        }
        L.ffn_norm = f32_vec(tm, blk(i, "ffn_norm.weight"), D);
        L.ffn_gate = tm.get(blk(i, "ffn_gate.weight"), {F, D});
        L.ffn_up = tm.get(blk(i, "ffn_up.weight"), {F, D});
        L.ffn_down = tm.get(blk(i, "ffn_down.weight"), {D, F});
    }
}

void TextDecoder::clear_cross() {
    for (Layer& L : layers_)
        if (L.is_cross) {
            L.cross.k.release();
            L.cross.v.release();
        }
    n_cross_keys_ = 0;
}

void TextDecoder::set_cross_states(const float* states, int64_t n_keys) {
    clear_cross();
    if (n_keys <= 0) return;
    const int64_t D = hp_.hidden_size, hd = hp_.head_dim, kvdim = int64_t(hp_.n_kv_head) * hd;
    const size_t es = kv_elem_size(kv_type_);
    BackendBuffer kf(&be_), kn(&be_);  // f32 [n_keys, kvdim] each
    float* k = kf.f32(n_keys * kvdim);
    float* knorm = kn.f32(n_keys * kvdim);
    for (Layer& L : layers_) {
        if (!L.is_cross) continue;
        CrossLayer& c = L.cross;
        // HF MllamaTextCrossAttention.forward: key_states = k_norm(k_proj(states)) per head; value_states = v_proj(states).
        be_.matmul(states, n_keys, D, c.wk, nullptr, k, kvdim);
        be_.rms_norm(k, static_cast<const float*>(c.k_norm.data), knorm, n_keys * hp_.n_kv_head, hd, hp_.rms_eps);
        be_.store_rows(knorm, c.k.reserve(size_t(n_keys) * kvdim * es), kv_type_, n_keys, kvdim, kvdim);
        be_.matmul(states, n_keys, D, c.wv, nullptr, k, kvdim);
        be_.store_rows(k, c.v.reserve(size_t(n_keys) * kvdim * es), kv_type_, n_keys, kvdim, kvdim);
    }
    be_.synchronize();  // the scratch buffers are freed on return
    n_cross_keys_ = n_keys;
}

// HF MllamaSelfAttentionDecoderLayer (attention half): x += o_proj(attn(rope(q), rope(k), v)) of rms_norm(x).
void TextDecoder::self_attention(Layer& L, int64_t n, int64_t n_past, const int32_t* pos_host) {
    SelfLayer& s = L.self;
    const int64_t D = hp_.hidden_size, hd = hp_.head_dim;
    const int64_t qdim = int64_t(hp_.n_head) * hd, kvdim = int64_t(hp_.n_kv_head) * hd;
    const size_t es = kv_elem_size(kv_type_);
    float* x = static_cast<float*>(x_.data());
    float* h = h_.f32(n * D);
    float* q = q_.f32(n * qdim);
    float* k = k_.f32(n * kvdim);
    float* v = v_.f32(n * kvdim);
    float* a = attn_.f32(n * qdim);

    be_.rms_norm(x, static_cast<const float*>(s.attn_norm.data), h, n, D, hp_.rms_eps);
    be_.matmul(h, n, D, s.wq, nullptr, q, qdim);   // q: [n, H, hd]
    be_.matmul(h, n, D, s.wk, nullptr, k, kvdim);  // k: [n, Hkv, hd]
    be_.matmul(h, n, D, s.wv, nullptr, v, kvdim);  // v: [n, Hkv, hd]
    // RoPE in interleaved-pair mode: the converter permuted HF's rotate-half rows (gguf_keys.permute_qk).
    be_.rope(q, n, hp_.n_head, int(hd), pos_host, hp_.rope_inv_freq.data());
    be_.rope(k, n, hp_.n_kv_head, int(hd), pos_host, hp_.rope_inv_freq.data());
    // Cache rows n_past .. n_past+n-1 ([n_ctx, Hkv*hd] of kv_type).
    be_.store_rows(k, static_cast<uint8_t*>(s.k_cache.data()) + size_t(n_past) * kvdim * es, kv_type_, n, kvdim, kvdim);
    be_.store_rows(v, static_cast<uint8_t*>(s.v_cache.data()) + size_t(n_past) * kvdim * es, kv_type_, n, kvdim, kvdim);
    // Causal: query i (position n_past + i) sees cache rows j <= n_past + i.
    be_.attention(q, s.k_cache.data(), s.v_cache.data(), kv_type_, kvdim, a, n, n_past + n, hp_.n_head,
                  hp_.n_kv_head, int(hd), 1.0f / std::sqrt(float(hd)), nullptr, 0, true, n_past);
    be_.matmul(a, n, qdim, s.wo, nullptr, h, D);
    be_.add(x, h, n * D);
}

// HF MllamaCrossAttentionDecoderLayer (attention half):
//   x += tanh(attn_gate) * o_proj(attn(q_norm(q_proj(rms_norm(x))), K, V, mask)).
// HF does NOT multiply this term by full_text_row_masked_out_mask: rows that
// see no image get a mask row of zeros (attend to every vision token, see
// _prepare_cross_attention_mask), which the caller encodes in xmask.
void TextDecoder::cross_attention(Layer& L, int64_t n, int64_t key_begin, int64_t key_count, const float* xmask) {
    CrossLayer& c = L.cross;
    const int64_t D = hp_.hidden_size, hd = hp_.head_dim;
    const int64_t qdim = int64_t(hp_.n_head) * hd, kvdim = int64_t(hp_.n_kv_head) * hd;
    const size_t off = size_t(key_begin) * kvdim * kv_elem_size(kv_type_);  // bytes to the first key used
    float* x = static_cast<float*>(x_.data());
    float* h = h_.f32(n * D);
    float* q = q_.f32(n * qdim);
    float* a = attn_.f32(n * qdim);

    be_.rms_norm(x, static_cast<const float*>(c.attn_norm.data), h, n, D, hp_.rms_eps);
    be_.matmul(h, n, D, c.wq, nullptr, a, qdim);
    be_.rms_norm(a, static_cast<const float*>(c.q_norm.data), q, n * hp_.n_head, hd, hp_.rms_eps);  // per head
    be_.attention(q, static_cast<const uint8_t*>(c.k.data()) + off, static_cast<const uint8_t*>(c.v.data()) + off,
                  kv_type_, kvdim, a, n, key_count, hp_.n_head, hp_.n_kv_head, int(hd), 1.0f / std::sqrt(float(hd)),
                  xmask, key_count, false, 0);
    be_.matmul(a, n, qdim, c.wo, nullptr, h, D);
    be_.add_scaled(x, h, c.attn_gate, n * D);
}

// SwiGLU MLP of rms_norm(x) into h_: [n, D] (HF MllamaTextMLP).
void TextDecoder::mlp(Layer& L, int64_t n) {
    const int64_t D = hp_.hidden_size, F = hp_.intermediate_size;
    float* x = static_cast<float*>(x_.data());
    float* h = h_.f32(n * D);
    float* g = ffn_a_.f32(n * F);
    float* u = ffn_b_.f32(n * F);
    be_.rms_norm(x, static_cast<const float*>(L.ffn_norm.data), h, n, D, hp_.rms_eps);
    be_.matmul(h, n, D, L.ffn_gate, nullptr, g, F);
    be_.matmul(h, n, D, L.ffn_up, nullptr, u, F);
    be_.silu_mul(g, u, g, n * F);
    be_.matmul(g, n, F, L.ffn_down, nullptr, h, D);
}

void TextDecoder::forward(const int32_t* tokens_host, int64_t n, int64_t n_past, int64_t key_begin,
                          int64_t key_count, const float* xmask, const uint8_t* row_visible_host, bool all_logits,
                          float* logits_host) {
    if (n <= 0) throw std::invalid_argument("forward: no tokens");
    if (key_count < 0) {
        key_begin = 0;
        key_count = n_cross_keys_;
    }
    if (has_cross() && (key_begin < 0 || key_count <= 0 || key_begin + key_count > n_cross_keys_))
        throw std::invalid_argument("forward: cross-attention key range out of bounds");
    if (n_past < 0 || n_past + n > n_ctx_)
        throw std::invalid_argument("forward: " + std::to_string(n_past) + " cached + " + std::to_string(n) +
                                    " new tokens exceed the context of " + std::to_string(n_ctx_));
    const int64_t D = hp_.hidden_size, V = hp_.vocab_size;
    for (int64_t i = 0; i < n; i++)
        if (tokens_host[i] < 0 || tokens_host[i] >= tok_embd_.rows)
            throw std::invalid_argument("token id " + std::to_string(tokens_host[i]) + " out of range [0, " +
                                        std::to_string(tok_embd_.rows) + ")");
    std::vector<int32_t> pos(n);
    for (int64_t i = 0; i < n; i++) pos[i] = int32_t(n_past + i);

    float* x = x_.f32(n * D);  // residual stream [n, D]
    be_.get_rows(tok_embd_, tokens_host, n, x);

    for (Layer& L : layers_) {
        if (L.is_cross) {
            if (!has_cross()) continue;  // text-only: HF MllamaTextModel.forward skips the layer entirely
            cross_attention(L, n, key_begin, key_count, xmask);
            mlp(L, n);
            // HF: mlp_out = full_text_row_masked_out_mask * mlp_out; x = x + tanh(mlp_gate) * mlp_out.
            // A masked row therefore adds exactly 0: skip it, add the rest in contiguous runs.
            const float* h = static_cast<const float*>(h_.data());
            for (int64_t r = 0; r < n;) {
                if (row_visible_host && !row_visible_host[r]) { r++; continue; }
                int64_t e = r + 1;
                while (e < n && !(row_visible_host && !row_visible_host[e])) e++;
                be_.add_scaled(x + r * D, h + r * D, L.cross.mlp_gate, (e - r) * D);
                r = e;
            }
        } else {
            self_attention(L, n, n_past, pos.data());
            mlp(L, n);
            be_.add(x, static_cast<const float*>(h_.data()), n * D);
        }
    }

    // Final norm and output head, for the last row only unless every row is wanted.
    const int64_t m = all_logits ? n : 1;
    const float* xl = x + (n - m) * D;
    float* h = h_.f32(m * D);
    float* lg = logits_.f32(m * V);
    be_.rms_norm(xl, static_cast<const float*>(output_norm_.data), h, m, D, hp_.rms_eps);
    be_.matmul(h, m, D, output_, nullptr, lg, V);
    be_.synchronize();
    be_.to_host(logits_host, lg, size_t(m) * V * sizeof(float));
}

}  // namespace mq
