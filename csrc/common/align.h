// 64-byte (cache line) alignment of a pointer inside an over-allocated buffer (new[] and
// std::vector give 16 bytes): the panel / activation buffers of the CPU matmul and the AMX
// tiles' buffers, whose rows must be whole cache lines. Allocate 64 bytes more than needed.
#pragma once
#include <cstdint>

namespace mq {

template <class T>
T* align64(T* p) {
    return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

}  // namespace mq
