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
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/tensors.h"

namespace mq {

struct VisionHParams {
    int hidden_size;            // Dv (1280)
    int intermediate_size;      // Fv (5120)
    int num_layers;             // local layers (32)
    int num_global_layers;      // gated global layers (8)
    int n_head;                 // 16 (head dim = hidden_size / n_head = 80)
    int image_size;             // tile side in pixels (560)
    int patch_size;             // 14
    int num_channels;           // 3
    int max_num_tiles;          // 4
    int max_aspect_ratio_id;    // len(supported_aspect_ratios) (8); embedding tables have +1 rows
    float norm_eps;             // eps of the encoder layers' LayerNorms (pre/post LN always use 1e-5 as HF)
    std::vector<int> intermediate_layers;  // [3, 7, 15, 23, 30]
    int out_dim;                // text hidden size = projector output (4096)
    // Which hidden state an entry i of intermediate_layers names.
    //   false (default): the OUTPUT of local layer i, as transformers 5.x computes it
    //     (MllamaVisionEncoder collects each layer's output; the project's numerics reference).
    //   true: the INPUT of local layer i, as Meta's reference code and transformers <= 4.53 did
    //     (the weights were trained that way). Equal to the default with every index minus one.
    bool intermediate_at_layer_input = false;
};

class VisionEncoder {
public:
    // Validates every tensor name and shape up front (throws std::runtime_error
    // naming the tensor) and checks the hyper-parameters (std::invalid_argument).
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
    void encode(const float* pixels_host, const int32_t* ar_ids_host, const int32_t* ar_mask_host, int n_img,
                float* out);

private:
    struct Layer {
        const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;  // backend f32 [Dv] (owned copies, see vec_)
        Weight q, k, v, o;                            // [Dv, Dv]
        Weight up, down;                              // [Fv, Dv], [Dv, Fv]
        const float *up_b, *down_b;                   // backend f32 [Fv], [Dv]
        float gate_attn = 1.0f, gate_ffn = 1.0f;      // tanh(g) for global layers, 1 for local
    };

    // Activation buffers of one encode_image call (backend memory):
    // h, q, k, v, a: [S, D]; u: [min(S, 1024), F]; mask: [512, S].
    struct Scratch {
        float *h, *q, *k, *v, *a, *u, *mask;
    };

    const float* vec_f32(const TensorMap& tm, const std::string& name, int64_t n);
    Layer load_layer(const TensorMap& tm, const std::string& prefix, bool gated);
    void run_layer(const Layer& L, float* x, int64_t S, const int32_t* tile_mask, const Scratch& s);
    void encode_image(const float* pixels_host, int32_t ar_id, const int32_t* tile_mask, float* out);

    Backend& be_;
    VisionHParams hp_;
    int64_t D_, F_, hd_, grid_, n_patch_, P_, Np_, T_, K_;  // sizes, see vision.cpp
    std::vector<void*> owned_;       // backend buffers this encoder allocated

    Weight patch_;                   // [Dv, C*p*p] view of the conv weight
    Weight pre_tile_, post_tile_, tile_pos_;
    const float* class_embd_ = nullptr;   // backend [Dv]
    const float* pos_embd_ = nullptr;     // backend [P, Dv]
    float g_pos_ = 0, g_tile_ = 0, g_pre_ = 0, g_post_ = 0;
    const float *pre_ln_w_, *pre_ln_b_, *post_ln_w_, *post_ln_b_;
    std::vector<Layer> local_, global_;
    Weight proj_;                    // [out_dim, Dv*(1+K)]
    const float* proj_b_ = nullptr;  // backend [out_dim]
};

}  // namespace mq
