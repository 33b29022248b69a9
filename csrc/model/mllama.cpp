// The whole mllama model (see mllama.h). Reference: HF transformers
// models/mllama/modeling_mllama.py, MllamaModel.forward and
// _prepare_cross_attention_mask.
#include "model/mllama.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>

#include "common/profile.h"

namespace mq {

// Prompts are evaluated in chunks of at most this many tokens, which bounds
// the scratch activations and the cross-attention mask ([chunk, n_keys] f32).
constexpr int64_t kMaxBatch = 512;

MllamaModel::MllamaModel(std::unique_ptr<Backend> be, TensorMap tm, const TextHParams& thp, int64_t n_ctx,
                         DType kv_type)
    : be_(std::move(be)), tm_(std::move(tm)), mask_buf_(be_.get()) {
    text_ = std::make_unique<TextDecoder>(*be_, tm_, thp, n_ctx, kv_type);
}

void MllamaModel::attach_vision(TensorMap vision_tm, const VisionHParams& vhp) {
    if (vhp.out_dim != text_->hparams().hidden_size)
        throw std::invalid_argument("vision out_dim " + std::to_string(vhp.out_dim) + " != text hidden_size " +
                                    std::to_string(text_->hparams().hidden_size));
    vision_.reset();
    vision_tm_ = std::move(vision_tm);
    vision_ = std::make_unique<VisionEncoder>(*be_, vision_tm_, vhp);
}

MllamaModel::~MllamaModel() = default;

void MllamaModel::reset() {
    n_past_ = 0;
    text_->clear_cross();
    n_img_ = n_tiles_ = 0;
    n_patches_ = 0;
    last_mask_row_.clear();
}

void MllamaModel::encode_images(const float* pixels_host, const int32_t* ar_ids_host, const int32_t* ar_mask_host,
                                int n_img, int n_tiles, int channels, int height, int width) {
    if (!vision_) throw std::invalid_argument("the model was loaded without its vision encoder (vision=False)");
    if (n_img <= 0) throw std::invalid_argument("encode_images: no images");
    const VisionHParams& vh = vision_->hparams();
    if (n_tiles != vh.max_num_tiles || channels != vh.num_channels || height != vh.image_size || width != vh.image_size)
        throw std::invalid_argument("pixel_values must be [n_img, " + std::to_string(vh.max_num_tiles) + ", " +
                                    std::to_string(vh.num_channels) + ", " + std::to_string(vh.image_size) + ", " +
                                    std::to_string(vh.image_size) + "], got [n_img, " + std::to_string(n_tiles) + ", " +
                                    std::to_string(channels) + ", " + std::to_string(height) + ", " +
                                    std::to_string(width) + "]");
    for (int i = 0; i < n_img * n_tiles; i++)
        if (ar_mask_host[i] != 0 && ar_mask_host[i] != 1)
            throw std::invalid_argument("aspect_ratio_mask values must be 0 or 1");
    for (int i = 0; i < n_img; i++) {
        if (ar_ids_host[i] < 0 || ar_ids_host[i] > vh.max_aspect_ratio_id)
            throw std::invalid_argument("aspect_ratio_id " + std::to_string(ar_ids_host[i]) + " out of range [0, " +
                                        std::to_string(vh.max_aspect_ratio_id) + "]");
    }
    const int T = vh.max_num_tiles;
    const int64_t P = vision_->num_patches(), D = text_->hparams().hidden_size;
    BackendBuffer states(be_.get());  // f32 [n_img, T, P, D]
    vision_->encode(pixels_host, ar_ids_host, ar_mask_host, n_img, states.f32(int64_t(n_img) * T * P * D));
    prof::Region region("cross_kv");   // profiling label (common/profile.h)
    set_cross_keys_from_backend(static_cast<const float*>(states.data()), n_img, T, P);
}

void MllamaModel::set_cross_attention_states(const float* states_host, int n_img, int n_tiles, int64_t n_patches) {
    if (n_img <= 0 || n_tiles <= 0 || n_patches <= 0) throw std::invalid_argument("cross-attention states must be non-empty");
    const int64_t n = int64_t(n_img) * n_tiles * n_patches * text_->hparams().hidden_size;
    BackendBuffer states(be_.get());
    be_->to_device(states.f32(n), states_host, size_t(n) * sizeof(float));
    set_cross_keys_from_backend(static_cast<const float*>(states.data()), n_img, n_tiles, n_patches);
}

void MllamaModel::set_cross_keys_from_backend(const float* states, int n_img, int n_tiles, int64_t n_patches) {
    // Keys are ordered (image, tile, vision token), as HF's
    // cross_attention_states.reshape(-1, num_patches, hidden) viewed as one sequence.
    n_img_ = 0;
    text_->set_cross_states(states, int64_t(n_img) * n_tiles * n_patches);
    n_img_ = n_img;
    n_tiles_ = n_tiles;
    n_patches_ = n_patches;
    last_mask_row_.clear();
}

void MllamaModel::eval(const int32_t* tokens_host, int64_t n, const int32_t* xmask_host, bool all_logits,
                       float* logits_host) {
    if (n <= 0) throw std::invalid_argument("eval: no tokens");
    if (n_past_ + n > n_ctx())
        throw std::invalid_argument("eval: " + std::to_string(n_past_) + " cached + " + std::to_string(n) +
                                    " new tokens exceed n_ctx = " + std::to_string(n_ctx()));
    for (int64_t i = 0; i < n; i++)
        if (tokens_host[i] < 0 || int64_t(tokens_host[i]) >= text_->hparams().vocab_size + 8)
            throw std::invalid_argument("token id " + std::to_string(tokens_host[i]) + " out of range");

    const bool cross = text_->has_cross();
    const int64_t tiles = int64_t(n_img_) * n_tiles_;  // mask entries per token
    const int64_t nk = text_->n_cross_keys();
    const int64_t V = text_->hparams().vocab_size;
    if (xmask_host && cross)
        for (int64_t i = 0; i < n * tiles; i++)
            if (xmask_host[i] != 0 && xmask_host[i] != 1)
                throw std::invalid_argument("cross_attention_mask values must be 0 or 1");

    std::vector<float> mask_host;
    std::vector<uint8_t> row_visible;
    for (int64_t b0 = 0; b0 < n; b0 += kMaxBatch) {
        const int64_t nb = std::min(kMaxBatch, n - b0);
        const float* xmask = nullptr;     // backend f32 [nb, key_count]
        const uint8_t* rows = nullptr;    // host [nb]
        // The mask rows of this chunk: given ones, else the last one repeated, else none.
        const int32_t* given = xmask_host ? xmask_host + b0 * tiles : nullptr;
        int64_t key_begin = 0, key_count = nk;
        if (cross && (given || !last_mask_row_.empty())) {
            auto row = [&](int64_t i) { return given ? given + i * tiles : last_mask_row_.data(); };
            // HF _prepare_cross_attention_mask: each (image, tile) entry repeated over
            // the tile's n_patches vision tokens; 0 -> finfo.min (here -inf: the
            // softmax gives exactly 0 either way), 1 -> 0. A row with no visible
            // tile (full_text_row_masked_out_mask = 0) is multiplied by 0, so it
            // attends to every vision token; its MLP output is zeroed instead.
            row_visible.assign(nb, 1);
            int64_t t_lo = tiles, t_hi = -1;  // visible tiles of the chunk: [t_lo, t_hi]
            bool all_rows_visible = true;
            for (int64_t i = 0; i < nb; i++) {
                const int32_t* m = row(i);
                bool any = false;
                for (int64_t t = 0; t < tiles; t++)
                    if (m[t]) {
                        any = true;
                        t_lo = std::min(t_lo, t);
                        t_hi = std::max(t_hi, t);
                    }
                row_visible[i] = any ? 1 : 0;
                all_rows_visible = all_rows_visible && any;
            }
            // Keys masked for every row get probability exactly 0: when every row
            // sees some tile, attend only over the tiles [t_lo, t_hi] (e.g. a decode
            // step that sees one 1-tile image reads 1/4 of that image's keys).
            int64_t tile0 = 0, n_tiles_used = tiles;
            if (all_rows_visible) {
                tile0 = t_lo;
                n_tiles_used = t_hi - t_lo + 1;
            }
            key_begin = tile0 * n_patches_;
            key_count = n_tiles_used * n_patches_;
            mask_host.assign(size_t(nb) * key_count, 0.0f);  // [nb, key_count]
            for (int64_t i = 0; i < nb; i++) {
                if (!row_visible[i]) continue;
                const int32_t* m = row(i);
                float* mr = &mask_host[i * key_count];
                for (int64_t t = 0; t < n_tiles_used; t++)
                    if (!m[tile0 + t])
                        std::fill(mr + t * n_patches_, mr + (t + 1) * n_patches_, -std::numeric_limits<float>::infinity());
            }
            if (given) last_mask_row_.assign(given + (nb - 1) * tiles, given + nb * tiles);
            float* dm = mask_buf_.f32(nb * key_count);
            be_->to_device(dm, mask_host.data(), mask_host.size() * sizeof(float));
            xmask = dm;
            rows = row_visible.data();
        }
        // Without all_logits every chunk writes its last token's logits to the
        // same place; the final chunk's are the ones returned.
        float* out = all_logits ? logits_host + b0 * V : logits_host;
        text_->forward(tokens_host + b0, nb, n_past_, key_begin, key_count, xmask, rows, all_logits, out);
        n_past_ += nb;
    }
}

}  // namespace mq
