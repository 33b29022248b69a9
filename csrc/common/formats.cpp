#include "common/formats.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace mq {

// One TypeInfo per line of MQ_ALL_TYPES, in its order (so kTypes[type_index(t)] is t's).
static const TypeInfo kTypes[] = {
#define MQ_X_INFO_W(E, NAME, ID, BS, TS) {DType::E, NAME, BS, static_cast<int>(TS), true},
#define MQ_X_INFO_A(E, NAME, ID, BS, TS) {DType::E, NAME, BS, static_cast<int>(TS), false},
    MQ_WEIGHT_TYPES(MQ_X_INFO_W) MQ_ACTIVATION_TYPES(MQ_X_INFO_A)
#undef MQ_X_INFO_A
#undef MQ_X_INFO_W
};
static_assert(sizeof(kTypes) / sizeof(kTypes[0]) == kNumTypes, "one TypeInfo per type");

// "f32, f16, ..." for error messages.
static std::string type_names() {
    std::string s;
    for (const auto& t : kTypes) s += (s.empty() ? "" : ", ") + std::string(t.name);
    return s;
}

const TypeInfo* all_types(size_t* count) {
    *count = sizeof(kTypes) / sizeof(kTypes[0]);
    return kTypes;
}

bool is_supported_type(int32_t id) { return type_index(static_cast<DType>(id)) >= 0; }

const TypeInfo& type_info(DType t) {
    const int i = type_index(t);
    if (i < 0) throw std::invalid_argument("unsupported tensor type id " + std::to_string(static_cast<int>(t)));
    return kTypes[i];
}

const TypeInfo& type_info_by_name(const char* name) {
    for (const auto& ti : kTypes)
        if (std::strcmp(ti.name, name) == 0) return ti;
    throw std::invalid_argument(std::string("unknown tensor type '") + name + "' (expected one of " + type_names() +
                                ")");
}

size_t row_size(DType t, int64_t n) {
    const TypeInfo& ti = type_info(t);
    if (n < 0 || n % ti.block_size != 0)
        throw std::invalid_argument(std::string("row length ") + std::to_string(n) + " is not a multiple of the " +
                                    ti.name + " block size " + std::to_string(ti.block_size));
    return static_cast<size_t>(n / ti.block_size) * ti.type_size;
}

}  // namespace mq
