// GGUF parse with every size checked before use (see gguf_reader.h).
//
// File layout (docs/gguf.md, little-endian):
//   header      "GGUF" | u32 version | u64 n_tensors | u64 n_kv                  24 bytes
//   metadata    n_kv x { string key | u32 type | value }
//                 string = u64 length | bytes;  array = u32 element type | u64 count | elements
//   tensor table n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 type | u64 offset }
//   padding     to a multiple of general.alignment (default 32)
//   tensor data each tensor at data_offset + offset (offset a multiple of the alignment)
//
// Checks and where they come from (gguf.cpp = llama.cpp ggml/src/gguf.cpp, gguf_init_from_reader;
// gguf-py = gguf-py/gguf/gguf_reader.py GGUFReader):
//   - magic, version in {2, 3}; a version whose low 16 bits are 0 is a byte-swapped
//     (big-endian) file (gguf.cpp's test): refused, because its tensor data is big-endian too
//     and the kernels read little-endian (gguf-py reads such metadata byte-swapped).
//   - n_tensors / n_kv: bounded by the bytes after the header (an entry takes >= 24 / 14
//     bytes) before anything is reserved (gguf.cpp bounds them by SIZE_MAX / sizeof only).
//   - every string length and array count against the bytes left (gguf.cpp gguf_reader::read);
//     a string array's count against 8 bytes per element, a nested array's against 12, a
//     fixed-size one's against count * element size, with no multiplication overflow.
//   - value types < 13; nested arrays (docs/gguf.md: "Arrays can be nested"; gguf-py reads
//     them, gguf.cpp refuses them) up to kMaxDepth levels, so recursion is bounded.
//   - bool bytes 0 or 1 (docs/gguf.md: "Anything else is invalid").
//   - keys non-empty (gguf.cpp) and unique (gguf.cpp, gguf-py); keys and tensor names valid
//     UTF-8 (gguf-py decodes them strictly). String VALUES are decoded when read (like
//     gguf-py's contents()), so one bad string fails only the reader of that key.
//   - general.alignment: a uint32 scalar, non-zero power of two (gguf.cpp, gguf-py).
//   - tensors: n_dims <= 4 (gguf.cpp GGML_MAX_DIMS), every ne < 2^63 and their product
//     representable (gguf.cpp), a known ggml type (gguf.cpp, gguf-py), ne[0] a multiple of
//     the block size (gguf.cpp), byte size representable (gguf.cpp), offset a multiple of the
//     alignment (docs/gguf.md), the data inside the file (gguf.cpp reads it; gguf-py's views
//     would come out short), names unique (gguf.cpp, gguf-py).
//   Not required (gguf-py reads such files): tensor data in table order without gaps
//   (gguf.cpp insists), names shorter than 64 bytes (gguf.cpp, docs), the 1 GiB caps on
//   strings and arrays of gguf.cpp (the file size bounds them here).
// Duplicates are found by sorting (n log n, no hash-collision worst case).
#include "gguf/gguf_reader.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <numeric>

#include "common/formats.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the GGUF reader assumes a little-endian host (GGUF files are little-endian)"
#endif

namespace mq::gguf {

namespace {

constexpr int kMaxDepth = 16;                        // nested array levels accepted
constexpr uint64_t kHeaderBytes = 24;                // magic, version, n_tensors, n_kv
constexpr uint64_t kMinKVBytes = 8 + 1 + 4 + 1;      // key length, >= 1 key byte, type, >= 1 value byte
constexpr uint64_t kMinTensorBytes = 8 + 4 + 4 + 8;  // name length, n_dims, type, offset
constexpr uint64_t kMinArrayBytes = 4 + 8;           // element type, count (an empty nested array)

const char* const kTypeNames[kValueTypeCount] = {"uint8", "int8",   "uint16", "int16",  "uint32", "int32",  "float32",
                                                 "bool",  "string", "array",  "uint64", "int64",  "float64"};
const size_t kTypeSizes[kValueTypeCount] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

std::string quoted(std::string_view s) {
    // Keys and names are quoted in messages; cap what a hostile 1 GB name prints.
    std::string out = "'";
    if (s.size() > 200) {
        out.append(s.substr(0, 200));
        out += "...";
    } else {
        out.append(s);
    }
    for (char& c : out)
        if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
    return out + "'";
}

class Parser {
public:
    Parser(const Mapping& m, File& f) : d_(m.data()), size_(m.size()), path_(m.path()), f_(f) {}

    void run();
    // Re-parse, recording everything, the (already validated) nested array whose header
    // (element type, count) is at `header` (File::expand).
    Value nested_at(uint64_t header) {
        pos_ = header;
        expanding_ = true;
        return value(ValueType::ARRAY, 0);
    }

private:
    const uint8_t* d_;
    uint64_t size_;
    uint64_t pos_ = 0;
    const std::string& path_;
    File& f_;
    std::string ctx_;  // the entry being read, for messages: "metadata key 'x' (entry 3 at byte 120)"
    // false while the elements of a nested array are validated at open: nothing is recorded for
    // them (File::expand re-parses one when it is read), so memory for the parsed structure is
    // at most one uint64 per string of a top-level string array (each takes >= 8 file bytes).
    bool record_ = true;
    bool expanding_ = false;  // set by nested_at()

    uint64_t left() const { return size_ - pos_; }

    [[noreturn]] void fail(const std::string& what, uint64_t at) const {
        throw FormatError(path_ + ": corrupt GGUF file: " + (ctx_.empty() ? "" : ctx_ + ": ") + what + " (at byte " +
                          std::to_string(at) + ")");
    }
    [[noreturn]] void truncated(const std::string& what, uint64_t need, uint64_t at) const {
        throw FormatError(path_ + ": corrupt or truncated GGUF file: " + (ctx_.empty() ? "" : ctx_ + ": ") + what +
                          " needs " + std::to_string(need) + " bytes at byte " + std::to_string(at) + ", only " +
                          std::to_string(size_ - std::min(at, size_)) + " remain in the file (" +
                          std::to_string(size_) + " bytes)");
    }

    void need(uint64_t n, const char* what) const {
        if (n > left()) truncated(what, n, pos_);
    }
    template <typename T>
    T rd(const char* what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, d_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    // A GGUF string: u64 length + bytes. Returns the bytes; *len_at = offset of the length field.
    std::string_view str(const char* what, uint64_t* len_at = nullptr) {
        const uint64_t at = pos_;
        const uint64_t n = rd<uint64_t>(what);
        if (n > left()) truncated(std::string(what) + " of " + std::to_string(n) + " bytes", n, pos_);
        std::string_view s(reinterpret_cast<const char*>(d_ + pos_), static_cast<size_t>(n));
        pos_ += n;
        if (len_at) *len_at = at;
        return s;
    }
    ValueType type_id(const char* what) {
        const uint64_t at = pos_;
        const uint32_t t = rd<uint32_t>(what);
        if (t >= kValueTypeCount) fail(std::string("unknown ") + what + " " + std::to_string(t) + " (valid: 0-12)", at);
        return static_cast<ValueType>(t);
    }
    void check_bools(uint64_t at, uint64_t n) const {
        for (uint64_t i = 0; i < n; i++)
            if (d_[at + i] > 1)
                fail("bool byte " + std::to_string(d_[at + i]) + " is neither 0 nor 1 (docs/gguf.md)", at + i);
    }
    // The name that starts entry i of a section ("metadata" key / "tensor" name), checked to be
    // valid UTF-8 (and non-empty for keys, as gguf.cpp); from then on ctx_ names the entry.
    std::string_view entry_name(const char* section, const char* what, uint64_t i, bool empty_ok) {
        const uint64_t at = pos_;
        const std::string where = "(entry " + std::to_string(i) + " at byte " + std::to_string(at) + ")";
        ctx_ = std::string(section) + " entry " + std::to_string(i) + " at byte " + std::to_string(at);
        const std::string_view s = str(what);
        if (s.empty() && !empty_ok) fail(std::string("empty ") + what, at);
        if (size_t bad = utf8_error_at(s); bad != std::string_view::npos)
            fail(std::string(what) + " is not valid UTF-8", at + 8 + bad);
        ctx_ = std::string(section) + (section[0] == 'm' ? " key " : " ") + quoted(s) + " " + where;
        return s;
    }
    Value value(ValueType t, int depth);
    void metadata(uint64_t n_kv);
    void alignment();
    void tensor_table(uint64_t n_tensors);
    void tensor_ranges();
    template <typename Name, typename Offset>
    void unique(size_t n, Name name_of, Offset offset_of, const char* what);
};

Value Parser::value(ValueType t, int depth) {
    Value v;
    v.type = t;
    v.offset = pos_;
    if (t == ValueType::STRING) {
        str("string value");
        return v;
    }
    if (t != ValueType::ARRAY) {
        const size_t sz = kTypeSizes[static_cast<uint32_t>(t)];
        need(sz, kTypeNames[static_cast<uint32_t>(t)]);
        if (t == ValueType::BOOL) check_bools(pos_, 1);
        pos_ += sz;
        return v;
    }
    // Array: element type, count, elements. Every count is bounded by the bytes left before
    // anything is reserved (an element takes >= 1, 8 or 12 bytes), so a flipped length byte
    // fails here at once instead of walking or allocating.
    if (depth >= kMaxDepth) fail("arrays nested more than " + std::to_string(kMaxDepth) + " deep", pos_);
    v.is_array = true;
    v.type = type_id("array element type");
    const uint64_t count_at = pos_;
    v.count = rd<uint64_t>("array length");
    v.offset = pos_;
    const uint32_t et = static_cast<uint32_t>(v.type);
    const uint64_t min_elem = v.type == ValueType::STRING  ? 8
                              : v.type == ValueType::ARRAY ? kMinArrayBytes
                                                           : kTypeSizes[et];
    if (v.count > left() / min_elem)
        fail("array of " + std::to_string(v.count) + " " + kTypeNames[et] + " elements cannot fit in the " +
                 std::to_string(left()) + " bytes left (each takes at least " + std::to_string(min_elem) + ")",
             count_at);
    if (v.type == ValueType::STRING) {
        v.first = f_.string_offsets.size();
        if (record_) f_.string_offsets.reserve(f_.string_offsets.size() + v.count);
        for (uint64_t i = 0; i < v.count; i++) {
            const uint64_t at = pos_;
            const uint64_t n = left() < 8 ? ~uint64_t(0) : rd<uint64_t>("string length");
            if (n > left()) {  // only now build the element's name for the message
                ctx_ += ", element " + std::to_string(i) + " of " + std::to_string(v.count);
                if (n == ~uint64_t(0)) truncated("string length", 8, at);
                truncated("string of " + std::to_string(n) + " bytes", n, pos_);
            }
            pos_ += n;
            if (record_) f_.string_offsets.push_back(at);
        }
    } else if (v.type == ValueType::ARRAY) {
        // Each element is an array header (element type, count) + its elements.
        if (!record_ || !expanding_) {  // at open: validate only, record nothing (see record_)
            const bool was = record_;
            record_ = false;
            for (uint64_t i = 0; i < v.count; i++) value(ValueType::ARRAY, depth + 1);
            record_ = was;
            return v;
        }
        // File::expand: record the elements. Reserve their slots first: the recursion appends
        // grandchildren after them.
        v.first = f_.children.size();
        f_.children.resize(f_.children.size() + v.count);
        for (uint64_t i = 0; i < v.count; i++) {
            const Value c = value(ValueType::ARRAY, depth + 1);
            f_.children[v.first + i] = c;
        }
    } else {
        const uint64_t nbytes = v.count * kTypeSizes[et];  // <= left(): no overflow
        if (v.type == ValueType::BOOL) check_bools(pos_, v.count);
        pos_ += nbytes;
    }
    return v;
}

// Fails on the first name that occurs twice (sorted, so n log n whatever the names are).
template <typename Name, typename Offset>
void Parser::unique(size_t n, Name name_of, Offset offset_of, const char* what) {
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), size_t(0));
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
        const std::string_view x = name_of(a), y = name_of(b);
        return x != y ? x < y : a < b;
    });
    for (size_t i = 1; i < n; i++) {
        if (name_of(order[i]) == name_of(order[i - 1])) {
            ctx_.clear();
            const size_t later = std::max(order[i], order[i - 1]), earlier = std::min(order[i], order[i - 1]);
            fail(std::string("duplicate ") + what + " " + quoted(name_of(later)) + " (entries " +
                     std::to_string(earlier) + " and " + std::to_string(later) + ")",
                 offset_of(later));
        }
    }
}

void Parser::metadata(uint64_t n_kv) {
    f_.kvs.reserve(n_kv);
    for (uint64_t i = 0; i < n_kv; i++) {
        KV kv;
        kv.offset = pos_;
        kv.key = entry_name("metadata", "key", i, false);
        kv.value = value(type_id("value type"), 0);
        f_.kvs.push_back(kv);
    }
    ctx_.clear();
    unique(
        f_.kvs.size(), [&](size_t i) { return f_.kvs[i].key; }, [&](size_t i) { return f_.kvs[i].offset; },
        "metadata key");
}

void Parser::alignment() {
    for (const KV& kv : f_.kvs) {
        if (kv.key != "general.alignment") continue;
        ctx_ = "metadata key 'general.alignment'";
        if (kv.value.is_array || kv.value.type != ValueType::U32)
            fail(std::string("must be a uint32, not ") +
                     (kv.value.is_array ? "an array" : kTypeNames[uint32_t(kv.value.type)]),
                 kv.offset);
        uint32_t a;
        std::memcpy(&a, d_ + kv.value.offset, 4);
        if (a == 0 || (a & (a - 1)) != 0) fail(std::to_string(a) + " is not a power of two", kv.value.offset);
        f_.alignment = a;
    }
    ctx_.clear();
}

void Parser::tensor_table(uint64_t n_tensors) {
    f_.tensors.reserve(n_tensors);
    for (uint64_t i = 0; i < n_tensors; i++) {
        TensorInfo ti;
        ti.info_offset = pos_;
        ti.name = entry_name("tensor", "tensor name", i, true);
        const uint64_t dims_at = pos_;
        ti.n_dims = rd<uint32_t>("n_dims");
        if (ti.n_dims > 4) fail(std::to_string(ti.n_dims) + " dimensions (at most 4, GGML_MAX_DIMS)", dims_at);
        // Element count, overflow-checked (gguf.cpp). Zero dimensions are skipped in the product:
        // a zero-element tensor whose other extents multiply past 2^60 cannot be viewed by
        // numpy either (its array-size check ignores zeros), so it is refused like an overflow.
        constexpr uint64_t kMaxExtent = uint64_t(std::numeric_limits<int64_t>::max()) / 8;  // 8 = largest itemsize
        uint64_t nz = 1;
        bool overflow = false, any_zero = false;
        for (uint32_t j = 0; j < ti.n_dims; j++) {
            const uint64_t at = pos_;
            const uint64_t d = rd<uint64_t>("dimension");
            if (d > uint64_t(std::numeric_limits<int64_t>::max()))
                fail("dimension " + std::to_string(j) + " = " + std::to_string(d) + " is >= 2^63", at);
            ti.ne[j] = static_cast<int64_t>(d);
            if (d == 0) {
                any_zero = true;
            } else if (nz > kMaxExtent / d) {
                overflow = true;
            } else {
                nz *= d;
            }
        }
        if (overflow) fail("the element count of its shape overflows int64", dims_at);
        ti.n_elements = any_zero ? 0 : nz;
        const uint64_t type_at = pos_;
        const uint32_t tid = rd<uint32_t>("ggml type");
        const TypeLayout* lay = type_layout(static_cast<int32_t>(tid));
        if (tid > uint32_t(std::numeric_limits<int32_t>::max()) || lay == nullptr)
            fail("unknown ggml type " + std::to_string(tid), type_at);
        ti.type = static_cast<int32_t>(tid);
        if (ti.ne[0] % lay->block_size != 0)
            fail("rows of " + std::to_string(ti.ne[0]) + " values are not whole " + lay->name + " blocks of " +
                     std::to_string(lay->block_size),
                 dims_at);
        const uint64_t blocks = ti.n_elements / uint64_t(lay->block_size);
        if (blocks > std::numeric_limits<uint64_t>::max() / uint64_t(lay->type_size))
            fail("its size in bytes overflows", dims_at);
        ti.nbytes = blocks * uint64_t(lay->type_size);
        ti.offset = rd<uint64_t>("data offset");  // relative until tensor_ranges()
        f_.tensors.push_back(ti);
    }
    ctx_.clear();
    unique(
        f_.tensors.size(), [&](size_t i) { return f_.tensors[i].name; },
        [&](size_t i) { return f_.tensors[i].info_offset; }, "tensor name");
}

void Parser::tensor_ranges() {
    // Data section start: the end of the tensor table rounded up to the alignment.
    const uint64_t a = f_.alignment;
    const uint64_t pad = (a - pos_ % a) % a;
    f_.data_offset = pos_ + pad;  // pos_ <= size_ < 2^63: no overflow
    for (size_t i = 0; i < f_.tensors.size(); i++) {
        TensorInfo& ti = f_.tensors[i];
        ctx_ = "tensor " + quoted(ti.name) + " (entry " + std::to_string(i) + " at byte " +
               std::to_string(ti.info_offset) + ")";
        const uint64_t rel = ti.offset;
        if (rel % a != 0)
            fail("data offset " + std::to_string(rel) + " is not a multiple of the alignment " + std::to_string(a) +
                     " (docs/gguf.md)",
                 ti.info_offset);
        if (rel > size_ || f_.data_offset > size_ - rel || ti.nbytes > size_ - rel - f_.data_offset) {
            const bool start_out = rel > size_ || f_.data_offset > size_ - rel;
            throw FormatError(path_ + ": corrupt or truncated GGUF file: " + ctx_ + ": its " +
                              std::to_string(ti.nbytes) + " bytes of data at offset " + std::to_string(rel) +
                              " in the data section (byte " +
                              (start_out ? std::string("past the end") : std::to_string(f_.data_offset + rel)) +
                              ") run past the end of the file (" + std::to_string(size_) + " bytes)");
        }
        ti.offset = f_.data_offset + rel;
    }
    ctx_.clear();
}

void Parser::run() {
    if (size_ < kHeaderBytes)
        throw FormatError(path_ + ": not a GGUF file (" + std::to_string(size_) +
                          " bytes, too small for a GGUF header)");
    if (std::memcmp(d_, "GGUF", 4) != 0) {
        std::string m;
        for (int i = 0; i < 4; i++) {
            const unsigned char c = d_[i];
            if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
                m += char(c);
            } else {
                char buf[8];
                std::snprintf(buf, sizeof buf, "\\x%02x", c);
                m += buf;
            }
        }
        throw FormatError(path_ + ": not a GGUF file (magic b'" + m + "', expected b'GGUF')");
    }
    pos_ = 4;
    f_.version = rd<uint32_t>("version");
    if ((f_.version & 0xFFFF) == 0)  // gguf.cpp: a byte-swapped version reads as 0xVV000000
        throw FormatError(path_ + ": unsupported GGUF version " + std::to_string(f_.version) +
                          ": a big-endian GGUF file (its tensor data is big-endian too), not supported");
    if (f_.version != 2 && f_.version != 3)
        throw FormatError(path_ + ": unsupported GGUF version " + std::to_string(f_.version) +
                          " (supported: 2, 3; version 1 is obsolete, its lengths are 32-bit)");
    const uint64_t n_tensors = rd<uint64_t>("tensor count");
    const uint64_t n_kv = rd<uint64_t>("metadata count");
    const uint64_t rest = left();
    if (n_kv > rest / kMinKVBytes || n_tensors > rest / kMinTensorBytes ||
        n_kv * kMinKVBytes > rest - n_tensors * kMinTensorBytes)
        throw FormatError(path_ + ": corrupt or truncated GGUF header: " + std::to_string(n_tensors) + " tensors and " +
                          std::to_string(n_kv) + " metadata entries cannot fit in the " + std::to_string(rest) +
                          " bytes after the header");
    metadata(n_kv);
    alignment();
    tensor_table(n_tensors);
    tensor_ranges();
}

}  // namespace

const char* value_type_name(ValueType t) {
    const uint32_t i = static_cast<uint32_t>(t);
    return i < kValueTypeCount ? kTypeNames[i] : "unknown";
}

size_t value_type_size(ValueType t) {
    const uint32_t i = static_cast<uint32_t>(t);
    return i < kValueTypeCount ? kTypeSizes[i] : 0;
}

size_t utf8_error_at(std::string_view s) {
    const auto* p = reinterpret_cast<const unsigned char*>(s.data());
    const size_t n = s.size();
    size_t i = 0;
    while (i < n) {
        const unsigned char c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2, cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3, cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4, cp = c & 0x07;
        } else {
            return i;  // continuation byte, 0xC0/0xC1 (overlong) or > 0xF4
        }
        if (n - i < len) return i;
        for (size_t k = 1; k < len; k++) {
            if ((p[i + k] & 0xC0) != 0x80) return i;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
            (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
            return i;  // overlong, surrogate or beyond Unicode
        i += len;
    }
    return std::string_view::npos;
}

// ---------------------------------------------------------------------------
std::shared_ptr<const Mapping> Mapping::open(const std::string& path) {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) throw FormatError(path + ": cannot open the file (" + std::strerror(errno) + ")");
    struct stat st;
    if (fstat(fd, &st) != 0) {
        const int e = errno;
        ::close(fd);
        throw FormatError(path + ": cannot stat the file (" + std::strerror(e) + ")");
    }
    if (!S_ISREG(st.st_mode)) {
        ::close(fd);
        throw FormatError(path + ": model path is not a regular file");
    }
    std::shared_ptr<Mapping> m(new Mapping());
    m->path_ = path;
    m->size_ = static_cast<uint64_t>(st.st_size);
    if (m->size_ == 0) {  // mmap of 0 bytes fails; Parser reports "too small"
        ::close(fd);
        static const uint8_t empty = 0;
        m->data_ = &empty;
        return m;
    }
    void* p = mmap(nullptr, static_cast<size_t>(m->size_), PROT_READ, MAP_SHARED, fd, 0);
    const int e = errno;
    ::close(fd);  // the mapping keeps the file open
    if (p == MAP_FAILED) throw FormatError(path + ": cannot map the file (" + std::strerror(e) + ")");
    m->data_ = static_cast<const uint8_t*>(p);
    return m;
}

Mapping::~Mapping() {
    if (size_ != 0 && data_ != nullptr) munmap(const_cast<uint8_t*>(data_), static_cast<size_t>(size_));
}

std::shared_ptr<const File> File::parse(std::shared_ptr<const Mapping> map) {
    std::shared_ptr<File> f(new File());
    f->map_ = std::move(map);
    Parser(*f->map_, *f).run();
    return f;
}

std::shared_ptr<const File> File::expand(const Value& nested, Value* root) const {
    std::shared_ptr<File> f(new File());
    f->map_ = map_;
    f->version = version;
    f->alignment = alignment;
    // The array header (element type u32, count u64) sits just before the first element.
    *root = Parser(*map_, *f).nested_at(nested.offset - 12);
    return f;
}

std::string_view File::string_at(uint64_t offset) const {
    uint64_t n;
    std::memcpy(&n, map_->data() + offset, 8);
    return std::string_view(reinterpret_cast<const char*>(map_->data() + offset + 8), static_cast<size_t>(n));
}

}  // namespace mq::gguf
