// The whole mllama model (HF MllamaForConditionalGeneration): one backend, the
// weights, the vision encoder (optional), the text decoder with its KV cache,
// and the cross-attention K/V of the current set of images.
//
// Session state: tokens are evaluated in order (eval appends to the KV cache);
// encode_images replaces the image set every later cross-attention layer reads;
// reset() clears both.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "backend/backend.h"
#include "model/tensors.h"
#include "model/text.h"

// The vision tower (csrc/model/vision.h) is developed on its own branch; the
// model compiles without it (text and cross-attention from given states only).
#if __has_include("model/vision.h")
#include "model/vision.h"
#define MQ_HAVE_VISION 1
#else
#define MQ_HAVE_VISION 0
#endif

namespace mq {

#if !MQ_HAVE_VISION
struct VisionHParams {};
class VisionEncoder {};  // placeholder: never constructed without vision.h
#endif

class MllamaModel {
public:
    // `tm` must hold every text tensor, and every vision tensor when `vhp` is given
    // (its weights were uploaded through `be`). Throws when a tensor is missing or misshaped.
    MllamaModel(std::unique_ptr<Backend> be, TensorMap tm, const TextHParams& thp,
                const std::optional<VisionHParams>& vhp, int64_t n_ctx, DType kv_type);
    ~MllamaModel();

    Backend& backend() { return *be_; }
    const TextHParams& text_hparams() const { return text_->hparams(); }
    bool has_vision() const { return bool(vision_); }
    int64_t n_ctx() const { return text_->n_ctx(); }
    int64_t n_past() const { return n_past_; }
    int n_images() const { return n_img_; }
    int n_tiles() const { return n_tiles_; }
    int64_t num_patches() const { return n_patches_; }

    // Forget every evaluated token and image.
    void reset();

    // Runs the vision tower on a set of images and caches the cross-attention
    // K/V of every cross-attention layer (replacing any previous set).
    //   pixels_host f32 [n_img, max_tiles, C, H, W]; ar_ids_host int32 [n_img];
    //   ar_mask_host int32 [n_img, max_tiles]
    // n_tiles, channels, height, width: the pixel array's extents, checked
    // against the vision hyper-parameters (invalid_argument on mismatch).
    void encode_images(const float* pixels_host, const int32_t* ar_ids_host, const int32_t* ar_mask_host, int n_img,
                       int n_tiles, int channels, int height, int width);

    // The same from ready-made cross-attention states (HF cross_attention_states,
    // i.e. the projector output), bypassing the vision tower:
    //   states_host f32 [n_img, n_tiles, n_patches, hidden_size]
    void set_cross_attention_states(const float* states_host, int n_img, int n_tiles, int64_t n_patches);

    // Evaluates n tokens after the n_past already cached and writes logits
    // f32 [all_logits ? n : 1, vocab] to logits_host.
    //   xmask_host: int32 [n, n_img, n_tiles] (HF cross_attention_mask rows for
    //   these tokens: 1 = the token may attend to that tile) or nullptr. With
    //   nullptr and images set, the last mask row given before is repeated (as
    //   HF's generate extends the mask for each new token); if none was ever
    //   given, every vision token is visible (HF forward without a mask).
    void eval(const int32_t* tokens_host, int64_t n, const int32_t* xmask_host, bool all_logits, float* logits_host);

private:
    void set_cross_keys_from_backend(const float* states, int n_img, int n_tiles, int64_t n_patches);

    std::unique_ptr<Backend> be_;   // declared first: destroyed last
    TensorMap tm_;
    std::unique_ptr<TextDecoder> text_;
    std::unique_ptr<VisionEncoder> vision_;
    int64_t n_past_ = 0;
    int n_img_ = 0, n_tiles_ = 0;
    int64_t n_patches_ = 0;
    std::vector<int32_t> last_mask_row_;  // [n_img, n_tiles] of the last token evaluated with a mask
    BackendBuffer mask_buf_;              // f32 [n, n_img*n_tiles*n_patches]
};

}  // namespace mq
