#include <pybind11/stl.h>

#include "bindings/bindings.h"
#include "common/formats.h"
#include "cuda/cuda_api.h"

namespace py = pybind11;

namespace mq::bind {

void register_formats(py::module_& m) {
    m.def(
        "type_info",
        [] {
            py::dict out;
            size_t n = 0;
            const TypeInfo* t = all_types(&n);
            for (size_t i = 0; i < n; i++) {
                py::dict d;
                d["ggml_type"] = static_cast<int>(t[i].type);
                d["block_size"] = t[i].block_size;
                d["type_size"] = t[i].type_size;
                d["weight"] = t[i].weight;  // False: an activation format (q8_k), never a tensor type
                out[t[i].name] = d;
            }
            return out;
        },
        "Block formats compiled into the extension: {name: {ggml_type, block_size, type_size, weight}}.");

    m.def("cuda_built", &mq::cuda::built, "True when the CUDA backend was compiled in.");
    m.def("cuda_device_count", &mq::cuda::device_count, "Usable CUDA devices now (0 without a driver or GPU).");
    m.def("cuda_device_name", &mq::cuda::device_name, py::arg("device") = 0);
}

}  // namespace mq::bind
