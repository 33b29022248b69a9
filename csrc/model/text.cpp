// The mllama text decoder (see text.h). Reference for every step:
// HF transformers models/mllama/modeling_mllama.py.
#include "model/text.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "common/checked.h"
#include "model/step_block.h"

namespace mq {
namespace {

std::string blk(int i, const char* name) { return "blk." + std::to_string(i) + "." + name; }

size_t kv_elem_size(DType t) { return t == DType::F16 ? 2 : 4; }

// Norm weights are read by the backend as float32 vectors.
const Weight& f32_vec(const TensorMap& tm, const std::string& name, int64_t n) {
    const Weight& w = tm.get(name, {n});
    if (w.type != DType::F32)
        throw std::runtime_error("tensor '" + name + "' must be f32 (norm weights are read as float32)");
    return w;
}

// A [1] f32 gate stored raw (gguf_keys: XATTN_ATTN_GATE / XATTN_MLP_GATE): tanh applied here.
float tanh_gate(const TensorMap& tm, const std::string& name) {
    tm.get(name, {1});
    return std::tanh(tm.host_f32(name)[0]);
}

}  // namespace

TextDecoder::TextDecoder(Backend& be, const TensorMap& tm, const TextHParams& hp, int64_t n_ctx, DType kv_type,
                         int n_seq)
    : be_(be), hp_(hp), n_ctx_(n_ctx), kv_type_(kv_type), n_seq_(n_seq), inv_freq_(&be), hist_(&be), x_(&be), h_(&be),
      q_(&be), k_(&be), v_(&be), attn_(&be), ffn_a_(&be), ffn_b_(&be), logits_(&be), xl_(&be), ids_(&be),
      block_(std::make_unique<StepBlock>(be)) {
    if (kv_type != DType::F16 && kv_type != DType::F32) throw std::invalid_argument("kv_type must be f16 or f32");
    if (n_ctx <= 0) throw std::invalid_argument("n_ctx must be positive");
    if (n_seq <= 0) throw std::invalid_argument("the number of sequences must be positive");
    if (int64_t(n_seq) * n_ctx > (int64_t(1) << 31) - 1)
        throw std::invalid_argument("n_ctx x sequences must stay below 2^31 cache rows");
    if (hp.n_layer <= 0 || hp.n_head <= 0 || hp.n_kv_head <= 0 || hp.head_dim <= 0 || hp.hidden_size <= 0 ||
        hp.intermediate_size <= 0 || hp.vocab_size <= 0)
        throw std::invalid_argument("text hyper-parameters must be positive");
    if (hp.n_head % hp.n_kv_head) throw std::invalid_argument("head_count must be a multiple of head_count_kv");
    if (hp.head_dim % 2) throw std::invalid_argument("head_dim must be even (RoPE rotates pairs)");
    if (int64_t(hp.rope_inv_freq.size()) * 2 != hp.head_dim)
        throw std::invalid_argument("rope_inv_freq must have head_dim/2 = " + std::to_string(hp.head_dim / 2) +
                                    " entries");
    for (int c : hp.cross_attention_layers)
        if (c < 0 || c >= hp.n_layer)
            throw std::invalid_argument("cross-attention layer index " + std::to_string(c) + " out of range");

    const int64_t D = hp.hidden_size, F = hp.intermediate_size, hd = hp.head_dim;
    const int64_t qdim = int64_t(hp.n_head) * hd, kvdim = int64_t(hp.n_kv_head) * hd;

    // token_embd has vocab + 8 rows in HF (embed_tokens: vocab_size + 8; <|image|> = row vocab_size).
    tok_embd_ = tm.get("token_embd.weight", {-1, D});
    if (tok_embd_.rows < hp.vocab_size)
        throw std::runtime_error("token_embd.weight has " + std::to_string(tok_embd_.rows) +
                                 " rows, fewer than vocab_size " + std::to_string(hp.vocab_size));
    output_norm_ = f32_vec(tm, "output_norm.weight", D);
    output_ = tm.get("output.weight", {hp.vocab_size, D});

    layers_.resize(hp.n_layer);
    for (int i = 0; i < hp.n_layer; i++) {
        Layer& L = layers_[i];
        L.is_cross = std::find(hp.cross_attention_layers.begin(), hp.cross_attention_layers.end(), i) !=
                     hp.cross_attention_layers.end();
        if (L.is_cross) {
            CrossLayer& c = L.cross;
            L.cross_index = int(cross_idx_.size());
            cross_idx_.push_back(i);
            c.attn_norm = f32_vec(tm, blk(i, "attn_norm.weight"), D);
            c.wq = tm.get(blk(i, "cross_attn_q_proj.weight"), {qdim, D});
            c.wk = tm.get(blk(i, "cross_attn_k_proj.weight"), {kvdim, D});
            c.wv = tm.get(blk(i, "cross_attn_v_proj.weight"), {kvdim, D});
            c.wo = tm.get(blk(i, "cross_attn_o_proj.weight"), {D, qdim});
            c.q_norm = f32_vec(tm, blk(i, "cross_attn_q_norm.weight"), hd);
            c.k_norm = f32_vec(tm, blk(i, "cross_attn_k_norm.weight"), hd);
            c.attn_gate = tanh_gate(tm, blk(i, "cross_attn_attn_gate"));
            c.mlp_gate = tanh_gate(tm, blk(i, "cross_attn_mlp_gate"));
        } else {
            SelfLayer& s = L.self;
            n_self_++;
            s.attn_norm = f32_vec(tm, blk(i, "attn_norm.weight"), D);
            s.wq = tm.get(blk(i, "attn_q.weight"), {qdim, D});
            s.wk = tm.get(blk(i, "attn_k.weight"), {kvdim, D});
            s.wv = tm.get(blk(i, "attn_v.weight"), {kvdim, D});
            s.wo = tm.get(blk(i, "attn_output.weight"), {D, qdim});
        }
        L.ffn_norm = f32_vec(tm, blk(i, "ffn_norm.weight"), D);
        L.ffn_gate = tm.get(blk(i, "ffn_gate.weight"), {F, D});
        L.ffn_up = tm.get(blk(i, "ffn_up.weight"), {F, D});
        L.ffn_down = tm.get(blk(i, "ffn_down.weight"), {D, F});
    }
    // The caches last: every tensor was found first (a bad file fails before the big allocations).
    // n_ctx and n_seq come from the caller: every product is checked (common/checked.h).
    const size_t slot_bytes = checked_bytes(checked_mul(n_ctx, kvdim, "KV cache [n_ctx, kv_dim]"),
                                            kv_elem_size(kv_type), "KV cache bytes per sequence");
    const size_t cache_bytes = checked_bytes(n_seq, slot_bytes, "KV cache bytes [n_seq, n_ctx, kv_dim]");
    for (Layer& L : layers_)
        if (!L.is_cross) {
            L.self.k_cache = BackendBuffer(&be);
            L.self.v_cache = BackendBuffer(&be);
            L.self.k_cache.reserve(cache_bytes);
            L.self.v_cache.reserve(cache_bytes);
        }
    hist_.reserve(checked_bytes(checked_mul(n_seq, n_ctx, "token history [n_seq, n_ctx]"), sizeof(int32_t),
                                "token history bytes"));
    be_.to_device(inv_freq_.f32(int64_t(hp_.rope_inv_freq.size())), hp_.rope_inv_freq.data(),
                  hp_.rope_inv_freq.size() * sizeof(float));
    be_.synchronize();
}

TextDecoder::~TextDecoder() = default;

size_t TextDecoder::kv_bytes_per_seq() const {
    return size_t(n_self_) * 2 * size_t(n_ctx_) * size_t(hp_.n_kv_head) * hp_.head_dim * kv_elem_size(kv_type_);
}

size_t TextDecoder::cross_bytes(int64_t n_keys) const {
    return size_t(cross_idx_.size()) * 2 * size_t(n_keys) * size_t(hp_.n_kv_head) * hp_.head_dim *
           kv_elem_size(kv_type_);
}

void TextDecoder::cross_kv(const float* states, int64_t n_keys, CrossKV& out) {
    if (n_keys <= 0) throw std::invalid_argument("cross_kv: no keys");
    const int64_t D = hp_.hidden_size, hd = hp_.head_dim, kvdim = int64_t(hp_.n_kv_head) * hd;
    const size_t es = kv_elem_size(kv_type_);
    BackendBuffer kf(&be_), kn(&be_);  // f32 [n_keys, kvdim] each
    float* k = kf.f32(n_keys * kvdim);
    float* knorm = kn.f32(n_keys * kvdim);
    out.k.clear();
    out.v.clear();
    for (int li : cross_idx_) {
        const CrossLayer& c = layers_[li].cross;
        BackendBuffer kb(&be_), vb(&be_);
        // HF MllamaTextCrossAttention.forward: key_states = k_norm(k_proj(states)) per head; value_states = v_proj(states).
        be_.matmul(states, n_keys, D, c.wk, nullptr, k, kvdim);
        be_.rms_norm(k, static_cast<const float*>(c.k_norm.data), knorm, n_keys * hp_.n_kv_head, hd, hp_.rms_eps);
        be_.store_rows(knorm, kb.reserve(size_t(n_keys) * kvdim * es), kv_type_, n_keys, kvdim, kvdim, nullptr);
        be_.matmul(states, n_keys, D, c.wv, nullptr, k, kvdim);
        be_.store_rows(k, vb.reserve(size_t(n_keys) * kvdim * es), kv_type_, n_keys, kvdim, kvdim, nullptr);
        out.k.push_back(std::move(kb));
        out.v.push_back(std::move(vb));
    }
    be_.synchronize();  // the scratch buffers are freed on return
    out.n_keys = n_keys;
    out.bytes = cross_bytes(n_keys);
}

void TextDecoder::concat(const std::vector<KeyRange>& parts, CrossKV& out) {
    const size_t row = size_t(hp_.n_kv_head) * hp_.head_dim * kv_elem_size(kv_type_);
    int64_t n = 0;
    for (const KeyRange& p : parts) {
        if (!p.kv || p.key0 < 0 || p.n < 0 || p.key0 + p.n > p.kv->n_keys)
            throw std::invalid_argument("concat: key range out of bounds");
        n += p.n;
    }
    if (n <= 0) throw std::invalid_argument("concat: no keys");
    out.k.clear();
    out.v.clear();
    for (size_t c = 0; c < cross_idx_.size(); c++) {
        BackendBuffer kb(&be_), vb(&be_);
        uint8_t* kd = static_cast<uint8_t*>(kb.reserve(size_t(n) * row));
        uint8_t* vd = static_cast<uint8_t*>(vb.reserve(size_t(n) * row));
        int64_t at = 0;
        for (const KeyRange& p : parts) {
            if (p.n == 0) continue;
            be_.copy(kd + at * row, static_cast<const uint8_t*>(p.kv->k[c].data()) + p.key0 * row, size_t(p.n) * row);
            be_.copy(vd + at * row, static_cast<const uint8_t*>(p.kv->v[c].data()) + p.key0 * row, size_t(p.n) * row);
            at += p.n;
        }
        out.k.push_back(std::move(kb));
        out.v.push_back(std::move(vb));
    }
    out.n_keys = n;
    out.bytes = cross_bytes(n);
}

void TextDecoder::save_rows(int slot, int64_t first, int64_t n, SavedRows& out) {
    if (slot < 0 || slot >= n_seq_ || first < 0 || n < 0 || first + n > n_ctx_)
        throw std::invalid_argument("save_rows: rows out of range");
    const size_t row = size_t(hp_.n_kv_head) * hp_.head_dim * kv_elem_size(kv_type_);
    const size_t base = (size_t(slot) * n_ctx_ + first) * row;
    out.first = first;
    out.n = n;
    out.k.clear();
    out.v.clear();
    out.bytes = 0;
    if (n == 0) return;
    for (const Layer& L : layers_) {
        if (L.is_cross) continue;
        BackendBuffer kb(&be_), vb(&be_);
        be_.copy(kb.reserve(size_t(n) * row), static_cast<const uint8_t*>(L.self.k_cache.data()) + base,
                 size_t(n) * row);
        be_.copy(vb.reserve(size_t(n) * row), static_cast<const uint8_t*>(L.self.v_cache.data()) + base,
                 size_t(n) * row);
        out.k.push_back(std::move(kb));
        out.v.push_back(std::move(vb));
        out.bytes += 2 * size_t(n) * row;
    }
    out.hist = BackendBuffer(&be_);
    be_.copy(out.hist.reserve(size_t(n) * 4), static_cast<const int32_t*>(hist_.data()) + size_t(slot) * n_ctx_ + first,
             size_t(n) * 4);
    out.bytes += size_t(n) * 4;
    be_.synchronize();
}

void TextDecoder::load_rows(int slot, const SavedRows& in) {
    if (slot < 0 || slot >= n_seq_ || in.first < 0 || in.first + in.n > n_ctx_)
        throw std::invalid_argument("load_rows: rows out of range");
    if (in.n == 0) return;
    const size_t row = size_t(hp_.n_kv_head) * hp_.head_dim * kv_elem_size(kv_type_);
    const size_t base = (size_t(slot) * n_ctx_ + in.first) * row;
    size_t i = 0;
    for (Layer& L : layers_) {
        if (L.is_cross) continue;
        be_.copy(static_cast<uint8_t*>(L.self.k_cache.data()) + base, in.k[i].data(), size_t(in.n) * row);
        be_.copy(static_cast<uint8_t*>(L.self.v_cache.data()) + base, in.v[i].data(), size_t(in.n) * row);
        i++;
    }
    be_.copy(static_cast<int32_t*>(hist_.data()) + size_t(slot) * n_ctx_ + in.first, in.hist.data(), size_t(in.n) * 4);
    be_.synchronize();
}

void TextDecoder::matmul_runs(const std::vector<RowRun>& runs, int64_t n_rows, const float* x, int64_t ldx,
                              const Weight& w, float* y, int64_t ldy) {
    for (const RowRun& r : runs) {
        if (r.row0 >= n_rows) break;
        be_.matmul_rows(x + r.row0 * ldx, std::min(r.n, n_rows - r.row0), ldx, w, y + r.row0 * ldy, ldy, r.decode);
    }
}

// SwiGLU MLP of rms_norm(x) into h_: [n, D] (HF MllamaTextMLP), rows [0, n) of the step's runs.
void TextDecoder::mlp(Layer& L, const std::vector<RowRun>& runs, int64_t n) {
    const int64_t D = hp_.hidden_size, F = hp_.intermediate_size;
    float* x = static_cast<float*>(x_.data());
    float* h = h_.f32(n * D);
    float* g = ffn_a_.f32(n * F);
    float* u = ffn_b_.f32(n * F);
    be_.rms_norm(x, static_cast<const float*>(L.ffn_norm.data), h, n, D, hp_.rms_eps);
    matmul_runs(runs, n, h, D, L.ffn_gate, g, F);
    matmul_runs(runs, n, h, D, L.ffn_up, u, F);
    be_.silu_mul(g, u, g, n * F);
    matmul_runs(runs, n, g, F, L.ffn_down, h, D);
}

void TextDecoder::step(const Step& st, float* logits_host, int32_t* ids_host, const std::atomic<bool>* abort) {
    const int64_t R = st.R, D = hp_.hidden_size, V = hp_.vocab_size, hd = hp_.head_dim;
    const int64_t qdim = int64_t(hp_.n_head) * hd, kvdim = int64_t(hp_.n_kv_head) * hd;
    const size_t es = kv_elem_size(kv_type_);
    const int64_t L = int64_t(st.logit_rows.size()), S = int64_t(st.sample.size());
    // ---- checks (host): nothing is sized from an unchecked value
    if (R <= 0) throw std::invalid_argument("step: no tokens");
    int64_t next = 0;
    std::vector<int> seen(size_t(n_seq_), 0);
    for (const SeqRows& q : st.seqs) {
        if (q.slot < 0 || q.slot >= n_seq_) throw std::invalid_argument("step: sequence slot out of range");
        if (seen[size_t(q.slot)]++) throw std::invalid_argument("step: a sequence appears twice in one step");
        if (q.row0 != next || q.n <= 0) throw std::invalid_argument("step: sequences must cover the rows in order");
        if (q.n_past < 0 || q.n_past + q.n > n_ctx_)
            throw std::invalid_argument("step: " + std::to_string(q.n_past) + " cached + " + std::to_string(q.n) +
                                        " new tokens exceed the context of " + std::to_string(n_ctx_));
        next += q.n;
    }
    if (next != R) throw std::invalid_argument("step: sequences must cover every row");
    for (int64_t i = 0; i < R; i++)
        if (st.tokens[i] < 0 || st.tokens[i] >= tok_embd_.rows)
            throw std::invalid_argument("token id " + std::to_string(st.tokens[i]) + " out of range [0, " +
                                        std::to_string(tok_embd_.rows) + ")");
    if (st.n_cross_rows < 0 || st.n_cross_rows > R) throw std::invalid_argument("step: bad cross-attention row count");
    for (const CrossRun& c : st.cross)
        if (c.row0 < 0 || c.n <= 0 || c.row0 + c.n > st.n_cross_rows || !c.kv || c.key0 < 0 || c.n_keys <= 0 ||
            c.key0 + c.n_keys > c.kv->n_keys || int(c.kv->k.size()) != n_cross_layers())
            throw std::invalid_argument("step: cross-attention run out of bounds");
    for (int64_t r : st.logit_rows)
        if (r < 0 || r >= R) throw std::invalid_argument("step: logit row out of range");
    if (S > L || int64_t(st.sample_slot.size()) != S || int64_t(st.sample_hist.size()) != S)
        throw std::invalid_argument("step: sampled rows must be the first logit rows");
    for (int64_t i = 0; i < S; i++)
        if (st.sample_slot[i] < 0 || st.sample_slot[i] >= n_seq_ || st.sample_hist[i] < 0 || st.sample_hist[i] > n_ctx_)
            throw std::invalid_argument("step: bad sampling history");

    // ---- the step block: every per-row and per-sequence input, one upload
    const int n_q = int(st.seqs.size()), n_c = int(st.cross.size());
    StepBlock& b = *block_;
    b.clear();
    const int a_tok = b.plan<int32_t>(size_t(R));                         // token ids [R]
    const int a_pos = b.plan<int32_t>(size_t(R));                         // positions [R]
    const int a_row = b.plan<int32_t>(size_t(R));                         // cache rows slot * n_ctx + pos [R]
    const int a_lrow = b.plan<int32_t>(size_t(std::max<int64_t>(L, 1)));  // logit rows [L]
    const int a_samp = b.plan<Backend::SampleParams>(size_t(std::max<int64_t>(S, 1)));
    const int a_self = b.plan<Backend::AttnSegment>(size_t(n_self_) * n_q);             // [self layer][sequence]
    const int a_cross = b.plan<Backend::AttnSegment>(cross_idx_.size() * size_t(n_c));  // [cross layer][run]
    b.begin();
    int32_t* tok = b.host<int32_t>(a_tok);
    int32_t* pos = b.host<int32_t>(a_pos);
    int32_t* row = b.host<int32_t>(a_row);
    std::copy(st.tokens, st.tokens + R, tok);
    for (const SeqRows& q : st.seqs)
        for (int64_t i = 0; i < q.n; i++) {
            pos[q.row0 + i] = int32_t(q.n_past + i);
            row[q.row0 + i] = int32_t(int64_t(q.slot) * n_ctx_ + q.n_past + i);
        }
    int32_t* lrow = b.host<int32_t>(a_lrow);
    for (int64_t i = 0; i < L; i++) lrow[i] = int32_t(st.logit_rows[i]);
    Backend::SampleParams* sp = b.host<Backend::SampleParams>(a_samp);
    for (int64_t i = 0; i < S; i++) {
        sp[i] = st.sample[i];
        sp[i].hist_begin = int32_t(int64_t(st.sample_slot[i]) * n_ctx_);
        sp[i].hist_len = int32_t(st.sample_hist[i]);
    }
    Backend::AttnSegment* self_seg = b.host<Backend::AttnSegment>(a_self);
    Backend::AttnSegment* cross_seg = b.host<Backend::AttnSegment>(a_cross);
    {
        int si = 0;
        for (const Layer& Ly : layers_) {
            if (Ly.is_cross) {
                for (int j = 0; j < n_c; j++) {
                    const CrossRun& c = st.cross[j];
                    Backend::AttnSegment& g = cross_seg[size_t(Ly.cross_index) * n_c + j];
                    g.q_row = c.row0;
                    g.n_q = c.n;
                    g.k = static_cast<const uint8_t*>(c.kv->k[Ly.cross_index].data()) + size_t(c.key0) * kvdim * es;
                    g.v = static_cast<const uint8_t*>(c.kv->v[Ly.cross_index].data()) + size_t(c.key0) * kvdim * es;
                    g.n_k = c.n_keys;
                    g.q_offset = 0;
                    g.causal = 0;
                }
                continue;
            }
            for (int j = 0; j < n_q; j++) {
                const SeqRows& q = st.seqs[j];
                Backend::AttnSegment& g = self_seg[size_t(si) * n_q + j];
                const size_t base = size_t(q.slot) * n_ctx_ * kvdim * es;  // the slot's first cache row
                g.q_row = q.row0;
                g.n_q = q.n;
                g.k = static_cast<const uint8_t*>(Ly.self.k_cache.data()) + base;
                g.v = static_cast<const uint8_t*>(Ly.self.v_cache.data()) + base;
                g.n_k = q.n_past + q.n;
                g.q_offset = q.n_past;  // causal: row i (position n_past + i) sees cache rows j <= n_past + i
                g.causal = 1;
            }
            si++;
        }
    }
    b.upload();
    const int32_t* tok_d = b.dev<int32_t>(a_tok);
    const int32_t* pos_d = b.dev<int32_t>(a_pos);
    const int32_t* row_d = b.dev<int32_t>(a_row);

    // ---- embeddings; the tokens join their sequences' histories
    float* x = x_.f32(R * D);  // residual stream [R, D]
    be_.get_rows(tok_embd_, tok_d, R, x);
    be_.scatter_i32(tok_d, static_cast<int32_t*>(hist_.data()), row_d, R);
    const float scale = 1.0f / std::sqrt(float(hd));
    const int64_t nc = st.n_cross_rows;
    // Row classes: decode rows by the per-row kernels, prompt rows by the prompt kernels,
    // whatever else shares the step (Backend::matmul_rows). MllamaModel orders a step's
    // sequences so that its decode rows are one run.
    std::vector<RowRun> runs;
    for (const SeqRows& q : st.seqs) {
        if (!runs.empty() && runs.back().decode == q.decode) runs.back().n += q.n;
        else runs.push_back({q.row0, q.n, q.decode});
    }

    int si = 0;
    for (Layer& Ly : layers_) {
        if (abort && abort->load(std::memory_order_relaxed)) {
            be_.synchronize();
            throw StepAborted();
        }
        if (Ly.is_cross) {
            // HF MllamaCrossAttentionDecoderLayer, rows [0, nc) (sequences with images):
            //   x += tanh(attn_gate) * o_proj(attn(q_norm(q_proj(rms_norm(x))), K, V))
            // HF does NOT multiply this term by full_text_row_masked_out_mask: rows
            // that see no image attend to every vision token of every image (their
            // mask row is zeroed by _prepare_cross_attention_mask): the caller gives
            // them a run over all keys. Then x += tanh(mlp_gate) * mask * MLP(x):
            // rows with mask 0 add exactly 0 and are skipped.
            if (nc == 0) continue;  // text-only batch: HF MllamaTextModel.forward skips the layer entirely
            CrossLayer& c = Ly.cross;
            float* h = h_.f32(nc * D);
            float* q = q_.f32(nc * qdim);
            float* a = attn_.f32(nc * qdim);
            be_.rms_norm(x, static_cast<const float*>(c.attn_norm.data), h, nc, D, hp_.rms_eps);
            matmul_runs(runs, nc, h, D, c.wq, a, qdim);
            be_.rms_norm(a, static_cast<const float*>(c.q_norm.data), q, nc * hp_.n_head, hd, hp_.rms_eps);  // per head
            const size_t off = size_t(Ly.cross_index) * n_c;
            be_.attention_segments(q, a, cross_seg + off, b.dev<Backend::AttnSegment>(a_cross) + off, n_c, kv_type_,
                                   kvdim, hp_.n_head, hp_.n_kv_head, int(hd), scale);
            matmul_runs(runs, nc, a, qdim, c.wo, h, D);
            be_.add_scaled(x, h, c.attn_gate, nc * D);
            mlp(Ly, runs, nc);
            const float* hm = static_cast<const float*>(h_.data());
            for (const CrossRun& r : st.cross)
                if (r.mlp) be_.add_scaled(x + r.row0 * D, hm + r.row0 * D, c.mlp_gate, r.n * D);
            continue;
        }
        // HF MllamaSelfAttentionDecoderLayer: x += o_proj(attn(rope(q), rope(k), v)) of rms_norm(x); x += MLP(x).
        SelfLayer& s = Ly.self;
        float* h = h_.f32(R * D);
        float* q = q_.f32(R * qdim);
        float* k = k_.f32(R * kvdim);
        float* v = v_.f32(R * kvdim);
        float* a = attn_.f32(R * qdim);
        be_.rms_norm(x, static_cast<const float*>(s.attn_norm.data), h, R, D, hp_.rms_eps);
        matmul_runs(runs, R, h, D, s.wq, q, qdim);   // q: [R, H, hd]
        matmul_runs(runs, R, h, D, s.wk, k, kvdim);  // k: [R, Hkv, hd]
        matmul_runs(runs, R, h, D, s.wv, v, kvdim);  // v: [R, Hkv, hd]
        // RoPE in interleaved-pair mode: the converter permuted HF's rotate-half rows (gguf_keys.permute_qk).
        be_.rope(q, R, hp_.n_head, int(hd), pos_d, static_cast<const float*>(inv_freq_.data()));
        be_.rope(k, R, hp_.n_kv_head, int(hd), pos_d, static_cast<const float*>(inv_freq_.data()));
        // Cache rows slot * n_ctx + n_past + i ([n_seq * n_ctx, Hkv*hd] of kv_type).
        be_.store_rows(k, s.k_cache.data(), kv_type_, R, kvdim, kvdim, row_d);
        be_.store_rows(v, s.v_cache.data(), kv_type_, R, kvdim, kvdim, row_d);
        const size_t off = size_t(si) * n_q;
        be_.attention_segments(q, a, self_seg + off, b.dev<Backend::AttnSegment>(a_self) + off, n_q, kv_type_, kvdim,
                               hp_.n_head, hp_.n_kv_head, int(hd), scale);
        matmul_runs(runs, R, a, qdim, s.wo, h, D);
        be_.add(x, h, R * D);
        mlp(Ly, runs, R);
        be_.add(x, static_cast<const float*>(h_.data()), R * D);
        si++;
    }

    // ---- final norm and output head, for the logit rows only (gathered: row i of xl = row logit_rows[i] of x)
    if (L == 0) {
        be_.synchronize();
        return;
    }
    float* xl = xl_.f32(L * D);
    be_.get_rows(Weight{x, DType::F32, R, D}, b.dev<int32_t>(a_lrow), L, xl);
    float* hl = h_.f32(L * D);
    float* lg = logits_.f32(L * V);
    be_.rms_norm(xl, static_cast<const float*>(output_norm_.data), hl, L, D, hp_.rms_eps);
    // the logit rows' runs (row i of xl is a decode row when row logit_rows[i] is)
    std::vector<RowRun> lruns;
    for (int64_t i = 0; i < L; i++) {
        bool dec = false;
        for (const SeqRows& q : st.seqs)
            if (st.logit_rows[i] >= q.row0 && st.logit_rows[i] < q.row0 + q.n) dec = q.decode;
        if (!lruns.empty() && lruns.back().decode == dec) lruns.back().n++;
        else lruns.push_back({i, 1, dec});
    }
    matmul_runs(lruns, L, hl, D, output_, lg, V);
    if (logits_host) {
        be_.synchronize();
        be_.to_host(logits_host, lg, size_t(L) * V * sizeof(float));
    }
    if (S > 0) {
        int32_t* ids = static_cast<int32_t*>(ids_.reserve(size_t(S) * sizeof(int32_t)));
        be_.sample(lg, S, V, b.dev<Backend::SampleParams>(a_samp), static_cast<const int32_t*>(hist_.data()), ids);
        be_.synchronize();
        be_.to_host(ids_host, ids, size_t(S) * sizeof(int32_t));
    }
    be_.synchronize();
}

}  // namespace mq
