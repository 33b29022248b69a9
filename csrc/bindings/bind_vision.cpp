// Test binding of the vision tower: `_core.VisionEncoder(tensors, hparams, device="cpu")`.
//   tensors: {gguf_name: (array, ggml_type, shape)} as for tensor_map_from_py
//   hparams: dict with the VisionHParams field names (intermediate_at_layer_input optional)
//   .encode(pixel_values [n_img, T, C, H, W] f32, aspect_ratio_ids [n_img] int,
//           aspect_ratio_mask [n_img, T] int) -> float32 [n_img, T, num_patches, out_dim]
// Leading batch axes are flattened as HF does (B * num_concurrent_media), so
// HF's [B, n, T, C, H, W] / [B, n] / [B, n, T] arrays are accepted too.
// The encoder keeps the tensors dict (and so the memory-mapped arrays) alive.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>

#include "backend/backend.h"
#include "bindings/array_check.h"
#include "bindings/bindings.h"
#include "bindings/hparams_py.h"
#include "bindings/tensor_map_py.h"
#include "common/threadpool.h"
#include "model/vision.h"

namespace py = pybind11;

namespace mq::bind {
namespace {

class PyVisionEncoder {
public:
    PyVisionEncoder(py::dict tensors, py::dict hparams, const std::string& device, int device_id) : tensors_(tensors) {
        if (device == "cpu") be_ = make_cpu_backend(ThreadPool::global());
        else if (device == "cuda") be_ = make_cuda_backend(device_id);
        else throw std::invalid_argument("unknown device '" + device + "' (expected 'cpu' or 'cuda')");
        tm_ = tensor_map_from_py(tensors, *be_);
        enc_ = std::make_unique<VisionEncoder>(*be_, tm_, vision_hparams_from(hparams));
    }
    ~PyVisionEncoder() {
        enc_.reset();  // frees its backend buffers before the backend goes
    }

    int64_t num_patches() const { return enc_->num_patches(); }

    py::array_t<float> encode(py::array pixel_values, py::array aspect_ratio_ids, py::array aspect_ratio_mask) {
        const VisionHParams& hp = enc_->hparams();
        require_dtype<float>(pixel_values, "pixel_values", "float32");
        require_c_contiguous(pixel_values, "pixel_values");
        const int nd = int(pixel_values.ndim());
        require(nd >= 5, "pixel_values must be [n_img, max_tiles, C, H, W]");
        const py::ssize_t* s = pixel_values.shape();
        require(s[nd - 4] == hp.max_num_tiles && s[nd - 3] == hp.num_channels && s[nd - 2] == hp.image_size &&
                    s[nd - 1] == hp.image_size,
                "pixel_values must be [n_img, " + std::to_string(hp.max_num_tiles) + ", " +
                    std::to_string(hp.num_channels) + ", " + std::to_string(hp.image_size) + ", " +
                    std::to_string(hp.image_size) + "]");
        int64_t n_img = 1;
        for (int i = 0; i < nd - 4; i++) n_img = checked_mul(n_img, s[i], "pixel_values images");
        checked_int(n_img, "pixel_values images");
        require_finite(static_cast<const float*>(pixel_values.data()), pixel_values.size(), "pixel_values");
        auto ar_ids = int32_checked(aspect_ratio_ids, "aspect_ratio_ids", 0, hp.max_aspect_ratio_id);
        auto ar_mask = int32_checked(aspect_ratio_mask, "aspect_ratio_mask", 0, 1);
        require(ar_ids.size() == n_img, "aspect_ratio_ids must have one entry per image");
        require(ar_mask.size() == checked_mul(n_img, hp.max_num_tiles, "aspect_ratio_mask size"),
                "aspect_ratio_mask must be [n_img, max_tiles]");
        const int64_t P = enc_->num_patches(), O = enc_->out_dim();
        const int64_t n_out = checked_product({n_img, hp.max_num_tiles, P, O}, "vision output size");
        py::array_t<float> out({py::ssize_t(n_img), py::ssize_t(hp.max_num_tiles), py::ssize_t(P), py::ssize_t(O)});
        float* dout = static_cast<float*>(
            be_->alloc(checked_bytes(std::max<int64_t>(n_out, 1), sizeof(float), "vision output bytes")));
        try {
            py::gil_scoped_release nogil;
            enc_->encode(static_cast<const float*>(pixel_values.data()), ar_ids.data(), ar_mask.data(), int(n_img),
                         dout);
            be_->synchronize();
            if (n_out) be_->to_host(out.mutable_data(), dout, size_t(n_out) * sizeof(float));
        } catch (...) {
            be_->free(dout);
            throw;
        }
        be_->free(dout);
        return out;
    }

private:
    py::dict tensors_;  // keeps the arrays the TensorMap points into alive
    std::unique_ptr<Backend> be_;
    TensorMap tm_;
    std::unique_ptr<VisionEncoder> enc_;
};

}  // namespace

void register_vision(py::module_& m) {
    py::class_<PyVisionEncoder>(m, "VisionEncoder", "Mllama vision tower + projector (test binding over one backend).")
        .def(py::init<py::dict, py::dict, const std::string&, int>(), py::arg("tensors"), py::arg("hparams"),
             py::arg("device") = "cpu", py::arg("device_id") = 0)
        .def_property_readonly("num_patches", &PyVisionEncoder::num_patches)
        .def("encode", &PyVisionEncoder::encode, py::arg("pixel_values"), py::arg("aspect_ratio_ids"),
             py::arg("aspect_ratio_mask"));
}

}  // namespace mq::bind
