// `_core.MllamaModel`: the compiled model (csrc/model/mllama.h) over numpy.
// mllama_q/model.py builds it from a GGUF file; tests drive it directly.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings/array_check.h"
#include "bindings/bindings.h"
#include "bindings/tensor_map_py.h"
#include "common/threadpool.h"
#include "model/mllama.h"

namespace py = pybind11;

namespace mq::bind {
namespace {

template <typename T>
T get(const py::dict& d, const char* key, const char* what) {
    if (!d.contains(key)) throw std::invalid_argument(std::string(what) + " is missing '" + key + "'");
    try {
        return d[key].cast<T>();
    } catch (const py::cast_error&) {
        throw std::invalid_argument(std::string(what) + "['" + key + "'] has the wrong type");
    }
}

TextHParams text_hparams_from(const py::dict& d) {
    const char* w = "text_hparams";
    TextHParams hp;
    hp.vocab_size = get<int64_t>(d, "vocab_size", w);
    hp.hidden_size = get<int64_t>(d, "hidden_size", w);
    hp.intermediate_size = get<int64_t>(d, "intermediate_size", w);
    hp.n_layer = get<int>(d, "n_layer", w);
    hp.n_head = get<int>(d, "n_head", w);
    hp.n_kv_head = get<int>(d, "n_kv_head", w);
    hp.head_dim = get<int>(d, "head_dim", w);
    hp.rms_eps = get<float>(d, "rms_eps", w);
    hp.cross_attention_layers = get<std::vector<int>>(d, "cross_attention_layers", w);
    hp.rope_inv_freq = get<std::vector<float>>(d, "rope_inv_freq", w);
    return hp;
}

#if MQ_HAVE_VISION
VisionHParams vision_hparams_from(const py::dict& d) {
    const char* w = "vision_hparams";
    VisionHParams hp{};
    hp.hidden_size = get<int>(d, "hidden_size", w);
    hp.intermediate_size = get<int>(d, "intermediate_size", w);
    hp.num_layers = get<int>(d, "num_layers", w);
    hp.num_global_layers = get<int>(d, "num_global_layers", w);
    hp.n_head = get<int>(d, "n_head", w);
    hp.image_size = get<int>(d, "image_size", w);
    hp.patch_size = get<int>(d, "patch_size", w);
    hp.num_channels = get<int>(d, "num_channels", w);
    hp.max_num_tiles = get<int>(d, "max_num_tiles", w);
    hp.max_aspect_ratio_id = get<int>(d, "max_aspect_ratio_id", w);
    hp.norm_eps = get<float>(d, "norm_eps", w);
    hp.intermediate_layers = get<std::vector<int>>(d, "intermediate_layers", w);
    hp.out_dim = get<int>(d, "out_dim", w);
    if (d.contains("intermediate_at_layer_input")) hp.intermediate_at_layer_input = get<bool>(d, "intermediate_at_layer_input", w);
    return hp;
}
#endif

std::unique_ptr<Backend> make_backend(const std::string& device) {
    if (device == "cpu") return make_cpu_backend(ThreadPool::global());
    if (device == "cuda") return make_cuda_backend(0);
    if (device.rfind("cuda:", 0) == 0) {
        int idx = -1;
        try {
            idx = std::stoi(device.substr(5));
        } catch (const std::exception&) {
        }
        if (idx < 0) throw std::invalid_argument("bad device '" + device + "' (expected 'cpu', 'cuda' or 'cuda:N')");
        return make_cuda_backend(idx);
    }
    throw std::invalid_argument("unknown device '" + device + "' (expected 'cpu', 'cuda' or 'cuda:N')");
}

using I32 = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Drops leading batch axes of extent 1 until `ndim` remain (HF arrays carry batch = 1).
template <typename A>
A squeeze_batch(A a, int ndim, const char* what) {
    std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
    while (int(shape.size()) > ndim && shape[0] == 1) shape.erase(shape.begin());
    require(int(shape.size()) == ndim, std::string(what) + " must have " + std::to_string(ndim) +
                                           " dimensions (plus an optional leading batch of 1)");
    return A(a.reshape(shape));
}

class PyMllamaModel {
public:
    PyMllamaModel(py::dict tensors, py::dict text_hparams, std::optional<py::dict> vision_hparams,
                  const std::string& device, int64_t n_ctx, const std::string& kv_type)
        : tensors_(tensors) {
        DType kvt;
        if (kv_type == "f16") kvt = DType::F16;
        else if (kv_type == "f32") kvt = DType::F32;
        else throw std::invalid_argument("kv_type must be 'f16' or 'f32', got '" + kv_type + "'");
        require(n_ctx > 0, "n_ctx must be positive");
        TextHParams thp = text_hparams_from(text_hparams);
        std::optional<VisionHParams> vhp;
        if (vision_hparams) {
#if MQ_HAVE_VISION
            vhp = vision_hparams_from(*vision_hparams);
#else
            throw std::invalid_argument("this build of mllama_q has no vision encoder; pass vision_hparams=None");
#endif
        }
        auto be = make_backend(device);
        TensorMap tm = tensor_map_from_py(tensors, *be);
        model_ = std::make_unique<MllamaModel>(std::move(be), std::move(tm), thp, vhp, n_ctx, kvt);
    }

    void reset() { model_->reset(); }

    void encode_images(py::array pixel_values, py::array aspect_ratio_ids, py::array aspect_ratio_mask) {
        require(model_->has_vision(), "the model was loaded without its vision encoder (vision=False)");
        F32 px = squeeze_batch(F32(pixel_values), 5, "pixel_values");   // [n_img, T, C, H, W]
        I32 ids = squeeze_batch(I32(aspect_ratio_ids), 1, "aspect_ratio_ids");  // [n_img]
        I32 msk = squeeze_batch(I32(aspect_ratio_mask), 2, "aspect_ratio_mask");  // [n_img, T]
        const int n_img = int(px.shape(0));
        require(n_img > 0, "pixel_values holds no image");
        require(ids.shape(0) == n_img, "aspect_ratio_ids must have one entry per image");
        require(msk.shape(0) == n_img && msk.shape(1) == px.shape(1), "aspect_ratio_mask must be [n_img, max_tiles]");
        py::gil_scoped_release nogil;
        model_->encode_images(px.data(), ids.data(), msk.data(), n_img, int(px.shape(1)), int(px.shape(2)),
                              int(px.shape(3)), int(px.shape(4)));
    }

    void set_cross_attention_states(py::array states) {
        F32 s = squeeze_batch(F32(states), 4, "states");  // [n_img, T, P, D]
        require(s.shape(3) == model_->text_hparams().hidden_size, "states must be [n_img, n_tiles, n_patches, hidden_size]");
        py::gil_scoped_release nogil;
        model_->set_cross_attention_states(s.data(), int(s.shape(0)), int(s.shape(1)), s.shape(2));
    }

    py::array_t<float> eval(py::array tokens, std::optional<py::array> cross_attention_mask, bool all_logits) {
        I32 t = squeeze_batch(I32(tokens), 1, "tokens");
        const int64_t n = t.shape(0);
        require(n > 0, "tokens is empty");
        std::optional<I32> m;
        if (cross_attention_mask && !cross_attention_mask->is_none()) {
            m = squeeze_batch(I32(*cross_attention_mask), 3, "cross_attention_mask");
            if (model_->n_images() > 0)
                require(m->shape(0) == n && m->shape(1) == model_->n_images() && m->shape(2) == model_->n_tiles(),
                        "cross_attention_mask must be [n_tokens, n_images, max_tiles] = [" + std::to_string(n) + ", " +
                            std::to_string(model_->n_images()) + ", " + std::to_string(model_->n_tiles()) + "]");
            else
                require(m->shape(0) == n, "cross_attention_mask must have one row per token");
        }
        const int64_t V = model_->text_hparams().vocab_size;
        py::array_t<float> out({all_logits ? n : int64_t(1), V});
        float* o = out.mutable_data();
        const int32_t* mp = m ? m->data() : nullptr;
        {
            py::gil_scoped_release nogil;
            model_->eval(t.data(), n, model_->n_images() > 0 ? mp : nullptr, all_logits, o);
        }
        return out;
    }

    int64_t n_past() const { return model_->n_past(); }
    int64_t n_ctx() const { return model_->n_ctx(); }
    int n_images() const { return model_->n_images(); }
    bool has_vision() const { return model_->has_vision(); }
    std::string device() const { return model_->backend().name(); }

private:
    py::object tensors_;  // keeps the mapped arrays alive as long as the model
    std::unique_ptr<MllamaModel> model_;
};

}  // namespace

void register_model(py::module_& m) {
    m.attr("have_vision") = bool(MQ_HAVE_VISION);
    py::class_<PyMllamaModel>(m, "MllamaModel",
                              "The compiled mllama model. Built by mllama_q.Model from a GGUF file:\n"
                              "MllamaModel(tensors, text_hparams, vision_hparams, device, n_ctx, kv_type)\n"
                              "  tensors: {name: (array, ggml_type, shape)} (mapped GGUF data, not copied)")
        .def(py::init<py::dict, py::dict, std::optional<py::dict>, const std::string&, int64_t, const std::string&>(),
             py::arg("tensors"), py::arg("text_hparams"), py::arg("vision_hparams") = py::none(),
             py::arg("device") = "cpu", py::arg("n_ctx") = 4096, py::arg("kv_type") = "f16")
        .def("reset", &PyMllamaModel::reset, "Forget every evaluated token and image.")
        .def("encode_images", &PyMllamaModel::encode_images, py::arg("pixel_values"), py::arg("aspect_ratio_ids"),
             py::arg("aspect_ratio_mask"),
             "Run the vision tower and cache the cross-attention K/V of this image set (replaces any previous set).")
        .def("set_cross_attention_states", &PyMllamaModel::set_cross_attention_states, py::arg("states"),
             "Cache cross-attention K/V from ready projector outputs f32 [n_img, n_tiles, n_patches, hidden].")
        .def("eval", &PyMllamaModel::eval, py::arg("tokens"), py::arg("cross_attention_mask") = py::none(),
             py::arg("all_logits") = false,
             "Evaluate tokens after the cached ones; returns f32 logits [n or 1, vocab].")
        .def_property_readonly("n_past", &PyMllamaModel::n_past)
        .def_property_readonly("n_ctx", &PyMllamaModel::n_ctx)
        .def_property_readonly("n_images", &PyMllamaModel::n_images)
        .def_property_readonly("has_vision", &PyMllamaModel::has_vision)
        .def_property_readonly("device", &PyMllamaModel::device);
}

}  // namespace mq::bind
