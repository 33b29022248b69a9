// Block formats of the GGUF tensor types mllama-q reads and writes.
//
// Every layout here is byte-identical to ggml's (ggml/src/ggml-common.h):
// same field order, same sizes, little-endian, fp16 scales stored as raw
// IEEE half bits. This is the ONE place these layouts are declared; Python
// asks the extension for block and type sizes (mllama_q.quants.type_info()).
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace mq {

constexpr int QK8_0 = 32;         // values per Q8_0 block
constexpr int QK_K = 256;         // values per K-quant super-block
constexpr int K_SCALE_SIZE = 12;  // packed 6-bit scales+mins of Q4_K

using half_bits = uint16_t;  // IEEE-754 binary16, raw bits

// Q8_0: 32 values = d * qs[i].  34 bytes (8.5 bits/weight).
struct block_q8_0 {
    half_bits d;       // scale
    int8_t qs[QK8_0];  // quants
};
static_assert(sizeof(block_q8_0) == sizeof(half_bits) + QK8_0, "wrong q8_0 block size/padding");

// Q4_K: 256 values in 8 sub-blocks of 32. value = d*sc[j]*q - dmin*m[j],
// q in [0,15], sc/m 6-bit, packed into `scales` (see get_scale_min_k4).
// qs holds 4-bit quants: byte l of 32-byte group g has value l of sub-block
// 2g in its low nibble and value l of sub-block 2g+1 in its high nibble.
// 144 bytes (4.5 bits/weight).
struct block_q4_K {
    half_bits d;                   // super-block scale for the quantized scales
    half_bits dmin;                // super-block scale for the quantized mins
    uint8_t scales[K_SCALE_SIZE];  // 8 scales + 8 mins, 6 bits each
    uint8_t qs[QK_K / 2];          // 4-bit quants
};
static_assert(sizeof(block_q4_K) == 2 * sizeof(half_bits) + K_SCALE_SIZE + QK_K / 2, "wrong q4_K block size/padding");

// Q6_K: 256 values in 16 sub-blocks of 16. value = d*scales[j]*(q-32),
// q 6-bit: low 4 bits in ql, high 2 bits in qh. 210 bytes (6.5625 bits/weight).
struct block_q6_K {
    uint8_t ql[QK_K / 2];      // lower 4 bits of the quants
    uint8_t qh[QK_K / 4];      // upper 2 bits of the quants
    int8_t scales[QK_K / 16];  // 8-bit sub-block scales
    half_bits d;               // super-block scale
};
static_assert(sizeof(block_q6_K) == sizeof(half_bits) + QK_K / 16 + 3 * QK_K / 4, "wrong q6_K block size/padding");

// Q8_K: activations quantized for the K-quant dot products.
// value = d * qs[i]; bsums[j] = sum of qs[16j .. 16j+15] (lets the Q4_K dot
// product apply the per-sub-block mins without touching qs again). 292 bytes.
struct block_q8_K {
    float d;                   // scale (float, not half)
    int8_t qs[QK_K];           // quants
    int16_t bsums[QK_K / 16];  // sums of quants in groups of 16
};
static_assert(sizeof(block_q8_K) == sizeof(float) + QK_K + QK_K / 16 * sizeof(int16_t),
              "wrong q8_K block size/padding");

// ---------------------------------------------------------------- the type table
// Every tensor type mllama-q knows, one line each. This is THE list: the DType
// enum, TypeInfo (type_info(), Python's mllama_q.quants.type_info()), the
// compile-time TypeTraits<T> and every per-type kernel table (TypeTable below)
// are generated from or indexed by it.
//   X(Enum, name, ggml id, values per block, bytes per block)
// Weight types: what GGUF tensors and the matmul kernels' W may be.
#define MQ_WEIGHT_TYPES(X)                        \
    X(F32, "f32", 0, 1, 4)                        \
    X(F16, "f16", 1, 1, 2)                        \
    X(BF16, "bf16", 30, 1, 2)                     \
    X(Q8_0, "q8_0", 8, QK8_0, sizeof(block_q8_0)) \
    X(Q4_K, "q4_k", 12, QK_K, sizeof(block_q4_K)) \
    X(Q6_K, "q6_k", 14, QK_K, sizeof(block_q6_K))
// Activation formats: X rows quantized inside a matmul, never a weight.
#define MQ_ACTIVATION_TYPES(X) X(Q8_K, "q8_k", 15, QK_K, sizeof(block_q8_K))
#define MQ_ALL_TYPES(X) MQ_WEIGHT_TYPES(X) MQ_ACTIVATION_TYPES(X)

// Type ids are ggml's `enum ggml_type` values, which GGUF stores on disk.
enum class DType : int32_t {
#define MQ_X_ENUM(E, NAME, ID, BS, TS) E = ID,
    MQ_ALL_TYPES(MQ_X_ENUM)
#undef MQ_X_ENUM
};

// Dense index 0 .. kNumTypes-1 of a type in the table order above (-1: unknown id).
// Per-type tables are arrays indexed by it.
#define MQ_X_ONE(E, NAME, ID, BS, TS) +1
constexpr int kNumTypes = 0 MQ_ALL_TYPES(MQ_X_ONE);
#undef MQ_X_ONE
constexpr int type_index(DType t) {
    int i = 0;
#define MQ_X_INDEX(E, NAME, ID, BS, TS) \
    if (t == DType::E) return i;        \
    i++;
    MQ_ALL_TYPES(MQ_X_INDEX)
#undef MQ_X_INDEX
    return -1;
}

// Static description of one type (run time).
struct TypeInfo {
    DType type;
    const char* name;  // lower-case, as used by gguf-py / our Python API ("q4_k")
    int block_size;    // values per block (1 for float types)
    int type_size;     // bytes per block
    bool weight;       // a weight type (false: an activation format)
};

// The same at compile time (usable in CUDA device code): TypeTraits<DType::Q4_K>::block_size.
template <DType T>
struct TypeTraits;
#define MQ_X_TRAITS(E, NAME, ID, BS, TS, W)                                     \
    template <>                                                                 \
    struct TypeTraits<DType::E> {                                               \
        static constexpr int block_size = BS;                                   \
        static constexpr int type_size = static_cast<int>(TS);                  \
        static constexpr bool weight = W;                                       \
        static constexpr bool quantized = BS > 1; /* integer quants + scales */ \
    };
#define MQ_X_TRAITS_W(E, NAME, ID, BS, TS) MQ_X_TRAITS(E, NAME, ID, BS, TS, true)
#define MQ_X_TRAITS_A(E, NAME, ID, BS, TS) MQ_X_TRAITS(E, NAME, ID, BS, TS, false)
MQ_WEIGHT_TYPES(MQ_X_TRAITS_W)
MQ_ACTIVATION_TYPES(MQ_X_TRAITS_A)
#undef MQ_X_TRAITS_A
#undef MQ_X_TRAITS_W
#undef MQ_X_TRAITS

// Table lookup; throws std::invalid_argument for an unknown/unsupported type id.
const TypeInfo& type_info(DType t);
const TypeInfo& type_info_by_name(const char* name);  // throws for unknown names
bool is_supported_type(int32_t ggml_type_id);
// Bytes of one row of `n` values; throws if n is not a multiple of the block size.
size_t row_size(DType t, int64_t n);
// All supported types, for iteration (bindings, tests).
const TypeInfo* all_types(size_t* count);

// ---------------------------------------------------------------- per-type tables
// A table of Entry (the kernels or quantizers of one backend/path) indexed by
// type_index(), filled from {type, entry} items in any order, one item per type
// the backend supports; find() gives nullptr for the others. The C++ form of
// ggml's `type_traits_cpu[GGML_TYPE_COUNT] = { [GGML_TYPE_Q4_K] = {...}, ... }`
// (ggml/src/ggml-cpu/ggml-cpu.c). Built once (function-local statics); a
// duplicate or unknown type in the items is a programming error (std::logic_error).
template <class Entry>
class TypeTable {
public:
    struct Item {
        DType type;
        Entry entry;
    };
    TypeTable(std::initializer_list<Item> items) {
        for (const Item& it : items) {
            const int i = type_index(it.type);
            if (i < 0 || has_[i]) throw std::logic_error("TypeTable: unknown or repeated type");
            entries_[i] = it.entry;
            has_[i] = true;
        }
    }
    const Entry* find(DType t) const {
        const int i = type_index(t);
        return i >= 0 && has_[i] ? &entries_[i] : nullptr;
    }
    // A copy with type t's entry set to e (a path that differs from another in one entry).
    TypeTable with(DType t, const Entry& e) const {
        TypeTable c = *this;
        const int i = type_index(t);
        if (i < 0) throw std::logic_error("TypeTable: unknown type");
        c.entries_[i] = e;
        c.has_[i] = true;
        return c;
    }

private:
    Entry entries_[kNumTypes] = {};
    bool has_[kNumTypes] = {};
};

// For code that instantiates a template per weight type (the CUDA kernels):
// calls f(std::integral_constant<DType, T>{}) for the weight type T == t and
// returns its result; any other type throws std::invalid_argument(what + name).
template <class F>
decltype(auto) dispatch_weight_type(DType t, const char* what, F&& f) {
    switch (t) {
#define MQ_X_CASE(E, NAME, ID, BS, TS) \
    case DType::E: return f(std::integral_constant<DType, DType::E>{});
        MQ_WEIGHT_TYPES(MQ_X_CASE)
#undef MQ_X_CASE
        default: break;
    }
    throw std::invalid_argument(std::string(what) + type_info(t).name);
}

// Block layout of EVERY tensor type id a GGUF file may carry, supported or not: the file
// reader (csrc/gguf) needs it to locate any tensor's bytes, as gguf-py and ggml do. Values
// are ggml's type_traits (ggml/src/ggml.c) = gguf-py's GGML_QUANT_SIZES; ids ggml removed
// (4, 5, 31-33, 36-38) are absent. The supported types above are checked against this
// table at compile time (formats.cpp), so their sizes are declared once.
struct TypeLayout {
    int32_t id;        // ggml_type
    const char* name;  // lower-case ggml name ("q4_k", "iq2_xxs")
    int block_size;    // values per block
    int type_size;     // bytes per block
};
// nullptr for an id no ggml version defines.
const TypeLayout* type_layout(int32_t ggml_type_id);
const TypeLayout* all_type_layouts(size_t* count);

}  // namespace mq
