#include "common/formats.h"

#include "common/checked.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace mq {

// One TypeInfo per line of MQ_ALL_TYPES, in its order (so kTypes[type_index(t)] is t's).
static constexpr TypeInfo kTypes[] = {
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

// Every ggml type id (formats.h TypeLayout): ggml/src/ggml.c type_traits, the same numbers as
// gguf-py's constants.GGML_QUANT_SIZES (gguf-py 0.17, which adds nvfp4 and q1_0).
static constexpr TypeLayout kLayouts[] = {
    {0, "f32", 1, 4},         {1, "f16", 1, 2},         {2, "q4_0", 32, 18},      {3, "q4_1", 32, 20},
    {6, "q5_0", 32, 22},      {7, "q5_1", 32, 24},      {8, "q8_0", 32, 34},      {9, "q8_1", 32, 40},
    {10, "q2_k", 256, 84},    {11, "q3_k", 256, 110},   {12, "q4_k", 256, 144},   {13, "q5_k", 256, 176},
    {14, "q6_k", 256, 210},   {15, "q8_k", 256, 292},   {16, "iq2_xxs", 256, 66}, {17, "iq2_xs", 256, 74},
    {18, "iq3_xxs", 256, 98}, {19, "iq1_s", 256, 50},   {20, "iq4_nl", 32, 18},   {21, "iq3_s", 256, 110},
    {22, "iq2_s", 256, 82},   {23, "iq4_xs", 256, 136}, {24, "i8", 1, 1},         {25, "i16", 1, 2},
    {26, "i32", 1, 4},        {27, "i64", 1, 8},        {28, "f64", 1, 8},        {29, "iq1_m", 256, 56},
    {30, "bf16", 1, 2},       {34, "tq1_0", 256, 54},   {35, "tq2_0", 256, 66},   {39, "mxfp4", 32, 17},
    {40, "nvfp4", 64, 36},    {41, "q1_0", 128, 18},
};

// The supported types' block/type sizes (from the block structs) equal ggml's.
static constexpr bool layouts_agree() {
    for (const TypeInfo& t : kTypes) {
        bool found = false;
        for (const TypeLayout& l : kLayouts)
            if (l.id == static_cast<int32_t>(t.type))
                found = l.block_size == t.block_size && l.type_size == t.type_size;
        if (!found) return false;
    }
    return true;
}
static_assert(layouts_agree(), "a supported type's block layout differs from ggml's (kLayouts)");

const TypeLayout* type_layout(int32_t id) {
    for (const TypeLayout& l : kLayouts)
        if (l.id == id) return &l;
    return nullptr;
}

const TypeLayout* all_type_layouts(size_t* count) {
    *count = sizeof(kLayouts) / sizeof(kLayouts[0]);
    return kLayouts;
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
    return checked_bytes(n / ti.block_size, size_t(ti.type_size), "row size");
}

}  // namespace mq
