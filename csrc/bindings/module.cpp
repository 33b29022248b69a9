#include "bindings/bindings.h"

PYBIND11_MODULE(_core, m) {
    m.doc() = "mllama-q compiled core: GGUF reader and block formats, quantized kernels, model forward passes";
    mq::bind::register_formats(m);
    mq::bind::register_quants(m);
    mq::bind::register_cpu(m);
    mq::bind::register_backend(m);
    mq::bind::register_model(m);
    mq::bind::register_vision(m);
    mq::bind::register_gguf(m);
}
