// Hyper-parameter dicts from Python -> the core's TextHParams / VisionHParams
// (one reader for _core.MllamaModel and _core.VisionEncoder). A missing key or
// a value of the wrong type (e.g. an int beyond the C++ field) is a ValueError
// naming the key. Ranges are the core constructors' business (and, before
// that, mllama_q/hparams.py's).
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "model/text.h"
#include "model/vision.h"

namespace mq::bind {

template <typename T>
T hparam_get(const pybind11::dict& d, const char* key, const char* what) {
    if (!d.contains(key)) throw std::invalid_argument(std::string(what) + ": missing key '" + key + "'");
    try {
        return d[key].cast<T>();
    } catch (const pybind11::cast_error&) {
        throw std::invalid_argument(std::string(what) + "['" + key + "'] has the wrong type");
    }
}

inline TextHParams text_hparams_from(const pybind11::dict& d) {
    const char* w = "text_hparams";
    TextHParams hp;
    hp.vocab_size = hparam_get<int64_t>(d, "vocab_size", w);
    hp.hidden_size = hparam_get<int64_t>(d, "hidden_size", w);
    hp.intermediate_size = hparam_get<int64_t>(d, "intermediate_size", w);
    hp.n_layer = hparam_get<int>(d, "n_layer", w);
    hp.n_head = hparam_get<int>(d, "n_head", w);
    hp.n_kv_head = hparam_get<int>(d, "n_kv_head", w);
    hp.head_dim = hparam_get<int>(d, "head_dim", w);
    hp.rms_eps = hparam_get<float>(d, "rms_eps", w);
    hp.cross_attention_layers = hparam_get<std::vector<int>>(d, "cross_attention_layers", w);
    hp.rope_inv_freq = hparam_get<std::vector<float>>(d, "rope_inv_freq", w);
    return hp;
}

inline VisionHParams vision_hparams_from(const pybind11::dict& d) {
    const char* w = "vision_hparams";
    VisionHParams hp{};
    hp.hidden_size = hparam_get<int>(d, "hidden_size", w);
    hp.intermediate_size = hparam_get<int>(d, "intermediate_size", w);
    hp.num_layers = hparam_get<int>(d, "num_layers", w);
    hp.num_global_layers = hparam_get<int>(d, "num_global_layers", w);
    hp.n_head = hparam_get<int>(d, "n_head", w);
    hp.image_size = hparam_get<int>(d, "image_size", w);
    hp.patch_size = hparam_get<int>(d, "patch_size", w);
    hp.num_channels = hparam_get<int>(d, "num_channels", w);
    hp.max_num_tiles = hparam_get<int>(d, "max_num_tiles", w);
    hp.max_aspect_ratio_id = hparam_get<int>(d, "max_aspect_ratio_id", w);
    hp.norm_eps = hparam_get<float>(d, "norm_eps", w);
    hp.intermediate_layers = hparam_get<std::vector<int>>(d, "intermediate_layers", w);
    hp.out_dim = hparam_get<int>(d, "out_dim", w);
    if (d.contains("intermediate_at_layer_input"))
        hp.intermediate_at_layer_input = hparam_get<bool>(d, "intermediate_at_layer_input", w);
    return hp;
}

}  // namespace mq::bind
