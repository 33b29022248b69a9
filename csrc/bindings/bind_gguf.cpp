// Python face of the GGUF reader (csrc/gguf): `_core.gguf_open(path) -> GGUFReader`.
// mllama_q/gguf_file.py wraps it into the GGUFFile API (CONTRACTS.md section A).
//
// Zero copy: `GGUFReader.buffer` is ONE read-only uint8 array [file size] over the mapping,
// whose base (a capsule) owns a reference to the mapping. Every numeric metadata array and
// every tensor view is a slice of it, so the mapping lives until the last view dies, whatever
// happens to the reader (closing the file while arrays are alive is safe). String arrays come
// back as GGUFStringArray: strings are decoded one at a time when asked for, and the
// tokenizer's vocabulary / merges can be serialised to JSON in one pass without any
// per-element Python object.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "bindings/bindings.h"
#include "common/formats.h"
#include "gguf/gguf_reader.h"

namespace py = pybind11;
using namespace mq::gguf;

namespace mq::bind {

namespace {

// numpy dtype of one element of each fixed-size metadata type (indexed by ValueType).
const char* const kNumpyType[kValueTypeCount] = {"<u1", "<i1", "<u2", "<i2", "<u4", "<i4", "<f4",
                                                 "?",   "",    "",    "<u8", "<i8", "<f8"};

py::str decode(std::string_view s, const std::string& what, uint64_t at) {
    PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "strict");
    if (o == nullptr) {
        PyErr_Clear();
        const size_t bad = utf8_error_at(s);
        throw FormatError(what + ": the string is not valid UTF-8 (at byte " +
                          std::to_string(at + 8 + (bad == std::string_view::npos ? 0 : bad)) + ")");
    }
    return py::reinterpret_steal<py::str>(o);
}

// JSON string literal of valid UTF-8 (RFC 8259: escape '"', '\' and control characters).
void append_json(std::string& out, std::string_view s) {
    static const char hex[] = "0123456789abcdef";
    out += '"';
    for (const char ch : s) {
        const unsigned char c = static_cast<unsigned char>(ch);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += ch;
        } else if (c < 0x20) {
            out += "\\u00";
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            out += ch;
        }
    }
    out += '"';
}

// The reader as Python holds it: the parsed file plus the buffer array over its mapping.
struct Reader {
    std::shared_ptr<const File> f;
    py::object buffer;  // read-only uint8 [size]; None after close()
};

// A metadata array of strings, decoded lazily. Holds the parsed file (and so the mapping).
class StringArray {
public:
    StringArray(std::shared_ptr<const File> f, const Value& v, std::string key)
        : f_(std::move(f)), first_(v.first), count_(v.count), key_(std::move(key)) {}

    size_t size() const { return static_cast<size_t>(count_); }

    std::string_view raw(size_t i) const { return f_->string_at(offset(i)); }
    uint64_t offset(size_t i) const { return f_->string_offsets[first_ + i]; }

    py::str get(size_t i) const { return decode(raw(i), where(i), offset(i)); }

    py::object getitem(py::object index) const {
        if (py::isinstance<py::slice>(index)) {
            size_t start, stop, step, n;
            if (!index.cast<py::slice>().compute(size(), &start, &stop, &step, &n)) throw py::error_already_set();
            py::list out(n);
            for (size_t k = 0; k < n; k++) out[k] = get(start + k * step);
            return std::move(out);
        }
        // Any integer-like index (numpy ints too); one beyond int64 is simply out of range.
        auto as_int = py::reinterpret_steal<py::object>(PyNumber_Index(index.ptr()));
        if (!as_int) throw py::error_already_set();  // TypeError: not an integer
        long long i = PyLong_AsLongLong(as_int.ptr());
        const bool overflow = i == -1 && PyErr_Occurred();
        if (overflow) PyErr_Clear();
        if (!overflow && i < 0) i += static_cast<long long>(size());
        if (overflow || i < 0 || static_cast<uint64_t>(i) >= count_)
            throw py::index_error("index " + py::str(index).cast<std::string>() + " out of range for " + key_ + " (" +
                                  std::to_string(count_) + " strings)");
        return get(static_cast<size_t>(i));
    }

    py::list tolist() const {
        py::list out(size());
        for (size_t i = 0; i < size(); i++) out[i] = get(i);
        return out;
    }

    // '["a","b",...]'
    py::str json_list() const {
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = build([&](std::string& o, size_t i) { checked_json(o, i, raw(i)); }, '[', ']');
        }
        return py::str(out);
    }

    // '{"tok0":0,"tok1":1,...}' (the tokenizers BPE "vocab"); fails on a repeated string,
    // which a JSON object cannot hold.
    py::str json_vocab() const {
        std::string out;
        {
            py::gil_scoped_release nogil;
            std::vector<size_t> order(size());
            for (size_t i = 0; i < size(); i++) order[i] = i;
            std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
                const auto x = raw(a), y = raw(b);
                return x != y ? x < y : a < b;
            });
            for (size_t k = 1; k < order.size(); k++)
                if (raw(order[k]) == raw(order[k - 1])) {
                    const size_t a = std::min(order[k], order[k - 1]), b = std::max(order[k], order[k - 1]);
                    throw FormatError(where(b) + ": duplicate of element " + std::to_string(a) + " (at byte " +
                                      std::to_string(offset(b)) + ")");
                }
            out = build(
                [&](std::string& o, size_t i) {
                    checked_json(o, i, raw(i));
                    o += ':';
                    o += std::to_string(i);
                },
                '{', '}');
        }
        return py::str(out);
    }

    // '[["l","r"],...]': each "left right" merge split at its first space (the tokenizers BPE
    // "merges" in pair form, tokenizers >= 0.20); a merge without a space is an error.
    py::str json_merges() const {
        std::string out;
        {
            py::gil_scoped_release nogil;
            out = build(
                [&](std::string& o, size_t i) {
                    const std::string_view s = raw(i);
                    const size_t sp = s.find(' ');
                    if (sp == std::string_view::npos)
                        throw FormatError(where(i) + ": merge " + std::string(s.substr(0, 80)) +
                                          " has no space between its two parts (at byte " + std::to_string(offset(i)) +
                                          ")");
                    o += '[';
                    checked_json(o, i, s.substr(0, sp));
                    o += ',';
                    checked_json(o, i, s.substr(sp + 1));
                    o += ']';
                },
                '[', ']');
        }
        return py::str(out);
    }

    std::string repr() const { return "<GGUF string array " + key_ + ", " + std::to_string(count_) + " strings>"; }

private:
    std::shared_ptr<const File> f_;
    uint64_t first_, count_;
    std::string key_;

    std::string where(size_t i) const {
        return f_->path() + ": metadata " + key_ + ", element " + std::to_string(i) + " of " + std::to_string(count_);
    }
    void checked_json(std::string& o, size_t i, std::string_view s) const {
        const size_t bad = utf8_error_at(s);
        if (bad != std::string_view::npos)
            throw FormatError(where(i) + ": the string is not valid UTF-8 (at byte " +
                              std::to_string(offset(i) + 8 + (s.data() - raw(i).data()) + bad) + ")");
        append_json(o, s);
    }
    template <typename Emit>
    std::string build(Emit emit, char open, char close) const {
        size_t bytes = 2;
        for (size_t i = 0; i < size(); i++) bytes += raw(i).size() + 12;  // quotes, separators, an id
        std::string o;
        o.reserve(bytes);
        o += open;
        for (size_t i = 0; i < size(); i++) {
            if (i) o += ',';
            emit(o, i);
        }
        o += close;
        return o;
    }
};

template <typename T>
T load(const uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}

// Nested arrays are named by their first element's type (empty: "array[array]"), read straight
// from the element headers: each is u32 element type + u64 count (+ elements).
std::string type_string(const File& f, const Value& v) {
    if (!v.is_array) return value_type_name(v.type);
    if (v.type != ValueType::ARRAY) return std::string("array[") + value_type_name(v.type) + "]";
    std::string out = "array[", close = "]";
    uint64_t at = v.offset;  // first element: an array header
    uint64_t count = v.count;
    for (int depth = 0; count > 0; depth++) {
        const ValueType et = static_cast<ValueType>(load<uint32_t>(f.map().data() + at));
        std::memcpy(&count, f.map().data() + at + 4, 8);
        out += "array[";
        close += "]";
        if (et != ValueType::ARRAY) return out + value_type_name(et) + close;
        at += 12;
    }
    return out + "array" + close;
}

py::object scalar(const Reader& r, const Value& v, const std::string& key) {
    const uint8_t* p = r.f->map().data() + v.offset;
    switch (v.type) {
        case ValueType::U8: return py::int_(load<uint8_t>(p));
        case ValueType::I8: return py::int_(load<int8_t>(p));
        case ValueType::U16: return py::int_(load<uint16_t>(p));
        case ValueType::I16: return py::int_(load<int16_t>(p));
        case ValueType::U32: return py::int_(load<uint32_t>(p));
        case ValueType::I32: return py::int_(load<int32_t>(p));
        case ValueType::U64: return py::int_(load<uint64_t>(p));
        case ValueType::I64: return py::int_(load<int64_t>(p));
        case ValueType::F32: return py::float_(static_cast<double>(load<float>(p)));
        case ValueType::F64: return py::float_(load<double>(p));
        case ValueType::BOOL: return py::bool_(*p != 0);
        case ValueType::STRING:
            return decode(r.f->string_at(v.offset), r.f->path() + ": metadata '" + key + "'", v.offset);
        default: break;
    }
    throw FormatError(r.f->path() + ": metadata '" + key + "': unexpected value type");
}

py::object to_py(const Reader& r, const Value& v, const std::string& key, bool expanded = false) {
    if (!v.is_array) return scalar(r, v, key);
    if (v.type == ValueType::STRING) return py::cast(StringArray(r.f, v, "'" + key + "'"));
    if (v.type == ValueType::ARRAY) {
        if (!expanded) {  // a top-level nested array: parse its elements now (gguf_reader.h Value)
            Value root;
            Reader sub{r.f->expand(v, &root), r.buffer};
            return to_py(sub, root, key, true);
        }
        py::list out(static_cast<size_t>(v.count));
        for (uint64_t i = 0; i < v.count; i++)
            out[i] = to_py(r, r.f->children[v.first + i], key + "[" + std::to_string(i) + "]", true);
        return std::move(out);
    }
    // Numeric / bool array: a read-only slice of the buffer viewed as the element type.
    const uint64_t nbytes = v.count * value_type_size(v.type);
    py::object sl = r.buffer[py::slice(py::int_(v.offset), py::int_(v.offset + nbytes), py::none())];
    return sl.attr("view")(py::dtype(kNumpyType[static_cast<uint32_t>(v.type)]));
}

const Reader& open_reader(const Reader& r) {
    if (!r.f) throw std::invalid_argument("the GGUF file is closed");
    return r;
}

}  // namespace

void register_gguf(py::module_& m) {
    // C++ FormatError -> mllama_q.gguf_file.ModelFileError (ValueError if that module is absent).
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const FormatError& e) {
            PyObject* cls = PyExc_ValueError;
            py::object mfe;
            try {
                mfe = py::module_::import("mllama_q.gguf_file").attr("ModelFileError");
                cls = mfe.ptr();
            } catch (py::error_already_set&) { PyErr_Clear(); }
            PyErr_SetString(cls, e.what());
        }
    });

    py::class_<StringArray>(m, "GGUFStringArray",
                            "A GGUF metadata array of strings, decoded one element at a time when asked for.")
        .def("__len__", &StringArray::size)
        .def("__getitem__", &StringArray::getitem)
        .def("__iter__", [](const StringArray& s) { return py::iter(s.tolist()); })
        .def("tolist", &StringArray::tolist, "Every string as a Python list.")
        .def(
            "raw",
            [](const StringArray& s, size_t i) {
                if (i >= s.size()) throw py::index_error("string index out of range");
                const auto b = s.raw(i);
                return py::bytes(b.data(), b.size());
            },
            py::arg("i"), "The undecoded bytes of element i.")
        .def("json_list", &StringArray::json_list, "JSON list of the strings.")
        .def("json_vocab", &StringArray::json_vocab,
             "JSON object {string: index}; ModelFileError on a repeated string.")
        .def("json_merges", &StringArray::json_merges,
             "JSON list of [left, right] pairs, each element split at its first space.")
        .def("__repr__", &StringArray::repr);

    py::class_<Reader>(m, "GGUFReader", "A parsed, memory-mapped GGUF file (mllama_q.gguf_file.GGUFFile wraps it).")
        .def_property_readonly("path", [](const Reader& r) { return open_reader(r).f->path(); })
        .def_property_readonly("version", [](const Reader& r) { return open_reader(r).f->version; })
        .def_property_readonly("alignment", [](const Reader& r) { return open_reader(r).f->alignment; })
        .def_property_readonly("data_offset", [](const Reader& r) { return open_reader(r).f->data_offset; })
        .def_property_readonly("size", [](const Reader& r) { return open_reader(r).f->map().size(); })
        .def_property_readonly(
            "buffer", [](const Reader& r) { return open_reader(r).buffer; },
            "Read-only uint8 array over the whole mapped file.")
        .def(
            "keys",
            [](const Reader& r) {
                const File& f = *open_reader(r).f;
                py::list out(f.kvs.size());
                for (size_t i = 0; i < f.kvs.size(); i++)
                    out[i] = decode(f.kvs[i].key, f.path() + ": key", f.kvs[i].offset);
                return out;
            },
            "Metadata keys in file order.")
        .def(
            "kv_type",
            [](const Reader& r, size_t i) {
                const File& f = *open_reader(r).f;
                if (i >= f.kvs.size()) throw py::index_error("metadata index out of range");
                return type_string(f, f.kvs[i].value);
            },
            py::arg("i"), "Type of metadata entry i: 'uint32', 'string', 'array[string]', 'array[array[int32]]', ...")
        .def(
            "kv_offset",
            [](const Reader& r, size_t i) {
                const File& f = *open_reader(r).f;
                if (i >= f.kvs.size()) throw py::index_error("metadata index out of range");
                return f.kvs[i].offset;
            },
            py::arg("i"), "Byte offset of metadata entry i (its key's length field).")
        .def(
            "kv_value",
            [](const Reader& r, size_t i) {
                const File& f = *open_reader(r).f;
                if (i >= f.kvs.size()) throw py::index_error("metadata index out of range");
                return to_py(r, f.kvs[i].value, std::string(f.kvs[i].key));
            },
            py::arg("i"),
            "Value of metadata entry i: int / float / bool / str, a read-only numpy view (numeric arrays), "
            "a GGUFStringArray (string arrays) or a list (nested arrays).")
        .def(
            "tensors",
            [](const Reader& r) {
                const File& f = *open_reader(r).f;
                py::list out(f.tensors.size());
                for (size_t i = 0; i < f.tensors.size(); i++) {
                    const TensorInfo& t = f.tensors[i];
                    py::tuple ne(t.n_dims);
                    for (uint32_t j = 0; j < t.n_dims; j++) ne[j] = py::int_(t.ne[j]);
                    out[i] = py::make_tuple(decode(t.name, f.path() + ": tensor name", t.info_offset), t.type, ne,
                                            t.offset, t.nbytes, t.n_elements, t.info_offset);
                }
                return out;
            },
            "Tensor table in file order: (name, ggml_type, ne in GGUF order, absolute offset, nbytes, "
            "n_elements, table entry offset).")
        .def(
            "close",
            [](Reader& r) {
                r.f.reset();
                r.buffer = py::none();
            },
            "Drop this reader's reference to the mapping (arrays taken from it stay valid).");

    m.def(
        "gguf_open",
        [](const std::string& path) {
            std::shared_ptr<const File> f;
            {
                py::gil_scoped_release nogil;
                f = File::parse(Mapping::open(path));
            }
            Reader r;
            r.f = f;
            auto* keep = new std::shared_ptr<const Mapping>(f->map_ptr());
            py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<const Mapping>*>(p); });
            py::array buf(py::dtype("uint8"), {static_cast<py::ssize_t>(f->map().size())}, {py::ssize_t(1)},
                          f->map().data(), owner);
            // PROT_READ pages: a write through the array would fault, so numpy must refuse it.
            py::detail::array_proxy(buf.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
            r.buffer = buf;
            return r;
        },
        py::arg("path"),
        "Map and parse a GGUF file; raises mllama_q.gguf_file.ModelFileError naming the entry and byte "
        "offset of the first problem.");

    m.def(
        "ggml_type_layouts",
        [] {
            py::dict out;
            size_t n = 0;
            const TypeLayout* t = all_type_layouts(&n);
            for (size_t i = 0; i < n; i++)
                out[py::int_(t[i].id)] = py::make_tuple(t[i].name, t[i].block_size, t[i].type_size);
            return out;
        },
        "{ggml type id: (name, block size, bytes per block)} for every type a GGUF may carry.");
}

}  // namespace mq::bind
