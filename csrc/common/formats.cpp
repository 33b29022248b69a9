#include "common/formats.h"

#include "common/checked.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace mq {

static const TypeInfo kTypes[] = {
    {DType::F32, "f32", 1, 4},
    {DType::F16, "f16", 1, 2},
    {DType::BF16, "bf16", 1, 2},
    {DType::Q8_0, "q8_0", QK8_0, sizeof(block_q8_0)},
    {DType::Q4_K, "q4_k", QK_K, sizeof(block_q4_K)},
    {DType::Q6_K, "q6_k", QK_K, sizeof(block_q6_K)},
    {DType::Q8_K, "q8_k", QK_K, sizeof(block_q8_K)},
};

const TypeInfo* all_types(size_t* count) {
    *count = sizeof(kTypes) / sizeof(kTypes[0]);
    return kTypes;
}

bool is_supported_type(int32_t id) {
    for (const auto& t : kTypes)
        if (static_cast<int32_t>(t.type) == id) return true;
    return false;
}

const TypeInfo& type_info(DType t) {
    for (const auto& ti : kTypes)
        if (ti.type == t) return ti;
    throw std::invalid_argument("unsupported tensor type id " + std::to_string(static_cast<int>(t)));
}

const TypeInfo& type_info_by_name(const char* name) {
    for (const auto& ti : kTypes)
        if (std::strcmp(ti.name, name) == 0) return ti;
    throw std::invalid_argument(std::string("unknown tensor type '") + name +
                                "' (expected one of f32, f16, bf16, q8_0, q4_k, q6_k, q8_k)");
}

size_t row_size(DType t, int64_t n) {
    const TypeInfo& ti = type_info(t);
    if (n < 0 || n % ti.block_size != 0)
        throw std::invalid_argument(std::string("row length ") + std::to_string(n) + " is not a multiple of the " +
                                    ti.name + " block size " + std::to_string(ti.block_size));
    return checked_bytes(n / ti.block_size, size_t(ti.type_size), "row size");
}

}  // namespace mq
