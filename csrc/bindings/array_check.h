// Argument checks shared by the bindings: every failure is a ValueError with
// a message naming the argument, never a crash. Sizes computed from caller
// values go through common/checked.h.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/checked.h"

namespace mq::bind {

// pybind11 turns std::invalid_argument into ValueError.
inline void require(bool ok, const std::string& msg) {
    if (!ok) throw std::invalid_argument(msg);
}

// A Python int as an int in [lo, hi]: a clear ValueError for a huge or negative value, where
// a plain cast<int> fails with pybind11's "Unable to cast" RuntimeError.
inline int int_in_range(const pybind11::handle& v, const char* what, int64_t lo, int64_t hi) {
    // __index__: Python and numpy integers (not floats, not strings)
    auto i = pybind11::reinterpret_steal<pybind11::object>(PyNumber_Index(v.ptr()));
    if (!i) PyErr_Clear();
    require(bool(i), std::string(what) + " must be an integer");
    int overflow = 0;
    const long long x = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
    require(overflow == 0 && x >= lo && x <= hi,
            std::string(what) + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
    return static_cast<int>(x);
}

inline void require_c_contiguous(const pybind11::array& a, const char* what) {
    require((a.flags() & pybind11::array::c_style) != 0,
            std::string(what) + " must be C-contiguous (use numpy.ascontiguousarray)");
}

template <typename T>
inline void require_dtype(const pybind11::array& a, const char* what, const char* dtype_name) {
    require(pybind11::dtype::of<T>().is(a.dtype()) || a.dtype().equal(pybind11::dtype::of<T>()),
            std::string(what) + " must have dtype " + dtype_name + ", got " + std::string(pybind11::str(a.dtype())));
}

// An integer (or bool) array of ids / flags -> a C-contiguous int32 array,
// every value checked to lie in [lo, hi] BEFORE narrowing. numpy's forcecast
// alone would read an int64 2**32 + 5 as 5 and a float 1.7 as 1; here both are
// ValueErrors. Shape is kept. (lo >= 0 in every use, so a uint64 >= 2**63,
// which reads as negative int64, is rejected too.)
inline pybind11::array_t<int32_t> int32_checked(const pybind11::array& a, const char* what, int64_t lo, int64_t hi) {
    const char kind = a.dtype().kind();
    require(kind == 'i' || kind == 'u' || kind == 'b',
            std::string(what) + " must be an integer array, got dtype " + std::string(pybind11::str(a.dtype())));
    using I64 = pybind11::array_t<int64_t, pybind11::array::c_style | pybind11::array::forcecast>;
    I64 wide(a);  // lossless for every integer dtype but uint64 >= 2**63 (see above)
    const int64_t* v = wide.data();
    const int64_t n = wide.size();
    for (int64_t i = 0; i < n; i++)
        if (v[i] < lo || v[i] > hi)
            throw std::invalid_argument(std::string(what) + " values must lie in [" + std::to_string(lo) + ", " +
                                        std::to_string(hi) + "]: " + std::to_string(v[i]) + " at flat index " +
                                        std::to_string(i) + " is out of range");
    return pybind11::array_t<int32_t, pybind11::array::c_style | pybind11::array::forcecast>(wide);
}

// Every value finite (NaN / inf pixels would turn every logit into NaN).
inline void require_finite(const float* p, int64_t n, const char* what) {
    for (int64_t i = 0; i < n; i++)
        if (!std::isfinite(p[i]))
            throw std::invalid_argument(std::string(what) + ": non-finite value " + std::to_string(p[i]) +
                                        " at flat index " + std::to_string(i));
}

// Extent `i` of an array as an int kernel argument (a zero-size array may
// carry a huge extent; never narrow it silently).
inline int dim_int(const pybind11::array& a, int i, const char* what) {
    return checked_int(static_cast<int64_t>(a.shape(i)), what);
}

}  // namespace mq::bind
