// Each part of the extension registers its Python functions from its own file.
#pragma once
#include <pybind11/pybind11.h>

namespace mq::bind {
void register_formats(pybind11::module_& m);  // bind_formats.cpp: type table, backends
void register_quants(pybind11::module_& m);   // bind_quants.cpp: quantize / dequantize
void register_cpu(pybind11::module_& m);      // bind_cpu.cpp: matmul, CPU paths, threads
void register_model(pybind11::module_& m);    // bind_model.cpp: the model forward passes
void register_backend(pybind11::module_& m);  // bind_backend.cpp: Backend test binding
void register_vision(pybind11::module_& m);   // bind_vision.cpp: vision tower test binding
void register_gguf(pybind11::module_& m);     // bind_gguf.cpp: the GGUF reader
}  // namespace mq::bind
