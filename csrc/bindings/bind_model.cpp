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
#include "bindings/sample_params_py.h"
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
        } catch (const std::exception&) {}
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

// A handle to one image's cross-attention K/V (shared by every slot that
// shows the image). Keeps the model (and so its backend) alive.
struct PyImage {
    py::object owner;  // declared first: destroyed after img (whose buffers the backend frees)
    std::shared_ptr<ImageKV> img;
};

// A saved slot state (MllamaModel::seq_snapshot). Keeps the model alive.
struct PySnapshot {
    py::object owner;  // declared first: destroyed after snap
    std::shared_ptr<MllamaModel::Snapshot> snap;
};

class PyMllamaModel;

// An image being encoded, one unit (vision layer) per step().
struct PyImageJob {
    py::object owner;  // declared first: destroyed after job
    std::unique_ptr<ImageJob> job;
    PyMllamaModel* model = nullptr;
    bool step();
    PyImage result();
};

class PyMllamaModel {
public:
    // Vision tensors (names starting with "v." or "mm.") are set aside and
    // uploaded, with the encoder built, only on the first image: a text-only
    // session never reads (or, on CUDA, copies) the vision weights.
    PyMllamaModel(py::dict tensors, py::dict text_hparams, std::optional<py::dict> vision_hparams,
                  const std::string& device, int64_t n_ctx, const std::string& kv_type, int n_seq)
        : tensors_(tensors) {
        DType kvt;
        if (kv_type == "f16") kvt = DType::F16;
        else if (kv_type == "f32") kvt = DType::F32;
        else throw std::invalid_argument("kv_type must be 'f16' or 'f32', got '" + kv_type + "'");
        require(n_ctx > 0, "n_ctx must be positive");
        require(n_seq > 0, "n_seq must be positive");
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
        model_ = std::make_unique<MllamaModel>(std::move(be), std::move(tm), thp, n_ctx, kvt, n_seq);
    }

    bool has_vision() const { return vhp_.has_value(); }
    MllamaModel& model() { return *model_; }
    std::mutex& mutex() { return mu_; }

    // Uploads the vision tensors and builds the encoder (once).
    void load_vision() {
        std::lock_guard<std::mutex> lock(mu_);  // the GIL is held too (Python objects are read)
        if (model_->has_vision()) return;
        require(vhp_.has_value(), "the model was loaded without its vision encoder (vision=False)");
        TensorMap vtm = tensor_map_from_py(vision_tensors_, model_->backend());
        model_->attach_vision(std::move(vtm), *vhp_);
    }

    // One image's HF arrays: pixel_values [T, C, H, W] (a leading batch of 1 is dropped),
    // its aspect-ratio id, aspect_ratio_mask [T].
    PyImageJob begin_image(py::object self, py::array pixel_values, int aspect_ratio_id, py::array aspect_ratio_mask) {
        load_vision();
        require(vhp_.has_value(), "the model was loaded without its vision encoder (vision=False)");
        F32 px = squeeze_batch(F32(pixel_values), 4, "pixel_values");  // [T, C, H, W]
        require(px.shape(0) > 0, "pixel_values holds no tile");
        require_finite(px.data(), px.size(), "pixel_values");
        require(aspect_ratio_id >= 0 && aspect_ratio_id <= vhp_->max_aspect_ratio_id,
                "aspect_ratio_id " + std::to_string(aspect_ratio_id) + " is outside [0, " +
                    std::to_string(vhp_->max_aspect_ratio_id) + "]");
        // [T] 0/1 flags, checked before narrowing to int32
        I32 msk = squeeze_batch(int32_checked(aspect_ratio_mask, "aspect_ratio_mask", 0, 1), 1, "aspect_ratio_mask");
        require(msk.shape(0) == px.shape(0), "aspect_ratio_mask must have one entry per tile");
        const int tiles = dim_int(px, 0, "pixel_values tiles"), ch = dim_int(px, 1, "pixel_values channels"),
                  h = dim_int(px, 2, "pixel_values height"), w = dim_int(px, 3, "pixel_values width");
        PyImageJob j;
        j.model = this;
        j.owner = self;
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(mu_);
        j.job = model_->begin_image(px.data(), aspect_ratio_id, msk.data(), tiles, ch, h, w);
        return j;
    }

    PyImage image_from_states(py::object self, py::array states) {
        F32 s = squeeze_batch(F32(states), 3, "states");  // [T, P, D]
        require(s.shape(2) == model_->text_hparams().hidden_size, "states must be [n_tiles, n_patches, hidden_size]");
        require_finite(s.data(), s.size(), "states");
        PyImage im;
        im.owner = self;
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(mu_);
        im.img = model_->image_from_states(s.data(), int(s.shape(0)), s.shape(1));
        return im;
    }

    int64_t seq_len(int slot) {
        std::lock_guard<std::mutex> lock(mu_);
        return model_->seq_len(slot);
    }
    void seq_truncate(int slot, int64_t n) {
        std::lock_guard<std::mutex> lock(mu_);
        model_->seq_truncate(slot, n);
    }
    void seq_set_images(int slot, const std::vector<PyImage*>& images) {
        std::vector<std::shared_ptr<ImageKV>> v;
        for (PyImage* p : images) {
            require(p && p->img, "seq_set_images: not an encoded image");
            v.push_back(p->img);
        }
        std::lock_guard<std::mutex> lock(mu_);
        model_->seq_set_images(slot, std::move(v));
    }
    PySnapshot seq_snapshot(py::object self, int slot, int64_t first) {
        PySnapshot p;
        p.owner = self;
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(mu_);
        p.snap = model_->seq_snapshot(slot, first);
        return p;
    }
    void seq_restore(int slot, const PySnapshot& p) {
        require(bool(p.snap), "not a snapshot");
        py::gil_scoped_release nogil;
        std::lock_guard<std::mutex> lock(mu_);
        model_->seq_restore(slot, *p.snap);
    }
    int seq_n_images(int slot) {
        std::lock_guard<std::mutex> lock(mu_);
        return int(model_->seq_images(slot).size());
    }

    // entries: [(slot, tokens int32 [n], mask int32 [n, n_img, T] | None, logits 0|1|2,
    //            sample (temperature, top_k, top_p, min_p, repetition_penalty, u) | None
    //            [, decode: bool (decode rows, else prompt rows: MllamaModel::Entry);
    //               absent: decode when the entry has one token (Model.eval's next token)])]
    // -> [(logits f32 [n, V] | [V] | None, sampled id | -1)] in the same order.
    py::list step(py::list entries) {
        const int64_t V = model_->text_hparams().vocab_size;
        struct Held {
            I32 tokens;
            std::optional<I32> mask;
            py::object logits;
            int32_t id = -1;
        };
        std::vector<Held> held(entries.size());
        std::vector<MllamaModel::Entry> es(entries.size());
        for (size_t i = 0; i < entries.size(); i++) {
            auto t = entries[i].cast<py::tuple>();
            require(t.size() == 5 || t.size() == 6, "step entries are (slot, tokens, mask, logits, sample[, decode])");
            MllamaModel::Entry& e = es[i];
            e.slot = int_in_range(t[0], "slot", 0, model_->n_seq() - 1);
            // ids index token_embd (vocab_size + 8 rows, <|image|> = vocab_size); checked before narrowing
            held[i].tokens = squeeze_batch(int32_checked(t[1].cast<py::array>(), "tokens", 0, V + 8 - 1), 1, "tokens");
            e.tokens = held[i].tokens.data();
            e.n = held[i].tokens.shape(0);
            require(e.n > 0, "tokens is empty");
            if (!t[2].is_none()) {
                held[i].mask = squeeze_batch(int32_checked(t[2].cast<py::array>(), "cross_attention_mask", 0, 1), 3,
                                             "cross_attention_mask");
                const I32& m = *held[i].mask;
                int n_img = 0, n_tiles = 0;
                {
                    std::lock_guard<std::mutex> lock(mu_);
                    const auto& imgs = model_->seq_images(e.slot);
                    n_img = int(imgs.size());
                    n_tiles = imgs.empty() ? 0 : imgs.front()->n_tiles;
                }
                if (n_img > 0) {
                    require(m.shape(0) == e.n && m.shape(1) == n_img && m.shape(2) == n_tiles,
                            "cross_attention_mask must be [n_tokens, n_images, max_tiles] = [" + std::to_string(e.n) +
                                ", " + std::to_string(n_img) + ", " + std::to_string(n_tiles) + "]");
                    e.mask = m.data();
                } else {
                    require(m.shape(0) == e.n, "cross_attention_mask must have one row per token");
                }
            }
            e.logits = int_in_range(t[3], "logits (0 none, 1 last row, 2 every row)", 0, 2);
            if (e.logits == 2) held[i].logits = py::array_t<float>({e.n, V});
            else if (e.logits == 1) held[i].logits = py::array_t<float>({V});
            if (e.logits) e.logits_out = held[i].logits.cast<py::array_t<float>>().mutable_data();
            if (!t[4].is_none()) {
                e.sample = true;
                e.params = sample_params_from(t[4].cast<py::tuple>());
                e.id_out = &held[i].id;
            }
            e.decode = e.n == 1;
            if (t.size() == 6) {
                require(py::isinstance<py::bool_>(t[5]), "decode must be True or False");
                e.decode = t[5].cast<bool>();
            }
        }
        {
            py::gil_scoped_release nogil;
            std::lock_guard<std::mutex> lock(mu_);
            model_->step(es);
        }
        py::list out;
        for (size_t i = 0; i < es.size(); i++)
            out.append(py::make_tuple(held[i].logits ? held[i].logits : py::object(py::none()), held[i].id));
        return out;
    }

    // Any thread, no lock: the running step stops between two layers (StepAborted).
    void abort() { model_->request_abort(); }
    void clear_abort() { model_->clear_abort(); }

    int64_t n_ctx() const { return model_->n_ctx(); }
    int n_seq() const { return model_->n_seq(); }
    size_t kv_bytes_per_seq() const { return model_->kv_bytes_per_seq(); }
    // Cross-attention K/V bytes of one image (max_tiles tiles), for the memory budget.
    size_t image_bytes() const {
        if (!vhp_) return 0;
        const int64_t grid = vhp_->image_size / vhp_->patch_size;
        return model_->cross_bytes(int64_t(vhp_->max_num_tiles) * (grid * grid + 1));
    }
    bool vision_loaded() const { return model_->has_vision(); }
    std::string device() const { return model_->backend().name(); }

private:
    py::object tensors_;  // keeps the mapped arrays alive as long as the model
    py::dict vision_tensors_;
    std::optional<VisionHParams> vhp_;
    std::unique_ptr<MllamaModel> model_;
    std::mutex mu_;  // one call at a time: the GIL is released while computing
};

bool PyImageJob::step() {
    require(bool(job), "this image job is finished");
    py::gil_scoped_release nogil;
    std::lock_guard<std::mutex> lock(model->mutex());
    return job->step();
}

PyImage PyImageJob::result() {
    require(job && job->finished(), "the image is not encoded yet (call step() until it returns False)");
    PyImage im;
    im.img = job->result();
    im.owner = owner;
    return im;
}

}  // namespace

void register_model(py::module_& m) {
    py::register_exception<StepAborted>(m, "StepAborted", PyExc_RuntimeError);
    py::class_<PyImage>(m, "ImageKV",
                        "Cross-attention K/V of one encoded image (shared by the sequences that show it).")
        .def_property_readonly("n_tiles", [](const PyImage& p) { return p.img->n_tiles; })
        .def_property_readonly("n_patches", [](const PyImage& p) { return p.img->n_patches; })
        .def_property_readonly("nbytes", [](const PyImage& p) { return p.img->kv.bytes; });
    py::class_<PySnapshot>(m, "SeqSnapshot", "A saved sequence slot state (MllamaModel.seq_snapshot).")
        .def_property_readonly("nbytes", [](const PySnapshot& p) { return MllamaModel::snapshot_bytes(*p.snap); });
    py::class_<PyImageJob>(m, "ImageJob", "An image being encoded: step() runs one unit (a vision layer).")
        .def("step", &PyImageJob::step, "Run the next unit; False when the image is done.")
        .def_property_readonly("done", [](const PyImageJob& j) { return j.job ? j.job->done_steps() : 0; })
        .def_property_readonly("total", [](const PyImageJob& j) { return j.job ? j.job->total_steps() : 0; })
        .def_property_readonly("finished", [](const PyImageJob& j) { return j.job && j.job->finished(); })
        .def("result", &PyImageJob::result);
    py::class_<PyMllamaModel>(m, "MllamaModel",
                              "The compiled mllama model. Built by mllama_q.Model from a GGUF file:\n"
                              "MllamaModel(tensors, text_hparams, vision_hparams, device, n_ctx, kv_type, n_seq)\n"
                              "  tensors: {name: (array, ggml_type, shape)} (mapped GGUF data, not copied)\n"
                              "  n_seq: sequence slots, each with an n_ctx-token KV cache")
        .def(py::init<py::dict, py::dict, std::optional<py::dict>, const std::string&, int64_t, const std::string&,
                      int>(),
             py::arg("tensors"), py::arg("text_hparams"), py::arg("vision_hparams") = py::none(),
             py::arg("device") = "cpu", py::arg("n_ctx") = 4096, py::arg("kv_type") = "f16", py::arg("n_seq") = 1)
        .def(
            "begin_image",
            [](py::object self, py::array px, int ar_id, py::array ar_mask) {
                return self.cast<PyMllamaModel&>().begin_image(self, px, ar_id, ar_mask);
            },
            py::arg("pixel_values"), py::arg("aspect_ratio_id"), py::arg("aspect_ratio_mask"),
            "Start encoding one image: pixel_values f32 [max_tiles, C, H, W], its aspect-ratio id, "
            "aspect_ratio_mask [max_tiles]. Returns an ImageJob.")
        .def(
            "image_from_states",
            [](py::object self, py::array states) {
                return self.cast<PyMllamaModel&>().image_from_states(self, states);
            },
            py::arg("states"), "Cross-attention K/V from ready projector outputs f32 [n_tiles, n_patches, hidden].")
        .def("seq_len", &PyMllamaModel::seq_len, py::arg("slot"))
        .def("seq_truncate", &PyMllamaModel::seq_truncate, py::arg("slot"), py::arg("n"))
        .def("seq_set_images", &PyMllamaModel::seq_set_images, py::arg("slot"), py::arg("images"))
        .def("seq_n_images", &PyMllamaModel::seq_n_images, py::arg("slot"))
        .def(
            "seq_snapshot",
            [](py::object self, int slot, int64_t first) {
                return self.cast<PyMllamaModel&>().seq_snapshot(self, slot, first);
            },
            py::arg("slot"), py::arg("first"),
            "Save the slot's state from token `first` on (cache rows, images, length) for seq_restore.")
        .def("seq_restore", &PyMllamaModel::seq_restore, py::arg("slot"), py::arg("snapshot"))
        .def("step", &PyMllamaModel::step, py::arg("entries"),
             "One forward pass over every entry (slot, tokens, mask, logits, sample); see bind_model.cpp.")
        .def("abort", &PyMllamaModel::abort, "Stop the running step between two layers (any thread).")
        .def("clear_abort", &PyMllamaModel::clear_abort)
        .def_property_readonly("n_ctx", &PyMllamaModel::n_ctx)
        .def_property_readonly("n_seq", &PyMllamaModel::n_seq)
        .def_property_readonly("kv_bytes_per_seq", &PyMllamaModel::kv_bytes_per_seq)
        .def_property_readonly("image_bytes", &PyMllamaModel::image_bytes)
        .def_property_readonly("has_vision", &PyMllamaModel::has_vision, "vision_hparams were given")
        .def_property_readonly("vision_loaded", &PyMllamaModel::vision_loaded,
                               "the vision weights were uploaded and the encoder built (first image)")
        .def("load_vision", &PyMllamaModel::load_vision, "Upload the vision weights and build the encoder now.")
        .def_property_readonly("device", &PyMllamaModel::device);
}

}  // namespace mq::bind
