// The whole mllama model (HF MllamaForConditionalGeneration): one backend, the
// weights, the vision encoder (optional), and the text decoder with n_seq
// sequence slots.
//
// State, per slot (one conversation each; mllama_q/session.py maps sessions to
// slots): the self-attention KV cache of its first seq_len tokens, the list of
// images its prompt refers to (shared, reference-counted cross-attention K/V:
// an image encoded once serves every slot that shows it), the HF mask row of
// its last evaluated token (repeated for generated tokens, as HF's generate
// does), and the key concatenations built for tokens that see several images.
//
// Cross-attention visibility follows HF (processing_mllama
// get_cross_attention_token_mask + modeling_mllama
// _prepare_cross_attention_mask): a token's mask row [n_img, max_tiles] says
// which tiles it attends to; tiles it cannot see get probability exactly 0, so
// a token attends over just the keys it can see: one image's real tiles (a
// prefix of that image's keys: no copy), or a concatenation of several images'
// visible tiles (built once, kept per slot). A row that sees no tile while the
// slot has images attends to every key of every image with its MLP output
// dropped (HF full_text_row_masked_out_mask; see text.cpp). A slot without
// images skips the cross-attention layers.
//
// Not thread-safe: one call at a time (the binding serialises them), except
// request_abort(), which any thread may call at any time.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "model/tensors.h"
#include "model/text.h"
#include "model/vision.h"

namespace mq {

// One image's cross-attention K/V: n_tiles x n_patches keys (HF order: tile, vision token).
struct ImageKV {
    CrossKV kv;
    int n_tiles = 0;
    int64_t n_patches = 0;
};

class MllamaModel;

// An image being encoded: the vision units (VisionEncoder::Job), then one unit
// of cross-attention K/V projections. step() runs one unit.
class ImageJob {
public:
    int total_steps() const { return total_; }
    int done_steps() const { return done_; }
    bool finished() const { return bool(result_); }
    bool step();  // false when finished
    std::shared_ptr<ImageKV> result() const { return result_; }

private:
    friend class MllamaModel;
    explicit ImageJob(MllamaModel& m) : m_(m) {}
    MllamaModel& m_;
    std::unique_ptr<BackendBuffer> states_;  // f32 [T, P, D] (the projector output)
    std::unique_ptr<VisionEncoder::Job> vjob_;
    int n_tiles_ = 0;
    int64_t n_patches_ = 0;
    int total_ = 0, done_ = 0;
    std::shared_ptr<ImageKV> result_;
};

class MllamaModel {
public:
    // `tm` must hold every text tensor (uploaded through `be`). Throws when a
    // tensor is missing or misshaped. The vision tower is attached separately
    // (attach_vision), so a text-only session never reads its weights.
    MllamaModel(std::unique_ptr<Backend> be, TensorMap tm, const TextHParams& thp, int64_t n_ctx, DType kv_type,
                int n_seq);
    ~MllamaModel();

    // Builds the vision encoder from its own tensors (v.*, mm.*, uploaded through backend()).
    void attach_vision(TensorMap vision_tm, const VisionHParams& vhp);

    Backend& backend() { return *be_; }
    const TextHParams& text_hparams() const { return text_->hparams(); }
    bool has_vision() const { return bool(vision_); }
    int64_t n_ctx() const { return text_->n_ctx(); }
    int n_seq() const { return text_->n_seq(); }
    size_t kv_bytes_per_seq() const { return text_->kv_bytes_per_seq(); }
    size_t cross_bytes(int64_t n_keys) const { return text_->cross_bytes(n_keys); }

    // ---- images -------------------------------------------------------------
    // One image, HF's arrays for it: pixels_host f32 [n_tiles, C, H, W],
    // aspect-ratio id, aspect_ratio_mask [n_tiles]; the extents are checked
    // against the vision hyper-parameters (invalid_argument on mismatch).
    std::unique_ptr<ImageJob> begin_image(const float* pixels_host, int32_t ar_id, const int32_t* ar_mask_host,
                                          int n_tiles, int channels, int height, int width);
    // From ready-made projector outputs (HF cross_attention_states of one
    // image), bypassing the vision tower: states_host f32 [n_tiles, n_patches, hidden].
    std::shared_ptr<ImageKV> image_from_states(const float* states_host, int n_tiles, int64_t n_patches);

    // ---- sequence slots -------------------------------------------------------
    int64_t seq_len(int slot) const;
    // Keeps the first n tokens (n <= seq_len); the cache rows are not touched.
    void seq_truncate(int slot, int64_t n);
    // The images the slot's prompt refers to, in prompt order (what the mask
    // rows' image axis indexes). All must have the same tile count.
    void seq_set_images(int slot, std::vector<std::shared_ptr<ImageKV>> images);
    const std::vector<std::shared_ptr<ImageKV>>& seq_images(int slot) const;

    // A copy of a slot's state from token `first` on (its cache rows, images,
    // last mask row, length), to put back with seq_restore: what a turn that
    // truncates a slot keeps so that cancelling it can give the slot back as
    // it was. Costs (len - first) tokens of KV memory while it lives.
    struct Snapshot;
    std::shared_ptr<Snapshot> seq_snapshot(int slot, int64_t first);
    void seq_restore(int slot, const Snapshot& snap);
    static size_t snapshot_bytes(const Snapshot& snap);

    // ---- one batched step -------------------------------------------------------
    struct Entry {
        int slot = 0;
        const int32_t* tokens = nullptr;  // host int32 [n], appended after the slot's seq_len tokens
        int64_t n = 0;
        // host int32 [n, n_img, n_tiles]: HF cross_attention_mask rows of these
        // tokens, or nullptr: repeat the slot's last mask row (HF generate); if
        // it never had one, every vision token is visible (HF forward without a mask).
        const int32_t* mask = nullptr;
        int logits = 0;                // 0: none, 1: the last row's, 2: every row's
        float* logits_out = nullptr;   // host f32 [logits == 2 ? n : 1, vocab]
        bool sample = false;           // sample a token after the last row
        Backend::SampleParams params;  // (hist fields filled in here)
        int32_t* id_out = nullptr;     // host, the sampled id
        // Decode rows (a generating sequence's next token) or prompt rows: each class has
        // its own kernels whatever the step's size (Backend::matmul_rows), so a sequence's
        // logits do not depend on what shares its steps.
        bool decode = false;
    };
    // Every entry (distinct slots) in ONE forward pass; on success each slot's
    // seq_len grows by its n. A single entry may be longer than kMaxBatch rows
    // (it is then run in chunks); several together may not.
    void step(std::vector<Entry>& entries);

    static constexpr int64_t kMaxBatch = 512;

    // Makes the running (or next) step throw StepAborted between two layers,
    // leaving every slot as before that step. Thread-safe.
    void request_abort() { abort_.store(true); }
    void clear_abort() { abort_.store(false); }

private:
    friend class ImageJob;
    struct Slot {
        int64_t len = 0;
        std::vector<std::shared_ptr<ImageKV>> images;
        std::vector<int32_t> last_mask;  // [n_img * n_tiles] of the last row evaluated with a mask
        // Key concatenations for visible sets spanning several images (at most
        // kConcatKeep, most recent last): visible-tile bit masks -> keys.
        std::vector<std::pair<std::vector<uint32_t>, std::shared_ptr<CrossKV>>> concat;
    };
    static constexpr size_t kConcatKeep = 2;

public:
    struct Snapshot {
        TextDecoder::SavedRows rows;
        Slot state;
    };

private:
    Slot& slot(int s);
    const Slot& slot(int s) const;
    void step_chunked(Entry& e);
    void step_once(std::vector<Entry>& entries);

    std::unique_ptr<Backend> be_;  // declared first: destroyed last
    TensorMap tm_;
    TensorMap vision_tm_;
    std::unique_ptr<TextDecoder> text_;
    std::unique_ptr<VisionEncoder> vision_;
    std::vector<Slot> slots_;
    std::atomic<bool> abort_{false};
};

}  // namespace mq
