// GGUF reader: a memory-mapped, fully bounds-checked parse of a GGUF file's header,
// metadata and tensor table. Nothing is copied: values, strings and tensor data are located
// (absolute byte offsets into the mapping) and handed out as views by the bindings.
//
// Format: ggml docs/gguf.md (github.com/ggml-org/ggml, docs/gguf.md); the checks follow
// llama.cpp's reference reader ggml/src/gguf.cpp (gguf_init_from_reader) and accept what
// gguf-py's GGUFReader accepts (gguf-py/gguf/gguf_reader.py), with the differences listed
// in gguf_reader.cpp's header comment.
//
// Hostile input: every count, length, offset and dimension is checked against the bytes
// that remain in the file and against overflow BEFORE anything is sized from it, so memory
// and time are linear in the file size (each element of any array occupies >= 1 byte of
// the file; counts are bounded by that before a vector is reserved). Every failure throws
// FormatError with a message naming the file, the key or tensor and the byte offset.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace mq::gguf {

// Malformed, truncated or unreadable file. The bindings raise it as
// mllama_q.gguf_file.ModelFileError (a ValueError).
struct FormatError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// GGUF metadata value types (docs/gguf.md gguf_metadata_value_type).
enum class ValueType : uint32_t {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    BOOL = 7,
    STRING = 8,
    ARRAY = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
};
constexpr uint32_t kValueTypeCount = 13;
const char* value_type_name(ValueType t);  // gguf-py's GGUFValueType names, lower-case ("uint32")
size_t value_type_size(ValueType t);       // bytes of one scalar; 0 for STRING and ARRAY

// A read-only mapping of a whole file; unmapped when the last reference goes.
class Mapping {
public:
    // Opens `path` (regular files only: a FIFO or device would block or never end),
    // maps it and closes the descriptor. Throws FormatError.
    static std::shared_ptr<const Mapping> open(const std::string& path);
    ~Mapping();
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;

    const uint8_t* data() const { return data_; }
    uint64_t size() const { return size_; }
    const std::string& path() const { return path_; }

private:
    Mapping() = default;
    const uint8_t* data_ = nullptr;
    uint64_t size_ = 0;
    std::string path_;
};

// One metadata value, located in the mapping.
//   scalar:          type, offset = its first byte (a string: its uint64 length field)
//   array:           is_array, type = element type, count elements, offset = first element
//                    (its 12-byte header, element type + count, just before);
//                    fixed-size elements: count * size bytes
//                    strings: first = index of element 0 in File::string_offsets (count entries)
//                    arrays (nested): nothing more is recorded at open; File::expand() re-parses
//                    one, giving a File whose `children` hold its elements (first = index of
//                    element 0, count entries) and whose string_offsets its strings
struct Value {
    ValueType type = ValueType::U8;
    bool is_array = false;
    uint64_t offset = 0;
    uint64_t count = 1;
    uint64_t first = 0;
};

struct KV {
    std::string_view key;  // into the mapping (valid UTF-8, checked)
    uint64_t offset = 0;   // of the key's length field
    Value value;
};

struct TensorInfo {
    std::string_view name;         // into the mapping (valid UTF-8, checked)
    uint64_t info_offset = 0;      // of the entry in the tensor table (its name's length field)
    uint32_t n_dims = 0;           // <= 4
    int64_t ne[4] = {1, 1, 1, 1};  // GGUF order: ne[0] is the row (fastest) axis
    int32_t type = 0;              // ggml type id (formats.h type_layout knows it)
    uint64_t offset = 0;           // ABSOLUTE byte offset of the data in the file
    uint64_t n_elements = 0;
    uint64_t nbytes = 0;
};

class File {
public:
    // Parses the mapped file; throws FormatError.
    static std::shared_ptr<const File> parse(std::shared_ptr<const Mapping> map);

    const Mapping& map() const { return *map_; }
    const std::shared_ptr<const Mapping>& map_ptr() const { return map_; }
    const std::string& path() const { return map_->path(); }

    uint32_t version = 0;
    uint64_t alignment = 32;               // general.alignment, default 32 (docs/gguf.md)
    uint64_t data_offset = 0;              // start of the tensor data section (aligned end of the tensor table)
    std::vector<KV> kvs;                   // file order
    std::vector<TensorInfo> tensors;       // file order
    std::vector<uint64_t> string_offsets;  // length field of every string of a top-level string array
    std::vector<Value> children;           // elements of nested arrays (in expand()ed Files only)

    // The nested array `nested` (a Value of this file with type ARRAY) parsed in full: the
    // returned File (sharing the mapping) holds its elements; *root is the array itself.
    std::shared_ptr<const File> expand(const Value& nested, Value* root) const;

    // The bytes of a string whose uint64 length field is at `offset` (already bounds-checked).
    std::string_view string_at(uint64_t offset) const;

private:
    std::shared_ptr<const Mapping> map_;
};

// Strict UTF-8 check (what Python's "strict" decoder accepts: no overlongs, no surrogates,
// nothing above U+10FFFF). Returns the byte index of the first bad sequence, or npos.
size_t utf8_error_at(std::string_view s);

}  // namespace mq::gguf
