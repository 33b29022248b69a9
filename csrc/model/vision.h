// Mllama vision tower + multi-modal projector (HF transformers
// modeling_mllama.py: MllamaVisionModel.forward followed by
// MllamaModel.multi_modal_projector), computed through the Backend interface.
//
// Input per image: max_tiles tiles of C x image_size x image_size pixels, an
// aspect-ratio id (1-based, 0 = padding image) and a per-tile mask (1 = real
// tile). Output per image: [max_tiles, num_patches, out_dim] float32, the
// `cross_attention_states` the text decoder's cross-attention layers read.
//
// Weights use the GGUF names and conventions of mllama_q/gguf_keys.py
// (Ollama's `mllama` layout): Q/K rows permuted within each head (the same
// permutation on both, so q.k and the attention are unchanged), vision gates
// stored as tanh(g) already, the position-embedding gate stored as two
// tensors (1 - tanh g, tanh g).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/tensors.h"

namespace mq {

struct VisionHParams {
    int hidden_size;                       // Dv (1280)
    int intermediate_size;                 // Fv (5120)
    int num_layers;                        // local layers (32)
    int num_global_layers;                 // gated global layers (8)
    int n_head;                            // 16 (head dim = hidden_size / n_head = 80)
    int image_size;                        // tile side in pixels (560)
    int patch_size;                        // 14
    int num_channels;                      // 3
    int max_num_tiles;                     // 4
    int max_aspect_ratio_id;               // len(supported_aspect_ratios) (8); embedding tables have +1 rows
    float norm_eps;                        // eps of the encoder layers' LayerNorms (pre/post LN always use 1e-5 as HF)
    std::vector<int> intermediate_layers;  // [3, 7, 15, 23, 30]
    int out_dim;                           // text hidden size = projector output (4096)
    // Which hidden state an entry i of intermediate_layers names.
    //   true (default): the INPUT of local layer i ("the states entering local
    //     layers 3, 7, 15, 23, 30"), as Meta's reference code computes it
    //     (llama_models/llama3/multimodal/model.py, ImageTransformer.forward
    //     appends x before running resblock idx) and transformers did after its
    //     fix in PR #39785: the convention the published weights were trained with.
    //   false: the OUTPUT of local layer i, which is what transformers 5.x's
    //     MllamaVisionEncoder.forward collects again (a regression); equal to
    //     the default with every index minus one. Kept for comparison tests.
    bool intermediate_at_layer_input = true;
};

class VisionEncoder {
public:
    // Validates every tensor name and shape up front (throws std::runtime_error
    // naming the tensor) and checks the hyper-parameters (std::invalid_argument).
    // Keeps the backend Weights of `tm` (views: the tensor data, e.g. the mapped
    // GGUF, and the backend must outlive the encoder) plus small owned f32
    // copies of the 1-D parameters; the TensorMap object itself may go.
    VisionEncoder(Backend& be, const TensorMap& tm, const VisionHParams& hp);
    ~VisionEncoder();
    VisionEncoder(const VisionEncoder&) = delete;
    VisionEncoder& operator=(const VisionEncoder&) = delete;

    // (image_size / patch_size)^2 + 1 (class token) = 1601 for the 11B.
    int64_t num_patches() const { return n_patch_ + 1; }
    int64_t out_dim() const { return hp_.out_dim; }
    const VisionHParams& hparams() const { return hp_; }

    // pixels_host:  float32 [n_img, max_tiles, C, H, W] (host memory)
    // ar_ids_host:  int32 [n_img], 1-based aspect-ratio ids as HF (0 = padding image)
    // ar_mask_host: int32 [n_img, max_tiles], 1 = real tile, 0 = padding tile
    // out:          BACKEND float32 [n_img, max_tiles, num_patches, out_dim]
    // Images are encoded independently (one Job each, run to the end).
    void encode(const float* pixels_host, const int32_t* ar_ids_host, const int32_t* ar_mask_host, int n_img,
                float* out);

    // One image encoded step by step, so that a caller can interleave other
    // work (decode steps of other sequences), report progress and stop early:
    // step() runs the next unit -- the patch/position embeddings, one encoder
    // layer (local or global), or the projector -- and returns whether units
    // remain. The job owns its activation buffers (about 430 MB for the 11B)
    // and a copy of the pixels; `out` (BACKEND f32 [max_tiles, num_patches,
    // out_dim]) is complete after the last unit. Arguments are checked here.
    class Job {
    public:
        ~Job();
        int total_steps() const { return total_; }
        int done_steps() const { return done_; }
        bool finished() const { return done_ >= total_; }
        bool step();

    private:
        friend class VisionEncoder;
        struct State;
        Job(VisionEncoder& enc, std::unique_ptr<State> st, int total);
        VisionEncoder& enc_;
        std::unique_ptr<State> st_;
        int total_ = 0, done_ = 0;
    };
    //   pixels_host: f32 [max_tiles, C, H, W]; ar_mask_host: int32 [max_tiles]
    std::unique_ptr<Job> begin(const float* pixels_host, int32_t ar_id, const int32_t* ar_mask_host, float* out);

private:
    struct Layer {
        const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  // backend f32 [Dv] (owned copies, see vec_)
        Weight q, k, v, o;                           // [Dv, Dv]
        Weight up, down;                             // [Fv, Dv], [Dv, Fv]
        const float *up_b, *down_b;                  // backend f32 [Fv], [Dv]
        float gate_attn = 1.0f, gate_ffn = 1.0f;     // tanh(g) for global layers, 1 for local
    };

    // A run of rows [row, row + n) of one image's S positions that are all real
    // or all padding; perm_row: where the run starts in the gathered query order.
    struct Segment {
        int64_t row, n, perm_row;
        bool pad;
    };
    // Activation buffers of one encode_image call (backend memory):
    // h, q, k, v, a: [S, D]; u: [min(S, 1024), F]; mask: [512, S] (one row repeated).
    struct Scratch {
        float *h, *q, *k, *v, *a, *u, *mask;
        const std::vector<Segment>* segs;
        int64_t n_real;  // real rows (they come first in the gathered order)
        bool identity;   // gathered order == natural order (no copies needed)
    };

    std::vector<Segment> segments(const int32_t* tile_mask) const;

    struct Table {  // aspect-ratio embedding table (see table())
        Weight w;
        int64_t rows_per_entry = 1;
    };
    Table table(const TensorMap& tm, const std::string& name, int64_t entries, int64_t per_entry) const;
    void table_entry(const Table& tb, int32_t id, float* out);
    void rows_f32(const Weight& w, int64_t first, int64_t n, float* out);
    const float* vec_f32(const TensorMap& tm, const std::string& name, int64_t n);
    Layer load_layer(const TensorMap& tm, const std::string& prefix, bool gated);
    void run_layer(const Layer& L, float* x, int64_t S, const Scratch& s);
    struct Work;                            // activation buffers of one image (vision.cpp)
    int64_t S() const { return T_ * Np_; }  // positions per image (all tiles, padded)
    void check_image_args(int32_t ar_id, const int32_t* tile_mask) const;
    // The units of one image (Job::step): embeddings, layers, projector.
    void embed(Job::State& st);
    void post_layernorm(Job::State& st);
    void project(Job::State& st);

    Backend& be_;
    VisionHParams hp_;
    int64_t D_, F_, hd_, grid_, n_patch_, P_, Np_, T_, K_;  // sizes, see vision.cpp
    std::vector<void*> owned_;                              // backend buffers this encoder allocated

    Weight patch_;                           // [Dv, C*p*p] view of the conv weight
    Table pre_tile_, post_tile_, tile_pos_;  // per aspect-ratio id: [T, D], [T, D], [T, P, D]
    const float* class_embd_ = nullptr;      // backend [Dv]
    const float* pos_embd_ = nullptr;        // backend [P, Dv]
    float g_pos_ = 0, g_tile_ = 0, g_pre_ = 0, g_post_ = 0;
    const float *pre_ln_w_, *pre_ln_b_, *post_ln_w_, *post_ln_b_;
    std::vector<Layer> local_, global_;
    Weight proj_;                    // [out_dim, Dv*(1+K)]
    const float* proj_b_ = nullptr;  // backend [out_dim]
};

}  // namespace mq
