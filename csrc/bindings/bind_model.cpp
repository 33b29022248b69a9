// `_core.MllamaModel`: the compiled model (csrc/model/mllama.h) over numpy.
// mllama_q/model.py builds it from a GGUF file; tests drive it directly.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "bindings/array_check.h"
#include "bindings/bindings.h"
#include "bindings/hparams_py.h"
#include "bindings/tensor_map_py.h"
#include "common/threadpool.h"
#include "model/mllama.h"

namespace py = pybind11;

namespace mq::bind {
namespace {

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
    // Vision tensors (names starting with "v." or "mm.") are set aside and
    // uploaded, with the encoder built, only on the first encode_images: a
    // text-only session never reads (or, on CUDA, copies) the vision weights.
    PyMllamaModel(py::dict tensors, py::dict text_hparams, std::optional<py::dict> vision_hparams,
                  const std::string& device, int64_t n_ctx, const std::string& kv_type)
        : tensors_(tensors) {
        DType kvt;
        if (kv_type == "f16") kvt = DType::F16;
        else if (kv_type == "f32") kvt = DType::F32;
        else throw std::invalid_argument("kv_type must be 'f16' or 'f32', got '" + kv_type + "'");
        require(n_ctx > 0, "n_ctx must be positive");
        TextHParams thp = text_hparams_from(text_hparams);
        if (vision_hparams) vhp_ = vision_hparams_from(*vision_hparams);
        py::dict text_tensors;
        for (auto item : tensors) {
            const std::string name = py::str(item.first);
            if (name.rfind("v.", 0) == 0 || name.rfind("mm.", 0) == 0) vision_tensors_[item.first] = item.second;
            else text_tensors[item.first] = item.second;
        }
        auto be = make_backend(device);
        TensorMap tm = tensor_map_from_py(text_tensors, *be);
        model_ = std::make_unique<MllamaModel>(std::move(be), std::move(tm), thp, n_ctx, kvt);
    }

    bool has_vision() const { return vhp_.has_value(); }

    // Uploads the vision tensors and builds the encoder (once).
    void load_vision() {
        std::lock_guard<std::mutex> lock(mu_);  // the GIL is held too (Python objects are read)
        if (model_->has_vision()) return;
        require(vhp_.has_value(), "the model was loaded without its vision encoder (vision=False)");
        TensorMap vtm = tensor_map_from_py(vision_tensors_, model_->backend());
        model_->attach_vision(std::move(vtm), *vhp_);
    }

    void reset() {
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(mu_);
        model_->reset();
    }

    void encode_images(py::array pixel_values, py::array aspect_ratio_ids, py::array aspect_ratio_mask) {
        require(vhp_.has_value(), "the model was loaded without its vision encoder (vision=False)");
        F32 px = squeeze_batch(F32(pixel_values), 5, "pixel_values");   // [n_img, T, C, H, W]
        const int n_img = dim_int(px, 0, "pixel_values n_img");
        require(n_img > 0, "pixel_values holds no image");
        require_finite(px.data(), px.size(), "pixel_values");
        // [n_img] ids in [0, max_aspect_ratio_id] and [n_img, T] 0/1 flags, checked before narrowing
        I32 ids = squeeze_batch(int32_checked(aspect_ratio_ids, "aspect_ratio_ids", 0, vhp_->max_aspect_ratio_id), 1,
                                "aspect_ratio_ids");
        I32 msk = squeeze_batch(int32_checked(aspect_ratio_mask, "aspect_ratio_mask", 0, 1), 2, "aspect_ratio_mask");
        require(ids.shape(0) == n_img, "aspect_ratio_ids must have one entry per image");
        require(msk.shape(0) == n_img && msk.shape(1) == px.shape(1), "aspect_ratio_mask must be [n_img, max_tiles]");
        const int tiles = dim_int(px, 1, "pixel_values tiles"), ch = dim_int(px, 2, "pixel_values channels"),
                  h = dim_int(px, 3, "pixel_values height"), w = dim_int(px, 4, "pixel_values width");
        load_vision();
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(mu_);
        model_->encode_images(px.data(), ids.data(), msk.data(), n_img, tiles, ch, h, w);
    }

    void set_cross_attention_states(py::array states) {
        F32 s = squeeze_batch(F32(states), 4, "states");  // [n_img, T, P, D]
        require(s.shape(3) == model_->text_hparams().hidden_size, "states must be [n_img, n_tiles, n_patches, hidden_size]");
        const int n_img = dim_int(s, 0, "states n_img"), tiles = dim_int(s, 1, "states tiles");
        require_finite(s.data(), s.size(), "states");
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(mu_);
        model_->set_cross_attention_states(s.data(), n_img, tiles, s.shape(2));
    }

    py::array_t<float> eval(py::array tokens, std::optional<py::array> cross_attention_mask, bool all_logits) {
        const int64_t V = model_->text_hparams().vocab_size;
        // ids index token_embd (vocab_size + 8 rows, <|image|> = vocab_size); checked before narrowing
        I32 t = squeeze_batch(int32_checked(tokens, "tokens", 0, V + 8 - 1), 1, "tokens");
        const int64_t n = t.shape(0);
        require(n > 0, "tokens is empty");
        std::optional<I32> m;
        if (cross_attention_mask && !cross_attention_mask->is_none()) {
            m = squeeze_batch(int32_checked(*cross_attention_mask, "cross_attention_mask", 0, 1), 3,
                              "cross_attention_mask");
            if (model_->n_images() > 0)
                require(m->shape(0) == n && m->shape(1) == model_->n_images() && m->shape(2) == model_->n_tiles(),
                        "cross_attention_mask must be [n_tokens, n_images, max_tiles] = [" + std::to_string(n) + ", " +
                            std::to_string(model_->n_images()) + ", " + std::to_string(model_->n_tiles()) + "]");
            else
                require(m->shape(0) == n, "cross_attention_mask must have one row per token");
        }
        py::array_t<float> out({all_logits ? n : int64_t(1), V});
        float* o = out.mutable_data();
        const int32_t* mp = m ? m->data() : nullptr;
        {
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(mu_);
            model_->eval(t.data(), n, model_->n_images() > 0 ? mp : nullptr, all_logits, o);
        }
        return out;
    }

    int64_t n_past() const { return model_->n_past(); }
    int64_t n_ctx() const { return model_->n_ctx(); }
    int n_images() const { return model_->n_images(); }
    bool vision_loaded() const { return model_->has_vision(); }
    std::string device() const { return model_->backend().name(); }

private:
    py::object tensors_;  // keeps the mapped arrays alive as long as the model
    py::dict vision_tensors_;
    std::optional<VisionHParams> vhp_;
    std::unique_ptr<MllamaModel> model_;
    std::mutex mu_;  // one call at a time: the GIL is released while computing
};

}  // namespace

void register_model(py::module_& m) {
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
        .def_property_readonly("has_vision", &PyMllamaModel::has_vision, "vision_hparams were given")
        .def_property_readonly("vision_loaded", &PyMllamaModel::vision_loaded,
                               "the vision weights were uploaded and the encoder built (first encode_images)")
        .def("load_vision", &PyMllamaModel::load_vision, "Upload the vision weights and build the encoder now.")
        .def_property_readonly("device", &PyMllamaModel::device);
}

}  // namespace mq::bind
