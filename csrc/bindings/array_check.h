// Argument checks shared by the bindings: every failure is a ValueError with
// a message naming the argument, never a crash.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

namespace mq::bind {

// pybind11 turns std::invalid_argument into ValueError.
inline void require(bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument(msg);
}

inline void require_c_contiguous(const pybind11::array& a, const char* what) {
    require((a.flags() & pybind11::array::c_style) != 0,
            std::string(what) + " must be C-contiguous (use numpy.ascontiguousarray)");
}

template <typename T>
inline void require_dtype(const pybind11::array& a, const char* what, const char* dtype_name) {
    require(pybind11::dtype::of<T>().is(a.dtype()) || a.dtype().equal(pybind11::dtype::of<T>()),
            std::string(what) + " must have dtype " + dtype_name + ", got " +
                std::string(pybind11::str(a.dtype())));
}

}  // namespace mq::bind
