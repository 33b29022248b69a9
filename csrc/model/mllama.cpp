// The whole mllama model (see mllama.h). Reference: HF transformers
// models/mllama/modeling_mllama.py, MllamaModel.forward and
// _prepare_cross_attention_mask; processing_mllama.py
// get_cross_attention_token_mask for which tiles a token sees.
#include "model/mllama.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common/profile.h"

namespace mq {
namespace {

std::string str(int64_t v) { return std::to_string(v); }

// The cross-attention context of one row: which tiles of which image it
// attends to (bit t of bits[i] = tile t of image i), and whether its MLP output
// is added. Rows with equal contexts share one attention call.
struct RowCtx {
    std::vector<uint32_t> bits;
    bool mlp = true;
    bool operator==(const RowCtx& o) const { return mlp == o.mlp && bits == o.bits; }
};

}  // namespace

// ---------------------------------------------------------------------------------- images
bool ImageJob::step() {
    if (finished()) return false;
    if (vjob_) {
        if (!vjob_->step()) vjob_.reset();  // the vision activations (~430 MB on the 11B) go now
        done_++;
        return true;
    }
    // Last unit: the cross-attention K/V of every cross layer (keys ordered tile, vision token).
    prof::Region region("cross_kv");  // profiling label (common/profile.h)
    auto img = std::make_shared<ImageKV>();
    m_.text_->cross_kv(static_cast<const float*>(states_->data()), int64_t(n_tiles_) * n_patches_, img->kv);
    img->n_tiles = n_tiles_;
    img->n_patches = n_patches_;
    states_.reset();
    result_ = std::move(img);
    done_++;
    return false;
}

std::unique_ptr<ImageJob> MllamaModel::begin_image(const float* pixels_host, int32_t ar_id, const int32_t* ar_mask_host,
                                                   int n_tiles, int channels, int height, int width) {
    if (!vision_) throw std::invalid_argument("the model was loaded without its vision encoder (vision=False)");
    const VisionHParams& vh = vision_->hparams();
    if (n_tiles != vh.max_num_tiles || channels != vh.num_channels || height != vh.image_size || width != vh.image_size)
        throw std::invalid_argument("pixel_values must be [n_img, " + str(vh.max_num_tiles) + ", " +
                                    str(vh.num_channels) + ", " + str(vh.image_size) + ", " + str(vh.image_size) +
                                    "], got [n_img, " + str(n_tiles) + ", " + str(channels) + ", " + str(height) +
                                    ", " + str(width) + "]");
    if (n_tiles > 32) throw std::invalid_argument("at most 32 tiles per image are supported");
    for (int t = 0; t < n_tiles; t++)
        if (ar_mask_host[t] != 0 && ar_mask_host[t] != 1)
            throw std::invalid_argument("aspect_ratio_mask values must be 0 or 1");
    if (ar_id < 0 || ar_id > vh.max_aspect_ratio_id)
        throw std::invalid_argument("aspect_ratio_id " + str(ar_id) + " out of range [0, " +
                                    str(vh.max_aspect_ratio_id) + "]");
    std::unique_ptr<ImageJob> job(new ImageJob(*this));
    job->n_tiles_ = n_tiles;
    job->n_patches_ = vision_->num_patches();
    job->states_ = std::make_unique<BackendBuffer>(be_.get());
    float* states = job->states_->f32(int64_t(n_tiles) * job->n_patches_ * text_->hparams().hidden_size);
    job->vjob_ = vision_->begin(pixels_host, ar_id, ar_mask_host, states);
    job->total_ = job->vjob_->total_steps() + 1;
    return job;
}

std::shared_ptr<ImageKV> MllamaModel::image_from_states(const float* states_host, int n_tiles, int64_t n_patches) {
    if (n_tiles <= 0 || n_patches <= 0) throw std::invalid_argument("cross-attention states must be non-empty");
    if (n_tiles > 32) throw std::invalid_argument("at most 32 tiles per image are supported");
    const int64_t n = int64_t(n_tiles) * n_patches * text_->hparams().hidden_size;
    BackendBuffer states(be_.get());
    be_->to_device(states.f32(n), states_host, size_t(n) * sizeof(float));
    auto img = std::make_shared<ImageKV>();
    text_->cross_kv(static_cast<const float*>(states.data()), int64_t(n_tiles) * n_patches, img->kv);
    img->n_tiles = n_tiles;
    img->n_patches = n_patches;
    return img;
}

// ---------------------------------------------------------------------------------- model
MllamaModel::MllamaModel(std::unique_ptr<Backend> be, TensorMap tm, const TextHParams& thp, int64_t n_ctx,
                         DType kv_type, int n_seq)
    : be_(std::move(be)), tm_(std::move(tm)) {
    text_ = std::make_unique<TextDecoder>(*be_, tm_, thp, n_ctx, kv_type, n_seq);
    slots_.resize(size_t(n_seq));
}

void MllamaModel::attach_vision(TensorMap vision_tm, const VisionHParams& vhp) {
    if (vhp.out_dim != text_->hparams().hidden_size)
        throw std::invalid_argument("vision out_dim " + str(vhp.out_dim) + " != text hidden_size " +
                                    str(text_->hparams().hidden_size));
    vision_.reset();
    vision_tm_ = std::move(vision_tm);
    vision_ = std::make_unique<VisionEncoder>(*be_, vision_tm_, vhp);
}

MllamaModel::~MllamaModel() = default;

MllamaModel::Slot& MllamaModel::slot(int s) {
    if (s < 0 || s >= int(slots_.size())) throw std::invalid_argument("sequence slot " + str(s) + " out of range");
    return slots_[size_t(s)];
}
const MllamaModel::Slot& MllamaModel::slot(int s) const {
    if (s < 0 || s >= int(slots_.size())) throw std::invalid_argument("sequence slot " + str(s) + " out of range");
    return slots_[size_t(s)];
}

int64_t MllamaModel::seq_len(int s) const { return slot(s).len; }

void MllamaModel::seq_truncate(int s, int64_t n) {
    Slot& sl = slot(s);
    if (n < 0 || n > sl.len)
        throw std::invalid_argument("seq_truncate: " + str(n) + " is not in [0, " + str(sl.len) + "]");
    if (n < sl.len) sl.last_mask.clear();  // the mask row of the new last token is not kept
    sl.len = n;
}

void MllamaModel::seq_set_images(int s, std::vector<std::shared_ptr<ImageKV>> images) {
    Slot& sl = slot(s);
    for (const auto& im : images) {
        if (!im) throw std::invalid_argument("seq_set_images: null image");
        if (im->n_tiles != images.front()->n_tiles)
            throw std::invalid_argument("seq_set_images: every image of a sequence must have the same tile count");
    }
    sl.images = std::move(images);
    sl.last_mask.clear();
    sl.concat.clear();
}

const std::vector<std::shared_ptr<ImageKV>>& MllamaModel::seq_images(int s) const { return slot(s).images; }

std::shared_ptr<MllamaModel::Snapshot> MllamaModel::seq_snapshot(int s, int64_t first) {
    Slot& sl = slot(s);
    if (first < 0 || first > sl.len) throw std::invalid_argument("seq_snapshot: first token out of range");
    auto snap = std::make_shared<Snapshot>();
    text_->save_rows(s, first, sl.len - first, snap->rows);
    snap->state = sl;
    return snap;
}

void MllamaModel::seq_restore(int s, const Snapshot& snap) {
    Slot& sl = slot(s);
    if (snap.rows.first > sl.len) throw std::invalid_argument("seq_restore: the slot lost rows before the snapshot");
    text_->load_rows(s, snap.rows);
    sl = snap.state;
}

size_t MllamaModel::snapshot_bytes(const Snapshot& snap) { return snap.rows.bytes; }

// ---------------------------------------------------------------------------------- step
void MllamaModel::step(std::vector<Entry>& entries) {
    if (entries.empty()) return;
    if (entries.size() == 1 && entries[0].n > kMaxBatch) {
        step_chunked(entries[0]);
        return;
    }
    int64_t rows = 0;
    for (const Entry& e : entries) rows += e.n;
    if (rows > kMaxBatch)
        throw std::invalid_argument("step: " + str(rows) + " tokens in one step, at most " + str(kMaxBatch));
    step_once(entries);
}

// One long entry in chunks of kMaxBatch tokens (prompts longer than a step):
// each chunk is committed when it completes.
void MllamaModel::step_chunked(Entry& e) {
    const Slot& sl = slot(e.slot);
    const int64_t per_row = int64_t(sl.images.size()) * (sl.images.empty() ? 0 : sl.images.front()->n_tiles);
    const int64_t V = text_->hparams().vocab_size;
    if (sl.len + e.n > n_ctx())
        throw std::invalid_argument("eval: " + str(sl.len) + " cached + " + str(e.n) +
                                    " new tokens exceed n_ctx = " + str(n_ctx()));
    for (int64_t b0 = 0; b0 < e.n; b0 += kMaxBatch) {
        const int64_t nb = std::min(kMaxBatch, e.n - b0);
        const bool last = b0 + nb == e.n;
        std::vector<Entry> one(1, e);
        Entry& c = one[0];
        c.tokens = e.tokens + b0;
        c.n = nb;
        c.mask = e.mask ? e.mask + b0 * per_row : nullptr;
        c.logits = e.logits == 2 ? 2 : (last ? e.logits : 0);
        c.logits_out = e.logits == 2 ? e.logits_out + b0 * V : e.logits_out;
        c.sample = last && e.sample;
        step_once(one);
    }
}

void MllamaModel::step_once(std::vector<Entry>& es) {
    const TextHParams& hp = text_->hparams();
    const int64_t V = hp.vocab_size;
    // ---- checks
    std::vector<int> used(slots_.size(), 0);
    for (const Entry& e : es) {
        Slot& sl = slot(e.slot);
        if (used[size_t(e.slot)]++) throw std::invalid_argument("step: sequence slot " + str(e.slot) + " twice");
        if (e.n <= 0 || !e.tokens) throw std::invalid_argument("eval: no tokens");
        if (sl.len + e.n > n_ctx())
            throw std::invalid_argument("eval: " + str(sl.len) + " cached + " + str(e.n) +
                                        " new tokens exceed n_ctx = " + str(n_ctx()));
        for (int64_t i = 0; i < e.n; i++)
            if (e.tokens[i] < 0 || int64_t(e.tokens[i]) >= hp.vocab_size + 8)
                throw std::invalid_argument("token id " + str(e.tokens[i]) + " out of range");
        if (e.logits < 0 || e.logits > 2 || (e.logits && !e.logits_out))
            throw std::invalid_argument("step: bad logits request");
        if (e.sample) {
            if (!e.id_out) throw std::invalid_argument("step: no place for the sampled id");
            Backend::check(e.params);
        }
        if (e.mask && !sl.images.empty()) {
            const int64_t cnt = e.n * int64_t(sl.images.size()) * sl.images.front()->n_tiles;
            for (int64_t i = 0; i < cnt; i++)
                if (e.mask[i] != 0 && e.mask[i] != 1)
                    throw std::invalid_argument("cross_attention_mask values must be 0 or 1");
        }
    }

    // ---- the batch: sequences with images first (their rows run the cross layers); within
    // those, prompt rows before decode rows, and after them decode rows before prompt rows,
    // so that the decode rows are one run in every matmul (TextDecoder::step) and in the
    // sampled logit rows (which come first, in this order)
    std::vector<size_t> order(es.size());
    for (size_t i = 0; i < es.size(); i++) order[i] = i;
    auto rank = [&](size_t i) {
        const bool img = !slot(es[i].slot).images.empty();
        return img ? (es[i].decode ? 1 : 0) : (es[i].decode ? 2 : 3);
    };
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return rank(a) < rank(b); });

    TextDecoder::Step st;
    std::vector<int32_t> tokens;
    std::vector<std::shared_ptr<CrossKV>> keep;  // concatenations used by this step stay alive
    std::vector<int64_t> entry_row0(es.size());
    for (size_t oi : order) {
        Entry& e = es[oi];
        Slot& sl = slot(e.slot);
        const int64_t row0 = int64_t(tokens.size());
        entry_row0[oi] = row0;
        tokens.insert(tokens.end(), e.tokens, e.tokens + e.n);
        st.seqs.push_back({e.slot, row0, e.n, sl.len, e.decode});
        if (sl.images.empty()) continue;
        // Cross-attention runs: consecutive rows with the same context.
        const int n_img = int(sl.images.size()), T = sl.images.front()->n_tiles;
        const uint32_t all_tiles = T >= 32 ? 0xffffffffu : ((1u << T) - 1);
        auto ctx_of = [&](int64_t i) {
            RowCtx c;
            c.bits.assign(size_t(n_img), 0u);
            const int32_t* m = e.mask ? e.mask + i * n_img * T : (sl.last_mask.empty() ? nullptr : sl.last_mask.data());
            bool any = false;
            if (m)
                for (int im = 0; im < n_img; im++)
                    for (int t = 0; t < T; t++)
                        if (m[im * T + t]) {
                            c.bits[size_t(im)] |= 1u << t;
                            any = true;
                        }
            if (!any) {
                // No mask at all: every vision token visible (HF forward without a
                // cross_attention_mask). A row that sees nothing: HF zeroes its mask
                // row (it attends to every key) and drops its MLP output.
                std::fill(c.bits.begin(), c.bits.end(), all_tiles);
                c.mlp = m == nullptr;
            }
            return c;
        };
        // Keys of a context: one image's leading tiles are a prefix of its keys (no
        // copy); anything else is a concatenation, cached per slot.
        auto source = [&](const RowCtx& c, const CrossKV*& kv, int64_t& key0, int64_t& n_keys) {
            int only = -1, n_with = 0;
            for (int im = 0; im < n_img; im++)
                if (c.bits[size_t(im)]) {
                    only = im;
                    n_with++;
                }
            if (n_with == 1) {
                const uint32_t b = c.bits[size_t(only)];
                if ((b & (b + 1)) == 0) {  // tiles 0 .. k-1
                    const ImageKV& img = *sl.images[size_t(only)];
                    kv = &img.kv;
                    key0 = 0;
                    n_keys = int64_t(__builtin_popcount(b)) * img.n_patches;
                    return;
                }
            }
            for (size_t k = 0; k < sl.concat.size(); k++)
                if (sl.concat[k].first == c.bits) {
                    auto hit = sl.concat[k];
                    sl.concat.erase(sl.concat.begin() + long(k));
                    sl.concat.push_back(hit);  // most recent last
                    keep.push_back(hit.second);
                    kv = hit.second.get();
                    key0 = 0;
                    n_keys = hit.second->n_keys;
                    return;
                }
            std::vector<TextDecoder::KeyRange> parts;
            for (int im = 0; im < n_img; im++) {
                const ImageKV& img = *sl.images[size_t(im)];
                const uint32_t b = c.bits[size_t(im)];
                for (int t = 0; t < T;) {
                    if (!((b >> t) & 1u)) {
                        t++;
                        continue;
                    }
                    int t1 = t;
                    while (t1 < T && ((b >> t1) & 1u)) t1++;
                    parts.push_back({&img.kv, int64_t(t) * img.n_patches, int64_t(t1 - t) * img.n_patches});
                    t = t1;
                }
            }
            auto cat = std::make_shared<CrossKV>();
            text_->concat(parts, *cat);
            sl.concat.emplace_back(c.bits, cat);
            if (sl.concat.size() > kConcatKeep) sl.concat.erase(sl.concat.begin());
            keep.push_back(cat);
            kv = cat.get();
            key0 = 0;
            n_keys = cat->n_keys;
        };
        for (int64_t i = 0; i < e.n;) {
            const RowCtx c = ctx_of(i);
            int64_t j = i + 1;
            while (j < e.n && ctx_of(j) == c) j++;
            TextDecoder::CrossRun run{row0 + i, j - i, nullptr, 0, 0, c.mlp};
            source(c, run.kv, run.key0, run.n_keys);
            st.cross.push_back(run);
            i = j;
        }
        st.n_cross_rows = row0 + e.n;
    }
    st.tokens = tokens.data();
    st.R = int64_t(tokens.size());

    // ---- logit rows: the sampled ones first (TextDecoder::Step), then the others
    struct Out {
        size_t entry;
        int64_t row;  // within the entry
    };
    std::vector<Out> outs;
    for (size_t oi : order) {
        Entry& e = es[oi];
        if (!e.sample) continue;
        st.logit_rows.push_back(entry_row0[oi] + e.n - 1);
        st.sample.push_back(e.params);
        st.sample_slot.push_back(e.slot);
        st.sample_hist.push_back(slot(e.slot).len + e.n);
        outs.push_back({oi, e.n - 1});
    }
    for (size_t oi : order) {
        Entry& e = es[oi];
        if (e.logits == 0) continue;
        for (int64_t r = e.logits == 2 ? 0 : e.n - 1; r < e.n; r++) {
            if (e.sample && r == e.n - 1) continue;  // already a (sampled) logit row
            st.logit_rows.push_back(entry_row0[oi] + r);
            outs.push_back({oi, r});
        }
    }
    bool want_logits = false;
    for (const Entry& e : es) want_logits = want_logits || e.logits > 0;
    std::vector<float> logits(want_logits ? st.logit_rows.size() * size_t(V) : 0);
    std::vector<int32_t> ids(st.sample.size());

    text_->step(st, want_logits ? logits.data() : nullptr, ids.data(), &abort_);

    // ---- commit
    for (size_t k = 0; k < outs.size(); k++) {
        Entry& e = es[outs[k].entry];
        if (e.logits == 0) continue;
        float* dst = e.logits_out + (e.logits == 2 ? outs[k].row * V : 0);
        std::copy(logits.begin() + long(k * V), logits.begin() + long((k + 1) * V), dst);
    }
    for (size_t k = 0; k < st.sample.size(); k++) *es[outs[k].entry].id_out = ids[k];
    for (Entry& e : es) {
        Slot& sl = slot(e.slot);
        sl.len += e.n;
        if (e.mask && !sl.images.empty()) {
            const int64_t per_row = int64_t(sl.images.size()) * sl.images.front()->n_tiles;
            sl.last_mask.assign(e.mask + (e.n - 1) * per_row, e.mask + e.n * per_row);
        }
    }
}

}  // namespace mq
