// Mllama vision tower + projector on the Backend interface (see vision.h).
//
// Reference: transformers models/mllama/modeling_mllama.py,
// MllamaVisionModel.forward and MllamaModel.forward (multi_modal_projector).
// Sizes used below (11B values in parentheses):
//   D = hidden (1280), F = intermediate (5120), hd = D / n_head (80),
//   T = max_num_tiles (4), grid = image_size / patch_size (40),
//   n_patch = grid^2 (1600), P = n_patch + 1 (1601, class token first),
//   Np = P rounded up to a multiple of 8 (1608), S = T * Np (6432) positions
//   per image, K = number of intermediate layers (5), Dc = D * (1 + K) (7680).
// Images are encoded one at a time: every layer attends across all tiles of
// one image, and S = 6432 rows already keep the matmul kernels busy.
#include "model/vision.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>

#include "common/profile.h"

namespace mq {
namespace {

constexpr float kPrePostLnEps = 1e-5f;  // HF builds layernorm_pre/post as nn.LayerNorm(hidden): default eps
constexpr int64_t kMlpRows = 1024;      // MLP row chunk: [1024, F] f32 = 21 MB for the 11B
constexpr int64_t kMaskRows = 512;      // rows of the padding-query mask buffer [512, S] = 13 MB
constexpr int64_t kProjRows = 256;      // projector row chunk: [256, Dc] f32 = 7.9 MB

// Backend buffer that frees itself (activations of one encode call).
struct Buf {
    Backend& be;
    float* p;
    Buf(Backend& b, int64_t n_floats)
        : be(b), p(static_cast<float*>(b.alloc(size_t(std::max<int64_t>(n_floats, 1)) * sizeof(float)))) {}
    ~Buf() { be.free(p); }
    Buf(const Buf&) = delete;
    Buf& operator=(const Buf&) = delete;
};

}  // namespace

// Backend activation buffers of one encode() call, shared by its images (11B
// sizes: about 430 MB; no buffer above 34 MB).
struct VisionEncoder::Work {
    Buf x, h, q, k, v, a;                     // [S, D]: residual stream, scratch, q/k/v, attention out
    Buf u;                                    // [min(S, kMlpRows), F]: MLP hidden rows
    Buf mask;                                 // [kMaskRows, S]: the padding-query mask row, repeated
    std::vector<std::unique_ptr<Buf>> inter;  // K x [S, D]: intermediate hidden states
    Buf tile_rows;                            // [T, P, D]: tile position embedding of the aspect ratio
    Buf pre_rows, post_rows;                  // [T, D]: pre/post tile embeddings of the aspect ratio
    Buf pre_bias, post_bias;                  // [T, D]
    Buf patches;                              // [n_patch, C*p*p]: im2col of one tile
    Buf dcat;                                 // [kProjRows, Dc]: projector input rows
    Work(Backend& be, const VisionEncoder& e)
        : x(be, e.S() * e.D_), h(be, e.S() * e.D_), q(be, e.S() * e.D_), k(be, e.S() * e.D_), v(be, e.S() * e.D_),
          a(be, e.S() * e.D_), u(be, std::min(kMlpRows, e.S()) * e.F_), mask(be, kMaskRows * e.S()),
          tile_rows(be, e.T_ * e.P_ * e.D_), pre_rows(be, e.T_ * e.D_), post_rows(be, e.T_ * e.D_),
          pre_bias(be, e.T_ * e.D_), post_bias(be, e.T_ * e.D_),
          patches(be, e.n_patch_ * e.hp_.num_channels * e.hp_.patch_size * e.hp_.patch_size),
          dcat(be, kProjRows * e.D_ * (1 + e.K_)) {
        for (int64_t i = 0; i < e.K_; i++) inter.push_back(std::make_unique<Buf>(be, e.S() * e.D_));
    }
};

VisionEncoder::VisionEncoder(Backend& be, const TensorMap& tm, const VisionHParams& hp) : be_(be), hp_(hp) {
    auto need = [](bool ok, const std::string& msg) {
        if (!ok) throw std::invalid_argument("vision hparams: " + msg);
    };
    need(hp.hidden_size > 0 && hp.intermediate_size > 0 && hp.n_head > 0, "sizes must be positive");
    need(hp.hidden_size % hp.n_head == 0, "hidden_size must be a multiple of n_head");
    need(hp.num_layers > 0 && hp.num_global_layers >= 0, "layer counts must be positive");
    need(hp.patch_size > 0 && hp.image_size >= hp.patch_size, "image_size must be at least patch_size");
    need(hp.num_channels > 0 && hp.max_num_tiles > 0 && hp.max_aspect_ratio_id > 0 && hp.out_dim > 0,
         "channels, tiles, aspect ratios and out_dim must be positive");
    for (int i : hp.intermediate_layers)
        need(i >= 0 && i < hp.num_layers, "intermediate layer index " + std::to_string(i) + " out of range [0, " +
                                              std::to_string(hp.num_layers) + ")");
    D_ = hp.hidden_size;
    F_ = hp.intermediate_size;
    hd_ = D_ / hp.n_head;
    grid_ = hp.image_size / hp.patch_size;  // Conv2d(stride = kernel, padding "valid") floors
    n_patch_ = grid_ * grid_;
    P_ = n_patch_ + 1;
    Np_ = (P_ + 7) / 8 * 8;  // HF: num_padding_patches = (8 - P % 8) % 8
    T_ = hp.max_num_tiles;
    K_ = int64_t(hp.intermediate_layers.size());
    const int64_t A1 = hp.max_aspect_ratio_id + 1, C = hp.num_channels, p = hp.patch_size;

    try {
        // Patch convolution weight [D, C, p, p] viewed as a [D, C*p*p] matrix: the
        // conv is then patches[n_patch, C*p*p] . W^T (im2col in encode_image).
        const NamedTensor& pw = tm.at("v.patch_embd.weight");
        tm.get("v.patch_embd.weight", {D_, C, p, p});
        patch_ = be_.upload(pw.host, pw.w.type, D_, C * p * p);

        class_embd_ = vec_f32(tm, "v.class_embd", D_);
        {
            const Weight& pos = tm.get("v.position_embd.weight", {P_, D_});
            float* buf = static_cast<float*>(be_.alloc(size_t(P_ * D_) * sizeof(float)));
            owned_.push_back(buf);
            rows_f32(pos, 0, P_, buf);
            pos_embd_ = buf;
        }
        auto gate = [&](const std::string& name) {
            tm.get(name, {1});
            return tm.host_f32(name)[0];
        };
        g_pos_ = gate("v.position_embd.gate");        // 1 - tanh(g)
        g_tile_ = gate("v.tile_position_embd.gate");  // tanh(g)
        g_pre_ = gate("v.pre_tile_position_embd.gate");
        g_post_ = gate("v.post_tile_position_embd.gate");
        tile_pos_ = table(tm, "v.tile_position_embd.weight", A1, T_ * P_ * D_);
        pre_tile_ = table(tm, "v.pre_tile_position_embd.weight", A1, T_ * D_);
        post_tile_ = table(tm, "v.post_tile_position_embd.weight", A1, T_ * D_);
        pre_ln_w_ = vec_f32(tm, "v.pre_ln.weight", D_);
        pre_ln_b_ = vec_f32(tm, "v.pre_ln.bias", D_);
        post_ln_w_ = vec_f32(tm, "v.post_ln.weight", D_);
        post_ln_b_ = vec_f32(tm, "v.post_ln.bias", D_);
        for (int l = 0; l < hp.num_layers; l++)
            local_.push_back(load_layer(tm, "v.blk." + std::to_string(l) + ".", false));
        for (int l = 0; l < hp.num_global_layers; l++)
            global_.push_back(load_layer(tm, "v.global.blk." + std::to_string(l) + ".", true));
        proj_ = tm.get("mm.0.weight", {int64_t(hp.out_dim), D_ * (1 + K_)});
        proj_b_ = vec_f32(tm, "mm.0.bias", hp.out_dim);
    } catch (...) {
        for (void* q : owned_) be_.free(q);
        throw;
    }
}

VisionEncoder::~VisionEncoder() {
    for (void* q : owned_) be_.free(q);
}

// A 1-D parameter (norm weight, bias, class embedding) of n values as a backend
// float32 buffer this encoder owns, whatever its stored type (get_rows converts).
const float* VisionEncoder::vec_f32(const TensorMap& tm, const std::string& name, int64_t n) {
    const Weight& w = tm.get(name, {n});
    float* buf = static_cast<float*>(be_.alloc(size_t(n) * sizeof(float)));
    owned_.push_back(buf);
    rows_f32(w, 0, 1, buf);
    return buf;
}

// out[n, w.cols] = rows first .. first + n - 1 of w as float32 (backend memory).
// get_rows reads its ids from backend memory: they are uploaded first.
void VisionEncoder::rows_f32(const Weight& w, int64_t first, int64_t n, float* out) {
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; i++) ids[i] = int32_t(first + i);
    Buf dev(be_, n);  // room for n int32 (Buf counts 4-byte floats)
    be_.to_device(dev.p, ids.data(), size_t(n) * sizeof(int32_t));
    be_.get_rows(w, reinterpret_cast<const int32_t*>(dev.p), n, out);
    be_.synchronize();  // dev is freed on return
}

// An aspect-ratio embedding table: `entries` entries of `per_entry` values each.
// Our converter writes [entries, per_entry] (gguf_keys.py); any shape with that
// leading extent and element count is accepted (e.g. [9, 4, 1601, 1280]): an
// entry is then per_entry / cols consecutive rows of the stored matrix.
VisionEncoder::Table VisionEncoder::table(const TensorMap& tm, const std::string& name, int64_t entries,
                                          int64_t per_entry) const {
    const NamedTensor& t = tm.at(name);
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (t.shape.empty() || t.shape[0] != entries || numel != entries * per_entry || per_entry % t.w.cols != 0)
        throw std::runtime_error("tensor '" + name + "' has shape " + TensorMap::fmt(t.shape) + ", expected [" +
                                 std::to_string(entries) + ", " + std::to_string(per_entry) + "]");
    return Table{t.w, per_entry / t.w.cols};
}

// out[per_entry] = entry `id` of the table, as float32 (backend memory).
void VisionEncoder::table_entry(const Table& tb, int32_t id, float* out) {
    rows_f32(tb.w, int64_t(id) * tb.rows_per_entry, tb.rows_per_entry, out);
}

VisionEncoder::Layer VisionEncoder::load_layer(const TensorMap& tm, const std::string& pre, bool gated) {
    Layer L;
    L.ln1_w = vec_f32(tm, pre + "attn_norm.weight", D_);
    L.ln1_b = vec_f32(tm, pre + "attn_norm.bias", D_);
    L.ln2_w = vec_f32(tm, pre + "ffn_norm.weight", D_);
    L.ln2_b = vec_f32(tm, pre + "ffn_norm.bias", D_);
    L.q = tm.get(pre + "attn_q.weight", {D_, D_});
    L.k = tm.get(pre + "attn_k.weight", {D_, D_});
    L.v = tm.get(pre + "attn_v.weight", {D_, D_});
    L.o = tm.get(pre + "attn_output.weight", {D_, D_});
    L.up = tm.get(pre + "ffn_up.weight", {F_, D_});
    L.up_b = vec_f32(tm, pre + "ffn_up.bias", F_);
    L.down = tm.get(pre + "ffn_down.weight", {D_, F_});
    L.down_b = vec_f32(tm, pre + "ffn_down.bias", D_);
    if (gated) {  // stored as tanh(gate) already (gguf_keys.py V_ATTN_GATE / V_FFN_GATE)
        tm.get(pre + "attn_gate", {1});
        tm.get(pre + "ffn_gate", {1});
        L.gate_attn = tm.host_f32(pre + "attn_gate")[0];
        L.gate_ffn = tm.host_f32(pre + "ffn_gate")[0];
    }
    return L;
}

void VisionEncoder::check_image_args(int32_t ar_id, const int32_t* tile_mask) const {
    if (ar_id < 0 || ar_id > hp_.max_aspect_ratio_id)
        throw std::invalid_argument("vision encode: aspect_ratio_id " + std::to_string(ar_id) + " out of range [0, " +
                                    std::to_string(hp_.max_aspect_ratio_id) + "]");
    for (int64_t t = 0; t < T_; t++)
        if (tile_mask[t] != 0 && tile_mask[t] != 1)
            throw std::invalid_argument("vision encode: aspect_ratio_mask values must be 0 or 1");
}

void VisionEncoder::encode(const float* pixels_host, const int32_t* ar_ids_host, const int32_t* ar_mask_host, int n_img,
                           float* out) {
    if (n_img < 0) throw std::invalid_argument("vision encode: negative image count");
    for (int b = 0; b < n_img; b++) check_image_args(ar_ids_host[b], ar_mask_host + b * T_);
    const int64_t tile_px = int64_t(hp_.num_channels) * hp_.image_size * hp_.image_size;
    for (int b = 0; b < n_img; b++) {
        auto job = begin(pixels_host + b * T_ * tile_px, ar_ids_host[b], ar_mask_host + b * T_,
                         out + int64_t(b) * T_ * P_ * hp_.out_dim);
        while (job->step()) {}
    }
}

// The state of one image's encode (Job): activations, the pixels, the padding segments.
struct VisionEncoder::Job::State {
    Work w;
    std::vector<float> px;  // [T, C, H, W] host copy
    int32_t ar_id = 0;
    std::vector<int32_t> tile_mask;  // [T]
    std::vector<Segment> segs;
    Scratch scratch{};
    float* out = nullptr;  // backend [T, P, out_dim]
    State(Backend& be, const VisionEncoder& e) : w(be, e) {}
};

VisionEncoder::Job::Job(VisionEncoder& enc, std::unique_ptr<State> st, int total)
    : enc_(enc), st_(std::move(st)), total_(total) {}
VisionEncoder::Job::~Job() = default;

std::unique_ptr<VisionEncoder::Job> VisionEncoder::begin(const float* px, int32_t ar_id, const int32_t* tile_mask,
                                                         float* out) {
    check_image_args(ar_id, tile_mask);
    const int64_t n_px = T_ * int64_t(hp_.num_channels) * hp_.image_size * hp_.image_size;
    auto st = std::make_unique<Job::State>(be_, *this);
    st->px.assign(px, px + n_px);
    st->ar_id = ar_id;
    st->tile_mask.assign(tile_mask, tile_mask + T_);
    st->segs = segments(st->tile_mask.data());
    Work& w = st->w;
    st->scratch = Scratch{w.h.p, w.q.p, w.k.p, w.v.p, w.a.p, w.u.p, w.mask.p, &st->segs, 0, true};
    for (const Segment& g : st->segs) {
        if (!g.pad) st->scratch.n_real += g.n;
        st->scratch.identity = st->scratch.identity && g.perm_row == g.row;
    }
    st->out = out;
    const int total = 1 + hp_.num_layers + hp_.num_global_layers + 1;
    return std::unique_ptr<Job>(new Job(*this, std::move(st), total));
}

bool VisionEncoder::Job::step() {
    if (finished()) return false;
    VisionEncoder& e = enc_;
    State& st = *st_;
    const int L = e.hp_.num_layers, G = e.hp_.num_global_layers;
    const int u = done_;
    const int64_t S = e.S();
    auto collect = [&](int at) {
        for (int64_t i = 0; i < e.K_; i++)
            if (e.hp_.intermediate_layers[i] == at)
                e.be_.copy(st.w.inter[i]->p, st.w.x.p, size_t(S * e.D_) * sizeof(float));
    };
    if (u == 0) {
        e.embed(st);
    } else if (u <= L) {                      // local layer u - 1, collecting the intermediate hidden states
        prof::Region region("vision.local");  // profiling labels (common/profile.h)
        const int l = u - 1;
        if (e.hp_.intermediate_at_layer_input) collect(l);
        e.run_layer(e.local_[l], st.w.x.p, S, st.scratch);
        if (!e.hp_.intermediate_at_layer_input) collect(l);  // transformers 5.x: hidden_states[l] = output of layer l
    } else if (u <= L + G) {                                 // global layer u - L - 1 (layernorm_post before the first)
        const int l = u - L - 1;
        if (l == 0) {
            prof::Region region("vision.post_ln");
            e.post_layernorm(st);
        }
        prof::Region region("vision.global");
        e.run_layer(e.global_[l], st.w.x.p, S, st.scratch);
    } else {
        if (G == 0) {
            prof::Region region("vision.post_ln");
            e.post_layernorm(st);
        }
        e.project(st);
    }
    done_++;
    return !finished();
}

// HF's aspect-ratio attention mask (_prepare_aspect_ratio_attention_mask):
// a position is "padding" if it is a pad row P..Np-1 of a tile or any row of a
// tile whose aspect_ratio_mask is 0, and the pair (query i, key j) gets
// finfo(float32).min added iff BOTH are padding. (P = grid^2 + 1 is never a
// multiple of 8, squares being 0, 1 or 4 mod 8, so HF's `[-pad_patches:]`
// slice always has pad_patches >= 1.)
// Returns the runs of equal kind over the S rows in order, each with its
// place in the gathered order (all real rows first, then all padding rows).
std::vector<VisionEncoder::Segment> VisionEncoder::segments(const int32_t* tile_mask) const {
    const int64_t S = T_ * Np_;
    auto is_pad = [&](int64_t r) { return tile_mask[r / Np_] == 0 || r % Np_ >= P_; };
    std::vector<Segment> segs;
    for (int64_t r0 = 0; r0 < S;) {
        int64_t r1 = r0 + 1;
        while (r1 < S && is_pad(r1) == is_pad(r0)) r1++;
        segs.push_back(Segment{r0, r1 - r0, 0, is_pad(r0)});
        r0 = r1;
    }
    int64_t next = 0;
    for (int pass = 0; pass < 2; pass++)
        for (Segment& g : segs)
            if (g.pad == (pass == 1)) {
                g.perm_row = next;
                next += g.n;
            }
    return segs;
}

// One encoder layer (HF MllamaVisionEncoderLayer.forward) on x [S, D] in place:
//   x = x + g_attn * o_proj(attn(LN1(x)));  x = x + g_ffn * fc2(gelu(fc1(LN2(x))))
// with g = 1 for local layers.
// s: the scratch buffers of encode_image.
void VisionEncoder::run_layer(const Layer& L, float* x, int64_t S, const Scratch& s) {
    const float eps = hp_.norm_eps;
    be_.layer_norm(x, L.ln1_w, L.ln1_b, s.h, S, D_, eps);
    be_.matmul(s.h, S, D_, L.q, nullptr, s.q, D_);
    be_.matmul(s.h, S, D_, L.k, nullptr, s.k, D_);
    be_.matmul(s.h, S, D_, L.v, nullptr, s.v, D_);

    // Attention over all S positions of the image with HF's aspect-ratio mask
    // (see segments()): real query rows are unmasked, padding query rows all
    // share one mask row. The queries are gathered real rows first, padding
    // rows last (qp, in h), so the backend sees one unmasked call for every real
    // row and a few masked calls of <= kMaskRows padding rows (each call
    // re-reads all S keys, so few calls matter). The output stays in that order
    // through the row-wise o_proj and is scattered back when added to x.
    float* qp = s.q;
    if (!s.identity) {
        for (const Segment& g : *s.segs)
            be_.copy(s.h + g.perm_row * D_, s.q + g.row * D_, size_t(g.n * D_) * sizeof(float));
        qp = s.h;
    }
    const float scale = 1.0f / std::sqrt(float(hd_));
    if (s.n_real > 0)
        be_.attention(qp, s.k, s.v, DType::F32, D_, s.a, s.n_real, S, hp_.n_head, hp_.n_head, int(hd_), scale, nullptr,
                      S, false, 0);
    for (int64_t r0 = s.n_real; r0 < S; r0 += kMaskRows) {
        const int64_t nr = std::min(kMaskRows, S - r0);
        be_.attention(qp + r0 * D_, s.k, s.v, DType::F32, D_, s.a + r0 * D_, nr, S, hp_.n_head, hp_.n_head, int(hd_),
                      scale, s.mask, S, false, 0);
    }
    be_.matmul(s.a, S, D_, L.o, nullptr, s.h, D_);  // o_proj, rows in the gathered order
    // x + g * attn (gate 1 for local layers: x + 1*h == x + h exactly)
    for (const Segment& g : *s.segs) be_.add_scaled(x + g.row * D_, s.h + g.perm_row * D_, L.gate_attn, g.n * D_);

    be_.layer_norm(x, L.ln2_w, L.ln2_b, s.h, S, D_, eps);
    for (int64_t r0 = 0; r0 < S; r0 += kMlpRows) {
        const int64_t nr = std::min(kMlpRows, S - r0);
        be_.matmul(s.h + r0 * D_, nr, D_, L.up, L.up_b, s.u, F_);      // fc1 [nr, F]
        be_.gelu(s.u, nr * F_);                                        // exact erf GELU (ACT2FN["gelu"])
        be_.matmul(s.u, nr, F_, L.down, L.down_b, s.a + r0 * D_, D_);  // fc2 [nr, D]
    }
    be_.add_scaled(x, s.a, L.gate_ffn, S * D_);
}

void VisionEncoder::embed(Job::State& st) {
    const int64_t S = T_ * Np_, C = hp_.num_channels, p = hp_.patch_size, W = hp_.image_size;
    const int64_t CPP = C * p * p;
    const float* px = st.px.data();
    const int32_t ar_id = st.ar_id;
    Work& w = st.w;
    Buf &x = w.x, &h = w.h, &mask = w.mask;
    const std::vector<Segment>& segs = st.segs;

    // ---- embeddings (HF: patch conv, + pre-tile, cls, + gated position, layernorm_pre, pad)
    // Profiling regions (common/profile.h; no cost when profiling is off): vision.embed
    // here, vision.local / vision.post_ln / vision.global in Job::step, projector in project().
    prof::Region region("vision.embed");
    // Per-aspect-ratio rows: tile_rows [T, P, D], pre/post [T, D].
    Buf &tile_rows = w.tile_rows, &pre_rows = w.pre_rows, &post_rows = w.post_rows;
    table_entry(tile_pos_, ar_id, tile_rows.p);
    table_entry(pre_tile_, ar_id, pre_rows.p);
    table_entry(post_tile_, ar_id, post_rows.p);
    // pre_bias[t] = tanh(g_pre) * pre_tile[ar][t]: added to every patch of tile t
    // (before the class token is prepended), here as the bias of the patch matmul.
    // post_bias[t] = post_ln.bias + tanh(g_post) * post_tile[ar][t]: the post-tile
    // embedding is added to every row of tile t right after layernorm_post, so it
    // folds into that LayerNorm's bias. Both [T, D].
    std::vector<float> zeros(std::max<int64_t>(T_ * D_, (Np_ - P_) * D_), 0.0f);
    Buf &pre_bias = w.pre_bias, &post_bias = w.post_bias;
    be_.to_device(pre_bias.p, zeros.data(), size_t(T_ * D_) * sizeof(float));
    be_.add_scaled(pre_bias.p, pre_rows.p, g_pre_, T_ * D_);
    for (int64_t t = 0; t < T_; t++) be_.copy(post_bias.p + t * D_, post_ln_b_, size_t(D_) * sizeof(float));
    be_.add_scaled(post_bias.p, post_rows.p, g_post_, T_ * D_);

    std::vector<float> cols(size_t(n_patch_ * CPP));  // im2col of one tile [n_patch, C*p*p]
    Buf& patches = w.patches;
    for (int64_t t = 0; t < T_; t++) {
        // cols[gy*grid + gx, (c*p + ky)*p + kx] = pixel[c, gy*p + ky, gx*p + kx]
        // (Conv2d weight [D, C, p, p] flattened row-major matches this column order).
        const uint64_t t_im2col = prof::start();
        const float* tile = px + t * C * W * W;
        for (int64_t gy = 0; gy < grid_; gy++)
            for (int64_t gx = 0; gx < grid_; gx++) {
                float* dst = &cols[size_t((gy * grid_ + gx) * CPP)];
                for (int64_t c = 0; c < C; c++)
                    for (int64_t ky = 0; ky < p; ky++)
                        std::memcpy(dst + (c * p + ky) * p, tile + (c * W + gy * p + ky) * W + gx * p,
                                    size_t(p) * sizeof(float));
            }
        if (t_im2col) prof::record("im2col (host)", "", t_im2col, 0, 8.0 * cols.size());
        be_.synchronize();  // the previous tile's matmul may still read `patches`
        be_.to_device(patches.p, cols.data(), cols.size() * sizeof(float));
        float* ht = h.p + t * Np_ * D_;  // tile t, pre-LN embeddings [P, D]
        be_.matmul(patches.p, n_patch_, CPP, patch_, pre_bias.p + t * D_, ht + D_, D_);
        be_.copy(ht, class_embd_, size_t(D_) * sizeof(float));
        // MllamaPrecomputedPositionEmbedding: + (1 - tanh g) * pos + tanh g * tile_pos[ar][t]
        be_.add_scaled(ht, pos_embd_, g_pos_, P_ * D_);
        be_.add_scaled(ht, tile_rows.p + t * P_ * D_, g_tile_, P_ * D_);
        be_.layer_norm(ht, pre_ln_w_, pre_ln_b_, x.p + t * Np_ * D_, P_, D_, kPrePostLnEps);
        if (Np_ > P_)  // F.pad: rows P..Np-1 of every tile are zeros
            be_.to_device(x.p + (t * Np_ + P_) * D_, zeros.data(), size_t((Np_ - P_) * D_) * sizeof(float));
    }

    // Mask row for padding queries: finfo(float32).min on padding keys, 0 elsewhere,
    // repeated kMaskRows times ([kMaskRows, S]).
    const uint64_t t_mask = prof::start();
    std::vector<float> m(size_t(kMaskRows * S));
    const float fmin = std::numeric_limits<float>::lowest();
    for (const Segment& g : segs)
        for (int64_t j = g.row; j < g.row + g.n; j++) m[j] = g.pad ? fmin : 0.0f;
    for (int64_t r = 1; r < kMaskRows; r++) std::memcpy(&m[r * S], &m[0], size_t(S) * sizeof(float));
    if (t_mask) prof::record("mask (host)", "", t_mask, 0, 4.0 * m.size());
    be_.to_device(mask.p, m.data(), m.size() * sizeof(float));
    be_.synchronize();  // the host staging vectors go out of scope
}

// layernorm_post (+ post-tile embedding folded into its bias), before the global layers.
void VisionEncoder::post_layernorm(Job::State& st) {
    const int64_t S = T_ * Np_;
    Work& w = st.w;
    float* xg = w.h.p;  // h is free between layers
    for (int64_t t = 0; t < T_; t++)
        be_.layer_norm(w.x.p + t * Np_ * D_, post_ln_w_, w.post_bias.p + t * D_, xg + t * Np_ * D_, Np_, D_,
                       kPrePostLnEps);
    be_.copy(w.x.p, xg, size_t(S * D_) * sizeof(float));
}

// Projector on [final (D) | intermediates], rows 0..P-1 of each tile, into st.out [T, P, O].
void VisionEncoder::project(Job::State& st) {
    const int64_t Dc = D_ * (1 + K_), O = hp_.out_dim;
    Work& w = st.w;
    float* out = st.out;
    // HF stacks the K intermediates on a new LAST axis and flattens it:
    // torch.stack(list, dim=-1).reshape(..., D*K), so column D + d*K + i holds
    // intermediate i at feature d (interleaved, not one block per layer). The
    // backend has no strided copy, so the rows are assembled on the host.
    prof::Region region("projector");  // profiling label (common/profile.h)
    std::vector<float> cat(size_t(kProjRows * Dc)), tmp(size_t(kProjRows * D_));
    Buf& dcat = w.dcat;
    be_.synchronize();
    for (int64_t t = 0; t < T_; t++) {
        for (int64_t r0 = 0; r0 < P_; r0 += kProjRows) {
            const int64_t nr = std::min(kProjRows, P_ - r0), row = t * Np_ + r0;
            be_.to_host(tmp.data(), w.x.p + row * D_, size_t(nr * D_) * sizeof(float));
            uint64_t t_cat = prof::start();
            for (int64_t r = 0; r < nr; r++) std::memcpy(&cat[r * Dc], &tmp[r * D_], size_t(D_) * sizeof(float));
            if (t_cat) prof::record("concat (host)", "", t_cat, 0, 8.0 * nr * D_);
            for (int64_t i = 0; i < K_; i++) {
                be_.to_host(tmp.data(), w.inter[i]->p + row * D_, size_t(nr * D_) * sizeof(float));
                t_cat = prof::start();
                for (int64_t r = 0; r < nr; r++) {
                    float* dst = &cat[r * Dc + D_ + i];
                    const float* src = &tmp[r * D_];
                    for (int64_t d = 0; d < D_; d++) dst[d * K_] = src[d];
                }
                if (t_cat) prof::record("concat (host)", "", t_cat, 0, 8.0 * nr * D_);
            }
            be_.to_device(dcat.p, cat.data(), size_t(nr * Dc) * sizeof(float));
            be_.matmul(dcat.p, nr, Dc, proj_, proj_b_, out + (t * P_ + r0) * O, O);
            be_.synchronize();  // dcat is rewritten by the next chunk
        }
    }
}

}  // namespace mq
