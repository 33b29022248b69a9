// Checked size arithmetic for every size computed from caller values.
//
// Element counts and byte counts that come from a caller (a Python argument,
// an array shape, a hyper-parameter) are multiplied and added ONLY through
// these helpers: on overflow of int64 (or a negative count) they throw
// std::invalid_argument naming `what` (pybind11 turns it into ValueError),
// instead of wrapping to a small number that then under-allocates a buffer.
// A zero-size dimension next to a huge one is legal here (the product is 0);
// callers that loop over one factor must skip the work when the product is 0.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>

namespace mq {

[[noreturn]] inline void size_error(const char* what, const std::string& detail) {
    throw std::invalid_argument(std::string(what) + ": " + detail);
}

// a * b for non-negative counts; throws on a negative factor or int64 overflow.
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
    if (a < 0 || b < 0) size_error(what, "negative size " + std::to_string(a < 0 ? a : b));
    int64_t r;
    if (__builtin_mul_overflow(a, b, &r))
        size_error(what, std::to_string(a) + " x " + std::to_string(b) + " overflows a 64-bit size");
    return r;
}

// Product of all factors (1 for none), checked.
inline int64_t checked_product(std::initializer_list<int64_t> factors, const char* what) {
    int64_t r = 1;
    for (int64_t f : factors) r = checked_mul(r, f, what);
    return r;
}

// Bytes of `count` elements of `elem_bytes` each, as size_t, checked.
inline size_t checked_bytes(int64_t count, size_t elem_bytes, const char* what) {
    return static_cast<size_t>(checked_mul(count, static_cast<int64_t>(elem_bytes), what));
}

// A count that must fit an `int` (kernel arguments): throws instead of narrowing.
inline int checked_int(int64_t v, const char* what) {
    if (v < 0 || v > std::numeric_limits<int>::max())
        size_error(what,
                   std::to_string(v) + " is outside [0, " + std::to_string(std::numeric_limits<int>::max()) + "]");
    return static_cast<int>(v);
}

}  // namespace mq
