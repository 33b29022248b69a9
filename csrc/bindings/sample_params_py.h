// Sampling parameters from Python: (temperature, top_k, top_p, min_p,
// repetition_penalty, u), the order every binding takes them in.
#pragma once
#include <pybind11/pybind11.h>

#include "backend/backend.h"
#include "bindings/array_check.h"

namespace mq::bind {

inline Backend::SampleParams sample_params_from(const pybind11::tuple& p) {
    require(p.size() == 6, "sampling parameters are (temperature, top_k, top_p, min_p, repetition_penalty, u)");
    Backend::SampleParams s;
    s.temperature = p[0].cast<float>();
    s.top_k = p[1].cast<int32_t>();
    s.top_p = p[2].cast<float>();
    s.min_p = p[3].cast<float>();
    s.repetition_penalty = p[4].cast<float>();
    s.u = p[5].cast<double>();
    return s;
}

}  // namespace mq::bind
